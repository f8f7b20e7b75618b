"""The official code's box-to-token rule (``patch_rule="paper"``), for LLaVA-1.5 and LLaVA-NeXT.

The paper's code paints each box into a mask with ``ImageDraw.rectangle`` (inclusive, so one pixel
wider and taller than the box), runs the mask through the image preprocessing with values kept
0-255 (pad to square with the mean colour, bicubic resize; for anyres models the base view and the
high-resolution grid) and keeps the patches holding a pixel exactly ``(255, 0, 0)``. Bicubic
resampling blurs the mask, so boxes lose or gain border patches compared with
:mod:`vlmflow.positions.patches` (``patch_rule="overlap"``: half-open boxes, the pixel under each
processed pixel's centre).

Anyres (LLaVA-NeXT): the mask goes through the same tiling as the image (paper §5.4 step 3): the
base view is the mask squashed to one view; the grid is the mask resized to fit the best pinpoint
and padded with black (never red), cut into patches and packed as the model packs image features
(un-padding, a newline token after each row: :class:`~vlmflow.positions.anyres.AnyresGrid`).
Newline tokens are never related.

The masks are resized with PIL directly, as the paper's code does (LLaVA's ``expand2square`` and
``process_anyres_image``, the CLIP processor's PIL resize), whatever image processor the model loads
(a torchvision one would resample differently), and without importing transformers. Given a
``processor`` (:func:`mask_processor`, :func:`next_mask_processor`: the Hugging Face PIL image
processors with rescaling and normalisation off), the functions run the mask through it instead;
the tests check that both give the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from vlmflow.data.sample import Box
from vlmflow.errors import ConfigError
from vlmflow.positions.anyres import AnyresLayout, fitted_size
from vlmflow.positions.patches import PREPROCESS_MODES

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
RED = (255, 0, 0)
GREEN = (0, 255, 0)


def mask_processor(
    mode: Literal["pad", "resize", "crop"],
    view_size: int,
    *,
    resample: int = Image.Resampling.NEAREST,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
) -> Any:
    """The transformers LLaVA image processor configured like the pipeline's ``mode``, values kept 0-255.

    With rescaling and normalisation off, a processed mask keeps the colours it was painted with.

    >>> mask_processor("pad", 336).do_pad
    True
    """
    from transformers import LlavaImageProcessorPil

    if mode == "resize":
        size: dict[str, int] = {"height": view_size, "width": view_size}
    elif mode in ("pad", "crop"):
        size = {"shortest_edge": view_size}
    else:
        raise ValueError(f"unknown preprocessing mode {mode!r}; valid: pad, resize, crop")
    return LlavaImageProcessorPil(
        size=size,
        crop_size={"height": view_size, "width": view_size},
        do_center_crop=mode != "resize",
        do_pad=mode == "pad",
        resample=int(resample),
        do_rescale=False,
        do_normalize=False,
        image_mean=list(image_mean),
    )


def next_mask_processor(view_size: int, pinpoints: Sequence[Sequence[int]], *, resample: int = Image.Resampling.BICUBIC) -> Any:
    """The transformers LLaVA-NeXT image processor (PIL) for ``view_size`` and ``pinpoints``, values kept 0-255.

    >>> next_mask_processor(336, [[336, 672]]).do_normalize
    False
    """
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": view_size},
        crop_size={"height": view_size, "width": view_size},
        image_grid_pinpoints=[list(p) for p in pinpoints],
        resample=int(resample),
        do_rescale=False,
        do_normalize=False,
    )


def paper_mask(image_size: tuple[int, int], boxes: Sequence[Box]) -> Image.Image:
    """The paper's mask: green, each box filled red with the inclusive ``ImageDraw.rectangle``.

    >>> np.asarray(paper_mask((4, 3), [Box(1, 0, 1, 1)]))[:, :, 0].tolist()
    [[0, 255, 255, 0], [0, 255, 255, 0], [0, 0, 0, 0]]
    """
    mask = Image.new("RGB", tuple(int(v) for v in image_size), GREEN)
    draw = ImageDraw.Draw(mask)
    for b in boxes:
        draw.rectangle((b.x, b.y, b.x + b.w, b.y + b.h), fill=RED)
    return mask


def red_patches(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """Bool ``(rows, cols)``: the ``patch_size`` patch holds a pixel exactly ``(255, 0, 0)``.

    ``pixels`` is ``(H, W, 3)`` or ``(3, H, W)``; pixels past the last whole patch (which the
    vision tower's patch convolution never sees) are dropped.

    >>> view = np.zeros((4, 4, 3)); view[3, 0] = RED
    >>> red_patches(view, 2).tolist()
    [[False, False], [True, False]]
    """
    if pixels.ndim != 3:
        raise ValueError(f"pixels must be (H, W, 3) or (3, H, W), got shape {pixels.shape}")
    if pixels.shape[0] == 3 and pixels.shape[-1] != 3:
        pixels = np.moveaxis(pixels, 0, -1)
    red = np.all(pixels == np.asarray(RED, dtype=pixels.dtype), axis=-1)  # (H, W)
    rows, cols = red.shape[0] // patch_size, red.shape[1] // patch_size
    red = red[: rows * patch_size, : cols * patch_size]
    return red.reshape(rows, patch_size, cols, patch_size).any(axis=(1, 3))


def single_view(
    mask: Image.Image,
    mode: Literal["pad", "resize", "crop"],
    view_size: int,
    *,
    resample: int = Image.Resampling.BICUBIC,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
) -> Image.Image:
    """The ``view_size`` square a single-view LLaVA sees of ``mask`` (as :func:`~vlmflow.positions.patches.llava_view`).

    ``pad`` is LLaVA's ``expand2square`` (centred on the mean colour ``int(255 * m)``), then a resize.

    >>> single_view(Image.new("RGB", (40, 20)), "pad", 28).size
    (28, 28)
    """
    width, height = mask.size
    if mode == "pad":
        side = max(width, height)
        if width != height:
            square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in image_mean))
            square.paste(mask, ((side - width) // 2, (side - height) // 2))
            mask = square
        return mask.resize((view_size, view_size), resample)
    if mode == "resize":
        return mask.resize((view_size, view_size), resample)
    if mode == "crop":
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(view_size * long / short)  # same float expression as transformers
        new_w, new_h = (view_size, new_long) if width <= height else (new_long, view_size)
        left, top = (new_w - view_size) // 2, (new_h - view_size) // 2
        return mask.resize((new_w, new_h), resample).crop((left, top, left + view_size, top + view_size))
    raise ConfigError(f"unknown preprocessing mode {mode!r}; valid: {', '.join(PREPROCESS_MODES)}")


def paper_rule_tokens(
    image_size: tuple[int, int],
    boxes: Sequence[Box],
    *,
    mode: Literal["pad", "resize", "crop"] = "pad",
    view_size: int = 336,
    patch_size: int = 14,
    resample: int = Image.Resampling.BICUBIC,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    processor: Any = None,
) -> np.ndarray:
    """Related tokens by the paper's rule for a single-view LLaVA (LLaVA-1.5: ``pad``), bool ``(n_tokens,)``.

    Green mask, each box filled red with ``ImageDraw.rectangle((x, y, x + w, y + h))`` (inclusive,
    so one pixel wider and taller than the box), pad to square with the mean colour, resize
    (bicubic by default), and keep patches holding a pixel exactly ``(255, 0, 0)``. With
    ``processor`` (e.g. :func:`mask_processor`), the mask goes through it instead of :func:`single_view`.

    >>> int(paper_rule_tokens((28, 28), [Box(0, 0, 14, 14)], view_size=28, patch_size=14).sum())
    4
    """
    mask = paper_mask(image_size, boxes)
    if processor is not None:
        view = np.asarray(processor(images=[mask], return_tensors="np")["pixel_values"])[0]  # (3, S, S)
    else:
        view = np.asarray(single_view(mask, mode, view_size, resample=resample, image_mean=image_mean))  # (S, S, 3)
    return red_patches(view, patch_size).reshape(-1)


def anyres_paper_rule_tokens(
    image_size: tuple[int, int],
    boxes: Sequence[Box],
    layout: AnyresLayout,
    *,
    view_size: int,
    patch_size: int,
    resample: int = Image.Resampling.BICUBIC,
    processor: Any = None,
) -> np.ndarray:
    """Related tokens by the paper's rule for an anyres (LLaVA-NeXT) image, bool ``(layout.n_tokens,)``.

    The mask's base view (squashed to ``view_size``) gives the base tokens; the mask resized to fit
    ``layout.best_resolution`` and padded with black gives the grid, packed by ``layout.grid``
    (un-padding, newline tokens never related). ``layout`` is the image's
    :func:`~vlmflow.positions.anyres.anyres_geometry` for the same ``view_size`` and ``patch_size``.
    With ``processor`` (e.g. :func:`next_mask_processor` for the same pinpoints), the mask's views
    come from it instead of PIL directly.

    >>> from vlmflow.positions.anyres import anyres_geometry
    >>> g = anyres_geometry((56, 28), view_size=28, patch_size=14, pinpoints=[[28, 56]])
    >>> anyres_paper_rule_tokens((56, 28), [Box(0, 0, 27, 27)], g, view_size=28, patch_size=14).astype(int).tolist()
    [1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    """
    mask = paper_mask(image_size, boxes)
    best_h, best_w = layout.best_resolution
    rows, cols = best_h // view_size, best_w // view_size
    if processor is not None:
        views = np.asarray(processor(images=[mask], return_tensors="np")["pixel_values"])[0]  # (1 + crops, 3, V, V)
        if len(views) != 1 + rows * cols:  # the base view, then the crops row by row
            raise ValueError(f"the mask went through {len(views)} views; the layout has 1 + {rows} x {cols}")
        base = red_patches(views[0], patch_size)
        crops = [red_patches(v, patch_size) for v in views[1:]]  # each (side, side)
        canvas = np.block([crops[r * cols : (r + 1) * cols] for r in range(rows)])  # (rows * side, cols * side)
    else:
        # LLaVA-NeXT's process_anyres_image: base view = the mask squashed; grid = the mask resized
        # to fit the pinpoint, pasted centred on black, cut into view_size crops.
        base = red_patches(np.asarray(mask.resize((view_size, view_size), resample)), patch_size)
        new_h, new_w = fitted_size(image_size, (best_h, best_w))
        padded = Image.new("RGB", (best_w, best_h), (0, 0, 0))
        padded.paste(mask.resize((new_w, new_h), resample), ((best_w - new_w) // 2, (best_h - new_h) // 2))
        pixels = np.asarray(padded)  # (best_h, best_w, 3)
        if view_size % patch_size == 0:
            canvas = red_patches(pixels, patch_size)
        else:  # each crop's pixels past its last whole patch are never seen
            crops = [
                red_patches(pixels[r * view_size : (r + 1) * view_size, c * view_size : (c + 1) * view_size], patch_size)
                for r in range(rows)
                for c in range(cols)
            ]
            canvas = np.block([crops[r * cols : (r + 1) * cols] for r in range(rows)])
    return np.concatenate([base.reshape(-1), layout.grid.pack(canvas)])
