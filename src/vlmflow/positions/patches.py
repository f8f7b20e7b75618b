"""Boxes to image tokens: which patches of the processed image show a box (pure geometry).

The rule
--------
A vision encoder sees the image after preprocessing (padding, resizing, cropping) and cuts that
*processed view* into ``patch_size`` x ``patch_size`` patches, one image token each. We say:

* a **processed pixel shows original pixel** ``(i, j)`` when the preprocessing's resampling takes
  it from there. For every resize we use the source pixel that PIL's nearest-neighbour resize
  copies into that output pixel: the one under the output pixel's centre, ``floor((p + 0.5) *
  n_in / n_out)``, computed with PIL's own double-precision accumulation so ties come out exactly as
  PIL's (:func:`pil_nearest_source`). Padding pixels show no original pixel.
* **original pixel** ``(i, j)`` (column, row) **is a box pixel** of ``Box(x, y, w, h)`` when
  ``x <= i < x + w`` and ``y <= j < y + h`` (half-open: a GQA box of width ``w`` covers ``w``
  pixels).
* a **patch is related** to a set of boxes when at least one of its pixels shows a box pixel (the
  paper's "a patch is related if any of its pixels is inside the box after preprocessing"); a
  **patch is padding** when none of its pixels shows an original pixel.

The pixel oracle of the tests (``tests/support/oracle.py``) checks this against the real Hugging
Face image processor run with ``resample=NEAREST`` on painted masks. The paper's code instead draws
the box with PIL's inclusive rectangle (one pixel wider and taller), resizes bicubically and keeps
patches holding an exactly red pixel; the two rules differ only at box borders
(:mod:`vlmflow.positions.paper_rule`).

Composition
-----------
One :class:`Axis` per direction records, for every processed pixel, the original pixel it shows
(``-1`` for padding); each preprocessing step (:meth:`Axis.pad`, :meth:`Axis.resize`,
:meth:`Axis.crop`) maps the axis of the previous stage. Two axes make a :class:`View`; a view cut
into patches is a :class:`PatchGrid`; an image's tokens are one or more :class:`GridPart` (a grid,
optionally a sub-range of its patch rows/columns and a newline token after each row) concatenated
in the order the language model sees them (:class:`TokenLayout`). LLaVA-1.5 is one part; LLaVA-NeXT's
anyres is a base view followed by the high-resolution grid with newlines.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from vlmflow.data.sample import Box
from vlmflow.errors import ConfigError

PreprocessMode = Literal["pad", "resize", "crop"]
PREPROCESS_MODES: tuple[str, ...] = ("pad", "resize", "crop")


@runtime_checkable
class ImageGeometry(Protocol):
    """One image's token layout, in the order the language model sees the image tokens."""

    n_tokens: int

    def related_tokens(self, boxes: Sequence[Box]) -> np.ndarray:
        """Bool ``(n_tokens,)``: the token's patch shows at least one box pixel."""
        ...

    def padding_tokens(self) -> np.ndarray:
        """Bool ``(n_tokens,)``: the token's patch shows only padding."""
        ...


def pil_nearest_source(n_in: int, n_out: int) -> np.ndarray:
    """For each of ``n_out`` output pixels, the input pixel PIL's nearest-neighbour resize copies.

    PIL (``ImagingScaleAffine``) starts at ``0.5 * n_in / n_out`` and adds ``n_in / n_out`` per
    pixel in double precision, then truncates. That is ``floor((p + 0.5) * n_in / n_out)`` except
    where the exact value is an integer and the accumulated sum lands just below it; a sequential
    ``cumsum`` reproduces the same sums bit for bit.

    >>> pil_nearest_source(4, 2).tolist()
    [1, 3]
    >>> pil_nearest_source(2, 5).tolist()
    [0, 0, 1, 1, 1]
    """
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"resize sizes must be positive, got {n_in} -> {n_out}")
    step = float(n_in) / n_out
    increments = np.full(n_out, step, dtype=np.float64)
    increments[0] = step * 0.5
    centres = np.cumsum(increments)  # sequential additions, like PIL's `xo += a[0]`
    return np.minimum(centres.astype(np.int64), n_in - 1)


