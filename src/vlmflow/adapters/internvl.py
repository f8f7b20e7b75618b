"""InternVL 3 / 3.5 (``InternVLForConditionalGeneration``, native in transformers): tiles, thumbnail, pixel shuffle.

Real targets: ``OpenGVLab/InternVL3-{1B,2B,8B,14B,38B}-hf`` (Qwen2.5 language models) and
``OpenGVLab/InternVL3_5-{1B,2B,4B,8B,38B}-HF`` (Qwen3 language models). The language model is
causal (``model.model.language_model``); what differs from LLaVA:

* **prompt** — the checkpoints' chat template: ChatML, one user turn holding ``<IMG_CONTEXT>\\n`` and
  then the question, no system turn (``internvl``); ``internvl_system`` adds the system message of
  InternVL's own chat code. The processor expands ``<IMG_CONTEXT>`` into ``<img>``, 256 context
  tokens per tile and ``</img>``; only the context tokens are image tokens;
* **geometry** — dynamic tiling (:mod:`vlmflow.positions.dynamic_tiles`): up to 12 tiles of 448 px
  in a grid matching the aspect ratio, then a 448-px thumbnail of the whole image; each tile's
  32 x 32 patches are pixel-shuffled into 16 x 16 tokens of 28 px;
* **groups** — ``image_grid`` (the tiles), ``image_base`` (the thumbnail, or the lone tile of an
  image that needs one), and ``tile`` whose items are the tiles (``tile[0]`` is the top-left one).

In transformers 5.x ``InternVLProcessor`` cannot be built without torchvision (its video
processor needs it). The adapter loads the same processor minus the video part
(:class:`InternVLImageProcessor`), with the PIL image processor, which handles images alike.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers import InternVLProcessor
from transformers.processing_utils import ProcessorMixin

from vlmflow.adapters.family import ModelFamily
from vlmflow.adapters.pipeline import InputPipeline
from vlmflow.adapters.registry import register_family
from vlmflow.errors import ConfigError
from vlmflow.inputs import Encoded
from vlmflow.positions.groups import Group
from vlmflow.positions.layout import ImageLayout
from vlmflow.prompts import ANSWER_SUFFIX, PromptTemplate, register_template

#: The system message of InternVL's own chat code (InternVL2.5 / 3 ``internvl2_5`` conversation).
INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# The InternVL3 / 3.5 -hf chat template for one user turn: the image part renders as
# "<IMG_CONTEXT>\n", then the paper's question text.
register_template(
    PromptTemplate(
        name="internvl",
        pattern="<|im_start|>user\n{image}\n{question}" + ANSWER_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n",
    )
)
register_template(
    PromptTemplate(
        name="internvl_system",
        pattern=(
            "<|im_start|>system\n" + INTERNVL_SYSTEM + "<|im_end|>\n<|im_start|>user\n{image}\n{question}"
            + ANSWER_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n"
        ),
    )
)


class InternVLImageProcessor(InternVLProcessor):
    """``InternVLProcessor`` without the video processor (images only; no torchvision needed).

    Same ``__call__``, same placeholder expansion; only its constructor skips the video part.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256, chat_template: Any = None, **kwargs: Any
    ) -> None:
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


class InternVLInputs(InputPipeline):
    """InternVL inputs: the processor expands ``<IMG_CONTEXT>`` per tile and thumbnail; checked against the model once."""

    image_separator = "\n"  # the chat template writes "<IMG_CONTEXT>\n" per image

    def configure(self) -> None:
        config, ip = self.model.config, self.processor.image_processor
        vision = config.vision_config
        self.tile = int(vision.image_size[0])
        self.patch = int(vision.patch_size[0])
        ratio = float(config.downsample_ratio)
        self.scale = round(1 / ratio)
        if abs(self.scale * ratio - 1) > 1e-9:
            raise ConfigError(f"InternVL downsample_ratio {ratio} is not 1/k for an integer k; the token grid is not mapped")
        if config.vision_feature_select_strategy != "default":
            raise ConfigError(
                f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} keeps the CLS token, which "
                "the pixel shuffle would fold into the grid; valid: 'default'"
            )
        size = ip.size
        if int(size["height"]) != self.tile or int(size["width"]) != self.tile:
            raise ConfigError(f"the image processor's size {dict(size)} differs from the vision tower's {self.tile} px tiles")
        per_tile = (self.tile // self.patch // self.scale) ** 2
        if int(self.processor.image_seq_length) != per_tile:
            raise ConfigError(
                f"the processor puts {self.processor.image_seq_length} tokens per tile but the vision tower makes {per_tile}"
            )

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        from vlmflow.positions.dynamic_tiles import internvl_geometry

        ip = self.processor.image_processor
        geometry = internvl_geometry(
            encoded.sizes[index],
            tile_size=self.tile,
            patch_size=self.patch,
            scale_factor=self.scale,
            min_tiles=int(ip.min_patches),
            max_tiles=int(ip.max_patches),
            tiling=True,  # InternVLProcessor turns crop_to_patches on for every call
        )
        thumbnail = geometry.global_tokens()
        subgroups = {Group.IMAGE_BASE: thumbnail}
        if geometry.n_tiles:
            subgroups[Group.IMAGE_GRID] = ~thumbnail
        units = {Group.TILE: geometry.tile_items()}
        return ImageLayout(n_tokens=int(geometry.n_tokens), geometry=geometry, subgroups=subgroups, units=units)


@register_family
class InternVLFamily(ModelFamily):
    """InternVL 3 / 3.5 (``InternVLForConditionalGeneration``)."""

    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    default_template = "internvl"
    description = "InternVL 3 / 3.5: up to 12 tiles of 448 px + thumbnail, pixel shuffle to 256 tokens per tile"
    support = {
        "prompt": "InternVL -hf chat turn (internvl; internvl_system with InternVL's system message), <img>...</img>",
        "groups": "image, image_grid (tiles) / image_base (thumbnail), tile[k], related/other over tiles + thumbnail",
        "box mapping": "aspect-ratio tile grid + thumbnail + 28-px shuffled tokens; == GotOcr2ImageProcessorPil + "
        "pixel-shuffle oracle",
        "attention": "causal",
        "fast engine": "exact (causal: recompute from the first target)",
        "verified": "tiny random InternVL (Qwen2 and Qwen3 language models) via save/from_pretrained: fast == reference "
        "(sdpa, eager)",
    }
    inputs_class = InternVLInputs

    def model_class(self) -> type[nn.Module]:
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def load_processor(self, source: str, **kwargs: Any) -> Any:
        """The images-only processor with the PIL image processor (pixels as the tests' oracle sees them)."""
        from transformers import AutoImageProcessor
        from transformers.image_processing_backends import PilBackend

        processor = InternVLImageProcessor.from_pretrained(source, **kwargs)
        if not isinstance(processor.image_processor, PilBackend):
            processor.image_processor = AutoImageProcessor.from_pretrained(source, backend="pil", **kwargs)
        return processor
