"""Boxes to image tokens for dynamic-resolution models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): resize, then merge.

Qwen2-VL resizes an image to the nearest size whose sides are multiples of ``patch * merge``
(``smart_resize``: keep the aspect ratio, stay within ``[min_pixels, max_pixels]``), cuts it into
``patch`` x ``patch`` vision patches, and merges every ``merge`` x ``merge`` block of patches into one
language-model token. So one image token shows a ``patch * merge`` square of the resized image
(28 x 28 pixels for the released Qwen2-VL checkpoints, 32 x 32 for Qwen3-VL's 16-px patches), the
tokens run row-major over the merged grid, and
there is no padding. The pixel rule is the one of :mod:`vlmflow.positions.patches` (nearest source
pixel); the pixel oracle of the tests (``tests/support/family_oracles.py``) checks it against the
real image processor.
"""

from __future__ import annotations

import functools
import math

from vlmflow.errors import ConfigError, SampleError
from vlmflow.positions.patches import Axis, GridPart, PatchGrid, TokenLayout, View, _check_size

#: The released Qwen2-VL / Qwen2.5-VL processors' pixel bounds (``size`` shortest/longest edge).
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 1280
#: The released Qwen3-VL processors' pixel bounds (16-px patches merged 2 x 2).
QWEN3_VL_MIN_PIXELS = 65536
QWEN3_VL_MAX_PIXELS = 16777216


def dynamic_resize(width: int, height: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` Qwen2-VL resizes an image to: multiples of ``factor``, pixels within bounds.

    Rounds each side to the nearest multiple of ``factor`` (Python's ``round``, halves to even); if
    that holds more than ``max_pixels`` (fewer than ``min_pixels``) pixels, scales both sides by the
    same factor ``beta`` and rounds down (up) instead.

    >>> dynamic_resize(500, 375, factor=28, min_pixels=QWEN2_VL_MIN_PIXELS, max_pixels=QWEN2_VL_MAX_PIXELS)
    (504, 364)
    """
    if max(height, width) / min(height, width) > 200:
        raise SampleError(
            f"a {width}x{height} image has an aspect ratio above 200, which Qwen2-VL's processor refuses",
            stage="image",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return w_bar, h_bar


def dynamic_geometry(
    image_size: tuple[int, int],
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = QWEN2_VL_MIN_PIXELS,
    max_pixels: int = QWEN2_VL_MAX_PIXELS,
) -> TokenLayout:
    """Token layout of one image in Qwen2-VL / Qwen2.5-VL: a merged patch grid over the resized image.

    >>> g = dynamic_geometry((500, 375))
    >>> g.n_tokens, g.parts[0].grid.shape
    (234, (13, 18))
    """
    if patch_size <= 0 or merge_size <= 0:
        raise ConfigError(f"patch size and merge size must be positive, got {patch_size} and {merge_size}")
    if not 0 < min_pixels <= max_pixels:
        raise ConfigError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    return _dynamic_geometry(_check_size(image_size), int(patch_size), int(merge_size), int(min_pixels), int(max_pixels))


@functools.lru_cache(maxsize=4096)
def _dynamic_geometry(image_size: tuple[int, int], patch: int, merge: int, min_pixels: int, max_pixels: int) -> TokenLayout:
    width, height = image_size
    new_w, new_h = dynamic_resize(width, height, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    view = View(y=Axis.identity(height).resize(new_h), x=Axis.identity(width).resize(new_w))
    return TokenLayout((GridPart(PatchGrid(view, patch * merge)),))


def qwen3_video_resize(
    n_frames: int, width: int, height: int, *, factor: int, temporal_factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """``(width, height)`` Qwen3-VL resizes every frame of an ``n_frames``-frame video to.

    As :func:`dynamic_resize`, but the pixel bounds hold for the whole video (frames rounded to a
    multiple of ``temporal_factor``), and a side below ``factor`` is first scaled up to it.

    >>> qwen3_video_resize(4, 500, 375, factor=32, temporal_factor=2, min_pixels=4096, max_pixels=25165824)
    (512, 384)
    """
    if n_frames < temporal_factor:
        raise SampleError(
            f"a {n_frames}-frame video is shorter than the temporal patch of {temporal_factor} frames Qwen3-VL needs",
            stage="image",
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise SampleError(f"a {width}x{height} frame has an aspect ratio above 200, which Qwen3-VL refuses", stage="image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(n_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((n_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (n_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return w_bar, h_bar


def resized_geometry(image_size: tuple[int, int], resized: tuple[int, int], *, patch_size: int, merge_size: int) -> TokenLayout:
    """Token layout of an image (or video frame) resized to ``resized`` ``(width, height)``: one merged
    patch grid, row-major, as for :func:`dynamic_geometry` (which picks the size itself).

    >>> resized_geometry((500, 375), (512, 384), patch_size=16, merge_size=2).n_tokens
    192
    """
    width, height = _check_size(image_size)
    new_w, new_h = resized
    token = patch_size * merge_size
    if new_w % token or new_h % token:
        raise ConfigError(f"a {new_w}x{new_h} view does not split into {token}-px merged patches")
    view = View(y=Axis.identity(height).resize(new_h), x=Axis.identity(width).resize(new_w))
    return TokenLayout((GridPart(PatchGrid(view, token)),))
