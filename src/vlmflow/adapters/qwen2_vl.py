"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, 2 x 2 patch merging, M-RoPE positions.

Real targets: ``Qwen/Qwen2-VL-{2B,7B}-Instruct`` (``Qwen2VLForConditionalGeneration``) and
``Qwen/Qwen2.5-VL-{3B,7B}-Instruct`` (``Qwen2_5_VLForConditionalGeneration``). The language model
is causal; what differs from LLaVA:

* **prompt** — the ChatML format of the checkpoints' chat template with its default system message;
  the image is ``<|vision_start|><|image_pad|><|vision_end|>`` and ``<|image_pad|>`` is repeated once
  per merged token (``t * h * w / merge**2`` of ``image_grid_thw``) by the adapter itself, because
  the HF processor needs a torchvision video processor (:mod:`vlmflow.adapters.expansion`);
  ``mm_token_type_ids`` (1 at image tokens) is passed, as transformers 5 requires for M-RoPE;
* **positions** — M-RoPE: every position has (temporal, height, width) ids ``[3, 1, seq]`` from the
  model's own ``get_rope_index`` (image tokens share the temporal id and step over rows/columns,
  text continues after the image's largest id); the fast engine takes the suffix's columns;
* **geometry** — one merged grid over the resized image (:mod:`vlmflow.positions.dynamic_grid`):
  234 tokens for a 500 x 375 GQA image, no padding.

Checkpoints with sliding-window layers (``use_sliding_window``, used by no released Qwen2-VL) are
refused: transformers applies that window only inside flash-attention kernels, which cannot take a
knockout mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.expansion import (
    check_template_tokens,
    encode_expanded,
    image_tensors,
    load_image_text_processor,
)
from vlmflow.adapters.family import ModelFamily
from vlmflow.adapters.pipeline import InputPipeline
from vlmflow.adapters.qwen_video import QwenVideo, with_token_types
from vlmflow.adapters.registry import register_family
from vlmflow.errors import ConfigError, UnsupportedModelError
from vlmflow.inputs import Encoded
from vlmflow.positions.layout import ImageLayout
from vlmflow.prompts import ANSWER_SUFFIX, PromptTemplate, register_template

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"

#: The chat template of the Qwen2-VL / Qwen2.5-VL instruct checkpoints (default system message, one
#: user turn holding the image and then the paper's question text, generation prompt).
QWEN_TEMPLATE = register_template(
    PromptTemplate(
        name="qwen2_vl",
        pattern=(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{image}{question}"
            + ANSWER_SUFFIX
            + "<|im_end|>\n<|im_start|>assistant\n"
        ),
    )
)


