"""Prompts whose image placeholder the adapter expands itself, and a processor of two parts.

The full Hugging Face processors of Qwen2-VL / Qwen2.5-VL / Qwen3-VL and SmolVLM cannot be built
without a video processor, which needs torchvision. Their adapters therefore load only what a
prompt needs, the image processor and the tokenizer (:class:`ImageTextProcessor`, plus the
checkpoint's video settings for families that take videos), and expand the image or video
placeholder the way the family's processor does (:func:`encode_expanded`); tests check the
expansion token for token against the real processors, or their replacement rules, where those
can be built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmflow.adapters.video_frames import VideoSettings, read_video_config
from vlmflow.errors import ConfigError, SampleError
from vlmflow.inputs import Encoded, expand_placeholders, model_inputs
from vlmflow.prompts import PromptTemplate, RenderedPrompt

#: Control tokens written in templates: ``<|im_start|>``, ``<end_of_utterance>``, ``<start_of_turn>``.
_MARKER = re.compile(r"<\|[^<>|\s]+\|>|<[a-z][a-z0-9_]*>")


@dataclass
class ImageTextProcessor:
    """The two parts of a processor an image prompt needs (no video processor).

    >>> ImageTextProcessor(image_processor=None, tokenizer=None).tokenizer is None
    True
    """

    image_processor: Any
    tokenizer: Any
    video: VideoSettings | None = None

    def save_pretrained(self, path: str | Path) -> None:
        """Save the parts so that :func:`load_image_text_processor` (and transformers) read them back; the
        video settings go to ``video_preprocessor_config.json``."""
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.video is not None:
            Path(path, "video_preprocessor_config.json").write_text(json.dumps(self.video.to_dict(), indent=2) + "\n")


def load_image_text_processor(
    source: str, *, video_defaults: Mapping[str, Any] | None = None, **kwargs: Any
) -> ImageTextProcessor:
    """Load a checkpoint's image processor (PIL backend) and tokenizer, and with ``video_defaults``
    (the family's video processor class defaults) its video settings.

    >>> load_image_text_processor("Qwen/Qwen2-VL-2B-Instruct")   # doctest: +SKIP
    ImageTextProcessor(image_processor=Qwen2VLImageProcessorPil {...}, tokenizer=...)
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    video = None
    if video_defaults is not None:
        video = VideoSettings.from_dict(video_defaults, read_video_config(source, **kwargs))
    return ImageTextProcessor(
        image_processor=AutoImageProcessor.from_pretrained(source, backend="pil", **kwargs),
        tokenizer=AutoTokenizer.from_pretrained(source, **kwargs),
        video=video,
    )


def check_template_tokens(tokenizer: Any, template: PromptTemplate) -> None:
    """Refuse a template whose control tokens (``<|im_start|>``, ...) are not single tokens here.

    A template written for another checkpoint would otherwise be tokenised into pieces of text and
    run without any error.
    """
    unknown = []
    for marker in dict.fromkeys(_MARKER.findall(template.pattern)):
        if len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1:
            unknown.append(marker)
    if unknown:
        raise ConfigError(
            f"prompt template {template.name!r} uses {', '.join(unknown)}, which this tokenizer does not know as "
            "single tokens; the template belongs to another checkpoint (choose one with --template)"
        )


def encode_expanded(
    model: nn.Module,
    tokenizer: Any,
    template: PromptTemplate,
    rendered: RenderedPrompt,
    *,
    placeholder: str,
    expansions: Sequence[str],
    image_inputs: Mapping[str, Any],
    image_sizes: Sequence[tuple[int, int]],
    token_id: int,
    n_tokens: int,
    video: bool = False,
) -> Encoded:
    """Replace each ``placeholder`` in ``rendered``'s image slot by its expansion, tokenize, add image inputs.

    Args:
        model: the model (inputs go to its device and dtype).
        tokenizer: the checkpoint's tokenizer (fast, with offsets).
        template: the prompt template ``rendered`` comes from (whether to add special tokens).
        rendered: the prompt with one ``placeholder`` per image (or one for the video) in its image slot.
        placeholder: what stands for one image (or the video) before expansion.
        expansions: the text the family's processor puts in place of each placeholder, in order.
        image_inputs: the image processor's outputs for the model (``pixel_values``, ...).
        image_sizes: ``(width, height)`` of every original image, or of every input frame of the video.
        token_id: the model's image (or video) token id.
        n_tokens: how many such tokens the expansions must yield together.
        video: the prompt shows a video.

    Raises:
        SampleError: the tokenized prompt does not hold exactly ``n_tokens`` image (or video) tokens.

    >>> r = template.render("Is it red?", image_token="<image>")                           # doctest: +SKIP
    >>> encode_expanded(model, tok, template, r, placeholder="<image>", expansions=["<image>" * 4],  # doctest: +SKIP
    ...                 image_inputs={}, image_sizes=[(8, 8)], token_id=5, n_tokens=4)
    """
    if len(rendered.image_spans) != 1:
        raise ConfigError(f"prompt template {template.name!r} must have exactly one {{image}} slot")
    slot_start, slot_end = rendered.image_spans[0]
    replacements, cursor = [], slot_start
    for expansion in expansions:
        start = rendered.text.find(placeholder, cursor, slot_end)
        if start < 0:
            raise ConfigError(f"the image slot of template {template.name!r} holds fewer than {len(expansions)} placeholders")
        replacements.append({"span": (start, start + len(placeholder)), "new_span": (0, len(expansion)), "replacement": expansion})
        cursor = start + len(placeholder)
    text, question_span = expand_placeholders(rendered, replacements)
    batch = tokenizer(
        text, return_tensors="pt", return_offsets_mapping=True, add_special_tokens=template.add_special_tokens
    )
    offsets = batch.pop("offset_mapping")[0].numpy()
    input_ids = batch["input_ids"][0]
    found = int((input_ids == token_id).sum())
    if found != n_tokens:
        raise SampleError(
            f"the prompt holds {found} image tokens (id {token_id}) but the {'video' if video else 'image'} needs {n_tokens}",
            stage="prompt",
        )
    return Encoded(
        inputs=model_inputs({**dict(batch), **dict(image_inputs)}, model),
        input_ids=input_ids.cpu(),
        offsets=np.asarray(offsets),
        text=text,
        question_span=question_span,
        image_size=tuple(image_sizes[0]),
        image_sizes=tuple(tuple(size) for size in image_sizes),
        video=video,
    )


def image_tensors(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of an image processor's output (drops lists such as row/column counts)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
