"""The adapter contract: everything the engine and the experiments need to know about a VLM family.

Generic code (engine, experiments, CLI) talks to models only through a :class:`VLMAdapter`; it never
checks a model's name or class. One adapter per family lives in its own module under
:mod:`vlmflow.adapters` and registers itself with :func:`vlmflow.adapters.registry.register_adapter`.

An adapter answers three kinds of question:

* **inputs** — how a prompt and an image become model inputs (:meth:`VLMAdapter.encode`), and where
  the image tokens' patches lie in the image (:meth:`VLMAdapter.image_layout`);
* **internals** — the decoder layers, their attention modules, the final norm and the unembedding,
  the rotary position embeddings, and which attention edges exist in the clean model
  (:meth:`VLMAdapter.base_allowed`: causal for most families);
* **safety** — whether a knockout mask can reach the attention kernel at all
  (:meth:`VLMAdapter.check_attention_backend`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlmflow.errors import ConfigError, SampleError
from vlmflow.load_spec import MASKABLE_ATTENTION
from vlmflow.positions.groups import Group
from vlmflow.prompts import PromptTemplate, RenderedPrompt


@dataclass
class Encoded:
    """One prompt + image turned into model inputs, with what position finding needs.

    Attributes:
        inputs: keyword arguments for ``model(**inputs)`` (batch of one), on the model's device.
        input_ids: ``[seq]`` token ids on CPU.
        offsets: ``[seq, 2]`` character offsets of each token in ``text`` (``(0, 0)`` for
            special and image tokens).
        text: the prompt text after image placeholders were expanded by the processor.
        question_span: character span of the question in ``text``.
        image_size: ``(width, height)`` of the image as given (before any padding).
        extra: what the family's adapter records at encoding time for later calls (e.g. the
            attention pattern :meth:`VLMAdapter.base_allowed` reproduces).
    """

    inputs: dict[str, Any]
    input_ids: torch.Tensor
    offsets: np.ndarray
    text: str
    question_span: tuple[int, int]
    image_size: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class ImageLayout:
    """Where the image tokens' patches are, for one image, in image-token order.

    ``related(boxes)`` returns a bool array over image tokens; ``padding`` and ``subgroups`` are
    bool arrays over image tokens too (``subgroups`` holds family-specific groups such as the
    LLaVA-NeXT base view, high-resolution grid and newline tokens).
    """

    n_tokens: int
    geometry: Any  # vlmflow.positions.patches.ImageGeometry (related_tokens / padding_tokens)
    subgroups: Mapping[Group, np.ndarray] = field(default_factory=dict)
    excluded_from_other: np.ndarray | None = None  # e.g. newline tokens: not patches at all

    def related(self, boxes: Sequence[Any]) -> np.ndarray:
        return np.asarray(self.geometry.related_tokens(boxes), dtype=bool)

    def padding(self) -> np.ndarray:
        return np.asarray(self.geometry.padding_tokens(), dtype=bool)


class VLMAdapter(ABC):
    """Family-specific knowledge. Subclasses set the class attributes and implement the methods.

    >>> from vlmflow.adapters.registry import adapter_for_architecture
    >>> adapter_for_architecture("LlavaForConditionalGeneration").family
    'llava'
    """

    family: ClassVar[str]  # registry key, e.g. "llava"
    architectures: ClassVar[tuple[str, ...]]  # HF class names this adapter handles
    default_template: ClassVar[str]  # prompt template used when the checkpoint names none
    description: ClassVar[str] = ""
    #: What ``vlmflow models`` shows, by aspect: "prompt", "groups", "box mapping", "attention",
    #: "fast engine", "verified" (how the family was tested).
    support: ClassVar[Mapping[str, str]] = {}

    # ---- loading -------------------------------------------------------------------------------
    @abstractmethod
    def model_class(self) -> type[nn.Module]:
        """The transformers class to load checkpoints of this family with."""

    def load_processor(self, source: str, **kwargs: Any) -> Any:
        """Load the checkpoint's processor (default: ``AutoProcessor.from_pretrained``)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, **kwargs)

    def prepare_processor(self, processor: Any, options: Mapping[str, Any]) -> Any:
        """Adjust a freshly loaded processor (default: unchanged)."""
        return processor

    def default_template_for(self, config: Any, processor: Any) -> str:
        """Prompt template of a checkpoint that names none (default: the family's ``default_template``)."""
        return self.default_template

    # ---- inputs --------------------------------------------------------------------------------
    @abstractmethod
    def image_token(self, processor: Any) -> str:
        """The placeholder string the prompt carries for one image."""

    @abstractmethod
    def image_token_id(self, model: nn.Module) -> int:
        """Id of the image token in the expanded ``input_ids``."""

    def preprocess_image(self, image: Image.Image, processor: Any, options: Mapping[str, Any]) -> Image.Image:
        """Transform the PIL image before the HF processor sees it (default: RGB conversion)."""
        return image.convert("RGB")

    def encode(
        self,
        model: nn.Module,
        processor: Any,
        template: PromptTemplate,
        question: str,
        image: Image.Image,
        options: Mapping[str, Any],
    ) -> Encoded:
        """Render the prompt, run the processor, and keep the offsets needed to find the question.

        The default works for processors that expand the image placeholder in the text and
        support ``return_offsets_mapping`` and ``return_text_replacement_offsets``.
        """
        rendered = template.render(question, image_token=self.image_token(processor))
        original_size = image.size
        image = self.preprocess_image(image, processor, options)
        batch = processor(
            images=image,
            text=rendered.text,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            add_special_tokens=template.add_special_tokens,
        )
        replacements = batch.pop("text_replacement_offsets")[0]
        offsets = batch.pop("offset_mapping")[0].numpy()
        text, question_span = _shift_span(rendered, replacements)
        return Encoded(
            inputs=model_inputs(batch, model),
            input_ids=batch["input_ids"][0].cpu(),
            offsets=offsets,
            text=text,
            question_span=question_span,
            image_size=original_size,
        )

    @abstractmethod
    def image_layout(self, model: nn.Module, processor: Any, encoded: Encoded, options: Mapping[str, Any]) -> ImageLayout:
        """The patch layout of this sample's image tokens (for related/other/padding groups)."""

    # ---- internals -----------------------------------------------------------------------------
    @abstractmethod
    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (has the layers, the final norm and the rotary embedding)."""

    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.language_model(model).layers

    def attention_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.decoder_layers(model)[layer].self_attn

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).norm

    def unembed(self, model: nn.Module) -> nn.Module:
        return model.get_output_embeddings()

    def n_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def n_heads(self, model: nn.Module) -> int:
        return int(self.attention_module(model, 0).config.num_attention_heads)

    def position_ids(self, model: nn.Module, encoded: Encoded) -> torch.Tensor:
        """Position ids of the full prompt, ``[1, seq]`` (families with M-RoPE return more axes)."""
        device = encoded.inputs["input_ids"].device
        return torch.arange(encoded.seq_len, device=device)[None]

    def select_positions(self, position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Position ids of the sequence positions ``index`` (``[n]``), laid out as one batch row."""
        return position_ids[..., index]

    def rotary(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """Position embeddings the decoder layers take (``(cos, sin)`` for RoPE families)."""
        return self.language_model(model).rotary_emb(hidden, position_ids=position_ids)

    def run_layer(
        self,
        model: nn.Module,
        layer: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        position_embeddings: Any,
        cache: Any,
    ) -> torch.Tensor:
        """Run decoder layer ``layer`` on ``hidden`` ``[batch, query, d_model]`` with a full 4-D mask."""
        out = self.decoder_layers(model)[layer](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )
        return out[0] if isinstance(out, tuple) else out

    def layer_key_values(
        self,
        model: nn.Module,
        layer: int,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        position_embeddings: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The post-RoPE keys and values ``[batch, kv_heads, query, head_dim]`` that decoder layer
        ``layer`` computes from its input ``hidden`` ``[batch, query, d_model]``, without the rest of
        the layer (its attention scores, output projection and MLP).

        Default: run the layer with a cache that records what the attention module hands it and
        then stops the layer (every supported family passes its new keys/values to the cache before
        attending). A family whose layers compute keys differently overrides this.

        >>> keys, values = adapter.layer_key_values(model, 31, hidden, pos, rotary)   # doctest: +SKIP
        >>> keys.shape                                                                 # doctest: +SKIP
        torch.Size([1, 32, 31, 128])
        """
        capture = _KeyValueCapture()
        try:
            self.run_layer(model, layer, hidden, None, position_ids, position_embeddings, capture)  # type: ignore[arg-type]
        except _KeyValuesCaptured:
            return capture.keys, capture.values  # type: ignore[return-value]
        raise RuntimeError(f"decoder layer {layer} did not hand its keys/values to the cache; override layer_key_values")

    def base_allowed(self, layer: int, rows: torch.Tensor, n_keys: int, encoded: Encoded) -> torch.Tensor:
        """Which keys each query row may attend to in the clean model: ``[len(rows), n_keys]`` bool.

        Default: causal attention (a row attends to itself and everything before it).
        """
        keys = torch.arange(n_keys, device=rows.device)
        return keys[None, :] <= rows[:, None]

    def is_causal(self) -> bool:
        """Whether :meth:`base_allowed` is plain causal attention in every layer (the default rule
        is not overridden), so no position ever reads a later one.

        >>> LlavaAdapter().is_causal(), Gemma3Adapter().is_causal()                   # doctest: +SKIP
        (True, False)
        """
        return type(self).base_allowed is VLMAdapter.base_allowed

    def check_attention_backend(self, model: nn.Module) -> None:
        """Refuse models whose attention kernel would ignore an explicit mask (e.g. flash-attention)."""
        impl = self.attention_implementation(model)
        if impl not in MASKABLE_ATTENTION:
            raise ConfigError(
                f"attention implementation {impl!r} cannot take a knockout mask (the kernel never sees "
                f"it, so a knockout would silently do nothing); valid: {', '.join(MASKABLE_ATTENTION)}. "
                "Load the model with attn_implementation='sdpa' or 'eager'."
            )

    def attention_implementation(self, model: nn.Module) -> str:
        config = self.attention_module(model, 0).config
        return str(config._attn_implementation)  # noqa: SLF001

    def answer_token_candidates(self, tokenizer: Any, word: str) -> list[int]:
        """Token ids of ``word`` as the model would produce it as the first answer token."""
        return list(tokenizer.encode(word, add_special_tokens=False))


class _KeyValuesCaptured(Exception):
    """Raised by :class:`_KeyValueCapture` to stop a layer once its keys/values are known."""


class _KeyValueCapture:
    """A stand-in KV cache that keeps the keys/values a layer hands it and stops the layer there."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = key_states, value_states
        raise _KeyValuesCaptured

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def model_inputs(batch: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Processor outputs as ``model(**inputs)`` keywords: tensors on the model's device, floats in its dtype.

    >>> model_inputs({"pixel_values": torch.zeros(1, dtype=torch.float64)}, nn.Linear(1, 1))["pixel_values"].dtype
    torch.float32
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        inputs[key] = value
    return inputs


def _shift_span(rendered: RenderedPrompt, replacements: Sequence[Mapping[str, Any]]) -> tuple[str, tuple[int, int]]:
    """Map the question's character span from the rendered prompt to the processor-expanded text."""
    start, end = rendered.question_span
    shift_start = shift_end = 0
    text = rendered.text
    for rep in replacements:
        old_start, old_end = rep["span"]
        new_start, new_end = rep["new_span"]
        delta = (new_end - new_start) - (old_end - old_start)
        if old_end <= start:
            shift_start += delta
        if old_end <= end:
            shift_end += delta
        if old_start < end and old_end > start:
            raise SampleError("an image placeholder lies inside the question text", stage="prompt")
    # Rebuild the expanded text to check the span really holds the question.
    pieces, cursor = [], 0
    for rep in sorted(replacements, key=lambda r: r["span"][0]):
        pieces.append(text[cursor : rep["span"][0]])
        pieces.append(rep["replacement"])
        cursor = rep["span"][1]
    pieces.append(text[cursor:])
    expanded = "".join(pieces)
    span = (start + shift_start, end + shift_end)
    if expanded[span[0] : span[1]] != rendered.question:
        raise SampleError(
            f"question {rendered.question!r} not found at its expected place in the expanded prompt", stage="prompt"
        )
    return expanded, span
