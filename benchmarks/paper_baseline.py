"""The paper's knockout procedure, re-implemented on transformers for benchmarking only.

It follows the original code's structure (``InformationFlow.py`` + ``methods.py``): for each
sample and each flow, one greedy ``generate`` gives the baseline answer token and probability; then
for each window centre one ``generate(max_new_tokens=1)`` runs with the knockout mask put in place
by hooks on the attention modules of the window's layers. Every call re-runs the vision tower and
the full prefill, batch size 1. The mask is built per call as in the original: a lower-triangular
matrix with the (target, source) entries cleared, turned into an additive mask with the dtype's
minimum.

It shares no knockout code with vlmflow's engine (only the position groups), so it doubles as an
independent correctness oracle: :func:`paper_flow_probabilities` must agree with ``vlmflow flows``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from vlmflow.experiments.prepare import PreparedSample
from vlmflow.loading import LoadedModel
from vlmflow.positions.groups import Flow


def _paper_mask(seq_len: int, targets: Sequence[int], sources: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(1, 1, q, k)`` additive mask: causal, with target rows unable to see source columns."""
    keep = torch.tril(torch.ones(seq_len, seq_len, device=device))
    for t in targets:  # the original fills the pairs in Python loops
        keep[t, list(sources)] = 0
    return ((1 - keep) * torch.finfo(dtype).min)[None, None].to(dtype)


@contextmanager
def _paper_hooks(loaded: LoadedModel, layers: Sequence[int], targets: Sequence[int], sources: Sequence[int]):
    dtype = next(loaded.model.parameters()).dtype
    handles = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs["attention_mask"] = _paper_mask(hidden.shape[-2], targets, sources, dtype, hidden.device)
        return args, kwargs

    try:
        for layer in layers:
            module = loaded.adapter.attention_module(loaded.model, layer)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def paper_windows(k: int, n_layers: int) -> list[tuple[int, list[int]]]:
    """The original loop: ``range(max(0, l - k//2), min(L, l + ceil(k/2)))`` for every layer ``l``."""
    return [(layer, list(range(max(0, layer - k // 2), min(n_layers, layer + math.ceil(k / 2))))) for layer in range(n_layers)]


@torch.no_grad()
def paper_flow_probabilities(
    loaded: LoadedModel,
    prepared: PreparedSample,
    flows: Sequence[Flow],
    window: int,
    *,
    max_new_tokens: int = 12,
) -> dict[str, list[tuple[int, float, float]]]:
    """Per flow: ``[(centre_layer, p_base, p_blocked)]`` computed the paper's way."""
    model, tokenizer = loaded.model, loaded.tokenizer
    inputs = prepared.encoded.inputs
    gen = {"do_sample": False, "num_beams": 1, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    out: dict[str, list[tuple[int, float, float]]] = {}
    n_layers = loaded.n_layers
    for flow in flows:
        # The original recomputes the baseline for every flow (one process per flow).
        base = model.generate(**inputs, max_new_tokens=max_new_tokens, output_scores=True, return_dict_in_generate=True, **gen)
        first_scores = base.scores[0][0].float()
        answer = int(base.sequences[0, prepared.encoded.seq_len])
        p_base = float(torch.softmax(first_scores, -1)[answer])
        targets = prepared.groups[flow.target]
        sources = prepared.groups[flow.source]
        rows = []
        for center, layers in paper_windows(window, n_layers):
            with _paper_hooks(loaded, layers, targets, sources):
                res = model.generate(**inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True, **gen)
            p_blocked = float(torch.softmax(res.scores[0][0].float(), -1)[answer])
            rows.append((center, p_base, p_blocked))
        out[str(flow)] = rows
    return out
