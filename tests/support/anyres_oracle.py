"""Pixel oracle for anyres geometries: painted masks through the real processor and the model's own packing.

An independent check of :mod:`vlmflow.positions.anyres` (it shares no geometry code with it):

1. boxes are painted into mask images (16 geometries of one image size per mask, as bit-planes in
   the red and green channels; blue is 255 on every image pixel, the black fill is 0), exactly as
   :mod:`support.oracle` does for single-view LLaVA;
2. the masks go through the **real Hugging Face processor** (``LlavaNextProcessor`` or
   ``LlavaOnevisionProcessor`` with the checkpoint's image-processor settings, but nearest
   resampling and no rescaling or normalisation), which also expands the image placeholder: its
   image-token count is read off ``input_ids``;
3. every processed view is cut into the vision tower's patches (the pixels past the last whole
   patch, 6 at 384/14, are dropped as the patch convolution drops them); each patch becomes a
   feature vector: one channel per bit-plane (1 when a pixel of the patch carries the bit) and one
   "shows the image" channel;
4. those features go through **the model's own** ``pack_image_features`` (un-padding, OneVision's
   bilinear downscaling, newline tokens, base view first) with a newline vector of -1, so each
   output row is one image token in the model's order.

A token is related to geometry ``k`` when channel ``k`` is positive (for a downscaled token: some
patch it takes a non-zero weight from carries the bit), padding when the image channel is 0, a
newline when every channel is -1.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from support.oracle import _IMAGE_BLUE, _PLANES, _bit_mask, _key
from vlmflow.data.sample import Box

#: ``pack(features, image_sizes)``: per image ``[views, patches, channels]`` -> ``[tokens, channels]``.
Packer = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class AnyresOracleTokens:
    """What the processed mask shows, per image token, in the model's order."""

    related: np.ndarray  # bool (n_tokens,)
    padding: np.ndarray  # bool (n_tokens,): patch token showing no image pixel
    newline: np.ndarray  # bool (n_tokens,)
    processor_count: int  # image tokens the processor put into input_ids


def nearest_image_processor(image_processor_class: type, config: Mapping[str, Any]) -> Any:
    """``image_processor_class(**config)`` with nearest resampling, values kept 0-255.

    >>> from transformers import LlavaNextImageProcessorPil
    >>> nearest_image_processor(LlavaNextImageProcessorPil, {"size": {"shortest_edge": 336}}).do_rescale
    False
    """
    settings = {k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class")}
    settings.update(resample=int(Image.Resampling.NEAREST), do_rescale=False, do_normalize=False)
    return image_processor_class(**settings)


def llava_next_packer(model_config: Any) -> Packer:
    """The packing step of ``LlavaNextModel`` (un-pad, newline per row, base view first)."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    # pack_image_features reads nothing but ``self.config``; no weights are built.
    owner = SimpleNamespace(config=model_config)

    def pack(features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        packed, _ = LlavaNextModel.pack_image_features(
            owner, features, image_sizes, vision_feature_select_strategy="default", image_newline=newline
        )
        return list(packed)

    return pack


def llava_onevision_packer(model_config: Any) -> Packer:
    """The packing step of ``LlavaOnevisionModel`` (un-pad, ``anyres_max`` downscale, newlines)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    owner = SimpleNamespace(config=model_config)

    def pack(features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        packed, _ = LlavaOnevisionModel.pack_image_features(
            owner, features, image_sizes, image_newline=newline, vision_aspect_ratio=model_config.vision_aspect_ratio
        )
        return list(packed)

    return pack


def anyres_oracle_tokens(
    geometries: Sequence[tuple[tuple[int, int], Sequence[Box]]],
    *,
    processor: Any,
    pack: Packer,
    patch_size: int,
) -> list[AnyresOracleTokens]:
    """Related, padding and newline tokens of each ``((width, height), boxes)``, read off processed masks.

    Args:
        geometries: image sizes with their boxes; identical ones are computed once.
        processor: a LLaVA-NeXT or OneVision processor whose image processor resamples with
            NEAREST and neither rescales nor normalises (:func:`nearest_image_processor`).
        pack: the model's packing step (:func:`llava_next_packer`, :func:`llava_onevision_packer`).
        patch_size: the vision tower's patch side.
    """
    keys = [_key(size, boxes) for size, boxes in geometries]
    by_size: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    for size, boxes in dict.fromkeys(keys):
        by_size[size].append(boxes)
    placeholder = processor.image_token
    results: dict[tuple, AnyresOracleTokens] = {}
    for size, box_sets in by_size.items():
        chunks = [box_sets[i : i + _PLANES] for i in range(0, len(box_sets), _PLANES)]
        masks = [_bit_mask(size, chunk) for chunk in chunks]
        batch = processor(images=masks, text=[placeholder] * len(masks))  # lists: no tensor conversion
        counts = [ids.count(processor.image_token_id) for ids in batch["input_ids"]]
        pixels = batch["pixel_values"]  # per mask (views, 3, S, S)
        features = [_patch_features(np.asarray(views), patch_size) for views in pixels]
        newline = torch.full((_PLANES + 1,), -1.0)
        packed = pack(features, torch.as_tensor(np.asarray(batch["image_sizes"])), newline)
        for chunk, tokens, count in zip(chunks, packed, counts, strict=True):
            tokens = tokens.numpy()  # (n_tokens, planes + 1)
            newline_rows = (tokens == -1).all(axis=1)
            padding = (tokens[:, _PLANES] <= 0) & ~newline_rows
            for k, boxes in enumerate(chunk):
                related = (tokens[:, k] > 0) & ~newline_rows
                results[(size, boxes)] = AnyresOracleTokens(related, padding, newline_rows, int(count))
    return [results[key] for key in keys]


def _patch_features(views: np.ndarray, patch: int) -> torch.Tensor:
    # views: (V, 3, S, S) uint8 -> (V, n*n, planes + 1) float32: bit channels, then "shows the image"
    blue = views[:, 2]
    if not ((blue == _IMAGE_BLUE) | (blue == 0)).all():
        raise RuntimeError("processed mask has mixed pixel values: the processor did not resample with NEAREST")
    n = views.shape[-1] // patch
    seen = n * patch  # the patch convolution drops the pixels past the last whole patch
    image_px = (blue == _IMAGE_BLUE)[:, :seen, :seen]
    bits = (views[:, 0].astype(np.uint32) | (views[:, 1].astype(np.uint32) << 8))[:, :seen, :seen] * image_px
    n_views = views.shape[0]
    patch_bits = np.bitwise_or.reduce(bits.reshape(n_views, n, patch, n, patch), axis=(2, 4))
    planes = (patch_bits.reshape(n_views, n * n, 1) >> np.arange(_PLANES)) & 1  # (V, n*n, planes)
    shows_image = image_px.reshape(n_views, n, patch, n, patch).any(axis=(2, 4)).reshape(n_views, n * n, 1)
    return torch.from_numpy(np.concatenate([planes, shows_image], axis=2).astype(np.float32))
