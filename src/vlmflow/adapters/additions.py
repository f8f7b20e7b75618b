"""What a model adds to its hidden states between decoder layers: :class:`ResidualAdditions`.

Most decoders are a plain stack: the output of layer ``l`` is the input of layer ``l + 1``. Some add
something in between. Qwen3-VL (DeepStack) adds features of intermediate vision-tower layers to
the hidden states at the image positions after each of its first decoder layers. An engine that
recomputes layer by layer (the fast engine's fold, :mod:`vlmflow.knockout.executor`) must add
exactly the same vectors at exactly the same places, or every recomputed image position would
drift from the model.

The additions of one sample do not depend on any knockout (they come from the vision tower, which
no knockout touches), so they are recorded once, in the clean run
(:meth:`DecoderMap.recording_additions <vlmflow.adapters.decoder.DecoderMap.recording_additions>`),
and applied to every recomputed row of those positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ResidualAdditions:
    """Vectors the model adds to the output of some decoder layers at fixed sequence positions.

    Attributes:
        positions: ``[P]`` long, sorted unique sequence positions.
        values: per decoder layer ``l``, ``[P, d_model]``: added to layer ``l``'s output at ``positions``
            (row ``i`` at ``positions[i]``) before layer ``l + 1`` reads it.

    >>> add = ResidualAdditions(torch.tensor([1, 3]), {0: torch.ones(2, 2)})
    >>> add.after_layer(0, torch.zeros(1, 3, 2), torch.tensor([2, 3, 4]))[0].tolist()
    [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    >>> add.after_layer(1, torch.zeros(1, 3, 2), torch.tensor([2, 3, 4])).abs().sum().item()
    0.0
    """

    positions: torch.Tensor
    values: Mapping[int, torch.Tensor]

    def __post_init__(self) -> None:
        n = int(self.positions.numel())
        if self.positions.dim() != 1 or (n > 1 and not bool((self.positions[1:] > self.positions[:-1]).all())):
            raise ValueError("ResidualAdditions.positions must be a sorted 1-D tensor of unique positions")
        for layer, value in self.values.items():
            if value.dim() != 2 or value.shape[0] != n:
                raise ValueError(f"additions after layer {layer} have shape {tuple(value.shape)}, expected [{n}, d_model]")

    def after_layer(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[..., S, d_model]`` (the output of ``layer`` at the sequence positions ``rows``
        ``[S]``) plus what the model adds there; ``hidden`` itself when nothing is added."""
        value = self.values.get(layer)
        if value is None or self.positions.numel() == 0:
            return hidden
        positions = self.positions.to(rows.device)
        index = torch.searchsorted(positions, rows).clamp(max=positions.numel() - 1)
        hit = positions[index] == rows  # [S]: rows that receive an addition
        if not bool(hit.any()):
            return hidden
        out = hidden.clone()
        # Same arithmetic as the model: its hidden state at the position plus the vector, in the hidden dtype.
        out[..., hit, :] = hidden[..., hit, :] + value.to(hidden.device, hidden.dtype)[index[hit]]
        return out