@dataclass(frozen=True, eq=False)
class Axis:
    """One direction of a processed view: ``source[p]`` is the original pixel index shown by
    processed pixel ``p``, or ``-1`` where ``p`` shows padding.

    >>> Axis.identity(4).pad(1, 1).source.tolist()
    [-1, 0, 1, 2, 3, -1]
    >>> Axis.identity(4).pad(1, 1).resize(3).source.tolist()
    [0, 2, -1]
    """

    source: np.ndarray  # int64 (length,)

    @classmethod
    def identity(cls, length: int) -> Axis:
        """The original image's own pixels ``0 .. length-1``."""
        if length <= 0:
            raise ValueError(f"axis length must be positive, got {length}")
        return cls(_frozen(np.arange(length, dtype=np.int64)))

    @property
    def length(self) -> int:
        return int(self.source.shape[0])

    def pad(self, before: int, after: int) -> Axis:
        """Add ``before``/``after`` padding pixels (they show no original pixel)."""
        if before < 0 or after < 0:
            raise ValueError(f"padding must be >= 0, got ({before}, {after})")
        fill = np.full(before + after + self.length, -1, dtype=np.int64)
        fill[before : before + self.length] = self.source
        return Axis(_frozen(fill))

    def resize(self, length: int) -> Axis:
        """Resample to ``length`` pixels (nearest source pixel, as PIL computes it)."""
        if length == self.length:
            return self  # PIL returns a copy for an unchanged size
        return Axis(_frozen(self.source[pil_nearest_source(self.length, length)]))

    def crop(self, start: int, length: int) -> Axis:
        """Keep pixels ``start .. start+length-1`` (padding where that runs past either end)."""
        if length <= 0:
            raise ValueError(f"crop length must be positive, got {length}")
        index = np.arange(start, start + length)
        inside = (index >= 0) & (index < self.length)
        out = np.full(length, -1, dtype=np.int64)
        out[inside] = self.source[index[inside]]
        return Axis(_frozen(out))