class Qwen2VLInputs(QwenVideo, InputPipeline):
    """Qwen2-VL inputs: ``<|image_pad|>`` (``<|video_pad|>``) expanded per merged token by vlmflow,
    ``mm_token_type_ids`` added; several images, or a video (:mod:`vlmflow.adapters.qwen_video`)."""

    def configure(self) -> None:
        check_template_tokens(self.tokenizer, self.template)
        ip = self.processor.image_processor
        if not getattr(ip, "do_resize", True):
            raise ConfigError("the Qwen2-VL image processor has do_resize=False; the token layout needs its resize")
        self.check_video_settings()

    @property
    def image_token(self) -> str:
        return VISION_START + IMAGE_PAD + VISION_END

    def encode_images(self, question: str, images: Sequence[Image.Image]) -> Encoded:
        ip = self.processor.image_processor
        pixels = image_tensors(ip(images=[image.convert("RGB") for image in images], return_tensors="pt"))
        counts = [int(grid.prod()) // int(ip.merge_size) ** 2 for grid in pixels["image_grid_thw"]]
        encoded = encode_expanded(
            self.model,
            self.tokenizer,
            self.template,
            self.render(question, len(images)),
            placeholder=self.image_token,
            expansions=[VISION_START + IMAGE_PAD * n + VISION_END for n in counts],
            image_inputs=pixels,
            image_sizes=[image.size for image in images],
            token_id=self.image_token_id,
            n_tokens=sum(counts),
        )
        return with_token_types(encoded, self.model)

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        from vlmflow.positions.dynamic_grid import dynamic_geometry

        ip = self.processor.image_processor
        geometry = dynamic_geometry(
            encoded.sizes[index],
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            min_pixels=int(ip.size["shortest_edge"]),
            max_pixels=int(ip.size["longest_edge"]),
        )
        return ImageLayout(n_tokens=int(geometry.n_tokens), geometry=geometry)


class Qwen25VLInputs(Qwen2VLInputs):
    """Qwen2.5-VL inputs: as Qwen2-VL's; a video also carries the seconds each temporal patch spans."""

    seconds_per_grid = True


class Qwen2VLDecoder(DecoderMap):
    """Qwen2-VL's decoder: M-RoPE position ids, layers that take no position ids, no sliding window."""

    def check_attention_backend(self) -> None:
        super().check_attention_backend()
        if "sliding_attention" in getattr(self.language_model.config, "layer_types", ()):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} with use_sliding_window=True is not supported: transformers applies the "
                "window only in flash-attention, which cannot take a knockout mask"
            )

    def position_ids(self, encoded: Encoded) -> torch.Tensor:
        """M-RoPE ids ``[3, 1, seq]`` (temporal, height, width), as the model computes them."""
        inputs = encoded.inputs
        # Only what the model itself hands get_rope_index (video grids and, for Qwen2.5-VL, seconds per grid).
        extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
        position_ids, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            attention_mask=inputs.get("attention_mask"),
            **extra,
        )
        return position_ids

    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        position_embeddings: Any,
        cache: Any,
        **attention_kwargs: Any,
    ) -> torch.Tensor:
        # The model passes no position ids to its layers (only flash-attention packing reads them);
        # the rotation comes entirely from `position_embeddings`.
        return super().run_layer(layer, hidden, mask, None, position_embeddings, cache, **attention_kwargs)


@register_family
class Qwen2VLFamily(ModelFamily):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``)."""

    family = "qwen2_vl"
    architectures: tuple[str, ...] = ("Qwen2VLForConditionalGeneration",)
    default_template = "qwen2_vl"
    description = "Qwen2-VL: dynamic resolution, 2x2 merged 28-px tokens, M-RoPE"
    support = {
        "prompt": "ChatML (qwen2_vl), <|image_pad|> expanded per merged token",
        "groups": "image (one item per image or video), frame (one item per model frame: 2 input frames), related/other "
        "per image or frame box (one merged grid), no padding",
        "box mapping": "smart_resize + 28-px merged patches; == Qwen2VLImageProcessorPil pixel oracle",
        "attention": "causal; M-RoPE position ids from get_rope_index",
        "fast engine": "exact (causal: recompute from the first target)",
        "verified": "tiny random Qwen2-VL via save/from_pretrained: fast == reference (sdpa, eager), incl. two-image and "
        "video routes (frame targets); video counts == transformers' smart_resize and replace_video_token, positions "
        "from get_rope_index; frame boxes == pixel oracle",
    }
    video = True
    inputs_class = Qwen2VLInputs
    decoder_class = Qwen2VLDecoder

    def model_class(self) -> type[nn.Module]:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def load_processor(self, source: str, **kwargs: Any) -> Any:
        return load_image_text_processor(source, video_defaults=self.inputs_class.video_defaults, **kwargs)


@register_family
class Qwen25VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's language side and geometry,
    a window-attention vision tower (invisible to the language model)."""

    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    description = "Qwen2.5-VL: as Qwen2-VL (dynamic resolution, 2x2 merge, M-RoPE), windowed vision tower"
    support = {
        **Qwen2VLFamily.support,
        "verified": "tiny random Qwen2.5-VL via save/from_pretrained: fast == reference (sdpa, eager), incl. two-image "
        "and video routes (temporal ids scaled by time)",
    }
    inputs_class = Qwen25VLInputs

    def model_class(self) -> type[nn.Module]:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
