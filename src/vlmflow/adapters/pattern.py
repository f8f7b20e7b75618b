"""Which keys each query position may read in the clean model: a sample's attention pattern.

Most families attend causally. Some let parts of the prompt read ahead: Gemma-3 attends
bidirectionally within each image, PaliGemma within the whole prompt (a prefix-LM); both narrow
some layers to a sliding window. A family's decoder map (:meth:`DecoderMap.attention_pattern
<vlmflow.adapters.decoder.DecoderMap.attention_pattern>`) makes one pattern per sample; the
engines build every knockout mask on top of it, and the fast engine reads :attr:`is_causal` and
:meth:`allowed` to find the first position a knockout can change.

A pattern is a pure value: no model, no weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class AttentionPattern(ABC):
    """The clean model's allowed attention edges for one sample."""

    #: True when every layer is plain causal attention (no position ever reads a later one).
    is_causal: bool = False

    @abstractmethod
    def allowed(self, layer: int, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        """``[len(rows), n_keys]`` bool: which keys query positions ``rows`` may read in ``layer``."""

    def extended(self, length: int) -> AttentionPattern:
        """The pattern of the same prompt followed by text positions up to ``length`` (generated
        tokens, which attend causally within the layer's window). Patterns with per-position data
        override this; a causal pattern is its own extension."""
        if self.is_causal:
            return self
        raise NotImplementedError(f"{type(self).__name__} does not say how generated tokens attend (extended)")


@dataclass(frozen=True)
class CausalPattern(AttentionPattern):
    """A row attends to itself and everything before it, in every layer.

    >>> CausalPattern().allowed(0, torch.arange(3), 3).int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """

    is_causal = True

    def allowed(self, layer: int, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        keys = torch.arange(n_keys, device=rows.device)
        return keys[None, :] <= rows[:, None]


@dataclass(frozen=True)
class BlockPattern(AttentionPattern):
    """Causal, or within the same image block; in layers with a window, only the last ``window`` keys.

    Attributes:
        blocks: ``[seq]`` long: the image block of each position (``-1``: text).
        windows: per layer, the sliding window or ``None`` (full attention).

    >>> BlockPattern(torch.tensor([-1, 0, 0, -1]), (None,)).allowed(0, torch.arange(4), 4).int().tolist()
    [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """

    blocks: torch.Tensor
    windows: Sequence[int | None]

    def allowed(self, layer: int, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        keys = torch.arange(n_keys, device=rows.device)
        blocks = self.blocks.to(rows.device)
        q_block = blocks[rows][:, None]
        allowed = (keys[None, :] <= rows[:, None]) | ((q_block == blocks[None, :n_keys]) & (q_block >= 0))
        window = self.windows[layer]
        if window is not None:
            allowed &= keys[None, :] > rows[:, None] - window
        return allowed

    def extended(self, length: int) -> BlockPattern:
        """Generated positions are text (block ``-1``).

        >>> BlockPattern(torch.tensor([0, 0]), (None,)).extended(3).blocks.tolist()
        [0, 0, -1]
        """
        extra = length - len(self.blocks)
        return BlockPattern(torch.cat([self.blocks, self.blocks.new_full((max(0, extra),), -1)]), self.windows)


@dataclass(frozen=True)
class PrefixLMPattern(AttentionPattern):
    """(Causal, within the layer's window if any) OR (query and key both in the prefix).

    Attributes:
        prefix: ``[seq]`` bool: the positions of the bidirectional prefix.
        windows: per layer, the sliding window or ``None`` (full attention).

    >>> PrefixLMPattern(torch.tensor([True, True, False]), (None,)).allowed(0, torch.arange(3), 3).int().tolist()
    [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """

    prefix: torch.Tensor
    windows: Sequence[int | None]

    def allowed(self, layer: int, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        keys = torch.arange(n_keys, device=rows.device)
        prefix = self.prefix.to(rows.device)
        causal = keys[None, :] <= rows[:, None]
        window = self.windows[layer]
        if window is not None:
            causal &= keys[None, :] > rows[:, None] - window
        return causal | (prefix[rows][:, None] & prefix[None, :n_keys])

    def extended(self, length: int) -> PrefixLMPattern:
        """Generated positions are outside the bidirectional prefix.

        >>> PrefixLMPattern(torch.tensor([True]), (None,)).extended(2).prefix.tolist()
        [True, False]
        """
        extra = length - len(self.prefix)
        return PrefixLMPattern(torch.cat([self.prefix, self.prefix.new_zeros(max(0, extra))]), self.windows)


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """``[seq]`` long: index of the contiguous image block each position is in (``-1``: text).

    ``token_type_ids`` is 1 at image tokens.

    >>> image_blocks(torch.tensor([0, 1, 1, 0, 1, 0])).tolist()
    [-1, 0, 0, -1, 1, -1]
    """
    is_image = token_type_ids == 1
    starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
    return torch.where(is_image, torch.cumsum(starts.long(), 0) - 1, -1)


def layer_windows(config: object) -> tuple[int | None, ...]:
    """Per layer of a decoder config, its sliding window (``None``: full attention).

    >>> from types import SimpleNamespace
    >>> layer_windows(SimpleNamespace(layer_types=["sliding_attention", "full_attention"], sliding_window=4))
    (4, None)
    >>> layer_windows(SimpleNamespace(num_hidden_layers=2))
    (None, None)
    """
    types = getattr(config, "layer_types", None) or ["full_attention"] * int(config.num_hidden_layers)  # type: ignore[attr-defined]
    window = getattr(config, "sliding_window", None)
    return tuple(int(window) if kind == "sliding_attention" and window is not None else None for kind in types)
