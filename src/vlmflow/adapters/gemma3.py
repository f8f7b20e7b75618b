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
  ``sliding_window`` keys; :meth:`Gemma3Decoder.attention_pattern` reproduces exactly the masks
  transformers builds (full layers: causal OR same image; sliding layers: window AND (causal OR same image)).

What a knockout means here. Blocking ``sources -> targets`` removes those edges of the mask and
nothing else: an image token that is a *target* (e.g. ``other->related``) still has its own state
read by every other token of the image, including earlier ones, so the change spreads backwards
through the image block in later layers; a *source* image token is hidden from the target rows only.
Knockouts whose targets follow the image (the paper's six flows: question and last position) behave
as in a causal model. The fast engine finds the first position a knockout can change from this
pattern (:func:`vlmflow.knockout.fast.affected_starts`) and recomputes from there, so it stays exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.family import ModelFamily
from vlmflow.adapters.pattern import AttentionPattern, BlockPattern, image_blocks, layer_windows
from vlmflow.adapters.pipeline import InputPipeline
from vlmflow.adapters.registry import register_family
from vlmflow.errors import ConfigError, UnsupportedModelError
from vlmflow.inputs import Encoded
from vlmflow.positions.layout import ImageLayout
from vlmflow.prompts import ANSWER_SUFFIX, PromptTemplate, register_template

#: One user turn of the Gemma-3 instruct chat template: image, then the question text (trimmed).
GEMMA3_TEMPLATE = register_template(
    PromptTemplate(
        name="gemma3",
        pattern="<bos><start_of_turn>user\n{image}{question}" + ANSWER_SUFFIX + "<end_of_turn>\n<start_of_turn>model\n",
        add_special_tokens=False,
    )
)


class Gemma3Inputs(InputPipeline):
    """Gemma-3 inputs: the processor expands ``<start_of_image>``; 16 x 16 pooled tokens of the resized view."""

    def configure(self) -> None:
        if getattr(self.processor.image_processor, "do_pan_and_scan", False):
            raise ConfigError(
                "Gemma-3 pan-and-scan (do_pan_and_scan=True) adds crops whose token layout vlmflow does not map; "
                "load the processor with do_pan_and_scan=False"
            )
        size = self.processor.image_processor.size
        self.view = int(size["height"])
        if int(size["width"]) != self.view:
            raise ConfigError(f"Gemma-3 image processor size must be square, got {dict(size)}")
        per_side = int(round(int(self.model.config.mm_tokens_per_image) ** 0.5))
        if self.view % per_side:
            raise ConfigError(f"a {self.view}-px view does not split into {per_side} x {per_side} pooled tokens")
        self.token_side = self.view // per_side

    @property
    def image_token(self) -> str:
        return str(self.processor.boi_token)

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        from vlmflow.positions.patches import llava_geometry

        geometry = llava_geometry(encoded.sizes[index], mode="resize", view_size=self.view, patch_size=self.token_side)
        return ImageLayout(n_tokens=int(geometry.n_tokens), geometry=geometry)


class Gemma3Decoder(DecoderMap):
    """Gemma-3's decoder: a bidirectional block per image, sliding layers, rotary embeddings per layer type."""

    def check_attention_backend(self) -> None:
        super().check_attention_backend()
        if getattr(self.language_model.config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                "Gemma-3 with use_bidirectional_attention=True (an encoder) is not supported: the last position "
                "would not predict an answer token"
            )

    def attention_pattern(self, encoded: Encoded) -> AttentionPattern:
        """Causal OR same image block; sliding layers also keep only the last ``sliding_window`` keys."""
        blocks = image_blocks(encoded.inputs["token_type_ids"][0])
        return BlockPattern(blocks=blocks, windows=layer_windows(self.language_model.config))

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """Per layer type (full / sliding), the ``(cos, sin)`` of that type's RoPE base."""
        lm = self.language_model
        return {kind: lm.rotary_emb(hidden, position_ids, kind) for kind in set(lm.config.layer_types)}

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
        kind = self.language_model.config.layer_types[layer]
        return super().run_layer(layer, hidden, mask, position_ids, position_embeddings[kind], cache, **attention_kwargs)


@register_family
class Gemma3Family(ModelFamily):
    """Gemma-3 (``Gemma3ForConditionalGeneration``)."""

    family = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    default_template = "gemma3"
    description = "Gemma-3: SigLIP 896 px, 256 pooled tokens; bidirectional attention within an image"
    support = {
        "prompt": "Gemma-3 chat turn (gemma3); processor expands <start_of_image> to 256 soft tokens",
        "groups": "image (one item per image), related/other (16x16 pooled grid, boxes per image), no padding",
        "box mapping": "resize to 896 + 56-px pooled tokens; == Gemma3ImageProcessorPil + projector oracle",
        "attention": "causal + bidirectional image block; sliding window in 5 of 6 layers",
        "fast engine": "exact: recomputes from the first position that can see a changed one",
        "verified": "tiny random Gemma-3 via save/from_pretrained: fast == reference (sdpa, eager), incl. image targets "
        "and two-image routes",
    }
    inputs_class = Gemma3Inputs
    decoder_class = Gemma3Decoder

    def model_class(self) -> type[nn.Module]:
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration
