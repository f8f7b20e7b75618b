"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, anyres_max_9, Qwen2 decoder.

Real targets: ``llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-{si,ov}-hf``. Not in the paper; the
prompt is the one OneVision was trained and evaluated with (LLaVA-NeXT's ``qwen_1_5`` ChatML
conversation) around the paper's user message.

Image tokens: the base view (27 x 27 = 729 tokens at 384/14; the patch convolution never sees the
last 6 pixels of each 384 px view), then the high-resolution grid, un-padded as in LLaVA-NeXT and,
when it holds more than 1.1 x the tokens of ``N`` views (``vision_aspect_ratio="anyres_max_N"``),
bilinearly downscaled; one newline token after each row. A downscaled token is related to a box
when one of the grid tokens it is interpolated from is (see :mod:`vlmflow.positions.anyres`).

Several images in one prompt: each is its base view only, then one newline token (the model's
``batch_num_images > 1`` path; :mod:`vlmflow.positions.onevision_views`). A video: every frame
resized to the square view, its patch grid bilinearly pooled to half (14 x 14 tokens at 384/14),
frames in order, one newline token after the last; ``frame[k]`` is frame ``k``.

In transformers 5.x, ``LlavaOnevisionProcessor`` cannot be built without torchvision (its video
processor needs it, even when absent). Without torchvision the adapter loads the same processor
minus the video part (:class:`OnevisionImageProcessor`), which handles images exactly alike; frames
are resized and normalized by vlmflow with the checkpoint's video settings
(:mod:`vlmflow.adapters.video_frames`) and the PIL image processor.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available

from vlmflow.adapters.expansion import encode_expanded
from vlmflow.adapters.family import ModelFamily
from vlmflow.adapters.llava_next import AnyresInputs
from vlmflow.adapters.registry import register_family
from vlmflow.adapters.video_frames import VideoSettings, frame_arrays, read_video_config
from vlmflow.errors import ConfigError
from vlmflow.inputs import Encoded, Video
from vlmflow.positions.groups import Group
from vlmflow.positions.layout import ImageLayout, VisualBlock
from vlmflow.prompts import ANSWER_SUFFIX, PromptTemplate, register_template

log = logging.getLogger(__name__)

#: ``LlavaOnevisionVideoProcessor``'s class defaults, which a checkpoint's video config overrides.
ONEVISION_VIDEO_DEFAULTS: dict[str, Any] = {
    "size": {"height": 384, "width": 384},
    "image_mean": (0.48145466, 0.4578275, 0.40821073),
    "image_std": (0.26862954, 0.26130258, 0.27577711),
    "resample": 3,
}

# conv_templates["qwen_1_5"] of the LLaVA-NeXT code base (ChatML: system turn, roles
# "<|im_start|>user" / "<|im_start|>assistant", sep "<|im_end|>"), with the paper's user message.
QWEN_1_5 = register_template(
    PromptTemplate(
        name="qwen_1_5",
        pattern=(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{image}\n{question}"
            + ANSWER_SUFFIX
            + "<|im_end|>\n<|im_start|>assistant\n"
        ),
        add_special_tokens=False,
    )
)


class OnevisionImageProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without the video processor (images only; no torchvision needed).

    Same ``__call__``, same placeholder expansion; only its constructor skips the video part.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = video_token
        self.video_token_id = None
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def parse_anyres_max(value: str) -> int:
    """``"anyres_max_9"`` -> 9.

    >>> parse_anyres_max("anyres_max_9")
    9
    """
    prefix = "anyres_max_"
    text = str(value)
    if not text.startswith(prefix) or not text[len(prefix) :].isdigit() or int(text[len(prefix) :]) <= 0:
        raise ConfigError(f"unsupported vision_aspect_ratio {value!r}; valid: anyres_max_N with N a positive integer")
    return int(text[len(prefix) :])


