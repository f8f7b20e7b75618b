"""The reference knockout: one plain full forward per knockout, with the mask applied by hooks.

This path is deliberately simple so that it is obviously correct: for every layer in the window a
forward pre-hook on that layer's attention module *replaces* the ``attention_mask`` keyword with a
complete mask built here (the clean model's allowed edges minus the blocked ones). It never edits
an incoming mask, which may be ``None`` on the sdpa fast path. Hooks are removed in ``finally``.

The fast engine (:mod:`vlmflow.knockout.fast`) is tested against this path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vlmflow.adapters.base import Encoded, VLMAdapter
from vlmflow.errors import VlmflowError
from vlmflow.knockout.mask import check_no_empty_rows, to_kernel_mask
from vlmflow.knockout.spec import Knockout, check_layers


class HookError(VlmflowError, RuntimeError):
    """The attention module was called in a way the knockout hook cannot handle safely."""


def full_allowed(adapter: VLMAdapter, model: nn.Module, encoded: Encoded, knockout: Knockout, layer: int) -> torch.Tensor:
    """``[1, head|1, seq, seq]`` bool mask of layer ``layer`` under ``knockout``."""
    n = encoded.seq_len
    device = encoded.inputs["input_ids"].device
    rows = torch.arange(n, device=device)
    base = adapter.base_allowed(layer, rows, n, encoded)  # [seq, seq]
    blocked = knockout.blocked_rows(rows, n) if layer in knockout.layers else torch.zeros_like(base)
    if knockout.heads is None or layer not in knockout.layers:
        allowed = (base & ~blocked)[None, None]
    else:
        n_heads = adapter.n_heads(model)
        per_head = torch.zeros(n_heads, dtype=torch.bool, device=device)
        per_head[list(knockout.heads)] = True
        allowed = (base[None] & ~(blocked[None] & per_head[:, None, None]))[None]
    check_no_empty_rows(allowed.reshape(-1, n), rows.repeat(allowed.shape[1]))
    return allowed


@contextmanager
def attention_knockout(model: nn.Module, adapter: VLMAdapter, encoded: Encoded, knockout: Knockout) -> Iterator[None]:
    """Inside the block, a full forward of ``encoded`` runs with ``knockout`` applied.

    >>> with attention_knockout(model, adapter, encoded, knockout):   # doctest: +SKIP
    ...     logits = model(**encoded.inputs).logits
    """
    adapter.check_attention_backend(model)
    check_layers([knockout], adapter.n_layers(model), adapter.n_heads(model))
    impl = adapter.attention_implementation(model)
    dtype = next(model.parameters()).dtype
    n = encoded.seq_len
    masks = {
        layer: to_kernel_mask(full_allowed(adapter, model, encoded, knockout, layer), impl, dtype)
        for layer in knockout.layers
    }
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None or len(args) > 1:
                raise HookError(
                    f"layer {layer}: attention module called with positional arguments beyond hidden_states; "
                    "the knockout mask cannot be put in place safely"
                )
            if hidden.shape[-2] != n:
                raise HookError(
                    f"layer {layer}: attention saw {hidden.shape[-2]} query positions, expected the full "
                    f"prompt of {n}; the reference knockout applies to a single full forward only"
                )
            kwargs["attention_mask"] = masks[layer]
            return args, kwargs

        return hook

    try:
        for layer in knockout.layers:
            module = adapter.attention_module(model, layer)
            handles.append(module.register_forward_pre_hook(make_hook(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def reference_logits(model: nn.Module, adapter: VLMAdapter, encoded: Encoded, knockouts: Sequence[Knockout]) -> torch.Tensor:
    """Last-position logits ``[len(knockouts), vocab]`` (float32), one full forward per knockout."""
    out = []
    for knockout in knockouts:
        with attention_knockout(model, adapter, encoded, knockout):
            logits = model(**encoded.inputs, logits_to_keep=1).logits
        out.append(logits[0, -1].float())
    return torch.stack(out) if out else torch.empty(0)


@torch.no_grad()
def clean_logits(model: nn.Module, encoded: Encoded) -> torch.Tensor:
    """Last-position logits ``[vocab]`` (float32) of the unmodified model."""
    return model(**encoded.inputs, logits_to_keep=1).logits[0, -1].float()
