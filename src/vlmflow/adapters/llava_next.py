"""LLaVA-NeXT / LLaVA-v1.6 (``LlavaNextForConditionalGeneration``): CLIP tower, anyres tiling, Llama decoder.

Real targets: the paper's ``llava-hf/llava-v1.6-vicuna-7b-hf`` (vicuna_v1 prompt) and
``llava-hf/llama3-llava-next-8b-hf`` (llava_llama_3 prompt, chosen when the tokenizer has the
Llama-3 header tokens; nothing here looks at a checkpoint's name).

Image tokens (``image_mode="anyres"``, the default and the paper's HD setting): the base view (576
tokens at 336/14), then the high-resolution grid, un-padded, with one newline token after each
row; :mod:`vlmflow.positions.anyres` maps boxes through both views and the un-padding. The count
follows the image's aspect ratio (2340 for a 500x375 GQA image) and is never assumed: the
processor expands the placeholder and the layout must agree with it.

``image_mode="nohd_nopad"`` is the paper's ``--noHD_noPad``: one view, padded to a square with the
mean colour (``expand2square``) and resized to 336, 576 tokens, no grid and no newline token (the
original code's ``image_aspect_ratio="pad"`` with ``mm_patch_merge_type="spatial"``). The HF model
has no such switch: ``pixel_values`` always go through the anyres packing, and even a lone view
gets a newline appended. So the adapter runs the model's own ``get_image_features`` on the padded
square (whose base view is exactly that 336 px view), keeps the base view's 576 features, and
hands them to the model as ``mm_encoder_outputs`` next to ``input_ids`` holding 576 image tokens.

``patch_rule="paper"`` relates tokens to boxes by the official code's rule in both modes: the
painted mask through the base view and the grid (anyres) or the padded view (``nohd_nopad``),
bicubic, a patch holding an exactly red pixel (:mod:`vlmflow.positions.paper_rule`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import LlavaNextForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmflow.adapters.family import ModelFamily
from vlmflow.adapters.llava import expand_to_square
from vlmflow.adapters.pipeline import InputPipeline
from vlmflow.adapters.registry import register_family
from vlmflow.errors import ConfigError, SampleError, UnsupportedModelError
from vlmflow.inputs import Encoded, expand_placeholders, model_inputs
from vlmflow.positions.anyres import AnyresLayout, anyres_geometry
from vlmflow.positions.groups import Group
from vlmflow.positions.layout import ImageLayout

NEXT_IMAGE_MODES = ("anyres", "nohd_nopad")

#: Tokens only a Llama-3 tokenizer has; their presence selects the llava_llama_3 prompt.
LLAMA3_HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _size_side(size: Any, what: str) -> int:
    """Side of a square size setting (``{"shortest_edge": s}`` or ``{"height": s, "width": s}``)."""
    if size is None:
        raise ConfigError(f"the image processor has no {what} setting")
    get = size.get if isinstance(size, Mapping) else lambda k, d=None: getattr(size, k, d)
    if get("shortest_edge", None):
        return int(get("shortest_edge"))
    height, width = get("height", None), get("width", None)
    if height is None or height != width:
        raise ConfigError(f"the image processor's {what} {dict(size) if isinstance(size, Mapping) else size} is not square")
    return int(height)


class AnyresInputs(InputPipeline):
    """What LLaVA-NeXT and LLaVA-OneVision inputs share: anyres tiling, checked against the model once."""

    option_names = ("image_mode",)
    image_separator = "\n"
    #: Image modes of the family; the first is the default.
    image_modes: tuple[str, ...] = ("anyres",)
    #: vision_feature_select_strategy the family's packing works with ("default" drops CLIP's CLS).
    feature_strategy: str = "default"

    def configure(self) -> None:
        mode = str(self.options.get("image_mode", self.image_modes[0])).lower()
        if mode not in self.image_modes:
            raise ConfigError(
                f"unknown image_mode {self.options.get('image_mode')!r} for {self.family}; valid: {', '.join(self.image_modes)}"
            )
        self.mode = mode
        self.view, self.patch, self.pinpoints = self.anyres_settings()

    def max_patches(self) -> int | None:
        """OneVision's ``anyres_max_N`` downscaling bound; ``None``: never downscale."""
        return None

    def anyres_settings(self) -> tuple[int, int, tuple[tuple[int, int], ...]]:
        """``(view_size, patch_size, pinpoints)``, checked to agree between processor and model.

        Raises:
            ConfigError: the processor would tile images differently from how the model packs them.
        """
        config, processor = self.model.config, self.processor
        vision = config.vision_config
        view, patch = int(vision.image_size), int(vision.patch_size)
        pins = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
        strategy = config.vision_feature_select_strategy
        if strategy != self.feature_strategy:
            raise UnsupportedModelError(
                f"{self.family}: vision_feature_select_strategy {strategy!r} is not supported (the image "
                f"features would not tile into the anyres grid); valid: {self.feature_strategy!r}"
            )
        ip = processor.image_processor
        proc_pins = tuple((int(h), int(w)) for h, w in ip.image_grid_pinpoints)
        sides = {"size": _size_side(ip.size, "size")}
        if getattr(ip, "do_center_crop", False):
            sides["crop_size"] = _size_side(ip.crop_size, "crop_size")
        if proc_pins != pins:
            raise ConfigError(
                f"the processor's image_grid_pinpoints {[list(p) for p in proc_pins]} differ from the model's "
                f"{[list(p) for p in pins]}; image tokens would not match their patches"
            )
        for name, side in sides.items():
            if side != view:
                raise ConfigError(f"the processor's {name} {side} differs from the vision tower's image_size {view}")
        proc_patch = getattr(processor, "patch_size", None)
        if proc_patch is not None and int(proc_patch) != patch:
            raise ConfigError(f"the processor's patch_size {proc_patch} differs from the vision tower's {patch}")
        return view, patch, pins

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        geometry = anyres_geometry(
            encoded.sizes[index],
            view_size=self.view,
            patch_size=self.patch,
            pinpoints=self.pinpoints,
            max_patches=self.max_patches(),
        )
        rule = None
        if self.patch_rule == "paper":
            from vlmflow.positions.paper_rule import anyres_paper_rule_tokens

            rule = functools.partial(
                anyres_paper_rule_tokens,
                encoded.sizes[index],
                layout=geometry,
                view_size=self.view,
                patch_size=self.patch,
            )
        return anyres_image_layout(geometry, rule)


