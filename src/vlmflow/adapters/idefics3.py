"""Idefics3 and SmolVLM: image splitting into tiles plus a global view, pixel shuffle, row/column tokens.

Real targets: ``HuggingFaceM4/Idefics3-8B-Llama3`` and ``HuggingFaceTB/SmolVLM-Instruct``
(``Idefics3ForConditionalGeneration``), ``HuggingFaceTB/SmolVLM2-*`` (``SmolVLMForConditionalGeneration``).
The language model is causal with plain 1-D positions; what differs from LLaVA:

* **prompt** — the checkpoints' chat format ``User:<image>...<end_of_utterance>\\nAssistant:``
  (``idefics3``: after ``<|begin_of_text|>``; ``smolvlm``: after ``<|im_start|>``, for SmolVLM and
  SmolVLM2). The single ``<image>`` placeholder is expanded the way the processors do: per tile
  ``<fake_token_around_image><row_r_col_c>`` and ``image_seq_len`` ``<image>`` tokens, a newline after
  each tile row, then ``\\n<fake_token_around_image><global-img>``, the global view's tokens and a
  closing ``<fake_token_around_image>``. The adapter expands it itself
  (:mod:`vlmflow.adapters.expansion`; SmolVLM's processor needs torchvision) and a test checks the
  result token for token against ``Idefics3Processor``.
* **geometry** — :mod:`vlmflow.positions.split_tiles`: 2,197 image tokens for a 500 x 375 GQA image
  in Idefics3-8B (12 tiles + global, 169 each). Position sub-groups: ``image_grid`` (tile tokens)
  and ``image_base`` (global view); related/other patches are mapped through both. The row/column
  and wrapper tokens are text tokens, in no image group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
from vlmflow.adapters.registry import register_family
from vlmflow.errors import ConfigError
from vlmflow.inputs import Encoded
from vlmflow.positions.groups import Group
from vlmflow.positions.layout import ImageLayout
from vlmflow.prompts import ANSWER_SUFFIX, PromptTemplate, register_template

FAKE_IMAGE, IMAGE, GLOBAL_IMAGE = "<fake_token_around_image>", "<image>", "<global-img>"

_TURN = "User:{image}{question}" + ANSWER_SUFFIX + "<end_of_utterance>\nAssistant:"
register_template(PromptTemplate(name="idefics3", pattern="<|begin_of_text|>" + _TURN, add_special_tokens=False))
register_template(PromptTemplate(name="smolvlm", pattern="<|im_start|>" + _TURN, add_special_tokens=False))


def split_image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The text the Idefics3 / SmolVLM processors put in place of one ``<image>``.

    >>> split_image_prompt(0, 0, 2)
    '<fake_token_around_image><global-img><image><image><fake_token_around_image>'
    >>> split_image_prompt(1, 2, 1).count("<row_1_col_2>")
    1
    """
    tokens = IMAGE * image_seq_len
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{FAKE_IMAGE}<row_{r + 1}_col_{c + 1}>{tokens}"
        text += "\n"
    prefix = "\n" if rows or cols else ""
    return f"{text}{prefix}{FAKE_IMAGE}{GLOBAL_IMAGE}{tokens}{FAKE_IMAGE}"


class Idefics3Inputs(InputPipeline):
    """Idefics3 / SmolVLM inputs: ``<image>`` expanded per tile and global view by vlmflow."""

    def configure(self) -> None:
        check_template_tokens(self.tokenizer, self.template)
        ip = self.processor.image_processor
        if not getattr(ip, "do_resize", True):
            raise ConfigError("the image processor has do_resize=False; the tile layout needs its longest-edge resize")
        vision = self.model.config.vision_config
        if int(ip.max_image_size["longest_edge"]) != int(vision.image_size):
            raise ConfigError(
                f"image processor tiles of {ip.max_image_size['longest_edge']} px but the vision tower takes "
                f"{vision.image_size} px"
            )

    @property
    def image_token(self) -> str:
        return IMAGE

    def encode_images(self, question: str, images: Sequence[Image.Image]) -> Encoded:
        ip = self.processor.image_processor
        # One list per prompt: the processor takes a prompt's several images as a nested list.
        out = ip(images=[[image.convert("RGB") for image in images]], return_tensors="pt", return_row_col_info=True)
        seq_len = int(self.model.model.image_seq_len)
        grids = [(int(r), int(c)) for r, c in zip(out["rows"][0], out["cols"][0], strict=True)]
        return encode_expanded(
            self.model,
            self.tokenizer,
            self.template,
            self.render(question, len(images)),
            placeholder=IMAGE,
            expansions=[split_image_prompt(rows, cols, seq_len) for rows, cols in grids],
            image_inputs=image_tensors(out),
            image_sizes=[image.size for image in images],
            token_id=self.image_token_id,
            n_tokens=sum((rows * cols + 1 if rows or cols else 1) * seq_len for rows, cols in grids),
        )

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        from vlmflow.positions.split_tiles import split_geometry

        ip = self.processor.image_processor
        vision = self.model.config.vision_config
        geometry = split_geometry(
            encoded.sizes[index],
            longest_edge=int(ip.size["longest_edge"]),
            tile_size=int(vision.image_size),
            patch_size=int(vision.patch_size),
            scale_factor=int(self.model.config.scale_factor),
            splitting=bool(ip.do_image_splitting),
        )
        glob = geometry.global_tokens()
        subgroups = {Group.IMAGE_BASE: glob}
        if geometry.n_tiles:
            subgroups[Group.IMAGE_GRID] = ~glob
        units = {Group.TILE: geometry.tile_items()}
        return ImageLayout(n_tokens=int(geometry.n_tokens), geometry=geometry, subgroups=subgroups, units=units)


class Idefics3Decoder(DecoderMap):
    """Idefics3's decoder: a Llama text model at ``model.model.text_model``."""

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model


@register_family
class Idefics3Family(ModelFamily):
    """Idefics3 (``Idefics3ForConditionalGeneration``, also SmolVLM v1)."""

    family = "idefics3"
    architectures: tuple[str, ...] = ("Idefics3ForConditionalGeneration",)
    default_template = "idefics3"
    description = "Idefics3 / SmolVLM v1: tiles + global view, pixel shuffle, row/column tokens"
    support = {
        "prompt": "User:/Assistant: turns (idefics3, smolvlm), <image> expanded per tile and global view",
        "groups": "image (one item per image), image_grid (tiles) / tile[k], image_base (global), related/other through "
        "both views",
        "box mapping": "longest-edge resize + tile split + global view; == Idefics3ImageProcessorPil + pixel_shuffle oracle",
        "attention": "causal",
        "fast engine": "exact (causal: recompute from the first target)",
        "verified": "tiny random Idefics3 via save/from_pretrained: fast == reference (sdpa, eager), incl. two-image routes",
    }
    inputs_class = Idefics3Inputs
    decoder_class = Idefics3Decoder

    def model_class(self) -> type[nn.Module]:
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    def load_processor(self, source: str, **kwargs: Any) -> Any:
        return load_image_text_processor(source, **kwargs)


@register_family
class SmolVLMFamily(Idefics3Family):
    """SmolVLM2 (``SmolVLMForConditionalGeneration``): Idefics3's image handling, ChatML-style turns."""

    family = "smolvlm"
    architectures = ("SmolVLMForConditionalGeneration",)
    default_template = "smolvlm"
    description = "SmolVLM2: as Idefics3 (tiles + global view, pixel shuffle), <|im_start|> turns"
    support = {
        **Idefics3Family.support,
        "verified": "tiny random SmolVLM via save/from_pretrained: fast == reference (sdpa, eager), incl. two-image routes",
    }

    def model_class(self) -> type[nn.Module]:
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration
