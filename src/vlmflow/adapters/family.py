"""A model family: how its checkpoints load, and the two parts it binds to a loaded model.

One :class:`ModelFamily` subclass per family lives in its own module under :mod:`vlmflow.adapters`
and registers itself with :func:`vlmflow.adapters.registry.register_family`. Generic code never
checks a model's name or class: it asks the registry for the family of ``config.architectures[0]``,
loads through :meth:`ModelFamily.model_class` and :meth:`ModelFamily.load_processor`, and then works
with the two bound parts :meth:`ModelFamily.bind` returns:

* the **input pipeline** (:class:`~vlmflow.adapters.pipeline.InputPipeline`): prompt, processor,
  image layout — everything before the model;
* the **decoder map** (:class:`~vlmflow.adapters.decoder.DecoderMap`): layers, attention modules,
  rotary embeddings, keys/values and the clean attention pattern — everything the engines touch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.pipeline import InputPipeline
from vlmflow.prompts import PromptTemplate


@dataclass(frozen=True)
class Bound:
    """A family's two parts bound to one loaded model."""

    inputs: InputPipeline
    decoder: DecoderMap


class ModelFamily:
    """Family-specific knowledge: what to load and how to bind it (subclassed per family).

    >>> from vlmflow.adapters.registry import family_for_architecture
    >>> family_for_architecture("LlavaForConditionalGeneration").family
    'llava'
    """

    family: ClassVar[str]  # registry key, e.g. "llava"
    architectures: ClassVar[tuple[str, ...]]  # HF class names this family handles
    default_template: ClassVar[str]  # prompt template used when the checkpoint names none
    description: ClassVar[str] = ""
    #: What ``vlmflow models`` shows, by aspect: "prompt", "groups", "box mapping", "attention",
    #: "fast engine", "verified" (how the family was tested).
    support: ClassVar[Mapping[str, str]] = {}
    #: Whether a prompt may show several images, and a video (frames), in this family.
    several_images: ClassVar[bool] = True
    video: ClassVar[bool] = False
    inputs_class: ClassVar[type[InputPipeline]] = InputPipeline
    decoder_class: ClassVar[type[DecoderMap]] = DecoderMap

    def model_class(self) -> type[nn.Module]:
        """The transformers class to load checkpoints of this family with."""
        raise NotImplementedError

    def load_processor(self, source: str, **kwargs: Any) -> Any:
        """Load the checkpoint's processor (default: ``AutoProcessor.from_pretrained``)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, **kwargs)

    def default_template_for(self, config: Any, processor: Any) -> str:
        """Prompt template of a checkpoint that names none (default: the family's ``default_template``)."""
        return self.default_template

    def bind(self, model: nn.Module, processor: Any, template: PromptTemplate, options: Mapping[str, Any]) -> Bound:
        """The input pipeline and decoder map of ``model``; checks the options and the attention kernel.

        Raises:
            ConfigError: an unknown or invalid family option, a processor that disagrees with the
                model, or an attention kernel that cannot take a knockout mask.
        """
        decoder = self.decoder_class(model)
        decoder.check_attention_backend()
        return Bound(inputs=self.inputs_class(model, processor, template, options, family=self.family), decoder=decoder)
