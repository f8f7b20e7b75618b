"""The official code's box-to-token rule for LLaVA-1.5, kept to measure how far it is from ours.

The paper's code paints each box into a mask with ``ImageDraw.rectangle`` (inclusive, so one pixel
wider and taller than the box), runs the mask through the LLaVA image processor (pad to square with
the mean colour, bicubic resize) and keeps the patches holding an exactly red pixel. Bicubic
resampling blurs the mask, so boxes lose or gain border patches compared with
:mod:`vlmflow.positions.patches` (half-open boxes, the pixel under each processed pixel's centre).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from vlmflow.data.sample import Box

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


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


def paper_rule_tokens(
    image_size: tuple[int, int],
    boxes: Sequence[Box],
    *,
    view_size: int = 336,
    patch_size: int = 14,
    resample: int = Image.Resampling.BICUBIC,
    processor: Any = None,
) -> np.ndarray:
    """Related tokens by the paper's rule for LLaVA-1.5 (pad to square), bool ``(n_tokens,)``.

    Green mask, each box filled red with ``ImageDraw.rectangle((x, y, x + w, y + h))`` (inclusive,
    so one pixel wider and taller than the box), pad to square with the mean colour, resize
    (bicubic by default), and keep patches holding a pixel exactly ``(255, 0, 0)``.

    >>> int(paper_rule_tokens((28, 28), [Box(0, 0, 14, 14)], view_size=28, patch_size=14).sum())
    4
    """
    processor = processor or mask_processor("pad", view_size, resample=resample)
    mask = Image.new("RGB", tuple(int(v) for v in image_size), (0, 255, 0))
    draw = ImageDraw.Draw(mask)
    for b in boxes:
        draw.rectangle((b.x, b.y, b.x + b.w, b.y + b.h), fill=(255, 0, 0))
    view = np.asarray(processor(images=[mask], return_tensors="np")["pixel_values"])[0]  # (3, S, S)
    red = (view[0] == 255) & (view[1] == 0) & (view[2] == 0)
    n = view.shape[1] // patch_size
    return red.reshape(n, patch_size, n, patch_size).any(axis=(1, 3)).reshape(-1)
