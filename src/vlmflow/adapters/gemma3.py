"""Gemma-3 (``Gemma3ForConditionalGeneration``): SigLIP at 896 px, 4 x 4 pooled tokens, and a
language model in which the image tokens attend to each other in both directions.

Real targets: ``google/gemma-3-{4b,12b,27b}-it``.

* **prompt** — the checkpoints' chat template for one user turn holding the image and then the
  paper's question text (``<bos><start_of_turn>user\\n<start_of_image>...<end_of_turn>\\n
  <start_of_turn>model\\n``); the processor expands ``<start_of_image>`` into
  ``\\n\\n<start_of_image>``, 256 ``<image_soft_token>`` and ``<end_of_image>\\n\\n``.
* **geometry** — the image is resized to 896 x 896 (no aspect ratio kept, no padding), cut into
  14-px patches, and the projector averages 4 x 4 patches into one token: 16 x 16 tokens of 56 px,
  row-major (:func:`vlmflow.positions.patches.llava_geometry` in ``"resize"`` mode).
  Pan-and-scan crops are refused (their token layout is not mapped).
* **attention** — causal, except that the tokens of one image see each other bidirectionally
  (``token_type_ids`` blocks), and sliding-window layers (5 of every 6) see only the last
  ``sliding_window`` keys; :meth:`Gemma3Adapter.base_allowed` reproduces exactly the masks transformers
  builds (full layers: causal OR same image; sliding layers: window AND (causal OR same image)).

What a knockout means here. Blocking ``sources -> targets`` removes those edges of the mask and
nothing else: an image token that is a *target* (e.g. ``other->related``) still has its own state
read by every other token of the image, including earlier ones, so the change spreads backwards
through the image block in later layers; a *source* image token is hidden from the target rows only.
Knockouts whose targets follow the image (the paper's six flows: question and last position) behave
as in a causal model. The fast engine finds the first position a knockout can change from this
pattern (:func:`vlmflow.knockout.fast.affected_starts`) and recomputes from there, so it stays exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlmflow.adapters.base import Encoded, ImageLayout, VLMAdapter
from vlmflow.adapters.registry import register_adapter
from vlmflow.errors import ConfigError, UnsupportedModelError
from vlmflow.prompts import ANSWER_SUFFIX, PromptTemplate, register_template

#: One user turn of the Gemma-3 instruct chat template: image, then the question text (trimmed).
GEMMA3_TEMPLATE = register_template(
    PromptTemplate(
        name="gemma3",
        pattern="<bos><start_of_turn>user\n{image}{question}" + ANSWER_SUFFIX + "<end_of_turn>\n<start_of_turn>model\n",
        add_special_tokens=False,
    )
)


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Block id per position (``[seq]``): the index of the image a token belongs to, ``-1`` for text.

    Consecutive image tokens (``token_type_ids == 1``) form one block, as in transformers' Gemma-3.

    >>> image_blocks(torch.tensor([0, 1, 1, 0, 1, 0])).tolist()
    [-1, 0, 0, -1, 1, -1]
    """
    is_image = token_type_ids == 1
    starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
    return torch.where(is_image, torch.cumsum(starts.long(), 0) - 1, -1)


