"""The fast, exact knockout engine.

Why it is exact: with causal attention, a knockout whose first target position is ``t0`` cannot
change anything at positions ``< t0`` (they never attend to later positions), and it cannot change
anything in layers below its first blocked layer ``a``. So the result of a knockout is determined by

* the clean keys/values of positions ``< t0`` in every layer (unchanged), and
* the clean hidden states of positions ``>= t0`` entering layer ``a`` (unchanged),

and only the suffix ``t0..n-1`` has to be recomputed, from layer ``a`` up. One clean forward
(vision tower once, baseline logits, greedy answer) provides both.

Many knockouts (all windows of all flows with the same ``t0``) run together "folded" into the query
axis of a single batch row: variant ``v``'s suffix occupies query rows ``[v*S, (v+1)*S)``; every
variant attends to the shared clean prefix keys/values (one copy per layer call, never one per
variant) and only to its own suffix keys (a block-diagonal mask, or on CPU the shared-prefix
attention of :mod:`vlmflow.knockout.prefix_attention`, which never scores the other variants' keys).
Variants start at their own first layer: at layer ``l`` only the variants whose window has started
are computed.

Module-level ablations (:class:`~vlmflow.knockout.ablation.Ablation`) obey the same rule (nothing
changes before their first position or below their first layer) and run folded next to knockouts:
their replacements are applied to their own query rows by :func:`~vlmflow.knockout.ablation.folded_ablation`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmflow.adapters.base import Encoded, VLMAdapter
from vlmflow.knockout.ablation import (
    Ablation,
    AblationValues,
    check_ablations,
    folded_ablation,
    replacement_values,
)
from vlmflow.knockout.mask import check_no_empty_rows, to_kernel_mask
from vlmflow.knockout.prefix_attention import shared_prefix_attention
from vlmflow.knockout.spec import Knockout, check_layers

#: What the fast engine runs: blocked attention edges or a module-level ablation.
Intervention = Knockout | Ablation

#: Default bound on query rows per folded layer call (keeps [query, key] score matrices small).
DEFAULT_FOLD_QUERIES = 1024


@dataclass
class CleanRun:
    """What one clean forward leaves for the fast engine and the metrics.

    Attributes:
        logits: ``[vocab]`` float32 last-position logits of the clean model.
        start: first position whose per-layer hidden states were kept.
        hidden: per layer ``l``, the hidden states entering layer ``l`` at positions ``start..n-1``:
            ``[n - start, d_model]``; ``hidden[L]`` is the last layer's output (before the final norm).
        keys / values: per layer, the clean post-RoPE keys/values of positions ``0..n-1``:
            ``[1, kv_heads, n, head_dim]``.
        generated: greedy answer token ids (``[new_tokens]``), when generation was asked for.
    """

    logits: torch.Tensor
    start: int
    hidden: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    generated: torch.Tensor | None = None


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


@torch.no_grad()
def clean_run(
    model: nn.Module,
    adapter: VLMAdapter,
    encoded: Encoded,
    *,
    capture_from: int,
    max_new_tokens: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> CleanRun:
    """One clean prefill (plus greedy decoding when ``max_new_tokens > 0``) that keeps, per layer,
    the hidden states at positions ``>= capture_from`` and the keys/values of all positions.

    Forward pre-hooks on the decoder layers read the layer inputs during the prefill only; they are
    removed in ``finally``.
    """
    from transformers import DynamicCache

    layers = adapter.decoder_layers(model)
    n = encoded.seq_len
    captured: dict[int, torch.Tensor] = {}
    handles = []
    # Layer inputs 0..L-1 come from the decoder layers; the final norm's input is layer L's output.
    hooked = [*layers, adapter.final_norm(model)]

    def make_hook(index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if index not in captured and hidden.shape[-2] == n:
                captured[index] = hidden[0, capture_from:].detach().clone()  # [n - start, d_model]

        return hook

    cache = DynamicCache(config=adapter.language_model(model).config)
    try:
        for index, module in enumerate(hooked):
            handles.append(module.register_forward_pre_hook(make_hook(index), with_kwargs=True))
        if max_new_tokens > 0:
            out = model.generate(
                **encoded.inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id,
                past_key_values=cache,
                return_dict_in_generate=True,
                output_logits=True,
            )
            logits = out.logits[0][0].float()
            generated = out.sequences[0, n:].cpu()
        else:
            out = model(**encoded.inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1].float()
            generated = None
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(hooked):
        raise RuntimeError(f"captured hidden states at {len(captured)} of {len(hooked)} layer boundaries during the prefill")
    keys = [cache.layers[i].keys[..., :n, :] for i in range(len(layers))]
    values = [cache.layers[i].values[..., :n, :] for i in range(len(layers))]
    return CleanRun(
        logits=logits,
        start=capture_from,
        hidden=[captured[i] for i in range(len(hooked))],
        keys=keys,
        values=values,
        generated=generated,
    )


@torch.no_grad()
def fast_logits(
    model: nn.Module,
    adapter: VLMAdapter,
    encoded: Encoded,
    clean: CleanRun,
    knockouts: Sequence[Intervention],
    *,
    max_fold_queries: int = DEFAULT_FOLD_QUERIES,
) -> torch.Tensor:
    """Last-position logits ``[len(knockouts), vocab]`` (float32) under each knockout, exactly.

    Knockouts (and ablations) with the same first target run folded together; ``max_fold_queries``
    bounds the query rows of one layer call (more variants are split into chunks of similar start
    layer). Mean ablations cost one extra clean forward for their replacement values.
    """
    adapter.check_attention_backend(model)
    n_layers = adapter.n_layers(model)
    check_layers([k for k in knockouts if isinstance(k, Knockout)], n_layers, adapter.n_heads(model))
    ablation_index = [i for i, k in enumerate(knockouts) if isinstance(k, Ablation)]
    check_ablations([knockouts[i] for i in ablation_index], n_layers, encoded.seq_len)
    values = dict(
        zip(ablation_index, replacement_values(model, adapter, encoded, [knockouts[i] for i in ablation_index]), strict=True)
    )
    vocab = clean.logits.shape[-1]
    result = torch.empty(len(knockouts), vocab, dtype=torch.float32)
    by_t0: dict[int, list[int]] = defaultdict(list)
    for index, knockout in enumerate(knockouts):
        if knockout.is_empty:
            result[index] = clean.logits.cpu()
        else:
            by_t0[knockout.first_target].append(index)
    for t0, indices in by_t0.items():
        if t0 < clean.start:
            raise ValueError(f"clean run kept hidden states from position {clean.start}, knockout needs {t0}")
        suffix = encoded.seq_len - t0
        per_call = max(1, max_fold_queries // suffix)
        ordered = sorted(indices, key=lambda i: knockouts[i].first_layer)
        for lo in range(0, len(ordered), per_call):
            chunk = ordered[lo : lo + per_call]
            chunk_values = {j: values[i] for j, i in enumerate(chunk) if i in values}
            logits = _run_folded(model, adapter, encoded, clean, [knockouts[i] for i in chunk], t0, chunk_values)
            result[chunk] = logits.cpu()
    return result


def _run_folded(
    model: nn.Module,
    adapter: VLMAdapter,
    encoded: Encoded,
    clean: CleanRun,
    variants: Sequence[Intervention],
    t0: int,
    values: dict[int, AblationValues] | None = None,
) -> torch.Tensor:
    """Run ``variants`` (sorted by first layer, same ``t0``) folded into one batch row.

    ``values`` maps the index of each :class:`Ablation` variant to its replacement vectors.
    With ``sdpa`` on CPU the attention runs through :mod:`~vlmflow.knockout.prefix_attention`:
    each query row scores only the shared prefix and its own variant's keys (compact mask
    ``[1, 1|H, k*S, n]``); the CPU kernels cannot skip the masked blocks of the dense layout, which
    for long suffixes are most of the attention work. Otherwise (``eager``, or CUDA, whose fused
    kernel keeps that share small at real widths) the model's own attention gets the dense
    block-diagonal mask ``[1, 1|H, k*S, t0 + k*S]``.
    """
    n = encoded.seq_len
    n_layers = adapter.n_layers(model)
    impl = adapter.attention_implementation(model)
    dtype = next(model.parameters()).dtype
    device = clean.hidden[0].device
    shared = impl == "sdpa" and device.type == "cpu"
    suffix = n - t0
    n_var = len(variants)
    rows = torch.arange(t0, n, device=device)  # [S] absolute query positions
    blocked = _blocked_edges(variants, rows, n)  # [V, S, n]; ablations block no edge
    in_window = torch.tensor(
        [[isinstance(v, Knockout) and layer in v.layers for layer in range(n_layers)] for v in variants],
        dtype=torch.bool,
        device=device,
    )  # [V, L]
    starts = [v.first_layer for v in variants]
    heads_sel = _head_selection(adapter, model, variants, device)  # [V, H] bool or None
    full_positions = adapter.position_ids(model, encoded)
    offset = t0 - clean.start
    d_model = clean.hidden[0].shape[-1]
    hidden = torch.empty(n_var, suffix, d_model, dtype=clean.hidden[0].dtype, device=device)
    positions: dict[int, tuple[torch.Tensor, Any]] = {}  # k -> (position ids, rotary embeddings), same in every layer
    config = adapter.attention_module(model, 0).config
    scope = shared_prefix_attention(config, t0, suffix) if shared else nullcontext(None)
    active = 0
    with scope as layout:
        for layer in range(starts[0], n_layers):
            while active < n_var and starts[active] <= layer:
                hidden[active] = clean.hidden[layer][offset:]  # the variant's window starts here
                active += 1
            k = active
            base = adapter.base_allowed(layer, rows, n, encoded)  # [S, n]
            blk = blocked[:k] & in_window[:k, layer, None, None]  # [k, S, n]
            if heads_sel is not None:
                # Per head: the blocked edges apply only in the selected heads of each variant.
                blk = blk[:, None] & heads_sel[:k, :, None, None]  # [k, H, S, n]
            allowed = _compact_mask(base, blk) if shared else _dense_mask(base, blk, t0)
            check_no_empty_rows(allowed.reshape(-1, allowed.shape[-1]), rows.repeat(k * allowed.shape[1]))
            mask = to_kernel_mask(allowed, impl, dtype)
            x = hidden[:k].reshape(1, k * suffix, d_model)
            if k not in positions:
                pos = adapter.select_positions(full_positions, rows.repeat(k))  # [.., kS] absolute positions
                positions[k] = (pos, adapter.rotary(model, x, pos))
            pos, pe = positions[k]
            cache = _PrefixKV(clean.keys[layer][..., :t0, :], clean.values[layer][..., :t0, :])
            calls = layout.calls if layout is not None else 0
            with folded_ablation(model, adapter, layer, variants[:k], values or {}, t0, suffix):
                x = adapter.run_layer(model, layer, x, mask, pos, pe, cache)
            if layout is not None and layout.calls != calls + 1:
                raise RuntimeError(
                    f"layer {layer}: the attention did not go through vlmflow's shared-prefix attention "
                    f"({layout.calls - calls} calls); this model's attention does not use transformers' AttentionInterface"
                )
            hidden[:k] = x.reshape(k, suffix, d_model)
    last = hidden[:, -1]  # [V, d_model]: the final prompt position of each variant
    logits = adapter.unembed(model)(adapter.final_norm(model)(last))
    return logits.float()


def _blocked_edges(variants: Sequence[Intervention], rows: torch.Tensor, n: int) -> torch.Tensor:
    """``[V, S, n]`` bool: the edges each variant blocks (computed once per distinct edge set)."""
    by_edges: dict[Any, torch.Tensor] = {}
    out = torch.zeros(len(variants), len(rows), n, dtype=torch.bool, device=rows.device)
    for i, v in enumerate(variants):
        if isinstance(v, Knockout):
            if v.edges not in by_edges:
                by_edges[v.edges] = v.blocked_rows(rows, n)
            out[i] = by_edges[v.edges]
    return out


def _compact_mask(base: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """Compact allowed mask ``[1, 1|H, k*S, n]``: variant ``v``'s rows see the prefix and its own suffix.

    ``base`` ``[S, n]``: clean allowed edges of the suffix rows; ``blocked`` ``[k, S, n]`` or
    ``[k, H, S, n]``. Columns ``< t0`` are the shared prefix, columns ``>= t0`` the variant's own keys.
    """
    allowed = ~blocked & base  # [k, S, n] or [k, H, S, n]
    if allowed.dim() == 3:
        return allowed.reshape(1, 1, -1, allowed.shape[-1])
    return allowed.transpose(0, 1).reshape(1, allowed.shape[1], -1, allowed.shape[-1])


def _dense_mask(base: torch.Tensor, blocked: torch.Tensor, t0: int) -> torch.Tensor:
    """Dense folded allowed mask ``[1, 1|H, k*S, t0 + k*S]`` (block diagonal over the suffix keys)."""
    if blocked.dim() == 3:
        return _fold_mask(base, blocked, t0)[None, None]
    return torch.stack([_fold_mask(base, blocked[:, h], t0) for h in range(blocked.shape[1])])[None]


def _fold_mask(base: torch.Tensor, blocked: torch.Tensor, t0: int) -> torch.Tensor:
    """Folded allowed mask ``[k*S, t0 + k*S]`` for ``k`` variants.

    ``base`` ``[S, n]``: clean allowed edges of the suffix rows; ``blocked`` ``[k, S, n]``.
    Columns ``< t0`` are the shared prefix; then each variant's own ``S`` suffix keys, visible only
    to that variant's queries (block diagonal).
    """
    k, suffix, _ = blocked.shape
    allowed = base[None] & ~blocked  # [k, S, n]
    prefix = allowed[..., :t0].reshape(k * suffix, t0)
    own = allowed[..., t0:]  # [k, S, S]
    diag = torch.block_diag(*own) if k > 1 else own[0]  # [kS, kS]
    return torch.cat([prefix, diag], dim=1)


def _head_selection(adapter: VLMAdapter, model: nn.Module, variants: Sequence[Intervention], device: torch.device) -> torch.Tensor | None:
    if all(not isinstance(v, Knockout) or v.heads is None for v in variants):
        return None
    n_heads = adapter.n_heads(model)
    sel = torch.zeros(len(variants), n_heads, dtype=torch.bool, device=device)
    for i, v in enumerate(variants):
        if not isinstance(v, Knockout) or v.heads is None:
            sel[i] = True
        else:
            sel[i, list(v.heads)] = True
    return sel
