"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, 2-layer projector, Llama decoder.

Real targets: ``llava-hf/llava-1.5-7b-hf`` and ``llava-hf/llava-1.5-13b-hf``; the shipped organism
and the tiny test models use the same class.

Image preprocessing follows the original LLaVA-1.5 (``image_aspect_ratio="pad"``): the image is
padded to a square with the processor's mean colour (``expand2square``) and then resized; the HF
checkpoints' processors would otherwise resize the short side and centre-crop, cutting off a
quarter of a 4:3 GQA image. ``image_mode`` may be set to ``"resize"`` (squash) or ``"crop"`` (the HF
processor's own behaviour) to study the difference.

``patch_rule="paper"`` relates a token to a box by the official code's rule (the painted mask through
the same preprocessing, bicubic, a patch holding an exactly red pixel:
:func:`vlmflow.positions.paper_rule.paper_rule_tokens`) instead of the pixel overlap.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from PIL import Image
from torch import nn
from transformers import LlavaForConditionalGeneration

from vlmflow.adapters.family import ModelFamily
from vlmflow.adapters.pipeline import InputPipeline
from vlmflow.adapters.registry import register_family
from vlmflow.errors import ConfigError
from vlmflow.inputs import Encoded
from vlmflow.positions.layout import ImageLayout

IMAGE_MODES = ("pad", "resize", "crop")


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a square, centred, with ``color`` (LLaVA's ``expand2square``).

    >>> expand_to_square(Image.new("RGB", (4, 2)), (1, 2, 3)).size
    (4, 4)
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, ((side - width) // 2, (side - height) // 2))
    return out


def processor_view(processor: Any) -> tuple[int, int]:
    """``(view_size, patch_size)`` of a LLaVA processor: the square side the tower sees, the patch."""
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None)
    if getattr(ip, "do_center_crop", False) and crop:
        side = int(crop["height"] if isinstance(crop, Mapping) else crop.height)
    else:
        size = ip.size
        side = int(size["shortest_edge"] if "shortest_edge" in size else size["height"])
    return side, int(processor.patch_size)


class LlavaInputs(InputPipeline):
    """LLaVA-1.5 inputs: the image padded to a square (or resized, or cropped), then the processor."""

    option_names = ("image_mode",)
    image_separator = "\n"
    patch_rules = ("overlap", "paper")

    def configure(self) -> None:
        mode = str(self.options.get("image_mode", "pad"))
        if mode not in IMAGE_MODES:
            raise ConfigError(f"unknown image_mode {mode!r} for LLaVA; valid: {', '.join(IMAGE_MODES)}")
        self.mode = mode
        self.view, self.patch = processor_view(self.processor)

    def preprocess_image(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        if self.mode == "pad":
            mean = self.processor.image_processor.image_mean
            return expand_to_square(image, tuple(int(255 * m) for m in mean))
        if self.mode == "resize":
            resample = self.processor.image_processor.resample
            return image.resize((self.view, self.view), resample=Image.Resampling(int(resample)))
        return image

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        from vlmflow.positions.patches import llava_geometry

        geometry = llava_geometry(encoded.sizes[index], mode=self.mode, view_size=self.view, patch_size=self.patch)
        rule = None
        if self.patch_rule == "paper":
            from vlmflow.positions.paper_rule import paper_rule_tokens

            rule = functools.partial(
                paper_rule_tokens,
                encoded.sizes[index],
                mode=self.mode,
                view_size=self.view,
                patch_size=self.patch,
                image_mean=tuple(self.processor.image_processor.image_mean),
            )
        return ImageLayout(n_tokens=int(geometry.n_tokens), geometry=geometry, related_rule=rule)


@register_family
class LlavaFamily(ModelFamily):
    """LLaVA-1.5 family (``LlavaForConditionalGeneration``), vicuna_v1 prompt, pad-to-square images."""

    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    default_template = "vicuna_v1"
    description = "LLaVA-1.5 (CLIP + Llama); pad-to-square + resize, 576 image tokens at 336/14"
    support = {
        "prompt": "vicuna_v1 as in the paper (also vicuna_nosys)",
        "groups": "image (one item per image), related/other/padding (pad-to-square, boxes per image)",
        "box mapping": "pad / resize / crop + 14-px patches; == LlavaImageProcessorPil pixel oracle on all released GQA geometries; "
        "patch_rule paper: the official code's rule",
        "attention": "causal",
        "fast engine": "exact (causal: recompute from the first target)",
        "verified": "three tiny random LLaVA shapes via save/from_pretrained: fast == reference (sdpa, eager), incl. "
        "two-image routes",
    }
    inputs_class = LlavaInputs

    def model_class(self) -> type[nn.Module]:
        return LlavaForConditionalGeneration