def bidirectional_block_mask(
    rows: torch.Tensor, n_keys: int, blocks: torch.Tensor, window: int | None
) -> torch.Tensor:
    """``[len(rows), n_keys]`` bool: causal OR same image block, AND within ``window`` (if given).

    >>> bidirectional_block_mask(torch.arange(4), 4, torch.tensor([-1, 0, 0, -1]), None).int().tolist()
    [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    keys = torch.arange(n_keys, device=rows.device)
    q_block = blocks[rows][:, None]
    allowed = (keys[None, :] <= rows[:, None]) | ((q_block == blocks[None, :n_keys]) & (q_block >= 0))
    if window is not None:
        allowed &= keys[None, :] > rows[:, None] - window
    return allowed


@register_adapter
class Gemma3Adapter(VLMAdapter):
    """Gemma-3 (``Gemma3ForConditionalGeneration``)."""

    family = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    default_template = "gemma3"
    description = "Gemma-3: SigLIP 896 px, 256 pooled tokens; bidirectional attention within an image"
    support = {
        "prompt": "Gemma-3 chat turn (gemma3); processor expands <start_of_image> to 256 soft tokens",
        "groups": "image, related/other (16x16 pooled grid), no padding",
        "box mapping": "resize to 896 + 56-px pooled tokens; == Gemma3ImageProcessorPil + projector oracle",
        "attention": "causal + bidirectional image block; sliding window in 5 of 6 layers",
        "fast engine": "exact: recomputes from the first position that can see a changed one",
        "verified": "tiny random Gemma-3 via save/from_pretrained: fast == reference (sdpa, eager), incl. image targets",
    }

    def model_class(self) -> type[nn.Module]:
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    def image_token(self, processor: Any) -> str:
        return str(processor.boi_token)

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def check_attention_backend(self, model: nn.Module) -> None:
        super().check_attention_backend(model)
        if getattr(self.language_model(model).config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                "Gemma-3 with use_bidirectional_attention=True (an encoder) is not supported: the last position "
                "would not predict an answer token"
            )

    def prepare_processor(self, processor: Any, options: Mapping[str, Any]) -> Any:
        if getattr(processor.image_processor, "do_pan_and_scan", False):
            raise ConfigError(
                "Gemma-3 pan-and-scan (do_pan_and_scan=True) adds crops whose token layout vlmflow does not map; "
                "load the processor with do_pan_and_scan=False"
            )
        return processor

    def encode(
        self,
        model: nn.Module,
        processor: Any,
        template: PromptTemplate,
        question: str,
        image: Image.Image,
        options: Mapping[str, Any],
    ) -> Encoded:
        self.prepare_processor(processor, options)
        encoded = super().encode(model, processor, template, question, image, options)
        config = self.language_model(model).config
        encoded.extra["blocks"] = image_blocks(encoded.inputs["token_type_ids"][0])
        encoded.extra["layer_types"] = tuple(config.layer_types)
        encoded.extra["sliding_window"] = int(config.sliding_window)
        return encoded

    def image_layout(self, model: nn.Module, processor: Any, encoded: Encoded, options: Mapping[str, Any]) -> ImageLayout:
        from vlmflow.positions.patches import llava_geometry

        size = processor.image_processor.size
        side = int(size["height"])
        if int(size["width"]) != side:
            raise ConfigError(f"Gemma-3 image processor size must be square, got {dict(size)}")
        per_side = int(round(int(model.config.mm_tokens_per_image) ** 0.5))
        if side % per_side:
            raise ConfigError(f"a {side}-px view does not split into {per_side} x {per_side} pooled tokens")
        geometry = llava_geometry(encoded.image_size, mode="resize", view_size=side, patch_size=side // per_side)
        return ImageLayout(n_tokens=int(geometry.n_tokens), geometry=geometry)

    def base_allowed(self, layer: int, rows: torch.Tensor, n_keys: int, encoded: Encoded) -> torch.Tensor:
        """Causal OR same image block; sliding layers also keep only the last ``sliding_window`` keys."""
        sliding = encoded.extra["layer_types"][layer] == "sliding_attention"
        blocks = encoded.extra["blocks"].to(rows.device)
        return bidirectional_block_mask(rows, n_keys, blocks, encoded.extra["sliding_window"] if sliding else None)

    def rotary(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """Per layer type (full / sliding), the ``(cos, sin)`` of that type's RoPE base."""
        lm = self.language_model(model)
        return {kind: lm.rotary_emb(hidden, position_ids, kind) for kind in set(lm.config.layer_types)}

    def run_layer(
        self,
        model: nn.Module,
        layer: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        position_embeddings: Any,
        cache: Any,
    ) -> torch.Tensor:
        kind = self.language_model(model).config.layer_types[layer]
        return super().run_layer(model, layer, hidden, mask, position_ids, position_embeddings[kind], cache)