@dataclass(frozen=True, eq=False)
class View:
    """A processed image (one input the vision tower sees): rows (``y``) and columns (``x``)."""

    y: Axis
    x: Axis

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the processed view."""
        return self.x.length, self.y.length


@dataclass(frozen=True, eq=False)
class PatchGrid:
    """A view cut into square patches, one token each, in row-major order.

    >>> grid = PatchGrid(View(Axis.identity(4), Axis.identity(6)), patch_size=2)
    >>> grid.shape
    (2, 3)
    >>> grid.related([Box(2, 0, 1, 1)]).astype(int).tolist()
    [[0, 1, 0], [0, 0, 0]]
    """

    view: View
    patch_size: int

    def __post_init__(self) -> None:
        width, height = self.view.size
        p = self.patch_size
        if p <= 0 or width % p or height % p:
            raise ValueError(f"a {width}x{height} view does not split into {p}x{p} patches")

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of patches."""
        width, height = self.view.size
        return height // self.patch_size, width // self.patch_size

    def _axis_hits(self, axis: Axis, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        # source: (length,) -> (n_patches, patch); lo/hi: (B,) -> hits (B, n_patches)
        src = axis.source.reshape(-1, self.patch_size)
        inside = (src[None] >= lo[:, None, None]) & (src[None] < hi[:, None, None]) & (src[None] >= 0)
        return inside.any(axis=2)

    def related(self, boxes: Sequence[Box]) -> np.ndarray:
        """Bool ``(rows, columns)``: the patch shows at least one pixel of any box."""
        rows, cols = self.shape
        if not boxes:
            return np.zeros((rows, cols), dtype=bool)
        bounds = np.array([(b.x, b.x + b.w, b.y, b.y + b.h) for b in boxes], dtype=np.float64)
        hit_x = self._axis_hits(self.view.x, bounds[:, 0], bounds[:, 1])  # (B, cols)
        hit_y = self._axis_hits(self.view.y, bounds[:, 2], bounds[:, 3])  # (B, rows)
        # A box's pixels form a product set, so a patch shows one iff its rows and columns both do.
        return (hit_y[:, :, None] & hit_x[:, None, :]).any(axis=0)

    def padding(self) -> np.ndarray:
        """Bool ``(rows, columns)``: the patch shows no original pixel at all."""
        valid_x = (self.view.x.source.reshape(-1, self.patch_size) >= 0).any(axis=1)
        valid_y = (self.view.y.source.reshape(-1, self.patch_size) >= 0).any(axis=1)
        return ~(valid_y[:, None] & valid_x[None, :])


@dataclass(frozen=True, eq=False)
class GridPart:
    """Some of a grid's patch rows and columns, row-major, optionally a newline token after each row.

    ``rows``/``cols`` are ``(start, stop)`` patch ranges (``None``: all), e.g. LLaVA-NeXT's
    un-padding keeps only the patch rows that show the image.
    """

    grid: PatchGrid
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    newline_after_row: bool = False

    def __post_init__(self) -> None:
        n_rows, n_cols = self.grid.shape
        for name, rng, n in (("rows", self.rows, n_rows), ("cols", self.cols, n_cols)):
            if rng is not None and not (0 <= rng[0] < rng[1] <= n):
                raise ValueError(f"{name} range {rng} is not inside 0..{n}")

    def _select(self, grid_values: np.ndarray, newline_value: bool) -> np.ndarray:
        r0, r1 = self.rows or (0, grid_values.shape[0])
        c0, c1 = self.cols or (0, grid_values.shape[1])
        part = grid_values[r0:r1, c0:c1]
        if self.newline_after_row:
            part = np.concatenate([part, np.full((part.shape[0], 1), newline_value)], axis=1)
        return part.reshape(-1)

    @property
    def n_tokens(self) -> int:
        return int(self._select(np.zeros(self.grid.shape, dtype=bool), False).shape[0])

    def related(self, boxes: Sequence[Box]) -> np.ndarray:
        return self._select(self.grid.related(boxes), False)

    def padding(self) -> np.ndarray:
        return self._select(self.grid.padding(), False)

    def newlines(self) -> np.ndarray:
        return self._select(np.zeros(self.grid.shape, dtype=bool), True)

    def token_grid(self) -> np.ndarray:
        """Int ``(rows, cols)``: the index (in this part's token order) of the token of each kept patch.

        >>> GridPart(PatchGrid(View(Axis.identity(4), Axis.identity(4)), 2), newline_after_row=True).token_grid().tolist()
        [[0, 1], [3, 4]]
        """
        r0, r1 = self.rows or (0, self.grid.shape[0])
        c0, c1 = self.cols or (0, self.grid.shape[1])
        width = (c1 - c0) + (1 if self.newline_after_row else 0)
        return np.arange(r1 - r0)[:, None] * width + np.arange(c1 - c0)[None, :]


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """An image's tokens: the parts concatenated in order. Implements :class:`ImageGeometry`.

    >>> layout = llava_geometry((40, 30), mode="pad", view_size=28, patch_size=7)
    >>> layout.n_tokens, int(layout.padding_tokens().sum())
    (16, 0)
    """

    parts: tuple[GridPart, ...]

    @property
    def n_tokens(self) -> int:
        return sum(part.n_tokens for part in self.parts)

    def related_tokens(self, boxes: Sequence[Box]) -> np.ndarray:
        """Bool ``(n_tokens,)``: the token's patch shows at least one box pixel."""
        return np.concatenate([part.related(boxes) for part in self.parts])

    def padding_tokens(self) -> np.ndarray:
        """Bool ``(n_tokens,)``: the token's patch shows only padding (newline tokens: False)."""
        return np.concatenate([part.padding() for part in self.parts])

    def newline_tokens(self) -> np.ndarray:
        """Bool ``(n_tokens,)``: the token is a row-end newline token, not a patch."""
        return np.concatenate([part.newlines() for part in self.parts])

    def views(self) -> dict[str, np.ndarray]:
        """The patch grids the tokens come from, by name: int ``(rows, cols)`` arrays of image-token
        indices (``grid:`` expressions address their rows and columns). One part: ``"base"``;
        several: ``"part0"``, ``"part1"``, ...

        >>> llava_geometry((40, 30), mode="pad", view_size=28, patch_size=7).views()["base"].shape
        (4, 4)
        """
        offsets = np.cumsum([0] + [part.n_tokens for part in self.parts])
        grids = [part.token_grid() + offsets[i] for i, part in enumerate(self.parts)]
        return {"base": grids[0]} if len(grids) == 1 else {f"part{i}": g for i, g in enumerate(grids)}


def llava_view(image_size: tuple[int, int], *, mode: PreprocessMode, view_size: int) -> View:
    """The processed square view of an original ``(width, height)`` image.

    * ``"pad"`` (LLaVA-1.5 ``expand2square``): centre the image on a square of side
      ``max(width, height)`` at offset ``(side - size) // 2`` (as transformers' ``pad_to_square``),
      then resize the square to ``view_size``;
    * ``"resize"``: resize both sides to ``view_size``;
    * ``"crop"`` (CLIP default): resize the short side to ``view_size`` and the long side to
      ``int(view_size * long / short)`` (transformers' ``get_resize_output_image_size``), then
      centre-crop at offset ``(resized - view_size) // 2``.

    >>> llava_view((4, 2), mode="pad", view_size=4).y.source.tolist()
    [-1, 0, 1, -1]
    """
    width, height = _check_size(image_size)
    x, y = Axis.identity(width), Axis.identity(height)
    if mode == "pad":
        side = max(width, height)
        x = x.pad((side - width) // 2, side - width - (side - width) // 2)
        y = y.pad((side - height) // 2, side - height - (side - height) // 2)
        return View(y=y.resize(view_size), x=x.resize(view_size))
    if mode == "resize":
        return View(y=y.resize(view_size), x=x.resize(view_size))
    if mode == "crop":
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(view_size * long / short)  # same float expression as transformers
        new_w, new_h = (view_size, new_long) if width <= height else (new_long, view_size)
        x, y = x.resize(new_w), y.resize(new_h)
        return View(y=y.crop((new_h - view_size) // 2, view_size), x=x.crop((new_w - view_size) // 2, view_size))
    raise ConfigError(f"unknown preprocessing mode {mode!r}; valid: {', '.join(PREPROCESS_MODES)}")


def llava_geometry(
    image_size: tuple[int, int], *, mode: PreprocessMode, view_size: int, patch_size: int
) -> TokenLayout:
    """Token layout of a single-view LLaVA model (576 tokens for LLaVA-1.5 at 336/14).

    Args:
        image_size: ``(width, height)`` of the original image.
        mode: ``"pad"`` (LLaVA-1.5), ``"resize"`` or ``"crop"`` (see :func:`llava_view`).
        view_size: side of the processed square (336 for LLaVA-1.5).
        patch_size: vision patch side (14).

    >>> g = llava_geometry((500, 375), mode="pad", view_size=336, patch_size=14)
    >>> g.n_tokens, int(g.padding_tokens().sum()), int(g.related_tokens([Box(0, 0, 500, 375)]).sum())
    (576, 144, 432)
    """
    if mode not in PREPROCESS_MODES:
        raise ConfigError(f"unknown preprocessing mode {mode!r}; valid: {', '.join(PREPROCESS_MODES)}")
    if view_size <= 0 or patch_size <= 0 or view_size % patch_size:
        raise ConfigError(f"view size {view_size} is not a positive multiple of patch size {patch_size}")
    return _llava_geometry(_check_size(image_size), mode, int(view_size), int(patch_size))


@functools.lru_cache(maxsize=4096)
def _llava_geometry(image_size: tuple[int, int], mode: PreprocessMode, view_size: int, patch_size: int) -> TokenLayout:
    view = llava_view(image_size, mode=mode, view_size=view_size)
    return TokenLayout((GridPart(PatchGrid(view, patch_size)),))


def _check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ConfigError(f"image size must be (width, height), got {image_size!r}") from None
    if width <= 0 or height <= 0 or (width, height) != tuple(image_size):
        raise ConfigError(f"image size must be two positive integers (width, height), got {image_size!r}")
    return width, height


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array
