"""Qwen3-VL (dense and MoE): Qwen2-VL's inputs and geometry, interleaved M-RoPE, and DeepStack.

Real targets: ``Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct`` (``Qwen3VLForConditionalGeneration``) and
``Qwen/Qwen3-VL-{30B-A3B,235B-A22B}-Instruct`` (``Qwen3VLMoeForConditionalGeneration``; the MoE
blocks replace the MLPs, invisible to attention). What differs from Qwen2-VL:

* **prompt** — the checkpoints' chat template without a system turn (it adds none unless given one);
  the image is ``<|vision_start|>`` + ``<|image_pad|>`` per merged token + ``<|vision_end|>``, 16-px
  patches merged 2 x 2 (32-px tokens), expanded by the adapter (the processor needs torchvision);
* **positions** — M-RoPE with the temporal/height/width frequencies interleaved inside each head
  (``mrope_interleaved``); the ids still come from the model's own ``get_rope_index``;
* **DeepStack** — features of intermediate vision-tower layers are *added* to the hidden states at
  the image positions after each of the first decoder layers (one per ``deepstack_visual_indexes``
  entry). The clean run records them (:meth:`Qwen3VLDecoder.recording_additions`) and the fast
  engine adds them to every recomputed image row after the same layers, so knockouts whose targets
  are image tokens (``other->related``, ``image[0]->image[1]``, frames) stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vlmflow.adapters.additions import ResidualAdditions
from vlmflow.adapters.qwen2_vl import Qwen2VLDecoder, Qwen2VLFamily, Qwen2VLInputs
from vlmflow.adapters.qwen_video import Qwen3Video
from vlmflow.adapters.registry import register_family
from vlmflow.prompts import ANSWER_SUFFIX, PromptTemplate, register_template

#: The chat template of the Qwen3-VL instruct checkpoints for one user turn (no system turn: the
#: template adds one only when the conversation has it), the paper's question text, generation prompt.
QWEN3_TEMPLATE = register_template(
    PromptTemplate(
        name="qwen3_vl",
        pattern="<|im_start|>user\n{image}{question}" + ANSWER_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n",
    )
)


class Qwen3VLInputs(Qwen3Video, Qwen2VLInputs):
    """Qwen3-VL inputs: Qwen2-VL's images; videos with whole-video pixel bounds and a timestamp per frame."""


class Qwen3VLDecoder(Qwen2VLDecoder):
    """Qwen3-VL's decoder: Qwen2-VL's (M-RoPE ids from ``get_rope_index``, layers without position
    ids), plus the DeepStack additions after the first layers."""

    @contextmanager
    def recording_additions(self) -> Iterator[Callable[[], ResidualAdditions | None]]:
        """Record the DeepStack features the model hands its language model in the prefill.

        A forward pre-hook on the language model reads its ``visual_pos_masks`` ``[1, seq]`` and
        ``deepstack_visual_embeds`` (per layer ``l < len``, ``[n_visual, d_model]``, added after layer
        ``l``); it is removed in ``finally``.
        """
        seen: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            embeds = kwargs.get("deepstack_visual_embeds")
            if embeds is not None and "embeds" not in seen:  # the prefill; decoding steps carry none
                seen["mask"], seen["embeds"] = kwargs["visual_pos_masks"], embeds

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield lambda: _deepstack_additions(seen)
        finally:
            handle.remove()


def _deepstack_additions(seen: dict[str, Any]) -> ResidualAdditions | None:
    if "embeds" not in seen:
        return None
    mask = seen["mask"]
    if mask.dim() != 2 or mask.shape[0] != 1:
        raise RuntimeError(f"DeepStack positions for one prompt expected, got a mask of shape {tuple(mask.shape)}")
    positions = torch.nonzero(mask[0]).flatten()  # [P], sorted
    return ResidualAdditions(positions=positions, values={layer: e.detach() for layer, e in enumerate(seen["embeds"])})


@register_family
class Qwen3VLFamily(Qwen2VLFamily):
    """Qwen3-VL (``Qwen3VLForConditionalGeneration``)."""

    family = "qwen3_vl"
    architectures: tuple[str, ...] = ("Qwen3VLForConditionalGeneration",)
    default_template = "qwen3_vl"
    description = "Qwen3-VL: dynamic resolution, 2x2 merged 32-px tokens, interleaved M-RoPE, DeepStack"
    support = {
        "prompt": "ChatML without system turn (qwen3_vl), <|image_pad|> expanded per merged token",
        "groups": "image (one item per image or video), frame (one item per model frame: 2 input frames), related/other "
        "per image or frame box (one merged grid), no padding",
        "box mapping": "smart_resize + 32-px merged patches; == Qwen2VLImageProcessorPil pixel oracle",
        "attention": "causal; interleaved M-RoPE ids from get_rope_index",
        "fast engine": "exact: DeepStack features re-added after the first layers at recomputed image rows",
        "verified": "tiny random Qwen3-VL via save/from_pretrained: fast == reference (sdpa, eager), incl. image and "
        "frame targets in the DeepStack layers, two-image and video routes; video prompt == replace_video_token",
    }
    inputs_class = Qwen3VLInputs
    decoder_class = Qwen3VLDecoder

    def model_class(self) -> type[nn.Module]:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration


@register_family
class Qwen3VLMoeFamily(Qwen3VLFamily):
    """Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``): Qwen3-VL with sparse MoE blocks for MLPs."""

    family = "qwen3_vl_moe"
    architectures = ("Qwen3VLMoeForConditionalGeneration",)
    description = "Qwen3-VL-MoE: as Qwen3-VL (interleaved M-RoPE, DeepStack), mixture-of-experts MLP blocks"
    support = {
        **Qwen3VLFamily.support,
        "verified": "tiny random Qwen3-VL-MoE via save/from_pretrained: fast == reference (sdpa, eager), incl. image "
        "targets in the DeepStack layers",
    }

    def model_class(self) -> type[nn.Module]:
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration
