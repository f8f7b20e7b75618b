"""Boxes to image tokens for LLaVA-OneVision's other inputs: several images in one prompt, and video frames.

* **Several images.** Each image of a several-image prompt is shown as its base view only (the
  image resized to ``view x view``, 27 x 27 tokens at 384/14, the last 6 pixels never seen),
  followed by one newline token; no high-resolution grid (``batch_num_images > 1`` in the model).
* **Video.** Every frame is resized to ``view x view``, cut into patches, and the model's
  ``apply_pooling`` bilinearly pools the ``n x n`` patch grid to ``ceil(n / 2)`` per side (27 -> 14);
  a pooled token is related when one of the patches it takes a weight from is. One newline token
  follows the last frame (:func:`newline_token`).

The tests check both against the real processors' token counts and, for the pooling, against the
model's own ``apply_pooling`` run on painted masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlmflow.data.sample import Box
from vlmflow.positions.anyres import _seen, bilinear_sources
from vlmflow.positions.patches import Axis, GridPart, PatchGrid, View, _check_size


@dataclass(frozen=True, eq=False)
class ViewWithNewline:
    """One view's patch tokens, row-major, then a single newline token.

    >>> g = single_view_geometry((500, 375), view_size=384, patch_size=14)
    >>> g.n_tokens, int(g.newline_tokens().sum())
    (730, 1)
    """

    view: GridPart

    @property
    def n_tokens(self) -> int:
        return self.view.n_tokens + 1

    def related_tokens(self, boxes: Sequence[Box]) -> np.ndarray:
        return np.concatenate([self.view.related(boxes), [False]])

    def padding_tokens(self) -> np.ndarray:
        return np.concatenate([self.view.padding(), [False]])

    def newline_tokens(self) -> np.ndarray:
        return np.concatenate([np.zeros(self.view.n_tokens, dtype=bool), [True]])


@dataclass(frozen=True, eq=False)
class PooledView:
    """A view's patch grid bilinearly pooled to ``shape`` (a video frame of LLaVA-OneVision), row-major.

    >>> g = video_frame_geometry((64, 48), view_size=384, patch_size=14)
    >>> g.n_tokens, g.shape
    (196, (14, 14))
    """

    grid: PatchGrid
    shape: tuple[int, int]

    @property
    def n_tokens(self) -> int:
        return self.shape[0] * self.shape[1]

    def _pool(self, values: np.ndarray) -> np.ndarray:
        by_row = bilinear_sources(values.shape[0], self.shape[0]).astype(np.int64)  # (out rows, grid rows)
        by_col = bilinear_sources(values.shape[1], self.shape[1]).astype(np.int64)  # (out cols, grid cols)
        return ((by_row @ values.astype(np.int64) @ by_col.T) > 0).reshape(-1)

    def related_tokens(self, boxes: Sequence[Box]) -> np.ndarray:
        return self._pool(self.grid.related(boxes))

    def padding_tokens(self) -> np.ndarray:
        return ~self._pool(~self.grid.padding())


@dataclass(frozen=True)
class NewlineToken:
    """A lone newline token (the one after a OneVision video's last frame): no patch at all."""

    n_tokens: int = 1

    def related_tokens(self, boxes: Sequence[Box]) -> np.ndarray:
        return np.zeros(self.n_tokens, dtype=bool)

    def padding_tokens(self) -> np.ndarray:
        return np.zeros(self.n_tokens, dtype=bool)


def _square_view(image_size: tuple[int, int], view_size: int, patch_size: int) -> PatchGrid:
    width, height = _check_size(image_size)
    view = View(
        y=_seen(Axis.identity(height).resize(view_size), view_size, patch_size),
        x=_seen(Axis.identity(width).resize(view_size), view_size, patch_size),
    )
    return PatchGrid(view, patch_size)


def single_view_geometry(image_size: tuple[int, int], *, view_size: int, patch_size: int) -> ViewWithNewline:
    """Token layout of one image of a several-image OneVision prompt: base view, then a newline."""
    return ViewWithNewline(GridPart(_square_view(image_size, view_size, patch_size)))


def video_frame_geometry(frame_size: tuple[int, int], *, view_size: int, patch_size: int) -> PooledView:
    """Token layout of one OneVision video frame: the square view's patches pooled to half (rounded up)."""
    grid = _square_view(frame_size, view_size, patch_size)
    rows, cols = grid.shape
    return PooledView(grid, (math.ceil(rows / 2), math.ceil(cols / 2)))


def newline_token() -> NewlineToken:
    """The layout of the newline token that ends a OneVision video."""
    return NewlineToken()