def anyres_image_layout(geometry: AnyresLayout, related_rule: Callable[[Sequence[Any]], np.ndarray] | None = None) -> ImageLayout:
    """Image groups of an anyres image: base, grid and newline tokens; newlines never count as "other".

    ``related_rule``: boxes -> related tokens, when not the geometry's pixel overlap.
    """
    newline = geometry.newline_tokens()
    return ImageLayout(
        n_tokens=geometry.n_tokens,
        geometry=geometry,
        subgroups={
            Group.IMAGE_BASE: geometry.base_tokens(),
            Group.IMAGE_GRID: geometry.grid_tokens(),
            Group.IMAGE_NEWLINE: newline,
        },
        excluded_from_other=newline,
        related_rule=related_rule,
    )


class LlavaNextInputs(AnyresInputs):
    """LLaVA-NeXT inputs: anyres, or the paper's single padded view (``image_mode="nohd_nopad"``)."""

    image_modes = NEXT_IMAGE_MODES
    patch_rules = ("overlap", "paper")

    def encode_images(self, question: str, images: Sequence[Image.Image]) -> Encoded:
        if self.mode == "anyres":
            return super().encode_images(question, images)
        if len(images) != 1:
            raise SampleError(f"image_mode nohd_nopad takes one image per prompt, got {len(images)}", stage="prompt")
        return self._encode_single_view(question, images[0])

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        if self.mode == "anyres":
            return super().image_layout(encoded, index)
        from vlmflow.positions.patches import llava_geometry

        geometry = llava_geometry(encoded.sizes[index], mode="pad", view_size=self.view, patch_size=self.patch)
        n = int(geometry.n_tokens)
        rule = None
        if self.patch_rule == "paper":
            from vlmflow.positions.paper_rule import paper_rule_tokens

            rule = functools.partial(
                paper_rule_tokens,
                encoded.sizes[index],
                mode="pad",
                view_size=self.view,
                patch_size=self.patch,
                image_mean=tuple(self.processor.image_processor.image_mean),
            )
        return ImageLayout(
            n_tokens=n,
            geometry=geometry,
            subgroups={
                Group.IMAGE_BASE: np.ones(n, dtype=bool),
                Group.IMAGE_GRID: np.zeros(n, dtype=bool),
                Group.IMAGE_NEWLINE: np.zeros(n, dtype=bool),
            },
            related_rule=rule,
        )

    @torch.no_grad()
    def single_view_features(self, image: Image.Image) -> torch.Tensor:
        """``[576, d_model]`` features of the mean-padded square view (``noHD_noPad``), from the model's own code."""
        ip = self.processor.image_processor
        square = expand_to_square(image.convert("RGB"), tuple(int(255 * m) for m in ip.image_mean))
        pixels = ip(images=square, return_tensors="pt")
        param = next(self.model.parameters())
        features = self.model.model.get_image_features(
            pixel_values=pixels["pixel_values"].to(param.device, param.dtype),
            image_sizes=pixels["image_sizes"].to(param.device),
            return_dict=True,
        ).pooler_output[0]
        # The packed features start with the base view: the square resized to view x view.
        return features[: (self.view // self.patch) ** 2]

    def _encode_single_view(self, question: str, image: Image.Image) -> Encoded:
        features = self.single_view_features(image)
        token = self.image_token
        rendered = self.template.render(question, image_token=token)
        if len(rendered.image_spans) != 1:
            raise SampleError(f"template {self.template.name!r} must hold exactly one image", stage="prompt")
        start, end = rendered.image_spans[0]
        expanded = token * int(features.shape[0])
        replacements = [{"span": (start, end), "new_span": (start, start + len(expanded)), "replacement": expanded}]
        text, question_span = expand_placeholders(rendered, replacements)
        batch = self.tokenizer(
            text, return_tensors="pt", return_offsets_mapping=True, add_special_tokens=self.template.add_special_tokens
        )
        offsets = batch.pop("offset_mapping")[0].numpy()
        inputs = model_inputs({key: batch[key] for key in ("input_ids", "attention_mask")}, self.model)
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[features])}
        return Encoded(
            inputs=inputs,
            input_ids=batch["input_ids"][0].cpu(),
            offsets=offsets,
            text=text,
            question_span=question_span,
            image_size=image.size,
        )