class OnevisionInputs(AnyresInputs):
    """LLaVA-OneVision inputs: anyres_max_N (large grids downscaled), SigLIP features without a CLS token."""

    feature_strategy = "full"  # SigLIP has no CLS token

    def processor_images(self, images: list[Image.Image]) -> list[Any]:
        # A nested list marks one prompt's several images (batch_num_images): base views only.
        return [images] if len(images) > 1 else images

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        if len(encoded.sizes) == 1:
            return super().image_layout(encoded, index)
        from vlmflow.positions.onevision_views import single_view_geometry

        geometry = single_view_geometry(encoded.sizes[index], view_size=self.view, patch_size=self.patch)
        newline = geometry.newline_tokens()
        return ImageLayout(
            n_tokens=geometry.n_tokens,
            geometry=geometry,
            subgroups={Group.IMAGE_BASE: ~newline, Group.IMAGE_NEWLINE: newline},
            excluded_from_other=newline,
        )

    # ---- video ------------------------------------------------------------------------------------
    @property
    def video_token(self) -> str:
        return str(getattr(self.processor, "video_token", None) or "<video>")

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def video_settings(self) -> VideoSettings:
        """The checkpoint's video settings (read at load); a processor that carries none falls back to its
        image processor's settings over the class defaults, as for a checkpoint without a video config."""
        settings = getattr(self.processor, "video_settings", None)
        if settings is None:
            settings = VideoSettings.from_dict(ONEVISION_VIDEO_DEFAULTS, self.processor.image_processor.to_dict())
        return settings

    def encode_video(self, question: str, video: Video) -> Encoded:
        """Frames resized to the square view and normalized; ``<video>`` once per pooled token plus the newline."""
        size = self.video_settings.size
        arrays = frame_arrays(video.frames, self.processor.image_processor, self.video_settings, (size["width"], size["height"]))
        per_frame = self._frame_geometry(video.size).n_tokens
        n_tokens = len(video.frames) * per_frame + 1  # + the newline after the last frame
        return encode_expanded(
            self.model,
            self.tokenizer,
            self.template,
            self.template.render(question, image_token=self.video_token),
            placeholder=self.video_token,
            expansions=[self.video_token * n_tokens],
            image_inputs={"pixel_values_videos": torch.from_numpy(arrays)[None]},
            image_sizes=[frame.size for frame in video.frames],
            token_id=self.video_token_id,
            n_tokens=n_tokens,
            video=True,
        )

    def _frame_geometry(self, size: tuple[int, int]) -> Any:
        from vlmflow.positions.onevision_views import video_frame_geometry

        return video_frame_geometry(size, view_size=self.video_settings.size["height"], patch_size=self.patch)

    def video_blocks(self, encoded: Encoded) -> tuple[VisualBlock, ...]:
        from vlmflow.positions.onevision_views import newline_token

        sizes = encoded.sizes
        geometry = self._frame_geometry(sizes[0])
        frame = ImageLayout(n_tokens=geometry.n_tokens, geometry=geometry)
        newline = ImageLayout(
            n_tokens=1, geometry=newline_token(), subgroups={Group.IMAGE_NEWLINE: np.ones(1, dtype=bool)},
            excluded_from_other=np.ones(1, dtype=bool),
        )
        blocks = [VisualBlock(frame, self.video_token_id, 0, k, (k,), size) for k, size in enumerate(sizes)]
        return (*blocks, VisualBlock(newline, self.video_token_id, 0, None, (), sizes[0]))

    def max_patches(self) -> int | None:
        return parse_anyres_max(self.model.config.vision_aspect_ratio)

    def anyres_settings(self) -> tuple[int, int, tuple[tuple[int, int], ...]]:
        settings = super().anyres_settings()
        proc_ratio = getattr(self.processor, "vision_aspect_ratio", None)
        if proc_ratio is not None and proc_ratio != self.model.config.vision_aspect_ratio:
            raise ConfigError(
                f"the processor's vision_aspect_ratio {proc_ratio!r} differs from the model's "
                f"{self.model.config.vision_aspect_ratio!r}; image-token counts would not match"
            )
        return settings


@register_family
class LlavaOnevisionFamily(ModelFamily):
    """LLaVA-OneVision single-image anyres (``LlavaOnevisionForConditionalGeneration``)."""

    family = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    default_template = "qwen_1_5"
    description = (
        "LLaVA-OneVision (SigLIP + Qwen2); anyres_max_9: 729 base + un-padded (downscaled when large) grid "
        "with a newline per row (1728 tokens at 500x375)"
    )
    support = {
        "prompt": "qwen_1_5 (ChatML, as LLaVA-NeXT's Qwen conversation)",
        "groups": "image (one item per image or video), frame (one item per frame), image_base/image_grid/image_newline, "
        "related/other through base view + grid, per image or frame box (padding: none)",
        "box mapping": "anyres_max_N incl. bilinear downscale; == processor pixel oracle on all released GQA rows",
        "attention": "causal",
        "fast engine": "exact (causal: recompute from the first target)",
        "verified": "tiny random LLaVA-OneVision (anyres_max_1) via save/from_pretrained: fast == reference (sdpa, eager), "
        "incl. two-image and video routes (frame targets); video tokens == replace_video_token, frame boxes == "
        "apply_pooling pixel oracle",
    }
    video = True
    inputs_class = OnevisionInputs

    def model_class(self) -> type[nn.Module]:
        return LlavaOnevisionForConditionalGeneration

    def load_processor(self, source: str, **kwargs: Any) -> Any:
        if is_torchvision_available():
            processor = super().load_processor(source, **kwargs)
        else:
            log.info("torchvision is not installed: loading the OneVision processor without its video part")
            processor = OnevisionImageProcessor.from_pretrained(source, **kwargs)
        # Frames are processed by vlmflow (the same on every machine) with the checkpoint's video settings.
        processor.video_settings = VideoSettings.from_dict(ONEVISION_VIDEO_DEFAULTS, read_video_config(source, **kwargs))
        return processor
