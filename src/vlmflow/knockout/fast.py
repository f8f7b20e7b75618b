"""The fast, exact knockout engine.

Why it is exact: a knockout changes attention only at its target rows, from its first blocked layer
``a`` on. From there a change spreads to every position that attends to a changed position in a
later layer. Let ``t`` be the **first affected position**: the earliest position that can see a
changed position, directly or through later layers, in the clean model's attention pattern
(:meth:`VLMAdapter.base_allowed <vlmflow.adapters.base.VLMAdapter.base_allowed>`, layers ``>= a``).
Nothing at positions ``< t`` and nothing below layer ``a`` changes, so the result is determined by

* the clean keys/values of positions ``< t`` in every layer (unchanged), and
* the clean hidden states of positions ``>= t`` entering layer ``a`` (unchanged),

and only the suffix ``t..n-1`` has to be recomputed, from layer ``a`` up. For causal attention
``t`` is the first target position; where earlier positions may attend to later ones (a
bidirectional image block, a prefix-LM) :func:`affected_starts` moves ``t`` back as far as needed,
so the same engine stays exact for every family. One clean forward (vision tower once, baseline
logits, greedy answer) provides both.

Many knockouts (all windows of all flows with the same ``t``) run together "folded" into the query
axis of a single batch row: variant ``v``'s suffix occupies query rows ``[v*S, (v+1)*S)``; every
variant attends to the shared clean prefix keys/values (one copy per layer call, never one per
variant) and only to its own suffix keys (a block-diagonal mask, or on CPU the shared-prefix
attention of :mod:`vlmflow.knockout.prefix_attention`, which never scores the other variants' keys).
Variants start at their own first layer: at layer ``l`` only the variants whose window has started
are computed. Two more savings leave every result unchanged: windows that share their first layer
and edges (the ones clipped at layer 0) agree below the layer where their layer sets first differ,
so each starts there from the other's states (:func:`branch_plan`); and in the top layer only the
last row's output is read, so the other rows give only their keys/values
(:meth:`VLMAdapter.layer_key_values <vlmflow.adapters.base.VLMAdapter.layer_key_values>`).

Module-level ablations (:class:`~vlmflow.knockout.ablation.Ablation`) obey the same rule (nothing
changes before their first affected position or below their first layer) and run folded next to
knockouts: their replacements are applied to their own query rows by
:func:`~vlmflow.knockout.ablation.folded_ablation`.
"""

from __future__ import annotations

import logging
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
from vlmflow.knockout.folding import (
    Intervention,
    blocked_edges,
    branch_plan,
    compact_mask,
    dense_mask,
    head_selection,
)
from vlmflow.knockout.mask import check_no_empty_rows, to_kernel_mask
from vlmflow.knockout.prefix_attention import PrefixLayout, shared_prefix_attention
from vlmflow.knockout.spec import Knockout, check_layers

log = logging.getLogger(__name__)

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


