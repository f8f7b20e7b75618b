"""How the folded variants of a fast-engine layer call attend: the fold's attention strategy.

The fast engine folds ``k`` variants' suffixes (``S`` rows each) into the query axis of one batch
row (:mod:`vlmflow.knockout.plan`); one layer call may hold the folds of several samples, one
:class:`Segment` each, their rows one after another. Every variant reads its sample's shared clean
prefix (keys ``< t0``) and only its own ``S`` suffix keys. Three strategies compute that, chosen
once per engine call by :func:`choose_strategy`:

* :class:`DenseFold`: the model's own attention kernel with a dense block-diagonal mask
  ``[1, 1|H, k*S, t0 + k*S]`` over ``[prefix ; every variant's keys]`` (works with every kernel
  that takes a mask, e.g. eager attention with soft-capping; each row also scores the other
  variants' keys, which the mask then hides). One fold per layer call.
* :class:`SharedPrefixFold`: vlmflow's own attention (:mod:`vlmflow.knockout.prefix_attention`)
  with the compact mask ``[1, 1|H, k*S, t0 + S]``: each row scores only the prefix and its own
  variant's keys, through torch's fused CPU kernels (CPU with sdpa).
* :class:`AcceleratorFold`: the same attention on an accelerator: each sample's prefix read once
  per layer call by all its variants' rows, the own keys per variant, the parts merged in float32
  (CUDA's memory-efficient kernel once checked on the device, else explicit products with float32
  scores and softmax); nothing is read back to the host inside the layer loop (accelerators with sdpa).

All receive everything a call needs as arguments; the one piece of state, which attention function
the decoder uses, is switched for the duration of :meth:`FoldAttention.session` through the
model's public API and restored in ``finally``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.knockout.fused_kernels import efficient_attention_works
from vlmflow.knockout.mask import to_kernel_mask
from vlmflow.knockout.prefix_attention import FoldCall, FoldPart, register


@dataclass(frozen=True)
class Segment:
    """One fold's rows in a layer call: what they may read and the clean prefix they share.

    Attributes:
        allowed: ``[k, H|1, Q, n]`` bool, what each computed row may read (prefix columns first,
            ``n = t0 + S``).
        prefix: the clean prefix keys/values ``[1, kv_heads, t0, head_dim]``.
        own: the keys/values of every row of every variant ``[1, kv_heads, k*S, head_dim]`` when they
            are known already (only some rows are computed, ``Q < S``), else ``None`` (the layer makes them).
        suffix: ``S``, rows (and own keys) per variant.
        prefix_visible: no computed row has a prefix key hidden.
    """

    allowed: torch.Tensor
    prefix: tuple[torch.Tensor, torch.Tensor]
    own: tuple[torch.Tensor, torch.Tensor] | None
    suffix: int
    prefix_visible: bool

    @property
    def t0(self) -> int:
        return int(self.prefix[0].shape[-2])

    @property
    def rows(self) -> int:
        """Computed rows, ``k*Q``."""
        return int(self.allowed.shape[0] * self.allowed.shape[-2])


@dataclass(frozen=True)
class LayerCall:
    """One folded layer call: its inputs, and the segments whose rows follow one another in them.

    Attributes:
        layer: decoder layer.
        hidden: ``[1, R, d_model]`` inputs of the computed rows (``R`` = the segments' rows together).
        position_ids / rotary: of the computed rows.
        segments: one per fold in the call.
    """

    layer: int
    hidden: torch.Tensor
    position_ids: torch.Tensor
    rotary: Any
    segments: tuple[Segment, ...]


class FoldAttention(ABC):
    """A way to run a folded layer call (see the module docstring)."""

    #: One layer call may hold several segments (the folds of several samples).
    packs: bool = True

    @contextmanager
    def session(self, decoder: DecoderMap) -> Iterator[None]:
        """Set the decoder up for this strategy for the duration of an engine call (default: nothing)."""
        yield

    @abstractmethod
    def run(self, decoder: DecoderMap, call: LayerCall) -> torch.Tensor:
        """Run ``call``: the layer's outputs ``[1, R, d_model]`` for the computed rows."""


class DenseFold(FoldAttention):
    """The model's kernel, a dense block-diagonal mask over ``[prefix ; all variants' keys]`` (one segment per call)."""

    packs = False

    def run(self, decoder: DecoderMap, call: LayerCall) -> torch.Tensor:
        if len(call.segments) != 1:
            raise ValueError(f"the dense fold runs one fold per layer call, got {len(call.segments)}")
        segment = call.segments[0]
        mask = to_kernel_mask(dense_mask(segment.allowed, segment.t0, segment.suffix), decoder.attention_implementation, decoder.dtype)
        if segment.own is None:
            cache: Any = _PrefixKV(*segment.prefix)
        else:
            keys = torch.cat([segment.prefix[0], segment.own[0]], dim=-2)
            values = torch.cat([segment.prefix[1], segment.own[1]], dim=-2)
            cache = _FixedKV(keys, values)
        return decoder.run_layer(call.layer, call.hidden, mask, call.position_ids, call.rotary, cache)


@dataclass
class SharedPrefixFold(FoldAttention):
    """vlmflow's shared-prefix attention with the compact mask (each row scores ``t0 + S`` keys).

    Attributes:
        fused: use torch's fused CPU kernels inside the attention (tests compare with them off).
    """

    fused: bool | None = True
    #: Check a sample of each "prefix visible" promise where it is used (reads masks back to the host).
    check_promise: bool = True

    @contextmanager
    def session(self, decoder: DecoderMap) -> Iterator[None]:
        with decoder.attention_function(register()):
            yield

    def run(self, decoder: DecoderMap, call: LayerCall) -> torch.Tensor:
        fold = FoldCall(
            parts=tuple(
                FoldPart(
                    t0=s.t0,
                    suffix=s.suffix,
                    prefix=s.prefix,
                    mask=compact_mask(s.allowed),
                    queries=None if s.allowed.shape[-2] == s.suffix else int(s.allowed.shape[-2]),
                    own=s.own,
                    prefix_visible=s.prefix_visible,
                )
                for s in call.segments
            ),
            fused=self.fused,
            check_promise=self.check_promise,
        )
        out = decoder.run_layer(call.layer, call.hidden, None, call.position_ids, call.rotary, _OwnKV(), vlmflow_fold=fold)
        if not fold.done:
            raise RuntimeError(
                f"layer {call.layer}: the attention did not go through vlmflow's shared-prefix attention; this "
                "model's attention does not use transformers' AttentionInterface"
            )
        return out


@dataclass
class AcceleratorFold(SharedPrefixFold):
    """The shared-prefix attention for accelerators, with no read back to the host in the layer loop.

    Per segment the prefix is read once by all its rows, the own keys by their variant's rows, and
    the two parts merged by log-sum-exp in float32. On CUDA each part goes through torch's
    memory-efficient kernel (which returns the log-sum-exp and never materialises the scores) once
    :func:`~vlmflow.knockout.fused_kernels.efficient_attention_works` has checked it on the device
    (at the start of the session); elsewhere, or where that check fails, through explicit products
    with float32 scores and softmax (:mod:`vlmflow.knockout.precision`). The "prefix visible"
    promises are checked on the device by the engine (:func:`~vlmflow.knockout.executor.run_folds`).
    """

    fused: bool | None = None
    check_promise: bool = False

    @contextmanager
    def session(self, decoder: DecoderMap) -> Iterator[None]:
        if self.fused is not False and decoder.device.type == "cuda":
            head_dim = int(getattr(decoder.attention(0), "head_dim", decoder.hidden_size // decoder.n_heads))
            efficient_attention_works(str(decoder.device), decoder.dtype, head_dim)  # checked here, not in the loop
        with super().session(decoder):
            yield


def choose_strategy(decoder: DecoderMap) -> FoldAttention:
    """The fold strategy for ``decoder``: with sdpa, :class:`SharedPrefixFold` on CPU and
    :class:`AcceleratorFold` elsewhere; with eager attention (which may soft-cap scores) the model's
    own kernel, :class:`DenseFold`.

    >>> type(choose_strategy(decoder)).__name__     # doctest: +SKIP
    'SharedPrefixFold'
    """
    if decoder.attention_implementation == "sdpa":
        return SharedPrefixFold() if decoder.device.type == "cpu" else AcceleratorFold()
    return DenseFold()


def compact_mask(allowed: torch.Tensor) -> torch.Tensor:
    """Compact allowed mask ``[1, H|1, k*Q, n]`` of ``allowed`` ``[k, H|1, Q, n]``.

    Row ``v*Q + i`` holds what variant ``v``'s row ``i`` may read: columns ``< t0`` are the shared
    prefix, columns ``>= t0`` the variant's own keys.

    >>> compact_mask(torch.ones(2, 1, 3, 5, dtype=torch.bool)).shape
    torch.Size([1, 1, 6, 5])
    """
    k, heads, rows, n = allowed.shape
    return allowed.transpose(0, 1).reshape(1, heads, k * rows, n)


def dense_mask(allowed: torch.Tensor, t0: int, suffix: int) -> torch.Tensor:
    """Dense folded allowed mask ``[1, H|1, k*Q, t0 + k*S]`` of ``allowed`` ``[k, H|1, Q, n]``.

    Columns ``< t0`` are the shared prefix; then each variant's own ``S`` suffix keys, visible only
    to that variant's rows (block diagonal).

    >>> dense_mask(torch.ones(2, 1, 1, 3, dtype=torch.bool), t0=1, suffix=2)[0, 0].int().tolist()
    [[1, 1, 1, 0, 0], [1, 0, 0, 1, 1]]
    """
    k, heads, rows, _ = allowed.shape
    out = torch.zeros(heads, k * rows, t0 + k * suffix, dtype=torch.bool, device=allowed.device)
    out[:, :, :t0] = allowed[..., :t0].transpose(0, 1).reshape(heads, k * rows, t0)
    for v in range(k):  # one Q x S block per variant
        out[:, v * rows : (v + 1) * rows, t0 + v * suffix : t0 + (v + 1) * suffix] = allowed[v, :, :, t0:]
    return out[None]


class _PrefixKV:
    """A read-only stand-in for a KV cache: returns ``[prefix ; new]`` keys/values for one layer.

    The attention module calls ``update(k, v, layer_idx)`` after RoPE; the shared prefix tensors
    ``[1, kv_heads, t0, head_dim]`` are concatenated with the new ones (one copy per call).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys.shape[-2])


class _OwnKV:
    """A stand-in KV cache that hands the attention only the new keys/values (the variants' own)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _FixedKV(_PrefixKV):
    """A stand-in KV cache whose keys/values are all known already: ``update`` returns them as they are.

    Used where only some rows are computed (each variant's last row in the top layer): they read
    keys/values computed beforehand for all rows (the new ones handed in are among them).
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values
