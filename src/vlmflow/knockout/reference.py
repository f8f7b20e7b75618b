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

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.pattern import AttentionPattern
from vlmflow.errors import VlmflowError
from vlmflow.inputs import Encoded
from vlmflow.knockout.mask import check_no_empty_rows, to_kernel_mask
from vlmflow.knockout.spec import Knockout, check_layers


class HookError(VlmflowError, RuntimeError):
    """The attention module was called in a way the knockout hook cannot handle safely."""


def full_allowed(
    pattern: AttentionPattern, encoded: Encoded, knockout: Knockout, layer: int, n_heads: int
) -> torch.Tensor:
    """``[1, head|1, seq, seq]`` bool mask of layer ``layer`` under ``knockout``."""
    n = encoded.seq_len
    rows = torch.arange(n, device=encoded.device)
    base = pattern.allowed(layer, rows, n)  # [seq, seq]
    blocked = knockout.blocked_rows(rows, n) if layer in knockout.layers else torch.zeros_like(base)
    if knockout.heads is None or layer not in knockout.layers:
        allowed = (base & ~blocked)[None, None]
    else:
        per_head = torch.zeros(n_heads, dtype=torch.bool, device=rows.device)
        per_head[list(knockout.heads)] = True
        allowed = (base[None] & ~(blocked[None] & per_head[:, None, None]))[None]
    check_no_empty_rows(allowed.reshape(-1, n), rows.repeat(allowed.shape[1]))
    return allowed


@contextmanager
def attention_knockout(decoder: DecoderMap, encoded: Encoded, knockout: Knockout) -> Iterator[None]:
    """Inside the block, a full forward of ``encoded`` runs with ``knockout`` applied.

    >>> with attention_knockout(decoder, encoded, knockout):   # doctest: +SKIP
    ...     logits = decoder.model(**encoded.inputs).logits
    """
    decoder.check_attention_backend()
    check_layers([knockout], decoder.n_layers, decoder.n_heads)
    impl = decoder.attention_implementation
    pattern = decoder.attention_pattern(encoded)
    n = encoded.seq_len
    masks = {
        layer: to_kernel_mask(full_allowed(pattern, encoded, knockout, layer, decoder.n_heads), impl, decoder.dtype)
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
            module = decoder.attention(layer)
            handles.append(module.register_forward_pre_hook(make_hook(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def reference_logits(
    decoder: DecoderMap, encoded: Encoded, knockouts: Sequence[Knockout], *, rows: int | None = None
) -> torch.Tensor:
    """Last-position logits ``[len(knockouts), vocab]`` (float32), one full forward per knockout.

    ``rows=R``: the logits of the last ``R`` positions, ``[len(knockouts), R, vocab]``.

    >>> reference_logits(decoder, encoded, knockouts).shape   # doctest: +SKIP
    torch.Size([6, 32064])
    """
    read = 1 if rows is None else rows
    out = []
    for knockout in knockouts:
        with attention_knockout(decoder, encoded, knockout):
            logits = decoder.model(**encoded.inputs, logits_to_keep=read).logits
        out.append(logits[0, -read:].float())  # [R, vocab]
    if not out:
        return torch.empty(0)
    stacked = torch.stack(out)  # [V, R, vocab]
    return stacked[:, 0] if rows is None else stacked


@torch.no_grad()
def clean_logits(decoder: DecoderMap, encoded: Encoded, *, rows: int | None = None) -> torch.Tensor:
    """Last-position logits ``[vocab]`` (float32) of the unmodified model; ``rows=R``: ``[R, vocab]``."""
    read = 1 if rows is None else rows
    logits = decoder.model(**encoded.inputs, logits_to_keep=read).logits[0, -read:].float()
    return logits[0] if rows is None else logits