class _OwnKV:
    """A stand-in KV cache that hands the attention only the new keys/values (the variants' own).

    Used with the shared-prefix attention, which reads the prefix from its layout
    (:attr:`~vlmflow.knockout.prefix_attention.PrefixLayout.prefix`), so no ``[prefix ; new]``
    copy is made in every layer.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _FixedKV(_PrefixKV):
    """A stand-in KV cache whose keys/values are all known already: ``update`` returns them as they are.

    Used in the top layer, where each variant's last row reads keys/values computed beforehand for
    all its rows (the new ones the layer hands in are those of the last rows, already included).
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


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

    # A plain cache keeps every position's keys/values in every layer (a config-built one would keep
    # only the last window of a sliding-window layer); windows are applied by the attention mask.
    cache = DynamicCache()
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

    Knockouts (and ablations) with the same first affected position (:func:`affected_starts`) run
    folded together; ``max_fold_queries``
    bounds the query rows of one layer call (more variants are split into chunks of similar start
    layer). Mean ablations cost one extra clean forward for their replacement values. On
    ``torch.OutOfMemoryError`` the chunk size is halved and the chunk retried, down to one variant
    per call; an OOM with a single variant is raised.
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
    starts = affected_starts(adapter, encoded, n_layers, knockouts)
    by_start: dict[int, list[int]] = defaultdict(list)
    for index, knockout in enumerate(knockouts):
        if knockout.is_empty:
            result[index] = clean.logits.cpu()
        else:
            by_start[starts[index]].append(index)
    for t0, indices in by_start.items():
        if t0 < clean.start:
            raise ValueError(
                f"clean run kept hidden states from position {clean.start}, but a knockout can change position "
                f"{t0} (use affected_starts() to choose capture_from)"
            )
        suffix = encoded.seq_len - t0
        per_call = max(1, max_fold_queries // suffix)
        ordered = sorted(indices, key=lambda i: knockouts[i].first_layer)
        lo = 0
        while lo < len(ordered):
            chunk = ordered[lo : lo + per_call]
            chunk_values = {j: values[i] for j, i in enumerate(chunk) if i in values}
            try:
                logits = _run_folded(model, adapter, encoded, clean, [knockouts[i] for i in chunk], t0, chunk_values)
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise  # one variant at a time is the smallest fold; the caller records the sample
                logits = None
            if logits is None:  # outside the except block, so the failed call's tensors are freed
                per_call = max(1, len(chunk) // 2)
                release_cached_memory()
                log.warning("out of memory folding %d knockouts; retrying %d at a time", len(chunk), per_call)
                continue
            result[chunk] = logits.cpu()
            lo += len(chunk)
    return result


def release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def affected_starts(
    adapter: VLMAdapter, encoded: Encoded, n_layers: int, interventions: Sequence[Intervention]
) -> list[int]:
    """Per intervention, the first position whose computation it can change (``-1`` when empty).

    An intervention changes the outputs of its target rows in its first layer ``a``; from layer
    ``a + 1`` on every position that attends to a changed position changes too. The result is the
    largest ``t <= first_target`` such that no position ``< t`` attends to any position ``>= t`` in
    any layer ``> a`` of the clean model (:meth:`VLMAdapter.base_allowed`), so positions ``< t``
    provably keep their clean states. With causal attention this is ``first_target``.

    >>> affected_starts(adapter, encoded, n_layers, knockouts)      # doctest: +SKIP
    [57, 57, 12]
    """
    if adapter.is_causal():  # no position reads a later one: nothing before the first target can change
        return [-1 if k.is_empty else k.first_target for k in interventions]
    live = [k for k in interventions if not k.is_empty]
    if not live:
        return [-1] * len(interventions)
    t_max = max(k.first_target for k in live)
    first = min(k.first_layer for k in live) + 1  # layers where a change can spread
    device = encoded.inputs["input_ids"].device
    n = encoded.seq_len
    rows = torch.arange(t_max, device=device)
    keys = torch.arange(n, device=device)
    # last_key[l, p]: the last key position row p may attend to in layer l (rows < t_max suffice);
    # row n_layers stands for "no later layer".
    last_key = torch.full((n_layers + 1, t_max), -1, dtype=torch.long)
    for layer in range(first, n_layers if t_max > 0 else first):
        allowed = adapter.base_allowed(layer, rows, n, encoded)  # [t_max, n]
        last_key[layer] = torch.where(allowed, keys, -1).amax(dim=1).cpu()
    reach = last_key.flip(0).cummax(dim=0).values.flip(0)  # reach[l, p]: max over layers >= l
    out = []
    for k in interventions:
        if k.is_empty:
            out.append(-1)
            continue
        r, t = reach[k.first_layer + 1], k.first_target
        while True:
            sees_ahead = torch.nonzero(r[:t] >= t)  # positions before t that read position >= t
            if len(sees_ahead) == 0:
                break
            t = int(sees_ahead[0])
        out.append(t)
    return out


def _run_folded(
    model: nn.Module,
    adapter: VLMAdapter,
    encoded: Encoded,
    clean: CleanRun,
    variants: Sequence[Intervention],
    t0: int,
    values: dict[int, AblationValues] | None = None,
) -> torch.Tensor:
    """Run ``variants`` (same ``t0``) folded into one batch row; ``[V, vocab]`` logits in their order.

    ``values`` maps the index of each :class:`Ablation` variant to its replacement vectors.
    With ``sdpa`` on CPU the attention runs through :mod:`~vlmflow.knockout.prefix_attention`:
    each query row scores only the shared prefix and its own variant's keys (compact mask
    ``[1, 1|H, k*S, n]``); the CPU kernels cannot skip the masked blocks of the dense layout, which
    for long suffixes are most of the attention work. Otherwise (``eager``, or CUDA, whose fused
    kernel keeps that share small at real widths) the model's own attention gets the dense
    block-diagonal mask ``[1, 1|H, k*S, t0 + k*S]``.

    Two savings leave the result unchanged: a knockout that agrees with another one below layer
    ``b`` (same edges and heads, same layers below ``b``: the clipped windows at the bottom of a
    sweep) starts at ``b`` from the other's hidden states (:func:`branch_plan`); and in the top
    layer only each variant's last row is computed in full (the other rows give keys/values only,
    :meth:`~vlmflow.adapters.base.VLMAdapter.layer_key_values`), since only the last row's output
    is read.
    """
    order, starts, parents = branch_plan(variants)
    variants = [variants[i] for i in order]
    values = {new: values[old] for new, old in enumerate(order) if values and old in values}
    n = encoded.seq_len
    n_layers = adapter.n_layers(model)
    impl = adapter.attention_implementation(model)
    dtype = next(model.parameters()).dtype
    device = clean.hidden[0].device
    shared = uses_shared_prefix(impl, device)
    suffix = n - t0
    n_var = len(variants)
    rows = torch.arange(t0, n, device=device)  # [S] absolute query positions
    blocked = blocked_edges(variants, rows, n)  # [V, S, n]; ablations block no edge
    blocks_prefix = blocked[..., :t0].reshape(n_var, -1).any(dim=1)  # [V]: cuts some prefix key
    in_window = torch.tensor(
        [[isinstance(v, Knockout) and layer in v.layers for layer in range(n_layers)] for v in variants],
        dtype=torch.bool,
        device=device,
    )  # [V, L]
    heads_sel = head_selection(adapter, model, variants, device)  # [V, H] bool or None
    full_positions = adapter.position_ids(model, encoded)
    offset = t0 - clean.start
    d_model = clean.hidden[0].shape[-1]
    hidden = torch.empty(n_var, suffix, d_model, dtype=clean.hidden[0].dtype, device=device)
    positions: dict[int, tuple[torch.Tensor, Any]] = {}  # k -> (position ids, rotary embeddings), same in every layer
    config = adapter.attention_module(model, 0).config
    scope = shared_prefix_attention(config, t0, suffix) if shared else nullcontext(None)
    # Ablations replace module outputs row by row; their top layer keeps every row.
    last_rows_only = suffix > 1 and all(isinstance(v, Knockout) for v in variants)
    active = 0
    with scope as layout:
        for layer in range(starts[0], n_layers):
            while active < n_var and starts[active] <= layer:
                # The variant's window starts here (clean inputs), or it branches off its parent.
                source = parents[active]
                hidden[active] = clean.hidden[layer][offset:] if source is None else hidden[source]
                active += 1
            k = active
            base = adapter.base_allowed(layer, rows, n, encoded)  # [S, n]
            now = in_window[:k, layer]  # [k]
            if bool(now.any()):
                blk = blocked[:k] & now[:, None, None]  # [k, S, n]
                if heads_sel is not None:
                    # Per head: the blocked edges apply only in the selected heads of each variant.
                    blk = blk[:, None] & heads_sel[:k, :, None, None]  # [k, H, S, n]
                allowed = compact_mask(base, blk) if shared else dense_mask(base, blk, t0)
                check_no_empty_rows(allowed.reshape(-1, allowed.shape[-1]), rows.repeat(k * allowed.shape[1]))
            elif shared:  # no window is open in this layer: every variant's rows keep the clean pattern
                allowed = compact_mask(base, None, k)
            else:
                allowed = dense_mask(base, torch.zeros(k, suffix, n, dtype=torch.bool, device=device), t0)
            mask = to_kernel_mask(allowed, impl, dtype)
            x = hidden[:k].reshape(1, k * suffix, d_model)
            if k not in positions:
                pos = adapter.select_positions(full_positions, rows.repeat(k))  # [.., kS] absolute positions
                positions[k] = (pos, adapter.rotary(model, x, pos))
            pos, pe = positions[k]
            prefix = (clean.keys[layer][..., :t0, :], clean.values[layer][..., :t0, :])  # [1, kv_heads, t0, head_dim]
            calls = layout.calls if layout is not None else 0
            if layout is not None:
                # The attention reads the prefix from the layout; the cache hands it only the own keys.
                layout.prefix = prefix
                # No knockout active here cuts a prefix key and the clean rule hides none.
                layout.prefix_visible = bool(base[:, :t0].all()) and not bool((blocks_prefix[:k] & now).any())
            with folded_ablation(model, adapter, layer, variants[:k], values, t0, suffix):
                if layer == n_layers - 1 and last_rows_only:
                    last = _top_layer_last_rows(model, adapter, layer, x, mask, pos, pe, prefix, k, suffix, full_positions, rows, layout)
                else:
                    cache = _OwnKV() if layout is not None else _PrefixKV(*prefix)
                    x = adapter.run_layer(model, layer, x, mask, pos, pe, cache)
            if layout is not None and layout.calls != calls + 1:
                raise RuntimeError(
                    f"layer {layer}: the attention did not go through vlmflow's shared-prefix attention "
                    f"({layout.calls - calls} calls); this model's attention does not use transformers' AttentionInterface"
                )
            if layer < n_layers - 1 or not last_rows_only:
                hidden[:k] = x.reshape(k, suffix, d_model)
            else:
                hidden[:k, -1] = last[0]
    # [V, d_model]: the final prompt position of each variant, back in the caller's order (the
    # rows are permuted here, before the unembedding, not the [V, vocab] logits after it).
    caller_order = torch.empty(n_var, dtype=torch.long, device=device)
    caller_order[torch.tensor(order, device=device)] = torch.arange(n_var, device=device)
    last_hidden = hidden[caller_order, -1]
    return adapter.unembed(model)(adapter.final_norm(model)(last_hidden)).float()


def _top_layer_last_rows(
    model: nn.Module,
    adapter: VLMAdapter,
    layer: int,
    x: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    pe: Any,
    prefix: tuple[torch.Tensor, torch.Tensor],
    k: int,
    suffix: int,
    full_positions: torch.Tensor,
    rows: torch.Tensor,
    layout: PrefixLayout | None,
) -> torch.Tensor:
    """The top layer for the last row of each of ``k`` folded variants: ``[1, k, d_model]``.

    ``x`` ``[1, k*S, d_model]`` are the layer's inputs; every row's keys/values are needed (the
    last row reads them), but only the last row's attention output, output projection and MLP.
    ``mask`` is the layer's folded mask (query rows on dim 2); its last row per variant is kept.
    """
    keys, values = adapter.layer_key_values(model, layer, x, pos, pe)  # [1, kv_heads, k*S, head_dim]
    last = torch.arange(k, device=x.device) * suffix + suffix - 1  # [k] query rows of the last position
    x_last = x[:, last]  # [1, k, d_model]
    pos_last = adapter.select_positions(full_positions, rows[-1:].repeat(k))
    pe_last = adapter.rotary(model, x_last, pos_last)
    if layout is not None:  # the shared-prefix attention takes the prefix from the layout
        cache = _FixedKV(keys, values)
        layout.queries = 1
    else:
        cache = _FixedKV(torch.cat([prefix[0], keys], dim=-2), torch.cat([prefix[1], values], dim=-2))
    try:
        return adapter.run_layer(model, layer, x_last, mask[:, :, last], pos_last, pe_last, cache)
    finally:
        if layout is not None:
            layout.queries = None


def uses_shared_prefix(implementation: str, device: torch.device) -> bool:
    """Whether folded knockouts run through :mod:`~vlmflow.knockout.prefix_attention` (CPU, sdpa).

    Then the folded attention is vlmflow's own, not the model's kernel; elsewhere the model's
    kernel gets the dense block-diagonal mask.

    >>> uses_shared_prefix("sdpa", torch.device("cpu")), uses_shared_prefix("eager", torch.device("cpu"))
    (True, False)
    """
    return implementation == "sdpa" and device.type == "cpu"
