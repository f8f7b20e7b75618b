"""A family's input pipeline, bound to one loaded model: prompt, processor, image layout.

:class:`InputPipeline` turns a question and what the prompt shows (an image, several images, or a
video: :class:`~vlmflow.inputs.Visuals`) into :class:`~vlmflow.inputs.Encoded` model inputs and
says where the image tokens' patches are (one :class:`~vlmflow.positions.layout.VisualBlock` per
image or video frame), the raw material of the position groups. It is bound once, at load, to the
model, its processor, the prompt template and the family options (``image_mode``, ...), which are
checked there, so a bad option stops the run before any sample. The base class is the common case:
a processor that expands the image placeholder itself and reports token offsets and its text
replacements. Several images fill the template's one ``{image}`` slot with one placeholder each
(joined by :attr:`InputPipeline.image_separator`); a video fills it with the video placeholder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlmflow.errors import ConfigError, SampleError
from vlmflow.inputs import Encoded, Video, Visuals, expand_placeholders, model_inputs
from vlmflow.load_spec import PATCH_RULES
from vlmflow.positions.layout import ImageLayout, VisualBlock
from vlmflow.prompts import PromptTemplate, RenderedPrompt


class InputPipeline:
    """How prompts and images become inputs of one loaded model (subclassed per family).

    Attributes:
        model: the loaded model (inputs go to its device and dtype; some families read its config).
        processor: the checkpoint's processor.
        template: the prompt template.
        options: the family options as given (``{"image_mode": "pad"}``); subclasses parse them once
            in :meth:`configure`.
        patch_rule: which image tokens are related to a box (option ``patch_rule``, one of
            :attr:`patch_rules`; default ``"overlap"``), applied by :meth:`image_layout`.
        family: the family's name, for messages.

    >>> pipeline = loaded.inputs                                      # doctest: +SKIP
    >>> encoded = pipeline.encode("What color is the circle?", image)  # doctest: +SKIP
    >>> pipeline.image_layout(encoded).n_tokens                        # doctest: +SKIP
    576
    """

    #: Family options this pipeline understands (others are refused at load); ``patch_rule`` is
    #: understood by every pipeline and checked against :attr:`patch_rules`.
    option_names: tuple[str, ...] = ()
    #: What separates the placeholders of several images in the template's ``{image}`` slot.
    image_separator: str = ""
    #: Whether a prompt may show several images (the family's processor and model take them).
    several_images: bool = True
    #: Patch rules this family's :meth:`image_layout` implements (the first is the default). The
    #: paper's rule needs the family's mask preprocessing, so only the paper's families have it.
    patch_rules: tuple[str, ...] = ("overlap",)
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
        unknown = sorted(set(self.options) - {*self.option_names, "patch_rule"})
        if unknown:
            valid = ", ".join((*self.option_names, "patch_rule"))
            raise ConfigError(f"unknown option {unknown[0]!r} for {self.family}; valid: {valid}")
        self.patch_rule = self._patch_rule(self.options.get("patch_rule"))
        self.configure()

    def _patch_rule(self, value: Any) -> str:
        rule = self.patch_rules[0] if value is None else str(value).strip().lower()
        if rule not in PATCH_RULES:
            raise ConfigError(f"unknown patch_rule {value!r}; valid: {', '.join(PATCH_RULES)}")
        if rule not in self.patch_rules:
            raise ConfigError(
                f"patch_rule {rule!r} is not implemented for {self.family} (the paper's rule exists for the paper's "
                f"families, LLaVA-1.5 and LLaVA-NeXT); valid here: {', '.join(self.patch_rules)}"
            )
        return rule

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

    @property
    def video_token(self) -> str | None:
        """The placeholder string the prompt carries for a video (``None``: the family takes no video)."""
        return None

    @property
    def video_token_id(self) -> int | None:
        """Id of the video tokens in the expanded ``input_ids`` (``None``: no video)."""
        return None

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The placeholder strings a question must not contain."""
        return tuple(p for p in (self.image_token, self.video_token) if p)

    def preprocess_image(self, image: Image.Image) -> Image.Image:
        """Transform the PIL image before the processor sees it (default: RGB conversion)."""
        return image.convert("RGB")

    def render(self, question: str, n_images: int = 1) -> RenderedPrompt:
        """The template with ``n_images`` image placeholders (joined by :attr:`image_separator`) in its slot."""
        return self.template.render(question, image_token=self.image_separator.join([self.image_token] * n_images))

    def encode(self, question: str, image: Image.Image | Sequence[Image.Image] | Video | Visuals) -> Encoded:
        """Render the prompt, run the processor, and keep the offsets needed to find the question.

        ``image`` is one image, several (a sequence, or :class:`~vlmflow.inputs.Visuals`) or a
        :class:`~vlmflow.inputs.Video`.

        Raises:
            SampleError: several images or a video for a family that takes none.
        """
        visuals = Visuals.of(image)
        if visuals.video is not None:
            if self.video_token is None:
                raise SampleError(
                    f"{self.family} takes no video (`vlmflow models` lists the families that do)", stage="prompt"
                )
            return self.encode_video(question, visuals.video)
        if len(visuals.images) > 1 and not self.several_images:
            raise SampleError(f"{self.family} takes one image per prompt here, got {len(visuals.images)}", stage="prompt")
        return self.encode_images(question, visuals.images)

    def encode_images(self, question: str, images: Sequence[Image.Image]) -> Encoded:
        """The prompt with ``images``, through a processor that expands the image placeholders itself
        and supports ``return_offsets_mapping`` and ``return_text_replacement_offsets``."""
        rendered = self.render(question, len(images))
        batch = self.processor(
            images=self.processor_images([self.preprocess_image(image) for image in images]),
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
            image_size=images[0].size,
            image_sizes=tuple(image.size for image in images),
        )

    def processor_images(self, images: list[Image.Image]) -> list[Any]:
        """How the processor takes one prompt's images (default: a flat list)."""
        return images

    def encode_video(self, question: str, video: Video) -> Encoded:
        """The prompt with ``video`` (families with video override this)."""
        raise SampleError(f"{self.family} takes no video", stage="prompt")

    def image_layout(self, encoded: Encoded, index: int = 0) -> ImageLayout:
        """The patch layout of the tokens of image ``index`` of this sample (for related/other/padding groups)."""
        raise NotImplementedError(f"{type(self).__name__} does not map image tokens to patches")

    def video_blocks(self, encoded: Encoded) -> tuple[VisualBlock, ...]:
        """The blocks of a video's frames, as the model sees them (families with video override this)."""
        raise SampleError(f"{self.family} takes no video", stage="prompt")

    def visual_blocks(self, encoded: Encoded) -> tuple[VisualBlock, ...]:
        """One block per image (or per frame of the video) in sequence order: layout, token id, boxes' source.

        >>> [b.layout.n_tokens for b in loaded.inputs.visual_blocks(encoded)]   # doctest: +SKIP
        [576, 576]
        """
        if encoded.video:
            return self.video_blocks(encoded)
        return tuple(
            VisualBlock(self.image_layout(encoded, k), self.image_token_id, k, None, (k,), size)
            for k, size in enumerate(encoded.sizes)
        )

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
