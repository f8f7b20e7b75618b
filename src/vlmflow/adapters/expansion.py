"""Prompts whose image placeholder the adapter expands itself, and a processor of two parts.

The full Hugging Face processors of Qwen2-VL / Qwen2.5-VL and SmolVLM cannot be built without a
video processor, which needs torchvision. Their adapters therefore load only what an image prompt
needs, the image processor and the tokenizer (:class:`ImageTextProcessor`), and expand the image
placeholder the way the family's processor does (:func:`encode_expanded`); tests check the
expansion token for token against the real processors where those can be built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmflow.errors import ConfigError, SampleError
from vlmflow.inputs import Encoded, expand_placeholders, model_inputs
from vlmflow.prompts import PromptTemplate

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

    def save_pretrained(self, path: str | Path) -> None:
        """Save both parts so that :func:`load_image_text_processor` (and transformers) read them back."""
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def load_image_text_processor(source: str, **kwargs: Any) -> ImageTextProcessor:
    """Load a checkpoint's image processor (PIL backend) and tokenizer.

    >>> load_image_text_processor("Qwen/Qwen2-VL-2B-Instruct")   # doctest: +SKIP
    ImageTextProcessor(image_processor=Qwen2VLImageProcessorPil {...}, tokenizer=...)
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    return ImageTextProcessor(
        image_processor=AutoImageProcessor.from_pretrained(source, backend="pil", **kwargs),
        tokenizer=AutoTokenizer.from_pretrained(source, **kwargs),
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
    question: str,
    *,
    placeholder: str,
    expansion: str,
    image_inputs: Mapping[str, Any],
    image_size: tuple[int, int],
    image_token_id: int,
    n_image_tokens: int,
) -> Encoded:
    """Render ``template`` with ``placeholder``, replace it by ``expansion``, tokenize, add image inputs.

    Args:
        model: the model (inputs go to its device and dtype).
        tokenizer: the checkpoint's tokenizer (fast, with offsets).
        template: the prompt template (exactly one ``{image}`` slot).
        question: the question text, inserted verbatim.
        placeholder: what the template's ``{image}`` slot holds before expansion.
        expansion: the text the family's processor puts in its place.
        image_inputs: the image processor's outputs for the model (``pixel_values``, ...).
        image_size: ``(width, height)`` of the original image.
        image_token_id: the model's image token id.
        n_image_tokens: how many image tokens ``expansion`` must yield.

    Raises:
        SampleError: the tokenized prompt does not hold exactly ``n_image_tokens`` image tokens.

    >>> encode_expanded(model, tok, template, "Is it red?", placeholder="<image>",          # doctest: +SKIP
    ...                 expansion="<image>" * 4, image_inputs={}, image_size=(8, 8), image_token_id=5, n_image_tokens=4)
    """
    rendered = template.render(question, image_token=placeholder)
    if len(rendered.image_spans) != 1:
        raise ConfigError(f"prompt template {template.name!r} must have exactly one {{image}} slot")
    start, end = rendered.image_spans[0]
    replacement = {"span": (start, end), "new_span": (start, start + len(expansion)), "replacement": expansion}
    text, question_span = expand_placeholders(rendered, [replacement])
    batch = tokenizer(
        text, return_tensors="pt", return_offsets_mapping=True, add_special_tokens=template.add_special_tokens
    )
    offsets = batch.pop("offset_mapping")[0].numpy()
    input_ids = batch["input_ids"][0]
    found = int((input_ids == image_token_id).sum())
    if found != n_image_tokens:
        raise SampleError(
            f"the prompt holds {found} image tokens (id {image_token_id}) but the image needs {n_image_tokens}",
            stage="prompt",
        )
    return Encoded(
        inputs=model_inputs({**dict(batch), **dict(image_inputs)}, model),
        input_ids=input_ids.cpu(),
        offsets=np.asarray(offsets),
        text=text,
        question_span=question_span,
        image_size=image_size,
    )


def image_tensors(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of an image processor's output (drops lists such as row/column counts)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