@register_family
class LlavaNextFamily(ModelFamily):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres or the paper's single padded view."""

    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    default_template = "vicuna_v1"
    description = (
        "LLaVA-NeXT / v1.6 (CLIP + Llama/Vicuna/Llama-3); anyres: 576 base + un-padded grid with a newline "
        "per row (2340 tokens at 500x375); image_mode nohd_nopad: one padded view, 576 tokens"
    )
    support = {
        "prompt": "vicuna_v1 (llava-v1.6-vicuna); llava_llama_3 when the tokenizer has Llama-3 header tokens",
        "groups": "image (one item per image), image_base/image_grid/image_newline, related/other through base view + grid "
        "(padding: none)",
        "box mapping": "anyres: base view + best pinpoint crops + un-padding; == processor pixel oracle on all released GQA rows; "
        "patch_rule paper: the official code's rule",
        "attention": "causal",
        "fast engine": "exact (causal: recompute from the first target)",
        "verified": "tiny random vicuna- and Llama-3-style LLaVA-NeXT via save/from_pretrained: fast == reference (sdpa, "
        "eager), anyres and nohd_nopad, two-image routes (anyres)",
    }
    inputs_class = LlavaNextInputs

    def model_class(self) -> type[nn.Module]:
        return LlavaNextForConditionalGeneration

    def default_template_for(self, config: Any, processor: Any) -> str:
        """vicuna_v1, or llava_llama_3 when the tokenizer is Llama-3's (it has the header tokens).

        Raises:
            UnsupportedModelError: a Mistral or ChatML (Yi) LLaVA-NeXT, whose prompts are not built in.
        """
        vocab = processor.tokenizer.get_vocab()
        if all(token in vocab for token in LLAMA3_HEADER_TOKENS):
            return "llava_llama_3"
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        if text_type == "mistral" or "<|im_start|>" in vocab:
            raise UnsupportedModelError(
                f"LLaVA-NeXT with a {'Mistral' if text_type == 'mistral' else 'ChatML'} language model: vlmflow "
                "has no built-in prompt for it (the paper's two are vicuna_v1 and llava_llama_3); name a "
                "template explicitly to use one anyway"
            )
        return self.default_template
