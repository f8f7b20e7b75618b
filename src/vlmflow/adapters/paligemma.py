"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``): a prefix-LM.

Real targets: ``google/paligemma-3b-mix-224`` / ``-448`` (Gemma decoder) and
``google/paligemma2-{3b,10b}-mix-224`` (Gemma 2 decoder).

* **prompt** — PaliGemma's task-prefix format: ``<image>`` x 256, ``<bos>``, ``answer en {question}``,
  ``\\n`` (what ``PaliGemmaProcessor`` builds; the mix checkpoints answer questions after the
  ``answer en`` prefix). The paper's "single word or phrase" instruction is LLaVA's and is left out.
* **geometry** — SigLIP resizes the image to the square view (224 or 448, no aspect ratio kept) and
  every 14-px patch is one token, row-major (:func:`vlmflow.positions.patches.llava_geometry`,
  ``"resize"`` mode). The projector is a per-patch linear map.
* **attention** — a prefix-LM: the whole prompt (``token_type_ids == 0``) is the prefix, and every
  prefix position attends to every other one, in both directions; generated tokens are causal.
  Gemma 2 sliding layers apply their window to the causal part only (transformers ORs the prefix
  block onto the windowed causal mask). Positions are 1-based, as in the model.

What a knockout means here. Blocking ``sources -> targets`` removes exactly those edges; because
everything else in the prompt attends to the targets, including the image tokens and the question,
a changed target changes every prompt position from the next layer on. The paper's flows keep
their definition (e.g. ``question->last``: the last position may not read the question), but the
picture of information "flowing forward" does not hold: the image tokens read the question and the
last position too. The fast engine finds that the first affected position is 0 for any knockout
that does not start in the last layer (:func:`vlmflow.knockout.fast.affected_starts`) and so
recomputes the whole prompt from the first blocked layer, still folded, still exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlmflow.adapters.base import Encoded, ImageLayout, VLMAdapter
from vlmflow.adapters.expansion import check_template_tokens, encode_expanded, image_tensors
from vlmflow.adapters.registry import register_adapter
from vlmflow.errors import ConfigError
from vlmflow.prompts import PromptTemplate, register_template

IMAGE = "<image>"

#: PaliGemma's VQA prompt; the adapter puts ``<bos>`` after the image tokens, as the processor does.
register_template(PromptTemplate(name="paligemma", pattern="{image}answer en {question}\n", add_special_tokens=False))


def prefix_lm_mask(rows: torch.Tensor, n_keys: int, prefix: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[len(rows), n_keys]`` bool: (causal AND within ``window``) OR (query and key both in the prefix).

    >>> prefix_lm_mask(torch.arange(3), 3, torch.tensor([True, True, False]), None).int().tolist()
    [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    keys = torch.arange(n_keys, device=rows.device)
    causal = keys[None, :] <= rows[:, None]
    if window is not None:
        causal &= keys[None, :] > rows[:, None] - window
    return causal | (prefix[rows][:, None] & prefix[None, :n_keys])


@register_adapter
class PaliGemmaAdapter(VLMAdapter):
    """PaliGemma / PaliGemma 2 (``PaliGemmaForConditionalGeneration``)."""

    family = "paligemma"
    architectures = ("PaliGemmaForConditionalGeneration",)
    default_template = "paligemma"
    description = "PaliGemma (1, 2): SigLIP 224/448, one token per 14-px patch; prefix-LM (bidirectional prompt)"
    support = {
        "prompt": "<image>*256 <bos> answer en {question}\\n (paligemma), as PaliGemmaProcessor builds it",
        "groups": "image, related/other (patch grid), no padding",
        "box mapping": "resize to the view + 14-px patches; == SiglipImageProcessorPil pixel oracle",
        "attention": "prefix-LM: the whole prompt attends bidirectionally; 1-based positions",
        "fast engine": "exact: every knockout recomputes the prompt from its first layer (start 0)",
        "verified": "tiny random PaliGemma via save/from_pretrained: fast == reference (sdpa, eager)",
    }

    def model_class(self) -> type[nn.Module]:
        from transformers import PaliGemmaForConditionalGeneration

        return PaliGemmaForConditionalGeneration

    def image_token(self, processor: Any) -> str:
        return IMAGE

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def encode(
        self,
        model: nn.Module,
        processor: Any,
        template: PromptTemplate,
        question: str,
        image: Image.Image,
        options: Mapping[str, Any],
    ) -> Encoded:
        tokenizer = processor.tokenizer
        check_template_tokens(tokenizer, template)
        n_tokens = int(model.config.text_config.num_image_tokens)
        pixels = image_tensors(processor.image_processor(images=[image.convert("RGB")], return_tensors="pt"))
        encoded = encode_expanded(
            model,
            tokenizer,
            template,
            question,
            placeholder=IMAGE,
            expansion=IMAGE * n_tokens + tokenizer.bos_token,
            image_inputs=pixels,
            image_size=image.size,
            image_token_id=self.image_token_id(model),
            n_image_tokens=n_tokens,
        )
        types = torch.zeros_like(encoded.inputs["input_ids"])  # 0 = prefix: the whole prompt
        encoded.inputs["token_type_ids"] = types
        config = self.language_model(model).config
        encoded.extra["prefix"] = types[0].cpu() == 0
        encoded.extra["layer_types"] = tuple(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        encoded.extra["sliding_window"] = getattr(config, "sliding_window", None)
        return encoded

    def image_layout(self, model: nn.Module, processor: Any, encoded: Encoded, options: Mapping[str, Any]) -> ImageLayout:
        from vlmflow.positions.patches import llava_geometry

        size = processor.image_processor.size
        side = int(size["height"])
        patch = int(model.config.vision_config.patch_size)
        if int(size["width"]) != side or side != int(model.config.vision_config.image_size):
            raise ConfigError(f"PaliGemma image processor size {dict(size)} does not match the vision tower's view")
        geometry = llava_geometry(encoded.image_size, mode="resize", view_size=side, patch_size=patch)
        return ImageLayout(n_tokens=int(geometry.n_tokens), geometry=geometry)

    def position_ids(self, model: nn.Module, encoded: Encoded) -> torch.Tensor:
        """PaliGemma's positions start at 1."""
        return super().position_ids(model, encoded) + 1

    def base_allowed(self, layer: int, rows: torch.Tensor, n_keys: int, encoded: Encoded) -> torch.Tensor:
        """Prefix-LM: every prompt position sees every other; windows only narrow the causal part."""
        sliding = encoded.extra["layer_types"][layer] == "sliding_attention"
        window = encoded.extra["sliding_window"] if sliding else None
        return prefix_lm_mask(rows, n_keys, encoded.extra["prefix"].to(rows.device), window)
