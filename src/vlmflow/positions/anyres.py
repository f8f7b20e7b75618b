"""Boxes to image tokens for "anyres" models: LLaVA-NeXT (v1.6) and LLaVA-OneVision.

An anyres image reaches the language model as two parts, in this order:

1. the **base view**: the whole image squashed to ``view_size`` x ``view_size`` (no padding),
   ``(view_size / patch_size) ** 2`` tokens (576 for LLaVA-NeXT at 336/14, 729 for OneVision at
   384/14);
2. the **high-resolution grid**: the image resized to fit the best grid pinpoint
   (:func:`select_best_resolution`) keeping its aspect ratio (:func:`fitted_size`), padded with
   black to the pinpoint (centred, the odd pixel after), cut into ``view_size`` crops. The model
   puts the crops' patch features back on one canvas, *un-pads* that canvas in token space
   (:func:`unpad_ranges`; its own rounding, so a kept row may still show some padding), for
   OneVision bilinearly *downscales* it when it holds more than ~``max_patches`` views' worth of
   tokens (:func:`downscaled_shape`), and appends one learned newline token after every row.

Everything follows the installed transformers' ``LlavaNextImageProcessor`` /
``LlavaOnevisionImageProcessor`` (pixels) and ``pack_image_features`` / ``unpad_image`` (token
order), written out here independently; the pixel oracle of the tests
(``tests/support/anyres_oracle.py``) checks the result against the real processor and the real
model code on painted masks.

Pixel rule: the same as :mod:`vlmflow.positions.patches` (a token is related when one of its
pixels shows a box pixel, padding when none shows an image pixel). A downscaled token mixes up to
2 x 2 canvas tokens; it is related when one of the tokens it takes a non-zero weight from is, and
padding when all of them are. Newline tokens are neither (they are not patches).

Pinpoints are ``(height, width)`` pairs, as in the Hugging Face configs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlmflow.data.sample import Box
from vlmflow.errors import ConfigError
from vlmflow.positions.patches import Axis, GridPart, PatchGrid, View, _check_size

Pinpoints = tuple[tuple[int, int], ...]

#: LLaVA-v1.6 / llama3-llava-next grid pinpoints (``(height, width)``), as in their HF configs.
LLAVA_NEXT_PINPOINTS: Pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def onevision_pinpoints(view_size: int = 384, max_side: int = 6) -> Pinpoints:
    """OneVision's pinpoints: every ``(i, j)`` grid of views, ``1 <= i, j <= max_side``.

    >>> onevision_pinpoints()[:3]
    ((384, 384), (384, 768), (384, 1152))
    """
    return tuple((i * view_size, j * view_size) for i in range(1, max_side + 1) for j in range(1, max_side + 1))


def select_best_resolution(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` an image of ``(width, height)`` is tiled at.

    Largest effective resolution (pixels kept after fitting, at most the original's), then least
    waste; the first such pinpoint in list order wins ties.

    >>> select_best_resolution((500, 375), LLAVA_NEXT_PINPOINTS)
    (672, 672)
    """
    width, height = image_size
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, math.inf
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(pin_h), int(pin_w)), effective, wasted
    if best is None:
        raise ConfigError(f"no grid pinpoint fits a {width}x{height} image; pinpoints: {list(pinpoints)}")
    return best


def fitted_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of the image resized to fit ``target`` ``(height, width)``, aspect kept.

    >>> fitted_size((500, 375), (672, 672))  # ceil(375 * 1.344) = ceil(504.00000000000006)
    (505, 672)
    """
    width, height = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpad_ranges(image_size: tuple[int, int], rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Token rows and columns the model keeps of a ``rows`` x ``cols`` canvas (``unpad_image``).

    For an extremely elongated image a range can be empty (the model keeps no column, say, but
    still emits a newline for each row).

    >>> unpad_ranges((500, 375), 48, 48)
    ((6, 42), (0, 48))
    """
    width, height = image_size
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        pad = (rows - new_height) // 2
        kept = ((pad, rows - pad), (0, cols))
    else:
        new_width = int(round(width * (rows / height), 7))
        pad = (cols - new_width) // 2
        kept = ((0, rows), (pad, cols - pad))
    return kept


