"""Samples in batches for the runner, without giving up per-sample commits.

An experiment that can compute several samples together (``analyse_batch``, e.g.
:meth:`FlowSettings.analyse_batch <vlmflow.experiments.settings.FlowSettings.analyse_batch>`) gets
them ``batch_size`` at a time; its results are still handed back (and committed by the runner)
one sample at a time, in data order, so resuming, error rows and progress work as with one sample:

* a sample that cannot be prepared (missing image, bad box) is its error row; its batch goes on
  without it;
* a problem the experiment pins on one sample (:class:`~vlmflow.errors.SampleError` in that
  sample's place) is that sample's error row; the others keep their rows;
* an error the batch as a whole raises (out of memory, or a :class:`SampleError` not pinned on a
  sample) splits the batch in halves, each computed again, down to single samples, where it
  becomes that sample's error row as in an unbatched run. After an out-of-memory error the batch
  size stays halved for the rest of the run.

The batch size is the experiment's ``batch_size`` or, when that is ``None``, chosen here: 1 on CPU
(:func:`auto_batch_size` on CUDA, from the free memory and the first sample's length).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from vlmflow.data.sample import Sample
from vlmflow.errors import SampleError
from vlmflow.experiments.prepare import PreparedSample
from vlmflow.knockout.fast import release_cached_memory
from vlmflow.loading import LoadedModel
from vlmflow.results.tables import ErrorRow, Row

__all__ = ["MAX_AUTO_BATCH", "auto_batch_size", "batched_tables", "error_tables", "free_memory", "memory_error_tables", "memory_reason", "per_sample_bytes"]

log = logging.getLogger(__name__)

Tables = dict[str, list[Row]]
#: Prepares one sample (raises :class:`SampleError` for a bad one).
Prepare = Callable[[Sample], PreparedSample]

#: The largest batch the automatic choice makes (beyond it a layer call gains little on any GPU).
MAX_AUTO_BATCH = 32
#: Share of the free accelerator memory the automatic choice plans to use.
MEMORY_SHARE = 0.6


def free_memory() -> None:
    """Release cached accelerator memory after an out-of-memory error (CPU: collect garbage only)."""
    gc.collect()
    release_cached_memory()


def error_tables(sample_id: str, exc: SampleError) -> Tables:
    """The ``errors`` row of a sample that failed at ``exc.stage``."""
    log.warning("sample %s skipped at %s: %s", sample_id, exc.stage, exc.reason)
    return {"errors": [ErrorRow(sample_id=sample_id, stage=exc.stage, reason=exc.reason)]}


def memory_reason(exc: BaseException) -> str:
    """The ``errors`` reason of a sample that ran out of memory even alone at the smallest fold.

    >>> memory_reason(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\\nmore"))
    'out of memory even at the smallest fold size: CUDA out of memory. Tried to allocate 2 GiB'
    """
    text = str(exc).strip()
    return f"out of memory even at the smallest fold size: {text.splitlines()[0] if text else 'no details'}"


def memory_error_tables(sample_id: str, exc: BaseException) -> Tables:
    """The ``errors`` row of a sample that ran out of memory even alone at the smallest fold."""
    reason = memory_reason(exc)
    log.warning("sample %s skipped: %s", sample_id, reason)
    return {"errors": [ErrorRow(sample_id=sample_id, stage="memory", reason=reason)]}


def per_sample_bytes(config: Any, seq_len: int, *, dtype_bytes: int, new_tokens: int = 12, fold_rows: int = 1024) -> int:
    """An upper estimate of the accelerator memory one sample of a batch holds at once (bytes).

    Its clean keys/values and kept hidden states (from position 0: the most any flow keeps), plus
    the larger of its share of a prefill layer call and of a fold layer call (``fold_rows`` query
    rows with float32 scores against every key). ``config``: the decoder's (``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``).

    >>> from types import SimpleNamespace
    >>> c = SimpleNamespace(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
    ...                     num_key_value_heads=32, intermediate_size=11008)
    >>> round(per_sample_bytes(c, 634, dtype_bytes=2) / 2**20)   # 323 K/V + 164 kept + 339 fold call
    825
    """
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    ffn = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    keys = seq_len + new_tokens
    kv = 2 * layers * kv_heads * head_dim * keys * dtype_bytes
    kept = (layers + 1) * seq_len * hidden * dtype_bytes
    activations = (4 * hidden + 3 * ffn) * dtype_bytes
    prefill = seq_len * activations + heads * seq_len * keys * 4
    fold = fold_rows * activations + 3 * heads * fold_rows * keys * 4
    return kv + kept + max(prefill, fold)


def auto_batch_size(loaded: LoadedModel, seq_len: int, *, free_bytes: int | None = None, fold_rows: int = 1024) -> int:
    """Samples per batch: 1 on CPU; on CUDA as many as :data:`MEMORY_SHARE` of the free memory holds
    (:func:`per_sample_bytes`, at 1.25 times ``seq_len`` for samples longer than the first), at most
    :data:`MAX_AUTO_BATCH`.

    >>> auto_batch_size(loaded, 2400)       # doctest: +SKIP
    24
    """
    device = loaded.decoder.device
    if free_bytes is None:
        if device.type != "cuda":
            return 1
        free_bytes, _ = torch.cuda.mem_get_info(device)
    config = loaded.decoder.language_model.config
    dtype_bytes = torch.finfo(loaded.decoder.dtype).bits // 8 if loaded.decoder.dtype.is_floating_point else 4
    need = per_sample_bytes(config, int(seq_len * 1.25), dtype_bytes=dtype_bytes, fold_rows=fold_rows)
    return max(1, min(MAX_AUTO_BATCH, int(free_bytes * MEMORY_SHARE) // need))


def batched_tables(
    loaded: LoadedModel, samples: Sequence[Sample], prepare: Prepare, experiment: Any, batch_size: int | None
) -> Iterator[Tables]:
    """Per sample, in data order, the tables to commit: the experiment's, or an ``errors`` row.

    ``experiment.analyse_batch(loaded, prepared)`` computes a batch; ``batch_size`` ``None``: chosen
    automatically from the first sample (:func:`auto_batch_size`).
    """
    pending = iter(samples)
    size = batch_size
    while True:
        batch: list[PreparedSample] = []
        ready: list[Tables | None] = []  # per sample: its error tables, or None (computed below)
        for sample in pending:
            try:
                prepared = prepare(sample)
            except SampleError as exc:
                ready.append(error_tables(sample.sample_id, exc))
                continue
            if size is None:
                size = auto_batch_size(loaded, prepared.encoded.seq_len)
                log.info("batch size %d (automatic)", size)
            batch.append(prepared)
            ready.append(None)
            if len(batch) >= size:
                break
        if not ready:
            return
        computed, size = _analyse(loaded, experiment, batch, size or 1)
        done = iter(computed)
        for tables in ready:
            yield tables if tables is not None else next(done)


def _analyse(loaded: LoadedModel, experiment: Any, batch: list[PreparedSample], size: int) -> tuple[list[Tables], int]:
    """Tables per sample of ``batch`` (computed at most ``size`` at a time), and the batch size to go
    on with (halved after running out of memory)."""
    out: list[Tables] = []
    while batch:
        chunk, batch = batch[:size], batch[size:]
        failure: BaseException | None = None
        try:
            outcomes = experiment.analyse_batch(loaded, chunk)
        except (torch.OutOfMemoryError, SampleError) as exc:
            failure = exc
        if failure is None:
            out += [error_tables(p.sample.sample_id, o) if isinstance(o, SampleError) else o for p, o in zip(chunk, outcomes, strict=True)]
            continue
        # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
        out_of_memory = isinstance(failure, torch.OutOfMemoryError)
        if out_of_memory:
            free_memory()
        if len(chunk) == 1:
            sample_id = chunk[0].sample.sample_id
            out.append(memory_error_tables(sample_id, failure) if out_of_memory else error_tables(sample_id, failure))  # type: ignore[arg-type]
            continue
        half = (len(chunk) + 1) // 2
        if out_of_memory:
            size = min(size, half)
        log.warning("a batch of %d samples failed (%s); computing it again in halves", len(chunk), type(failure).__name__)
        first, size = _analyse(loaded, experiment, chunk[:half], size)
        second, size = _analyse(loaded, experiment, chunk[half:], size)
        out += first + second
    return out, size
