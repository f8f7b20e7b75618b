"""A family's input pipeline, bound to one loaded model: prompt, processor, image layout.

:class:`InputPipeline` turns a question and an image into :class:`~vlmflow.inputs.Encoded` model
inputs and says where the image tokens' patches are (:class:`~vlmflow.positions.layout.ImageLayout`),
the raw material of the position groups. It is bound once, at load, to the model, its processor,
the prompt template and the family options (``image_mode``, ...), which are checked there, so a bad
option stops the run before any sample. The base class is the common case: a processor that
expands the image placeholder itself and reports token offsets and its text replacements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PIL import Image
from torch import nn

from vlmflow.errors import ConfigError
from vlmflow.inputs import Encoded, expand_placeholders, model_inputs
from vlmflow.load_spec import PATCH_RULES
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
    #: Patch rules this family's :meth:`image_layout` implements (the first is the default). The
    #: paper's rule needs the family's mask preprocessing, so only the paper's families have it.
    patch_rules: tuple[str, ...] = ("overlap",)

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
