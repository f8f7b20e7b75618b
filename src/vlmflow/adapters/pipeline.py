"""A family's input pipeline, bound to one loaded model: prompt, processor, image layout.

:class:`InputPipeline` turns a question and an image into :class:`~vlmflow.inputs.Encoded` model
inputs and says where the image tokens' patches are (:class:`~vlmflow.positions.layout.ImageLayout`),
the raw material of the position groups. It is bound once, at load, to the model, its processor,
the prompt template and the family options (``image_mode``, ...), which are checked there, so a bad
option stops the run before any sample. The base class is the common case: a processor that
expands the image placeholder itself and reports token offsets and its text replacements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlmflow.errors import ConfigError
from vlmflow.inputs import Encoded, expand_placeholders, model_inputs
from vlmflow.positions.layout import ImageLayout
from vlmflow.prompts import PromptTemplate


class InputPipeline:
    """How prompts and images become inputs of one loaded model (subclassed per family).

    Attributes:
        model: the loaded model (inputs go to its device and dtype; some families read its config).
        processor: the checkpoint's processor.
        template: the prompt template.
        options: the family options as given (``{"image_mode": "pad"}``); subclasses parse them once
            in :meth:`configure`.
        family: the family's name, for messages.

    >>> pipeline = loaded.inputs                                      # doctest: +SKIP
    >>> encoded = pipeline.encode("What color is the circle?", image)  # doctest: +SKIP
    >>> pipeline.image_layout(encoded).n_tokens                        # doctest: +SKIP
    576
    """

    #: Family options this pipeline understands (others are refused at load).
    option_names: tuple[str, ...] = ()
    #: Per-token inputs besides ``input_ids`` and the value an appended (generated) token takes in each.
    appended_token_values: Mapping[str, int] = {"attention_mask": 1, "token_type_ids": 0, "mm_token_type_ids": 0}

    def __init__(
        self, model: nn.Module, processor: Any, template: PromptTemplate, options: Mapping[str, Any], *, family: str = ""
    ) -> None:
        self.model = model
        self.family = family or type(model).__name__
        self.processor = processor
        self.template = template
        self.options = dict(options)
        unknown = sorted(set(self.options) - set(self.option_names))
        if unknown:
            valid = ", ".join(self.option_names) or "none"
            raise ConfigError(f"unknown option {unknown[0]!r} for {self.family}; valid: {valid}")
        self.configure()

    def configure(self) -> None:
        """Parse and check :attr:`options` and the processor (called once, at load). Default: nothing."""

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_token(self) -> str:
        """The placeholder string the prompt carries for one image."""
        return str(self.processor.image_token)

    @property
    def image_token_id(self) -> int:
        """Id of the image token in the expanded ``input_ids``."""
        return int(self.model.config.image_token_id)

    def preprocess_image(self, image: Image.Image) -> Image.Image:
        """Transform the PIL image before the processor sees it (default: RGB conversion)."""
        return image.convert("RGB")

    def encode(self, question: str, image: Image.Image) -> Encoded:
        """Render the prompt, run the processor, and keep the offsets needed to find the question.

        The default works for processors that expand the image placeholder in the text and
        support ``return_offsets_mapping`` and ``return_text_replacement_offsets``.
        """
        rendered = self.template.render(question, image_token=self.image_token)
        original_size = image.size
        batch = self.processor(
            images=self.preprocess_image(image),
            text=rendered.text,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            add_special_tokens=self.template.add_special_tokens,
        )
        replacements = batch.pop("text_replacement_offsets")[0]
        offsets = batch.pop("offset_mapping")[0].numpy()
        text, question_span = expand_placeholders(rendered, replacements)
        return Encoded(
            inputs=model_inputs(batch, self.model),
            input_ids=batch["input_ids"][0].cpu(),
            offsets=offsets,
            text=text,
            question_span=question_span,
            image_size=original_size,
        )

    def image_layout(self, encoded: Encoded) -> ImageLayout:
        """The patch layout of this sample's image tokens (for related/other/padding groups)."""
        raise NotImplementedError(f"{type(self).__name__} does not map image tokens to patches")

    def append_tokens(self, encoded: Encoded, tokens: Sequence[int]) -> Encoded:
        """``encoded`` with ``tokens`` appended as the model would see them generated (teacher forcing).

        Every per-token input grows by one value per token (:attr:`appended_token_values`: attention
        mask 1, text token types); the text, offsets and question span stay the prompt's (the
        appended tokens hold no prompt characters). A per-token input the pipeline does not know
        is refused rather than guessed.

        >>> longer = loaded.inputs.append_tokens(encoded, [319, 29889])   # doctest: +SKIP
        >>> longer.seq_len - encoded.seq_len                               # doctest: +SKIP
        2
        """
        if not tokens:
            return encoded
        n, extra = encoded.seq_len, len(tokens)
        inputs = dict(encoded.inputs)
        ids = torch.as_tensor(list(tokens), dtype=encoded.inputs["input_ids"].dtype, device=encoded.device)
        for key, value in encoded.inputs.items():
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape != (1, n):
                continue
            if key == "input_ids":
                inputs[key] = torch.cat([value, ids[None]], dim=1)
            elif key in self.appended_token_values:
                fill = torch.full((1, extra), self.appended_token_values[key], dtype=value.dtype, device=value.device)
                inputs[key] = torch.cat([value, fill], dim=1)
            else:
                raise ConfigError(f"{self.family}: cannot append answer tokens to the per-token input {key!r}")
        return replace(
            encoded,
            inputs=inputs,
            input_ids=torch.cat([encoded.input_ids, ids.cpu()]),
            offsets=np.concatenate([encoded.offsets, np.zeros((extra, 2), dtype=encoded.offsets.dtype)]),
        )
