"""A family's decoder map, bound to one loaded model: its layers, attention, rotary and attention pattern.

The engines (:mod:`vlmflow.knockout`), the lens and the attention summaries reach a model's decoder
only through a :class:`DecoderMap`. The base class describes the common transformers layout (a
language model at ``model.model.language_model`` with ``layers``, ``norm`` and ``rotary_emb``;
decoder layers that take ``attention_mask``, ``position_ids``, ``cache`` and ``position_embeddings``;
causal attention); a family overrides only what differs (M-RoPE position ids, a bidirectional image
block, rotary embeddings per layer type, ...).

Binding happens once, at load (:meth:`ModelFamily.bind <vlmflow.adapters.family.ModelFamily.bind>`);
no method takes the model again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
from torch import nn

from vlmflow.adapters.additions import ResidualAdditions
from vlmflow.adapters.pattern import AttentionPattern, CausalPattern
from vlmflow.errors import ConfigError
from vlmflow.inputs import Encoded
from vlmflow.load_spec import MASKABLE_ATTENTION


class DecoderMap:
    """The decoder of one loaded model, as the engines see it.

    >>> decoder = DecoderMap(model)                             # doctest: +SKIP
    >>> decoder.n_layers, decoder.attention(0).layer_idx        # doctest: +SKIP
    (4, 0)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ---- structure -----------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (has the layers, the final norm and the rotary embedding)."""
        return self.model.model.language_model

    @cached_property
    def layers(self) -> Sequence[nn.Module]:
        return self.language_model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return int(self.attention(0).config.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.language_model.config.hidden_size)

    def attention(self, layer: int) -> nn.Module:
        """The self-attention module of decoder layer ``layer``."""
        return self.layers[layer].self_attn

    def mlp(self, layer: int) -> nn.Module:
        """The MLP block of decoder layer ``layer`` (module-level ablations replace its output)."""
        module = getattr(self.layers[layer], "mlp", None)
        if module is None:
            raise ConfigError(f"decoder layer {layer} of {type(self.model).__name__} has no 'mlp' module")
        return module

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- attention kernel ----------------------------------------------------------------------
    @property
    def attention_implementation(self) -> str:
        return str(self.attention(0).config._attn_implementation)  # noqa: SLF001

    def check_attention_backend(self) -> None:
        """Refuse models whose attention kernel would ignore an explicit mask (e.g. flash-attention)."""
        impl = self.attention_implementation
        if impl not in MASKABLE_ATTENTION:
            raise ConfigError(
                f"attention implementation {impl!r} cannot take a knockout mask (the kernel never sees "
                f"it, so a knockout would silently do nothing); valid: {', '.join(MASKABLE_ATTENTION)}. "
                "Load the model with attn_implementation='sdpa' or 'eager'."
            )

    @contextmanager
    def attention_function(self, name: str) -> Iterator[None]:
        """Inside the block the decoder's attention modules call the function registered as ``name``
        with transformers' ``AttentionInterface`` (set through the model's public
        ``set_attn_implementation``, restored in ``finally``, also after an error).

        >>> with decoder.attention_function("eager"):       # doctest: +SKIP
        ...     out = decoder.run_layer(0, hidden, mask, pos, rotary, None)
        """
        previous = self.attention_implementation
        self.language_model.set_attn_implementation(name)
        try:
            yield
        finally:
            self.language_model.set_attn_implementation(previous)

    # ---- positions -----------------------------------------------------------------------------
    def position_ids(self, encoded: Encoded) -> torch.Tensor:
        """Position ids of the full prompt, ``[1, seq]`` (families with M-RoPE return more axes)."""
        return torch.arange(encoded.seq_len, device=encoded.device)[None]

    def next_positions(self, position_ids: torch.Tensor, count: int) -> torch.Tensor:
        """Position ids of ``count`` tokens generated after a prompt with ``position_ids`` ``[..., 1, n]``.

        Each continues one past the prompt's largest id on every axis (M-RoPE families advance all
        three axes together after the prompt, as transformers' rope deltas do).

        >>> DecoderMap(None).next_positions(torch.arange(4)[None] + 1, 2).tolist()
        [[5, 6]]
        """
        steps = torch.arange(1, count + 1, device=position_ids.device, dtype=position_ids.dtype)
        return (position_ids.amax() + steps).expand(*position_ids.shape[:-1], count)

    def select_positions(self, position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Position ids of the sequence positions ``index`` (``[n]``), laid out as one batch row."""
        return position_ids[..., index]

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """Position embeddings the decoder layers take (``(cos, sin)`` for RoPE families)."""
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def attention_pattern(self, encoded: Encoded) -> AttentionPattern:
        """Which keys each position may read in the clean model, for this sample (default: causal)."""
        return CausalPattern()

    # ---- inputs and outputs of the layer stack -------------------------------------------------
    def input_embeddings(self, encoded: Encoded) -> torch.Tensor:
        """The hidden states ``[1, n, d_model]`` entering layer 0 for the whole prompt.

        Default: the model's own forward (vision tower, projector, merge of the image features into
        the text embeddings, any embedding scale), stopped where it enters layer 0, so every family
        gets its own input side without vlmflow repeating it.

        >>> decoder.input_embeddings(encoded).shape       # doctest: +SKIP
        torch.Size([1, 634, 4096])
        """
        captured: list[torch.Tensor] = []

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _InputsCaptured

        handle = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(**encoded.inputs, use_cache=False)
        except _InputsCaptured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{type(self.model).__name__}'s forward did not reach decoder layer 0")
        return captured[0]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[batch, tokens, d_model]`` of text token ids ``[batch, tokens]`` (with any scale
        the family's embedding applies; image tokens never come through here)."""
        return self.model.get_input_embeddings()(ids)

    @contextmanager
    def recording_additions(self) -> Iterator[Callable[[], ResidualAdditions | None]]:
        """Inside the block a clean forward records what the model adds to its hidden states between
        decoder layers (:class:`~vlmflow.adapters.additions.ResidualAdditions`); after it, the yielded
        function returns them (default: ``None``, a plain stack of layers adds nothing).

        >>> with decoder.recording_additions() as recorded:     # doctest: +SKIP
        ...     decoder.model(**encoded.inputs)
        >>> recorded() is None                                   # doctest: +SKIP
        True
        """
        yield lambda: None

    # ---- running layers ------------------------------------------------------------------------
    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        position_embeddings: Any,
        cache: Any,
        **attention_kwargs: Any,
    ) -> torch.Tensor:
        """Run decoder layer ``layer`` on ``hidden`` ``[batch, query, d_model]`` with a full 4-D mask.

        ``attention_kwargs`` reach the attention function (transformers passes a decoder layer's
        extra keywords through its attention module to the ``AttentionInterface`` function).
        """
        out = self.layers[layer](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
            **attention_kwargs,
        )
        return out[0] if isinstance(out, tuple) else out

    def layer_key_values(
        self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor, position_embeddings: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The post-RoPE keys and values ``[batch, kv_heads, query, head_dim]`` that decoder layer
        ``layer`` computes from its input ``hidden`` ``[batch, query, d_model]``, without the rest of
        the layer (its attention scores, output projection and MLP).

        Default: run the layer with a cache that records what the attention module hands it and
        then stops the layer (every supported family passes its new keys/values to the cache before
        attending). A family whose layers compute keys differently overrides this.

        >>> keys, values = decoder.layer_key_values(31, hidden, pos, rotary)   # doctest: +SKIP
        >>> keys.shape                                                         # doctest: +SKIP
        torch.Size([1, 32, 31, 128])
        """
        capture = _KeyValueCapture()
        try:
            self.run_layer(layer, hidden, None, position_ids, position_embeddings, capture)
        except _KeyValuesCaptured:
            return capture.keys, capture.values  # type: ignore[return-value]
        raise RuntimeError(f"decoder layer {layer} did not hand its keys/values to the cache; override layer_key_values")


class _InputsCaptured(Exception):
    """Raised by :meth:`DecoderMap.input_embeddings` to stop the forward where it enters layer 0."""


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
