"""The paper's knockout procedure, re-implemented on transformers for benchmarking only.

It follows the original code's structure (``InformationFlow.py`` + ``methods.py``, one process per
model, task and flow): for each sample and flow, one greedy ``generate`` gives the baseline answer
token and its probability; then for each window centre one ``generate(max_new_tokens=1)`` runs with
the knockout mask put in place by forward pre-hooks on the attention modules of the window's layers.
Every call re-runs the vision tower and the full prefill, batch size 1. The mask is built per
hooked call as in the original: a lower-triangular matrix with the (target, source) entries cleared
in a Python loop over the targets, turned into an additive mask with the dtype's minimum.

It shares no knockout code with vlmflow's engine (only the position groups and the tokenized
inputs), so it doubles as an independent correctness oracle: its probabilities must agree with
``vlmflow flows`` (:func:`vlmflow.experiments.flows.analyse_sample`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmflow.experiments.prepare import PreparedSample
from vlmflow.loading import LoadedModel
from vlmflow.positions.groups import Flow


def paper_mask(seq_len: int, targets: Sequence[int], sources: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(1, 1, q, k)`` additive mask: causal, with target rows unable to see source columns.

    >>> paper_mask(3, [2], [0], torch.float32, torch.device("cpu"))[0, 0, 2].tolist()[1:]
    [0.0, 0.0]
    """
    keep = torch.tril(torch.ones(seq_len, seq_len, device=device))
    columns = list(sources)
    for t in targets:  # the original clears the pairs in a Python loop over the targets
        keep[t, columns] = 0
    return ((1 - keep) * torch.finfo(dtype).min)[None, None].to(dtype)


@contextmanager
def paper_hooks(loaded: LoadedModel, layers: Sequence[int], targets: Sequence[int], sources: Sequence[int]) -> Iterator[None]:
    """Inside the block, the attention of ``layers`` gets the knockout mask (hooks removed after)."""
    dtype = next(loaded.model.parameters()).dtype
    handles = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs["attention_mask"] = paper_mask(hidden.shape[-2], targets, sources, dtype, hidden.device)
        return args, kwargs

    try:
        for layer in layers:
            module = loaded.decoder.attention(layer)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def paper_windows(k: int, n_layers: int) -> list[tuple[int, list[int]]]:
    """The original loop: ``range(max(0, l - k//2), min(L, l + ceil(k/2)))`` for every layer ``l``."""
    return [(layer, list(range(max(0, layer - k // 2), min(n_layers, layer + math.ceil(k / 2))))) for layer in range(n_layers)]


@dataclass
class PaperFlowResult:
    """One flow of one sample, the paper's way, with the time of every ``generate`` call.

    Attributes:
        answer_id: first greedy token of the clean model; ``p_base`` its probability.
        rows: ``(centre, p_blocked)`` for each window centre that was run.
        t_generate: wall seconds of the baseline ``generate``; ``t_windows``: of each knockout call.
        c_generate, c_windows: the same in process CPU seconds.
    """

    answer_id: int
    p_base: float
    rows: list[tuple[int, float]] = field(default_factory=list)
    t_generate: float = 0.0
    t_windows: list[float] = field(default_factory=list)
    c_generate: float = 0.0
    c_windows: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def paper_flow(
    loaded: LoadedModel,
    prepared: PreparedSample,
    flow: Flow,
    window: int,
    *,
    max_new_tokens: int,
    centres: Sequence[int] | None = None,
) -> PaperFlowResult:
    """Run one flow on one sample the paper's way (``centres``: a subset of window centres, or all).

    >>> result = paper_flow(loaded, prepared, Flow.parse("image->last"), 7, max_new_tokens=3)  # doctest: +SKIP
    >>> len(result.rows) == loaded.n_layers                                                      # doctest: +SKIP
    True
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    device = loaded.device
    inputs = prepared.encoded.inputs
    gen = {
        "do_sample": False,
        "num_beams": 1,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    base = model.generate(**inputs, max_new_tokens=max_new_tokens, **gen)
    answer = int(base.sequences[0, prepared.encoded.seq_len])
    p_base = float(torch.softmax(base.scores[0][0].float(), -1)[answer])
    result = PaperFlowResult(
        answer_id=answer, p_base=p_base, t_generate=time.perf_counter() - start, c_generate=time.process_time() - start_cpu
    )
    targets = prepared.groups[flow.target]
    sources = prepared.groups[flow.source]
    wanted = None if centres is None else set(centres)
    for centre, layers in paper_windows(window, loaded.n_layers):
        if wanted is not None and centre not in wanted:
            continue
        start, start_cpu = time.perf_counter(), time.process_time()
        with paper_hooks(loaded, layers, targets, sources):
            out = model.generate(**inputs, max_new_tokens=1, **gen)
        p_blocked = float(torch.softmax(out.scores[0][0].float(), -1)[answer])
        result.t_windows.append(time.perf_counter() - start)
        result.c_windows.append(time.process_time() - start_cpu)
        result.rows.append((centre, p_blocked))
    return result


def paper_flow_probabilities(
    loaded: LoadedModel, prepared: PreparedSample, flows: Sequence[Flow], window: int, *, max_new_tokens: int = 12
) -> dict[str, list[tuple[int, float, float]]]:
    """Per flow: ``[(centre_layer, p_base, p_blocked)]`` computed the paper's way, every centre."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for flow in flows:  # the original recomputes the baseline for every flow (one process per flow)
        res = paper_flow(loaded, prepared, flow, window, max_new_tokens=max_new_tokens)
        out[str(flow)] = [(centre, res.p_base, p) for centre, p in res.rows]
    return out
