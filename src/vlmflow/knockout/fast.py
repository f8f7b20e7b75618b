"""The fast, exact knockout engine.

Why it is exact: a knockout changes attention only at its target rows, from its first blocked layer
``a`` on. From there a change spreads to every position that attends to a changed position in a
later layer. Let ``t`` be the **first affected position**: the earliest position that can see a
changed position, directly or through later layers, in the clean model's attention pattern
(:class:`~vlmflow.adapters.pattern.AttentionPattern`, layers ``>= a``). Nothing at positions
``< t`` and nothing below layer ``a`` changes, so the result is determined by

* the clean keys/values of positions ``< t`` in every layer (unchanged), and
* the clean hidden states of positions ``>= t`` entering layer ``a`` (unchanged),

and only the suffix ``t..n-1`` has to be recomputed, from layer ``a`` up. For causal attention
``t`` is the first target position; where earlier positions may attend to later ones (a
bidirectional image block, a prefix-LM) :func:`affected_starts` moves ``t`` back as far as needed,
so the same engine stays exact for every family. One clean forward (:mod:`vlmflow.knockout.clean`:
vision tower once, baseline logits, greedy answer) provides both.

Many knockouts (all windows of all flows with the same ``t``) run together "folded" into the query
axis of one batch row, and the folds of several samples share each layer call
(:func:`fast_logits_batch`). How is planned as a pure value (:mod:`vlmflow.knockout.plan`: order, start
layers, branches, per-layer masks, which rows each layer computes); a short executor
(:mod:`vlmflow.knockout.executor`) runs the plan through the attention strategy chosen once per
call (:mod:`vlmflow.knockout.strategy`).

Module-level ablations (:class:`~vlmflow.knockout.ablation.Ablation`) obey the same rule (nothing
changes before their first affected position or below their first layer) and run folded next to
knockouts: their replacements are applied to their own query rows by
:func:`~vlmflow.knockout.ablation.folded_ablation`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.pattern import AttentionPattern
from vlmflow.errors import SampleError
from vlmflow.inputs import Encoded
from vlmflow.knockout.ablation import Ablation, AblationValues, check_ablations, replacement_values
from vlmflow.knockout.clean import CleanRun, clean_run, clean_runs
from vlmflow.knockout.executor import FoldJob, run_folds
from vlmflow.knockout.plan import Intervention, plan_fold
from vlmflow.knockout.precision import final_logits
from vlmflow.knockout.spec import Knockout, check_layers
from vlmflow.knockout.strategy import FoldAttention, choose_strategy

__all__ = [
    "DEFAULT_FOLD_QUERIES",
    "CleanRun",
    "FoldRequest",
    "affected_starts",
    "clean_run",
    "clean_runs",
    "fast_logits",
    "fast_logits_batch",
    "release_cached_memory",
]

log = logging.getLogger(__name__)

#: Default bound on query rows per fold of one sample in a layer call (keeps [query, key] score matrices small).
DEFAULT_FOLD_QUERIES = 1024


@dataclass(frozen=True)
class FoldRequest:
    """One sample's knockouts for :func:`fast_logits_batch`: its encoded prompt, clean run and interventions.

    ``rows``: ``None`` for the last position's logits ``[K, vocab]``; ``R`` for the last ``R`` positions'
    ``[K, R, vocab]`` (the clean run must have kept ``R`` rows, ``clean_run(..., read_rows=R)``).
    """

    encoded: Encoded
    clean: CleanRun
    knockouts: Sequence[Intervention]
    rows: int | None = None

    @property
    def read(self) -> int:
        """``R``, the trailing rows read (1 for the last position)."""
        return 1 if self.rows is None else self.rows


@torch.no_grad()
def fast_logits(
    decoder: DecoderMap,
    encoded: Encoded,
    clean: CleanRun,
    knockouts: Sequence[Intervention],
    *,
    max_fold_queries: int = DEFAULT_FOLD_QUERIES,
    strategy: FoldAttention | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """Last-position logits ``[len(knockouts), vocab]`` (float32) under each knockout, exactly.

    ``rows=R`` reads the last ``R`` positions instead: ``[len(knockouts), R, vocab]`` (the logits of
    a teacher-forced answer of ``R`` tokens appended to the prompt). A position before a knockout's
    first affected position keeps its clean logits, taken from ``clean.row_logits`` (the clean run
    must have kept ``R`` rows: ``clean_run(..., read_rows=R)``).

    Knockouts (and ablations) with the same first affected position (:func:`affected_starts`) run
    folded together; ``max_fold_queries`` bounds the query rows of one fold (more variants are split
    into chunks of similar start layer). Mean ablations cost one extra clean forward for their
    replacement values. On ``torch.OutOfMemoryError`` a chunk is halved and retried, down to one
    variant per call; an OOM with a single variant is raised. ``strategy``: the fold's attention
    (default: :func:`~vlmflow.knockout.strategy.choose_strategy`).

    Raises:
        SampleError: a knockout leaves a query row with no key to attend to.

    >>> logits = fast_logits(decoder, encoded, clean, knockouts)   # doctest: +SKIP
    >>> logits.shape                                               # doctest: +SKIP
    torch.Size([192, 32064])
    """
    (out,) = fast_logits_batch(
        decoder, [FoldRequest(encoded, clean, knockouts, rows)], max_fold_queries=max_fold_queries, strategy=strategy
    )
    if isinstance(out, SampleError):
        raise out
    return out


@torch.no_grad()
def fast_logits_batch(
    decoder: DecoderMap,
    requests: Sequence[FoldRequest],
    *,
    max_fold_queries: int = DEFAULT_FOLD_QUERIES,
    strategy: FoldAttention | None = None,
) -> list[torch.Tensor | SampleError]:
    """:func:`fast_logits` for several samples at once: per request its logits, or the
    :class:`SampleError` its knockouts raise (the other requests' results are kept).

    The folds of different samples share each layer call (the ``i``-th fold of every sample in one
    call, when the strategy packs, :attr:`FoldAttention.packs`); each keeps its own prefix, masks
    and rows, so every result is the one the sample gets alone. On ``torch.OutOfMemoryError`` a
    call is split in halves (fewer samples, then fewer variants) and retried.

    >>> results = fast_logits_batch(decoder, [FoldRequest(e, c, k) for e, c, k in samples])   # doctest: +SKIP
    """
    decoder.check_attention_backend()
    strategy = strategy or choose_strategy(decoder)
    batch = _Batch(decoder, requests, strategy)
    with strategy.session(decoder):
        for call in batch.calls(max_fold_queries):
            batch.run(call)
    # [K, vocab] for a request of the last position, [K, R, vocab] for one of R rows
    logits = [result[:, 0] if request.rows is None else result for request, result in zip(requests, batch.results, strict=True)]
    return [batch.errors.get(r, logits[r]) for r in range(len(requests))]


@dataclass(frozen=True)
class _Chunk:
    """Variants ``indices`` of request ``request`` (all with first affected position ``t0``), folded together;
    the fold reads the last ``read`` rows (rows before ``t0`` keep their clean logits)."""

    request: int
    t0: int
    indices: tuple[int, ...]
    read: int = 1


class _Batch:
    """The requests of one :func:`fast_logits_batch` call: their checks, chunks, results and errors."""

    def __init__(self, decoder: DecoderMap, requests: Sequence[FoldRequest], strategy: FoldAttention) -> None:
        self.decoder, self.requests, self.strategy = decoder, requests, strategy
        self.patterns: list[AttentionPattern] = []
        self.values: list[dict[int, AblationValues]] = []
        self.results: list[torch.Tensor] = []  # per request [K, R, vocab]
        self.clean_rows: list[torch.Tensor] = []  # per request [R, vocab]
        self.errors: dict[int, SampleError] = {}
        self.max_jobs: int | None = None  # lowered for the rest of the batch after an out-of-memory error
        for request in requests:
            knockouts = request.knockouts
            check_layers([k for k in knockouts if isinstance(k, Knockout)], decoder.n_layers, decoder.n_heads)
            ablations = [i for i, k in enumerate(knockouts) if isinstance(k, Ablation)]
            check_ablations([knockouts[i] for i in ablations], decoder.n_layers, request.encoded.seq_len)
            found = replacement_values(decoder, request.encoded, [knockouts[i] for i in ablations])
            self.values.append(dict(zip(ablations, found, strict=True)))
            self.patterns.append(decoder.attention_pattern(request.encoded))
            n, read = request.encoded.seq_len, request.read
            if not 1 <= read <= n:
                raise ValueError(f"rows must be 1..{n} (the sequence length), got {request.rows}")
            clean_rows = request.clean.read_rows_logits(read).cpu()  # [R, vocab]
            logits = torch.empty(len(knockouts), read, clean_rows.shape[-1], dtype=torch.float32)
            for i, knockout in enumerate(knockouts):
                if knockout.is_empty:
                    logits[i] = clean_rows
            self.results.append(logits)
            self.clean_rows.append(clean_rows)

    def chunks(self, request: int, max_fold_queries: int) -> list[_Chunk]:
        """The request's folds: per first affected position, chunks of at most ``max_fold_queries`` rows."""
        r = self.requests[request]
        n = r.encoded.seq_len
        starts = affected_starts(self.patterns[request], self.decoder.n_layers, n, r.knockouts)
        by_start: dict[int, list[int]] = defaultdict(list)
        for index, knockout in enumerate(r.knockouts):
            if not knockout.is_empty:
                by_start[starts[index]].append(index)
        out = []
        for t0, indices in by_start.items():
            per_call = max(1, max_fold_queries // (n - t0))
            ordered = sorted(indices, key=lambda i: r.knockouts[i].first_layer)
            read = min(r.read, n - t0)  # rows before t0 are untouched by these knockouts
            out += [_Chunk(request, t0, tuple(ordered[lo : lo + per_call]), read) for lo in range(0, len(ordered), per_call)]
        return out

    def calls(self, max_fold_queries: int) -> list[list[_Chunk]]:
        """The layer-loop runs: the ``i``-th chunk of every request together (alone for ablations, or
        when the strategy does not pack)."""
        per_request = [self.chunks(r, max_fold_queries) for r in range(len(self.requests))]
        alone = [r for r in range(len(self.requests)) if self.values[r] or not self.strategy.packs]
        calls = [[chunk] for r in alone for chunk in per_request[r]]
        packed = [per_request[r] for r in range(len(self.requests)) if r not in alone]
        for i in range(max((len(c) for c in packed), default=0)):
            calls.append([chunks[i] for chunks in packed if i < len(chunks)])
        return calls

    def run(self, call: list[_Chunk]) -> None:
        """Fill the results of ``call``'s chunks, splitting the call after an out-of-memory error."""
        call = [c for c in call if c.request not in self.errors]
        if not call:
            return
        if self.max_jobs is not None and len(call) > self.max_jobs:
            for lo in range(0, len(call), self.max_jobs):
                self.run(call[lo : lo + self.max_jobs])
            return
        try:
            outcomes = self._compute(call)
        except torch.OutOfMemoryError:
            if len(call) == 1 and len(call[0].indices) == 1:
                raise  # one variant at a time is the smallest fold; the caller records the sample
            outcomes = None
        if outcomes is None:  # outside the except block, so the failed call's tensors are freed
            release_cached_memory()
            if len(call) > 1:
                self.max_jobs = max(1, len(call) // 2)
                log.warning("out of memory folding %d samples' knockouts together; retrying %d at a time", len(call), self.max_jobs)
                self.run(call[: self.max_jobs])
                self.run(call[self.max_jobs :])
            else:
                chunk = call[0]
                half = len(chunk.indices) // 2
                log.warning("out of memory folding %d knockouts; retrying %d at a time", len(chunk.indices), half)
                self.run([_Chunk(chunk.request, chunk.t0, chunk.indices[:half], chunk.read)])
                self.run([_Chunk(chunk.request, chunk.t0, chunk.indices[half:], chunk.read)])
            return
        for chunk, outcome in zip(call, outcomes, strict=True):
            if isinstance(outcome, SampleError):
                self.errors[chunk.request] = outcome
            else:
                result, index = self.results[chunk.request], list(chunk.indices)
                untouched = result.shape[1] - chunk.read
                result[index, untouched:] = outcome
                if untouched:
                    result[index, :untouched] = self.clean_rows[chunk.request][:untouched]

    def _compute(self, call: list[_Chunk]) -> list[torch.Tensor | SampleError]:
        """Run one call: per chunk its CPU float32 logits ``[len(indices), read, vocab]`` (or its error)."""
        jobs = []
        for chunk in call:
            request = self.requests[chunk.request]
            plan = plan_fold(
                [request.knockouts[i] for i in chunk.indices],
                self.patterns[chunk.request],
                t0=chunk.t0,
                n=request.encoded.seq_len,
                n_layers=self.decoder.n_layers,
                n_heads=self.decoder.n_heads,
                read_rows=chunk.read,
            )
            values = self.values[chunk.request]
            # Replacement values by folded index (the plan reorders the chunk).
            folded = {j: values[chunk.indices[i]] for j, i in enumerate(plan.order) if chunk.indices[i] in values}
            jobs.append(FoldJob(plan, request.clean, self.decoder.position_ids(request.encoded), folded))
        outcomes = run_folds(jobs, self.decoder, self.strategy)
        states = [o for o in outcomes if not isinstance(o, SampleError)]
        # One unembedding for every job of the call (its weight is read once): [sum V*R, vocab].
        d_model = states[0].shape[-1] if states else 0
        flat = final_logits(self.decoder, torch.cat([o.reshape(-1, d_model) for o in states])).cpu() if states else None
        sizes = [o.shape[0] * o.shape[1] for o in states]
        parts = iter([] if flat is None else [p.view(o.shape[0], o.shape[1], -1) for p, o in zip(flat.split(sizes), states, strict=True)])
        return [o if isinstance(o, SampleError) else next(parts) for o in outcomes]


def release_cached_memory() -> None:
    """Hand cached accelerator memory back after an out-of-memory error (nothing to do on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def affected_starts(
    pattern: AttentionPattern, n_layers: int, n: int, interventions: Sequence[Intervention]
) -> list[int]:
    """Per intervention, the first position whose computation it can change (``-1`` when empty).

    An intervention changes the outputs of its target rows in its first layer ``a``; from layer
    ``a + 1`` on every position that attends to a changed position changes too. The result is the
    largest ``t <= first_target`` such that no position ``< t`` attends to any position ``>= t`` in
    any layer ``> a`` of the clean ``pattern`` (``n`` positions), so positions ``< t`` provably keep
    their clean states. With causal attention this is ``first_target``.

    >>> from vlmflow.adapters.pattern import CausalPattern
    >>> affected_starts(CausalPattern(), 2, 6, [Knockout((((5,), (1,)),), (0,)), Knockout(((( ), (1,)),), (0,))])
    [5, -1]
    """
    if pattern.is_causal:  # no position reads a later one: nothing before the first target can change
        return [-1 if k.is_empty else k.first_target for k in interventions]
    live = [k for k in interventions if not k.is_empty]
    if not live:
        return [-1] * len(interventions)
    t_max = max(k.first_target for k in live)
    first = min(k.first_layer for k in live) + 1  # layers where a change can spread
    rows = torch.arange(t_max)
    keys = torch.arange(n)
    # last_key[l, p]: the last key position row p may attend to in layer l (rows < t_max suffice);
    # row n_layers stands for "no later layer".
    last_key = torch.full((n_layers + 1, t_max), -1, dtype=torch.long)
    for layer in range(first, n_layers if t_max > 0 else first):
        allowed = pattern.allowed(layer, rows, n).cpu()  # [t_max, n]
        last_key[layer] = torch.where(allowed, keys, -1).amax(dim=1)
    reach = last_key.flip(0).cummax(dim=0).values.flip(0)  # reach[l, p]: max over layers >= l
    out = []
    for k in interventions:
        if k.is_empty:
            out.append(-1)
            continue
        r, t = reach[k.first_layer + 1], k.first_target
        while True:
            sees_ahead = torch.nonzero(r[:t] >= t)  # positions before t that read position >= t
            if len(sees_ahead) == 0:
                break
            t = int(sees_ahead[0])
        out.append(t)
    return out
