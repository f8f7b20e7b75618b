"""Attention for folded knockout variants that share a clean prefix, without scoring other variants' keys.

In the fast engine's folded layout (:mod:`vlmflow.knockout.fast`) the ``k`` variants' suffixes
(``S`` positions each, from the first affected position ``t0``) are query rows ``[v*S, (v+1)*S)``
of one batch row, and the keys are ``[shared clean prefix (t0) ; variant 0's S keys ; ... ;
variant k-1's S keys]``. A dense block-diagonal mask makes every query row score all
``t0 + k*S`` keys although it may see only ``t0 + S`` of them: for the →question flows (``S`` ~ 30,
``k`` ~ 30, ``t0`` ~ 600) that is 2-3 times the attention work that is needed.

Here each query row is scored only against the shared prefix (one matrix product against the
prefix keys, never copied per variant) and its own variant's ``S`` keys (one batched product), with
one softmax, in float32, over exactly those ``t0 + S`` scores. That is the same softmax over the same
allowed keys, so the result is exact up to floating-point rounding.

The mask it takes is the *compact* allowed mask ``[1, 1|H, k*S, t0 + S]``: row ``v*S + i`` lists
what variant ``v``'s suffix position ``t0 + i`` may read, prefix columns first, then its own
suffix columns. The keys/values it receives are the variants' own ``k*S`` only (the prefix comes
with the call), so a call that did not come through here fails on the shapes instead of
attending without the prefix.

A call may also ask for fewer query rows than keys per variant (:attr:`FoldCall.queries`, e.g.
only each variant's last row in the top layer): then the queries are ``[1, H, k*Q, D]``, the own
keys still ``k*S``, and the mask ``[1, 1|H, k*Q, t0 + S]``.

Routing: :func:`register` registers :func:`shared_prefix_attention_forward` with transformers'
``AttentionInterface`` (its public ``register``); the fold strategy
(:class:`~vlmflow.knockout.strategy.SharedPrefixFold`) makes the decoder use it for the duration
of an engine call (the model's public ``set_attn_implementation``, restored in ``finally``) and
hands every call its inputs explicitly, as the attention keyword ``vlmflow_fold`` (a
:class:`FoldCall`). Without that keyword the function is transformers' sdpa attention. No module's
``forward`` is touched, and nothing is shared between calls but what the caller passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmflow.knockout.mask import any_last

#: Name under which the attention function is registered with transformers.
ATTENTION_NAME = "vlmflow_shared_prefix"

#: Bound on the float32 score tensor of one chunk of key/value heads (bytes), without the fused kernel.
SCORE_BUDGET_BYTES = 256 * 2**20


@dataclass
class FoldCall:
    """What the attention of one folded layer call needs, handed to it as the keyword ``vlmflow_fold``.

    Attributes:
        t0: length of the shared prefix (keys ``< t0`` are shared by all variants).
        suffix: query rows (and own keys) per variant, ``S``.
        prefix: the shared prefix keys/values ``[1, kv_heads, t0, head_dim]``; the layer's cache
            hands the attention only the variants' own keys (``k*S`` of them), so the prefix is never
            concatenated per layer call.
        queries: query rows per variant in this call (``None``: ``suffix``, every row), e.g. only
            each variant's last row in the top layer.
        prefix_visible: the engine's promise that every query row may read every prefix key (no
            knockout edge and no clean-mask edge cuts the prefix), so the prefix part needs no mask;
            the mask is still checked against it (cheaply: see :func:`_attend`).
        fused: use torch's fused CPU flash kernel where it exists (tests switch it off).
        done: set by the attention function once it has attended this call.

    >>> FoldCall(t0=600, suffix=31, prefix=(keys, values)).queries is None   # doctest: +SKIP
    True
    """

    t0: int
    suffix: int
    prefix: tuple[torch.Tensor, torch.Tensor]
    queries: int | None = None
    prefix_visible: bool = False
    fused: bool = True
    done: bool = False


def register() -> str:
    """Register :func:`shared_prefix_attention_forward` with transformers (idempotent); its name.

    >>> register()
    'vlmflow_shared_prefix'
    """
    from transformers import AttentionInterface

    if AttentionInterface().get(ATTENTION_NAME) is not shared_prefix_attention_forward:
        AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention_forward)
    return ATTENTION_NAME


def shared_prefix_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    vlmflow_fold: FoldCall | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: ``query [1, H, k*Q, D]``, own ``key/value [1, Hkv, k*S, D]``.

    ``Q`` is :attr:`FoldCall.queries` (``S`` unless the engine asks for fewer rows per variant);
    the prefix keys/values come from :attr:`FoldCall.prefix`.

    Returns ``([1, k*Q, H, D], None)`` like transformers' sdpa function. Without ``vlmflow_fold``,
    or for arguments it does not model (attention sinks, logit soft-capping, dropout), it is
    transformers' sdpa function (with the prefix put back in front of the keys).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    call = vlmflow_fold
    if call is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    t0, suffix = call.t0, call.suffix
    per_variant = call.queries if call.queries is not None else suffix
    batch, n_heads, rows, dim = query.shape
    n_kv = key.shape[1]
    k = rows // per_variant
    prefix_key, prefix_value = call.prefix
    own_key, own_value = key, value
    if prefix_key.shape[2] != t0 or key.shape[2] != k * suffix:
        raise ValueError(
            f"shared-prefix attention expected {t0} prefix keys and {k} x {suffix} own keys, "
            f"got {tuple(prefix_key.shape)} and {tuple(key.shape)}"
        )
    if batch != 1 or rows != k * per_variant or own_key.shape[2] != k * suffix or attention_mask is None:
        raise ValueError(
            f"shared-prefix attention expected 1 x {k} x {per_variant} query rows and {t0} + {k} x {suffix} keys with a "
            f"mask, got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"mask {None if attention_mask is None else tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (rows, t0 + suffix):
        raise ValueError(f"shared-prefix attention needs the compact bool mask [.., {rows}, {t0 + suffix}], got {attention_mask.dtype} {tuple(attention_mask.shape)}")
    call.done = True
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or (dropout and module.training):
        dense = compact_to_dense(attention_mask, t0, suffix, per_variant)
        key, value = torch.cat([prefix_key, own_key], dim=2), torch.cat([prefix_value, own_value], dim=2)
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    group = n_heads // n_kv
    scale = scaling if scaling is not None else dim**-0.5
    mask = attention_mask[0]  # [1|H, rows, t0 + S]
    per_head = mask.shape[0] != 1
    out = torch.empty(n_kv, group, rows, dim, dtype=torch.float32, device=query.device)
    # Heads are processed in chunks of key/value heads so the float32 scores stay within budget.
    per_chunk = max(1, SCORE_BUDGET_BYTES // max(1, 4 * group * rows * (t0 + suffix)))
    for lo in range(0, n_kv, per_chunk):
        hi = min(n_kv, lo + per_chunk)
        q = (query[0, lo * group : hi * group] * scale).view(hi - lo, group, rows, dim)
        m = mask[lo * group : hi * group].view(hi - lo, group, rows, t0 + suffix) if per_head else mask.view(1, 1, rows, t0 + suffix)
        out[lo:hi] = _attend(
            q,
            (prefix_key[0, lo:hi], prefix_value[0, lo:hi]),
            (own_key[0, lo:hi], own_value[0, lo:hi]),
            m,
            suffix,
            k,
            call.prefix_visible,
            call.fused,
        )
    result = out.view(n_heads, rows, dim).to(query.dtype).transpose(0, 1)  # [rows, H, D]
    return result[None].contiguous(), None


def _attend(
    q: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor],
    own: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    suffix: int,
    k: int,
    prefix_visible: bool = False,
    fused: bool = True,
) -> torch.Tensor:
    """Softmax attention of ``q [h, g, k*Q, D]`` (already scaled) over the prefix and own keys.

    ``prefix`` keys/values ``[h, t0, D]``, ``own`` ``[h, k*S, D]``; ``mask [h|1, g|1, k*Q, t0 + S]`` bool. The two parts are
    computed separately, each with its log-sum-exp, and merged exactly. Returns ``[h, g, k*Q, D]``
    float32. ``prefix_visible``: the caller's word that the prefix columns of ``mask`` are all
    True; the prefix part then runs unmasked (no float bias is built, the kernel reads none). A wrong
    promise would turn a knockout into a silent no-op, so a cheap sample of the mask is checked
    (every row's first and last prefix column, the first row in full): a guard against an engine
    bug, not a proof; the engine derives the promise from the same blocked edges the mask is built
    from.
    """
    t0 = prefix[0].shape[-2]
    if t0 == 0:  # nothing shared (a prefix-LM knockout can start at position 0); fused kernels refuse 0 keys
        out, _ = _own_part(q, *own, mask, suffix, k, fused)
        return out
    prefix_mask = mask[..., :t0]
    if prefix_visible and not _looks_all_visible(prefix_mask):
        raise RuntimeError("shared-prefix attention was told the prefix is fully visible, but its mask blocks prefix keys")
    out_p, lse_p = _prefix_part(q, *prefix, None if prefix_visible else prefix_mask, fused)
    out_o, lse_o = _own_part(q, *own, mask[..., t0:], suffix, k, fused)
    lse = torch.logaddexp(lse_p, lse_o)  # [h, g, rows]; never -inf: no row is empty (checked by the engine)
    out_p.mul_(torch.exp(lse_p - lse)[..., None])
    return out_p.add_(out_o.mul_(torch.exp(lse_o - lse)[..., None]))


def _looks_all_visible(mask: torch.Tensor) -> bool:
    """A cheap necessary condition for ``mask [.., rows, t0]`` being all True (see :func:`_attend`)."""
    return bool(mask[..., 0].all()) and bool(mask[..., -1].all()) and bool(mask[..., 0, :].all())


def _prefix_part(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query row over the shared prefix: ``(out [h, g, rows, D] float32, lse [h, g, rows])``.

    On CPU torch's fused flash kernel (which also returns the log-sum-exp) is used when present;
    otherwise explicit products with a float32 softmax, as transformers' eager attention computes.
    Rows that may see no prefix key get ``lse = -inf`` and a zero output. ``mask`` ``None``: every
    row sees every prefix key (no mask is built or applied).
    """
    h, g, rows, dim = q.shape
    t0 = key.shape[-2]
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused and q.device.type == "cpu" and kernel is not None:
        bias = None
        if mask is not None:
            bias = torch.where(mask, torch.zeros((), dtype=q.dtype), torch.full((), float("-inf"), dtype=q.dtype))
            bias = bias.expand(bias.shape[0], g, rows, t0).reshape(1, bias.shape[0], g * rows, t0)
        out, lse = kernel(q.reshape(1, h, g * rows, dim), key[None], value[None], 0.0, False, attn_mask=bias, scale=1.0)
        out, lse = out.view(h, g, rows, dim).float(), lse.view(h, g, rows).float()
    else:
        scores = torch.matmul(q, key[:, None].transpose(-1, -2)).float()  # [h, g, rows, t0]
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        visible = any_last(mask) if mask is not None else None
        probs = scores.sub_((lse if visible is None else lse.masked_fill(~visible, 0.0))[..., None]).exp_()
        out = torch.matmul(probs.to(value.dtype), value[:, None]).float()
    if mask is None:
        return out, lse
    # The fused kernel reports lse 0 (not -inf) and output 0 for a row with no visible key.
    return out, lse.masked_fill(~any_last(mask), float("-inf"))


def _own_part(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, suffix: int, k: int, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of variant ``v``'s rows over its own ``S`` keys: ``(out [h, g, rows, D] float32, lse [h, g, rows])``.

    ``q [h, g, k*Q, D]`` (``Q`` rows per variant); ``key/value [h, k*S, D]``; ``mask [h|1, g|1, k*Q, S]``.
    On CPU one call of torch's fused flash kernel with the variants as its batch (the query groups
    of a key/value head folded into its rows, as in :func:`_prefix_part`); otherwise small batched
    products with a float32 softmax. Rows that may see no own key get ``lse = -inf`` and output 0.
    """
    h, g, rows, dim = q.shape
    per_variant = rows // k
    m = mask.reshape(*mask.shape[:2], k, per_variant, suffix)  # [h|1, g|1, k, Q, S]
    visible = any_last(m)  # [h|1, g|1, k, Q]
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused and q.device.type == "cpu" and kernel is not None:
        qb = q.view(h, g, k, per_variant, dim).permute(2, 0, 1, 3, 4).reshape(k, h, g * per_variant, dim)
        kb = key.view(h, k, suffix, dim).transpose(0, 1)  # [k, h, S, D]
        vb = value.view(h, k, suffix, dim).transpose(0, 1)
        bias = torch.where(m, torch.zeros((), dtype=q.dtype), torch.full((), float("-inf"), dtype=q.dtype))
        bias = bias.permute(2, 0, 1, 3, 4).expand(k, bias.shape[0], g, per_variant, suffix)
        bias = bias.reshape(k, bias.shape[1], g * per_variant, suffix)  # [k, h|1, g*Q, S]
        out, lse = kernel(qb, kb, vb, 0.0, False, attn_mask=bias, scale=1.0)[:2]  # [k, h, g*Q, D], [k, h, g*Q]
        out = out.view(k, h, g, per_variant, dim).permute(1, 2, 0, 3, 4).float()
        lse = lse.view(k, h, g, per_variant).permute(1, 2, 0, 3).float()
        # The fused kernel reports lse 0 (not -inf) and output 0 for a row with no visible key.
        lse = lse.masked_fill(~visible, float("-inf"))
        return out.reshape(h, g, rows, dim), lse.reshape(h, g, rows)
    ko = key.reshape(h, 1, k, suffix, dim)
    vo = value.reshape(h, 1, k, suffix, dim)
    scores = torch.matmul(q.view(h, g, k, per_variant, dim), ko.transpose(-1, -2)).float()  # [h, g, k, Q, S]
    scores.masked_fill_(~m, float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [h, g, k, Q]
    probs = scores.sub_(lse.masked_fill(~visible, 0.0)[..., None]).exp_()
    out = torch.matmul(probs.to(value.dtype), vo).float()
    return out.view(h, g, rows, dim), lse.view(h, g, rows)


def compact_to_dense(compact: torch.Tensor, t0: int, suffix: int, queries: int | None = None) -> torch.Tensor:
    """The block-diagonal dense mask ``[.., k*Q, t0 + k*S]`` of a compact mask ``[.., k*Q, t0 + S]``.

    ``queries``: query rows per variant ``Q`` (default ``S``).

    >>> compact_to_dense(torch.ones(1, 1, 4, 3, dtype=torch.bool), t0=1, suffix=2)[0, 0].int().tolist()
    [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 1], [1, 0, 0, 1, 1]]
    """
    per_variant = queries if queries is not None else suffix
    rows = compact.shape[-2]
    k = rows // per_variant
    own = torch.zeros(*compact.shape[:-1], k * suffix, dtype=compact.dtype, device=compact.device)
    for v in range(k):  # one Q x S block per variant
        own[..., v * per_variant : (v + 1) * per_variant, v * suffix : (v + 1) * suffix] = compact[
            ..., v * per_variant : (v + 1) * per_variant, t0:
        ]
    return torch.cat([compact[..., :t0], own], dim=-1)
