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

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.expansion import check_template_tokens, encode_expanded, image_tensors
from vlmflow.adapters.family import ModelFamily
from vlmflow.adapters.pattern import AttentionPattern, PrefixLMPattern, layer_windows
from vlmflow.adapters.pipeline import InputPipeline
from vlmflow.adapters.registry import register_family
from vlmflow.errors import ConfigError
from vlmflow.inputs import Encoded
from vlmflow.positions.layout import ImageLayout
from vlmflow.prompts import PromptTemplate, register_template

IMAGE = "<image>"

#: PaliGemma's VQA prompt; the adapter puts ``<bos>`` after the image tokens, as the processor does.
register_template(PromptTemplate(name="paligemma", pattern="{image}answer en {question}\n", add_special_tokens=False))


class PaliGemmaInputs(InputPipeline):
    """PaliGemma inputs: 256 (or 1024) image tokens, then ``<bos>``, then the prompt; all of it the prefix."""

    #: Generated tokens are the suffix (token type 1): causal, outside the bidirectional prefix.
    appended_token_values = {"attention_mask": 1, "token_type_ids": 1}

    def configure(self) -> None:
        check_template_tokens(self.tokenizer, self.template)
        size = self.processor.image_processor.size
        vision = self.model.config.vision_config
        self.view, self.patch = int(size["height"]), int(vision.patch_size)
        if int(size["width"]) != self.view or self.view != int(vision.image_size):
            raise ConfigError(f"PaliGemma image processor size {dict(size)} does not match the vision tower's view")

    @property
    def image_token(self) -> str:
        return IMAGE

    def encode_images(self, question: str, images: Sequence[Image.Image]) -> Encoded:
        n_tokens = int(self.model.config.text_config.num_image_tokens)
        pixels = image_tensors(
            self.processor.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        )
        # PaliGemmaProcessor: every image's tokens, then <bos>, then the prompt.
        k = len(images)
        encoded = encode_expanded(
            self.model,
            self.tokenizer,
            self.template,
            self.render(question, k),
            placeholder=IMAGE,
            expansions=[IMAGE * n_tokens] * (k - 1) + [IMAGE * n_tokens + self.tokenizer.bos_token],
            image_inputs=pixels,
            image_sizes=[image.size for image in images],
            token_id=self.image_token_id,
            n_tokens=n_tokens * k,
        )
        encoded.inputs["token_type_ids"] = torch.zeros_like(encoded.inputs["input_ids"])  # 0 = prefix: the whole prompt
        return encoded

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        from vlmflow.positions.patches import llava_geometry

        geometry = llava_geometry(encoded.sizes[index], mode="resize", view_size=self.view, patch_size=self.patch)
        return ImageLayout(n_tokens=int(geometry.n_tokens), geometry=geometry)


class PaliGemmaDecoder(DecoderMap):
    """PaliGemma's decoder: a prefix-LM over the whole prompt, positions from 1."""

    def position_ids(self, encoded: Encoded) -> torch.Tensor:
        """PaliGemma's positions start at 1."""
        return super().position_ids(encoded) + 1

    def attention_pattern(self, encoded: Encoded) -> AttentionPattern:
        """Prefix-LM: every prompt position sees every other; windows only narrow the causal part."""
        prefix = encoded.inputs["token_type_ids"][0].cpu() == 0
        return PrefixLMPattern(prefix=prefix, windows=layer_windows(self.language_model.config))


@register_family
class PaliGemmaFamily(ModelFamily):
    """PaliGemma / PaliGemma 2 (``PaliGemmaForConditionalGeneration``)."""

    family = "paligemma"
    architectures = ("PaliGemmaForConditionalGeneration",)
    default_template = "paligemma"
    description = "PaliGemma (1, 2): SigLIP 224/448, one token per 14-px patch; prefix-LM (bidirectional prompt)"
    support = {
        "prompt": "<image>*256 <bos> answer en {question}\\n (paligemma), as PaliGemmaProcessor builds it",
        "groups": "image (one item per image), related/other (patch grid, boxes per image), no padding",
        "box mapping": "resize to the view + 14-px patches; == SiglipImageProcessorPil pixel oracle",
        "attention": "prefix-LM: the whole prompt attends bidirectionally; 1-based positions",
        "fast engine": "exact: every knockout recomputes the prompt from its first layer (start 0)",
        "verified": "tiny random PaliGemma via save/from_pretrained: fast == reference (sdpa, eager), incl. two-image routes",
    }
    inputs_class = PaliGemmaInputs
    decoder_class = PaliGemmaDecoder

    def model_class(self) -> type[nn.Module]:
        from transformers import PaliGemmaForConditionalGeneration

        return PaliGemmaForConditionalGeneration