def downscaled_shape(rows: int, cols: int, side: int, max_patches: int | None) -> tuple[int, int] | None:
    """OneVision's ``anyres_max_N`` rule: the grid's new shape, or ``None`` when it is kept.

    ``side`` is the tokens per view side (27 at 384/14). The grid is shrunk by
    ``sqrt(rows * cols / (N * side**2))`` when that exceeds 1.1.

    >>> downscaled_shape(81, 108, 27, 9), downscaled_shape(27, 36, 27, 9)
    ((70, 93), None)
    """
    if max_patches is None:
        return None
    ratio = math.sqrt(rows * cols / (max_patches * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return None


def bilinear_sources(n_in: int, n_out: int) -> np.ndarray:
    """Bool ``(n_out, n_in)``: which inputs get a non-zero weight in ``F.interpolate(mode="bilinear")``.

    ``align_corners=False``, source index ``scale * (o + 0.5) - 0.5`` clamped at 0, computed in
    float32 like PyTorch's kernels; each output takes ``floor`` and (unless the fraction is 0)
    the next input.

    >>> bilinear_sources(4, 2).astype(int).tolist()
    [[1, 1, 0, 0], [0, 0, 1, 1]]
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    low = src.astype(np.int64)
    high = np.where(low < n_in - 1, low + 1, low)
    frac = src - low.astype(np.float32)
    out = np.zeros((n_out, n_in), dtype=bool)
    out[np.arange(n_out), low] = True
    out[np.arange(n_out), high] |= frac > 0
    return out


@dataclass(frozen=True, eq=False)
class AnyresGrid:
    """The high-resolution grid as the model packs it: kept region, optional downscale, newlines.

    ``rows``/``cols`` are the token ranges un-padding keeps of ``grid`` (either may be empty for an
    extremely elongated image: the model then still emits one newline per kept row); ``shape`` is
    the region's ``(rows, cols)`` after OneVision's downscaling (the kept shape when none).
    """

    grid: PatchGrid
    rows: tuple[int, int]
    cols: tuple[int, int]
    shape: tuple[int, int]

    @property
    def kept_shape(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    @property
    def downscaled(self) -> bool:
        return self.shape != self.kept_shape

    @property
    def n_tokens(self) -> int:
        return self.shape[0] * (self.shape[1] + 1)

    def _pack(self, values: np.ndarray, newline_value: bool) -> np.ndarray:
        # values: (grid rows, grid cols) bool -> (n_tokens,) in the model's order
        kept = values[self.rows[0] : self.rows[1], self.cols[0] : self.cols[1]]
        if self.downscaled:
            # A downscaled token takes weights from <= 2 x 2 kept tokens: true if any of them is.
            by_row = bilinear_sources(kept.shape[0], self.shape[0]).astype(np.int64)  # (out rows, kept rows)
            by_col = bilinear_sources(kept.shape[1], self.shape[1]).astype(np.int64)  # (out cols, kept cols)
            kept = (by_row @ kept.astype(np.int64) @ by_col.T) > 0
        newline = np.full((kept.shape[0], 1), newline_value)
        return np.concatenate([kept, newline], axis=1).reshape(-1)

    def pack(self, values: np.ndarray) -> np.ndarray:
        """Bool ``(n_tokens,)`` of per-patch ``values`` ``(grid rows, grid cols)``, in the model's
        order (un-padded, downscaled, newline tokens False), e.g. a rule other than the pixel overlap."""
        return self._pack(np.asarray(values, dtype=bool), False)

    def related(self, boxes: Sequence[Box]) -> np.ndarray:
        return self._pack(self.grid.related(boxes), False)

    def padding(self) -> np.ndarray:
        # All-padding after downscaling = no contributing token shows the image.
        return ~self._pack(~self.grid.padding(), False) & ~self.newlines()

    def newlines(self) -> np.ndarray:
        return self._pack(np.zeros(self.grid.shape, dtype=bool), True)

    def token_grid(self) -> np.ndarray:
        """Int ``shape``: the index (in the grid's token order) of each patch token, newlines skipped."""
        rows, cols = self.shape
        return np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]


@dataclass(frozen=True, eq=False)
class AnyresLayout:
    """An anyres image's tokens: base view, then the high-resolution grid with its newlines.

    Implements :class:`vlmflow.positions.patches.ImageGeometry`.

    >>> g = anyres_geometry((500, 375), view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)
    >>> g.n_tokens, int(g.base_tokens().sum()), int(g.grid_tokens().sum()), int(g.newline_tokens().sum())
    (2340, 576, 1728, 36)
    """

    base: GridPart
    grid: AnyresGrid
    best_resolution: tuple[int, int]  # (height, width) of the pinpoint used

    @property
    def n_tokens(self) -> int:
        return self.base.n_tokens + self.grid.n_tokens

    def related_tokens(self, boxes: Sequence[Box]) -> np.ndarray:
        """Bool ``(n_tokens,)``: base or grid token whose patch shows a box pixel."""
        return np.concatenate([self.base.related(boxes), self.grid.related(boxes)])

    def padding_tokens(self) -> np.ndarray:
        """Bool ``(n_tokens,)``: grid token showing only the black fill (newlines: False)."""
        return np.concatenate([self.base.padding(), self.grid.padding()])

    def newline_tokens(self) -> np.ndarray:
        """Bool ``(n_tokens,)``: the row-end newline tokens of the grid."""
        return np.concatenate([np.zeros(self.base.n_tokens, dtype=bool), self.grid.newlines()])

    def base_tokens(self) -> np.ndarray:
        """Bool ``(n_tokens,)``: tokens of the base view."""
        out = np.zeros(self.n_tokens, dtype=bool)
        out[: self.base.n_tokens] = True
        return out

    def grid_tokens(self) -> np.ndarray:
        """Bool ``(n_tokens,)``: patch tokens of the high-resolution grid (newlines excluded)."""
        return ~self.base_tokens() & ~self.newline_tokens()

    def views(self) -> dict[str, np.ndarray]:
        """``"base"``: the base view's patch grid; ``"hd"``: the high-resolution grid as the model packs
        it (after un-padding and any downscaling; newlines skipped). Int arrays of image-token indices.

        >>> g = anyres_geometry((500, 375), view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)
        >>> {name: grid.shape for name, grid in g.views().items()}
        {'base': (24, 24), 'hd': (36, 48)}
        """
        return {"base": self.base.token_grid(), "hd": self.base.n_tokens + self.grid.token_grid()}


def anyres_geometry(
    image_size: tuple[int, int],
    *,
    view_size: int,
    patch_size: int,
    pinpoints: Sequence[Sequence[int]],
    max_patches: int | None = None,
) -> AnyresLayout:
    """Token layout of an anyres image (LLaVA-NeXT: ``max_patches=None``; OneVision: 9).

    Args:
        image_size: ``(width, height)`` of the original image.
        view_size: side of one view (336 LLaVA-NeXT, 384 OneVision).
        patch_size: vision patch side (14).
        pinpoints: grid resolutions ``(height, width)``, multiples of ``view_size``.
        max_patches: OneVision's ``anyres_max_N``; ``None`` never downscales.

    Raises:
        ConfigError: sizes that do not tile (pinpoint not a multiple of the view, view not a
            multiple of the patch).

    >>> anyres_geometry((500, 375), view_size=384, patch_size=14, pinpoints=onevision_pinpoints(), max_patches=9).n_tokens
    1728
    """
    if patch_size <= 0 or view_size < patch_size:
        raise ConfigError(f"view size {view_size} must be at least the patch size {patch_size} (> 0)")
    pins = tuple((int(h), int(w)) for h, w in pinpoints)
    if not pins:
        raise ConfigError("anyres needs at least one grid pinpoint")
    for h, w in pins:
        if h <= 0 or w <= 0 or h % view_size or w % view_size:
            raise ConfigError(f"grid pinpoint {[h, w]} is not a positive multiple of the view size {view_size}")
    if max_patches is not None and max_patches <= 0:
        raise ConfigError(f"anyres_max must be positive, got {max_patches}")
    return _anyres_geometry(_check_size(image_size), int(view_size), int(patch_size), pins, max_patches)


@functools.lru_cache(maxsize=4096)
def _anyres_geometry(
    image_size: tuple[int, int], view_size: int, patch_size: int, pins: Pinpoints, max_patches: int | None
) -> AnyresLayout:
    width, height = image_size
    base_view = View(
        y=_seen(Axis.identity(height).resize(view_size), view_size, patch_size),
        x=_seen(Axis.identity(width).resize(view_size), view_size, patch_size),
    )
    base = GridPart(PatchGrid(base_view, patch_size))

    best_h, best_w = select_best_resolution(image_size, pins)
    new_h, new_w = fitted_size(image_size, (best_h, best_w))
    pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas = View(
        y=_seen(Axis.identity(height).resize(new_h).pad(pad_y, best_h - new_h - pad_y), view_size, patch_size),
        x=_seen(Axis.identity(width).resize(new_w).pad(pad_x, best_w - new_w - pad_x), view_size, patch_size),
    )
    grid = PatchGrid(canvas, patch_size)
    rows, cols = unpad_ranges(image_size, *grid.shape)
    kept = (rows[1] - rows[0], cols[1] - cols[0])
    shape = downscaled_shape(*kept, view_size // patch_size, max_patches) or kept
    hd = AnyresGrid(grid, rows=rows, cols=cols, shape=shape)
    return AnyresLayout(base=base, grid=hd, best_resolution=(best_h, best_w))


def _seen(axis: Axis, view_size: int, patch_size: int) -> Axis:
    """The pixels the vision tower's patch convolution sees, crop by crop.

    A ``view_size`` crop yields ``view_size // patch_size`` patches per side; the last
    ``view_size % patch_size`` pixels of each crop (6 at 384/14, none at 336/14) fall outside
    every patch, so they are dropped here. ``axis`` spans whole crops.
    """
    seen = (view_size // patch_size) * patch_size
    if seen == view_size:
        return axis
    parts = [axis.crop(start, seen).source for start in range(0, axis.length, view_size)]
    source = np.concatenate(parts)
    source.setflags(write=False)
    return Axis(source)
