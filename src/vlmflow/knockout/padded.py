"""Several prompts of different lengths in one batch: right padding that no real query reads.

Sample ``b`` (``n_b`` positions) occupies rows ``0..n_b-1`` of batch row ``b``; rows ``n_b..n_max-1``
are padding. A real query never reads a padding key (its mask column is False), so its result is
the one it has alone; a padding row reads only itself, so it stays finite and harmless. Tokens
generated after the prompts go to cache columns ``n_max, n_max+1, ...`` of every batch row
(:class:`PaddedKV`); the masks map each sample's sequence positions onto those columns.

>>> from vlmflow.adapters.pattern import CausalPattern
>>> prompt_mask([CausalPattern(), CausalPattern()], 0, [2, 3], 3)[0, 0].int().tolist()
[[1, 0, 0], [1, 1, 0], [0, 0, 1]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmflow.adapters.pattern import AttentionPattern

__all__ = ["PaddedKV", "decode_mask", "pad_positions", "pad_rows", "prompt_mask"]


def pad_rows(rows: Sequence[torch.Tensor], n_max: int) -> torch.Tensor:
    """``[B, n_max, d]``: each ``[n_b, d]`` in ``rows`` followed by zeros.

    >>> pad_rows([torch.ones(1, 2), torch.ones(2, 2)], 2)[0].tolist()
    [[1.0, 1.0], [0.0, 0.0]]
    """
    out = rows[0].new_zeros(len(rows), n_max, rows[0].shape[-1])
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


def pad_positions(positions: Sequence[torch.Tensor], n_max: int) -> torch.Tensor:
    """Position ids ``[..., B, n_max]`` of per-sample ids ``[..., 1, n_b]`` (padding rows get id 0).

    >>> pad_positions([torch.arange(2)[None], torch.arange(3)[None]], 3).tolist()
    [[0, 1, 0], [0, 1, 2]]
    """
    out = positions[0].new_zeros(*positions[0].shape[:-2], len(positions), n_max)
    for b, p in enumerate(positions):
        out[..., b, : p.shape[-1]] = p[..., 0, :]
    return out


def prompt_mask(
    patterns: Sequence[AttentionPattern], layer: int, lengths: Sequence[int], n_max: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[B, 1, n_max, n_max]`` bool: each sample's clean pattern in ``layer``; padding rows read themselves."""
    out = torch.zeros(len(lengths), 1, n_max, n_max, dtype=torch.bool, device=device)
    for b, (pattern, n) in enumerate(zip(patterns, lengths, strict=True)):
        out[b, 0, :n, :n] = pattern.allowed(layer, torch.arange(n, device=device), n)
        pad = torch.arange(n, n_max, device=device)
        out[b, 0, pad, pad] = True
    return out


def decode_mask(
    patterns: Sequence[AttentionPattern],
    layer: int,
    lengths: Sequence[int],
    n_max: int,
    generated: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[B, 1, 1, n_max + generated + 1]`` bool: what generated token ``generated`` of each sample reads.

    ``patterns`` are the samples' patterns extended over their generated tokens
    (:meth:`~vlmflow.adapters.pattern.AttentionPattern.extended`). Sample ``b``'s prompt keys are
    columns ``< n_b``, its generated tokens columns ``n_max..n_max + generated``.

    >>> from vlmflow.adapters.pattern import CausalPattern
    >>> decode_mask([CausalPattern()] * 2, 0, [1, 2], 2, 0)[:, 0, 0].int().tolist()
    [[1, 0, 1], [1, 1, 1]]
    """
    out = torch.zeros(len(lengths), 1, 1, n_max + generated + 1, dtype=torch.bool, device=device)
    for b, (pattern, n) in enumerate(zip(patterns, lengths, strict=True)):
        row = n + generated
        allowed = pattern.allowed(layer, torch.tensor([row], device=device), row + 1)[0]  # [n + generated + 1]
        out[b, 0, 0, :n] = allowed[:n]
        out[b, 0, 0, n_max:] = allowed[n:]
    return out


class PaddedKV:
    """A stand-in KV cache for a padded batch: per layer ``[B, kv_heads, capacity, head_dim]`` buffers
    written in place (no copy per generated token); ``update`` returns the filled part.

    >>> cache = PaddedKV(capacity=3)
    >>> k, v = cache.update(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), 0)
    >>> k.shape, cache.get_seq_length(0)
    (torch.Size([1, 1, 2, 4]), 2)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.filled: dict[int, int] = {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.keys:
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self.keys[layer_idx] = key_states.new_empty(shape)
            self.values[layer_idx] = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
            self.filled[layer_idx] = 0
        lo = self.filled[layer_idx]
        hi = lo + key_states.shape[-2]
        if hi > self.capacity:
            raise RuntimeError(f"layer {layer_idx}: {hi} keys do not fit the cache's {self.capacity} columns")
        self.keys[layer_idx][:, :, lo:hi] = key_states
        self.values[layer_idx][:, :, lo:hi] = value_states
        self.filled[layer_idx] = hi
        return self.keys[layer_idx][:, :, :hi], self.values[layer_idx][:, :, :hi]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled.get(layer_idx, 0)
