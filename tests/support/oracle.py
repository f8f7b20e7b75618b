"""Pixel oracle for the box-to-token rule: paint masks, run the real image processor, read patches.

This is an independent check of :mod:`vlmflow.positions.patches` and shares no code with it: the
boxes are painted into mask images, the masks go through transformers' own LLaVA image processor
(``LlavaImageProcessorPil``: ``pad_to_square`` with the mean colour, resize, centre crop) with
rescaling and normalisation off, and the processed views are cut into patches.

Pixel rule (the same as the analytic module's, so the two agree exactly):

* the oracle resizes with ``resample=NEAREST``, so every processed pixel is an unaltered copy of
  one mask pixel (the real pipeline resizes bicubically; ``NEAREST`` copies the pixel under each
  output pixel's centre, which is what "the pixel at this position after preprocessing" means);
* original pixel ``(i, j)`` is painted for ``Box(x, y, w, h)`` when ``x <= i < x + w`` and
  ``y <= j < y + h`` (half-open);
* a patch is related when it holds a painted pixel, padding when it holds no image pixel.

Because nearest resampling never mixes values, many geometries of one image size share a mask: the
red and green channels carry 16 bit-planes (one geometry each) and the blue channel is 255 on
image pixels, so padding (blue = the mean colour's 104 for CLIP) is told apart in the same pass.

The paper's own rule (inclusive ``ImageDraw.rectangle``, bicubic resize, exactly-red pixels) is
:func:`vlmflow.positions.paper_rule.paper_rule_tokens`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from vlmflow.data.sample import Box
from vlmflow.positions.paper_rule import OPENAI_CLIP_MEAN, mask_processor

_PLANES = 16  # geometries per mask: 8 bit-planes in red + 8 in green
_IMAGE_BLUE = 255

Geometry = tuple[tuple[int, int], tuple[Box, ...]]  # ((width, height), boxes)


@dataclass(frozen=True)
class OracleTokens:
    """What the processed mask shows, per image token (row-major patches)."""

    related: np.ndarray  # bool (n_tokens,): patch holds a pixel painted for a box
    padding: np.ndarray  # bool (n_tokens,): patch holds no image pixel


def oracle_tokens(
    geometries: Sequence[tuple[tuple[int, int], Sequence[Box]]],
    *,
    mode: Literal["pad", "resize", "crop"],
    view_size: int,
    patch_size: int,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
) -> list[OracleTokens]:
    """Related and padding tokens of each ``((width, height), boxes)`` read off processed masks.

    Identical geometries are computed once; geometries of one image size share masks (16 each).

    >>> out = oracle_tokens([((40, 20), [Box(0, 0, 10, 20)])], mode="pad", view_size=28, patch_size=14)
    >>> out[0].related.astype(int).tolist(), out[0].padding.astype(int).tolist()
    ([1, 0, 1, 0], [0, 0, 0, 0])
    """
    processor = mask_processor(mode, view_size, image_mean=image_mean)
    pad_blue = int(255 * image_mean[2])
    if mode == "pad" and pad_blue == _IMAGE_BLUE:
        raise ValueError("the padding colour's blue is 255, so the oracle cannot tell padding from image")
    keys = [_key(size, boxes) for size, boxes in geometries]
    by_size: dict[tuple[int, int], list[tuple[tuple[float, float, float, float], ...]]] = defaultdict(list)
    for size, boxes in dict.fromkeys(keys):
        by_size[size].append(boxes)
    results: dict[Geometry | tuple, OracleTokens] = {}
    for size, box_sets in by_size.items():
        chunks = [box_sets[i : i + _PLANES] for i in range(0, len(box_sets), _PLANES)]
        masks = [_bit_mask(size, chunk) for chunk in chunks]
        pixels = np.asarray(processor(images=masks, return_tensors="np")["pixel_values"])  # (N, 3, S, S)
        for chunk, view in zip(chunks, pixels, strict=True):
            related, padding = _read_view(view, len(chunk), patch_size, pad_blue)
            for k, boxes in enumerate(chunk):
                results[(size, boxes)] = OracleTokens(related=related[k], padding=padding)
    return [results[key] for key in keys]


def _key(size: tuple[int, int], boxes: Sequence[Box]) -> tuple:
    return (int(size[0]), int(size[1])), tuple((float(b.x), float(b.y), float(b.w), float(b.h)) for b in boxes)


def _bit_mask(size: tuple[int, int], chunk: Sequence[tuple[tuple[float, float, float, float], ...]]) -> Image.Image:
    width, height = size
    cols, rows = np.arange(width), np.arange(height)
    bits = np.zeros((height, width), dtype=np.uint16)
    for k, boxes in enumerate(chunk):
        for x, y, w, h in boxes:
            in_rows = (rows >= y) & (rows < y + h)
            in_cols = (cols >= x) & (cols < x + w)
            bits[np.ix_(in_rows, in_cols)] |= np.uint16(1 << k)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rgb[..., 0] = bits & 0xFF
    rgb[..., 1] = bits >> 8
    rgb[..., 2] = _IMAGE_BLUE
    return Image.fromarray(rgb, mode="RGB")


def _read_view(view: np.ndarray, n_planes: int, patch: int, pad_blue: int) -> tuple[np.ndarray, np.ndarray]:
    # view: (3, S, S) values 0..255 -> related (n_planes, n_tokens), padding (n_tokens,)
    view = np.asarray(view)
    blue = view[2]
    if not np.isin(blue, (_IMAGE_BLUE, pad_blue)).all():
        raise RuntimeError("processed mask has mixed pixel values: the processor did not resample with NEAREST")
    image_px = blue == _IMAGE_BLUE
    bits = (view[0].astype(np.uint32) | (view[1].astype(np.uint32) << 8)) * image_px
    side = bits.shape[0]
    n = side // patch
    if n * patch != side or bits.shape[1] != side:
        raise ValueError(f"a {bits.shape[1]}x{side} view does not split into {patch}x{patch} patches")
    # (S, S) -> (n, patch, n, patch): OR over each patch's pixels keeps every geometry's bit.
    patch_bits = np.bitwise_or.reduce(np.bitwise_or.reduce(bits.reshape(n, patch, n, patch), axis=3), axis=1)
    related = ((patch_bits.reshape(-1)[None, :] >> np.arange(n_planes)[:, None]) & 1).astype(bool)
    padding = ~image_px.reshape(n, patch, n, patch).any(axis=(1, 3)).reshape(-1)
    return related, padding
