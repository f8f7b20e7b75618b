"""Attention for folded knockout variants that share a clean prefix, without scoring other variants' keys.

In the fast engine's folded layout (:mod:`vlmflow.knockout.fast`) the ``k`` variants' suffixes
(``S`` positions each, from the first affected position ``t0``) are query rows ``[v*S, (v+1)*S)``
of one batch row, and the keys are ``[shared clean prefix (t0) ; variant 0's S keys ; ... ;
variant k-1's S keys]``. A dense block-diagonal mask makes every query row score all
``t0 + k*S`` keys although it may see only ``t0 + S`` of them: for the →question flows (``S`` ~ 30,
``k`` ~ 30, ``t0`` ~ 600) that is 2-3 times the attention work that is needed.

Here each query row is scored only against the shared prefix (one matrix product against the
prefix keys, never copied per variant) and its own variant's ``S`` keys (one batched product), each
part with its log-sum-exp, in float32, and the two parts are merged exactly: the same softmax over
the same allowed keys, so the result is exact up to floating-point rounding.

One layer call may hold several such folds, each a :class:`FoldPart` (the folds of several
samples computed together: each has its own prefix, length and masks); their query rows follow
one another. A part's mask is its *compact* allowed mask ``[1, 1|H, k*Q, t0 + S]``: row ``v*Q + i``
lists what variant ``v``'s ``i``-th computed row may read, prefix columns first, then its own
suffix columns. ``Q`` is ``S``, or fewer (:attr:`FoldPart.queries`, e.g. only each variant's last
row in the top layer, whose own keys are then given, :attr:`FoldPart.own`).

Each part is computed by a fused kernel that returns the log-sum-exp
(:mod:`vlmflow.knockout.fused_kernels`: torch's flash kernel on CPU, its memory-efficient kernel on
CUDA once checked on the device) or by explicit products on any device
(:func:`~vlmflow.knockout.precision.float32_bmm`: float32 scores and softmax from half-precision
keys without float32 copies). Nothing here reads a value back to the host unless asked to check a
promise (:attr:`FoldCall.check_promise`).

Routing: :func:`register` registers :func:`shared_prefix_attention_forward` with transformers'
``AttentionInterface`` (its public ``register``); a fold strategy
(:mod:`vlmflow.knockout.strategy`) makes the decoder use it for the duration of an engine call
(the model's public ``set_attn_implementation``, restored in ``finally``) and hands every call its
inputs explicitly, as the attention keyword ``vlmflow_fold`` (a :class:`FoldCall`). Without that
keyword the function is transformers' sdpa attention. No module's ``forward`` is touched, and
nothing is shared between calls but what the caller passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmflow.knockout.fused_kernels import fused_kernel
from vlmflow.knockout.mask import any_last
from vlmflow.knockout.precision import float32_bmm

#: Name under which the attention function is registered with transformers.
ATTENTION_NAME = "vlmflow_shared_prefix"

#: Bound on the float32 score tensor of one chunk of key/value heads (bytes), without the fused kernel.
SCORE_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class FoldPart:
    """One fold's rows in a layer call of the shared-prefix attention.

    Attributes:
        t0: length of the shared prefix (keys ``< t0`` are shared by the part's variants).
        suffix: own keys per variant, ``S``.
        prefix: the shared prefix keys/values ``[1, kv_heads, t0, head_dim]`` (never concatenated
            with the own keys).
        mask: the compact allowed mask ``[1, 1|H, k*Q, t0 + S]`` bool.
        queries: computed rows per variant ``Q`` (``None``: ``suffix``, every row).
        own: the own keys/values of every variant ``[1, kv_heads, k*S, head_dim]`` when they were
            computed beforehand (``Q < S``), else ``None``: the layer's keys of the part's rows.
        prefix_visible: the engine's promise that every query row may read every prefix key, so the
            prefix part needs no mask.

    >>> FoldPart(t0=600, suffix=31, prefix=(keys, values), mask=compact).rows     # doctest: +SKIP
    1054
    """

    t0: int
    suffix: int
    prefix: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor
    queries: int | None = None
    own: tuple[torch.Tensor, torch.Tensor] | None = None
    prefix_visible: bool = False

    @property
    def per_variant(self) -> int:
        """Computed rows per variant, ``Q``."""
        return self.queries if self.queries is not None else self.suffix

    @property
    def rows(self) -> int:
        """Query rows of the part, ``k*Q``."""
        return int(self.mask.shape[-2])


@dataclass
class FoldCall:
    """What the attention of one folded layer call needs, handed to it as the keyword ``vlmflow_fold``.

    Attributes:
        parts: the folds whose query rows follow one another in the call.
        fused: fused kernels (:func:`~vlmflow.knockout.fused_kernels.fused_kernel`): ``True`` the
            device's (CPU flash on CPU), ``None`` only on CUDA once checked, ``False`` explicit products.
        check_promise: check a cheap sample of each ``prefix_visible`` part's mask (reads it back to
            the host: the CPU path; the engine also checks every mask on the device, see
            :func:`~vlmflow.knockout.executor.run_folds`).
        done: set by the attention function once it has attended this call.
    """

    parts: tuple[FoldPart, ...]
    fused: bool | None = True
    check_promise: bool = True
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
    """An ``AttentionInterface`` function: ``query [1, H, R, D]``, ``key/value [1, Hkv, R, D]`` (the layer's
    keys of its ``R`` computed rows), the parts' prefixes and masks in ``vlmflow_fold``.

    Returns ``([1, R, H, D], None)`` like transformers' sdpa function. Without ``vlmflow_fold`` it is
    transformers' sdpa function; for arguments it does not model (attention sinks, logit
    soft-capping, dropout) it refuses the call (the fold strategies use the model's own kernel there).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    call = vlmflow_fold
    if call is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or (dropout and module.training):
        raise ValueError("shared-prefix attention models no logit soft-capping, attention sinks or dropout")
    batch, n_heads, rows, dim = query.shape
    total = sum(part.rows for part in call.parts)
    if batch != 1 or rows != total or key.shape[2] != rows:
        raise ValueError(
            f"shared-prefix attention expected 1 x {total} query rows and as many keys for {len(call.parts)} part(s), "
            f"got query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    for part in call.parts:
        _check_part(part, n_heads)
    call.done = True
    scale = scaling if scaling is not None else dim**-0.5
    out = torch.empty(rows, n_heads, dim, dtype=query.dtype, device=query.device)
    offset = 0
    for part in call.parts:
        end = offset + part.rows
        own = part.own if part.own is not None else (key[:, :, offset:end], value[:, :, offset:end])
        out[offset:end] = _attend_part(query[0, :, offset:end], part, own, scale, call)
        offset = end
    return out[None], None


def _check_part(part: FoldPart, n_heads: int) -> None:
    """Refuse a part whose shapes do not describe the folded layout (wrong prefix, mask or own keys)."""
    mask, t0, suffix, q = part.mask, part.t0, part.suffix, part.per_variant
    k = part.rows // q
    own_rows = k * suffix if part.own is not None else part.rows
    if part.prefix[0].shape[2] != t0 or part.rows != k * q or own_rows != k * suffix:
        raise ValueError(
            f"shared-prefix attention expected {t0} prefix keys and {k} x {suffix} own keys for {k} x {q} query rows, "
            f"got prefix {tuple(part.prefix[0].shape)} and {own_rows} own keys"
        )
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != t0 + suffix or mask.shape[1] not in (1, n_heads):
        raise ValueError(f"shared-prefix attention needs the compact bool mask [1, 1|H, {part.rows}, {t0 + suffix}], got {mask.dtype} {tuple(mask.shape)}")


def _attend_part(
    query: torch.Tensor, part: FoldPart, own: tuple[torch.Tensor, torch.Tensor], scale: float, call: FoldCall
) -> torch.Tensor:
    """One part: ``query [H, k*Q, D]`` over its prefix and own keys; ``[k*Q, H, D]`` in the query's dtype."""
    n_heads, rows, dim = query.shape
    prefix_key, prefix_value = part.prefix
    n_kv = prefix_key.shape[1]
    group = n_heads // n_kv
    k = rows // part.per_variant
    mask = part.mask[0]  # [1|H, rows, t0 + S]
    per_head = mask.shape[0] != 1
    out = torch.empty(n_kv, group, rows, dim, dtype=torch.float32, device=query.device)
    # Heads are processed in chunks of key/value heads so the float32 scores stay within budget.
    per_chunk = max(1, SCORE_BUDGET_BYTES // max(1, 4 * group * rows * (part.t0 + part.suffix)))
    width = part.t0 + part.suffix
    for lo in range(0, n_kv, per_chunk):
        hi = min(n_kv, lo + per_chunk)
        q = query[lo * group : hi * group].view(hi - lo, group, rows, dim)
        m = mask[lo * group : hi * group].view(hi - lo, group, rows, width) if per_head else mask.view(1, 1, rows, width)
        out[lo:hi] = _attend(
            q,
            (prefix_key[0, lo:hi], prefix_value[0, lo:hi]),
            (own[0][0, lo:hi], own[1][0, lo:hi]),
            m,
            part.suffix,
            k,
            scale,
            prefix_visible=part.prefix_visible,
            fused=call.fused,
            check_promise=call.check_promise,
        )
    return out.view(n_heads, rows, dim).to(query.dtype).transpose(0, 1)


def _attend(
    q: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor],
    own: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    suffix: int,
    k: int,
    scale: float,
    *,
    prefix_visible: bool = False,
    fused: bool | None = True,
    check_promise: bool = True,
) -> torch.Tensor:
    """Softmax attention of ``q [h, g, k*Q, D]`` (unscaled) over the prefix and own keys.

    ``prefix`` keys/values ``[h, t0, D]``, ``own`` ``[h, k*S, D]``; ``mask [h|1, g|1, k*Q, t0 + S]`` bool. The two parts are
    computed separately, each with its log-sum-exp, and merged exactly. Returns ``[h, g, k*Q, D]``
    float32. ``prefix_visible``: the caller's word that the prefix columns of ``mask`` are all
    True; the prefix part then runs unmasked (no float bias is built, the kernel reads none). A wrong
    promise would turn a knockout into a silent no-op: with ``check_promise`` a cheap sample of the
    mask is checked here (every row's first and last prefix column, the first row in full); the
    engine checks every mask on the device in any case.
    """
    t0 = prefix[0].shape[-2]
    if t0 == 0:  # nothing shared (a prefix-LM knockout can start at position 0); fused kernels refuse 0 keys
        out, _ = _own_part(q, *own, mask, suffix, k, scale, fused)
        return out
    prefix_mask = mask[..., :t0]
    if prefix_visible and check_promise and not _looks_all_visible(prefix_mask):
        raise RuntimeError("shared-prefix attention was told the prefix is fully visible, but its mask blocks prefix keys")
    out_p, lse_p = _prefix_part(q, *prefix, None if prefix_visible else prefix_mask, scale, fused)
    out_o, lse_o = _own_part(q, *own, mask[..., t0:], suffix, k, scale, fused)
    lse = torch.logaddexp(lse_p, lse_o)  # [h, g, rows]; never -inf: no row is empty (checked by the engine)
    out_p.mul_(torch.exp(lse_p - lse)[..., None])
    return out_p.add_(out_o.mul_(torch.exp(lse_o - lse)[..., None]))


def _looks_all_visible(mask: torch.Tensor) -> bool:
    """A cheap necessary condition for ``mask [.., rows, t0]`` being all True (see :func:`_attend`)."""
    return bool(mask[..., 0].all()) and bool(mask[..., -1].all()) and bool(mask[..., 0, :].all())


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive float bias (0 / -inf) of a bool mask, for the fused kernels."""
    return torch.where(mask, torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype))


def _softmax_rows(scores: torch.Tensor, visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: float32 ``scores`` (masked with -inf) -> probabilities; returns ``(probs, lse)``.

    Rows with no visible key (``visible`` False) get ``lse = -inf`` and probabilities 0.
    """
    lse = torch.logsumexp(scores, -1)
    probs = scores.sub_((lse if visible is None else lse.masked_fill(~visible, 0.0))[..., None]).exp_()
    return probs, lse


def _empty_rows_out(out: torch.Tensor, lse: torch.Tensor, visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output 0 and log-sum-exp -inf for rows that may see no key (a fused kernel may report anything there)."""
    if visible is None:
        return out, lse
    return out.masked_fill(~visible[..., None], 0.0), lse.masked_fill(~visible, float("-inf"))


def _prefix_part(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float, fused: bool | None = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query row over the shared prefix: ``(out [h, g, rows, D] float32, lse [h, g, rows])``.

    ``q [h, g, rows, D]``, ``key/value [h, t0, D]``. A fused kernel (:func:`~vlmflow.knockout.fused_kernels.fused_kernel`:
    the query groups of a key/value head folded into its rows) or explicit products with float32
    scores and softmax. Rows that may see no prefix key get ``lse = -inf`` and a zero output.
    ``mask`` ``None``: every row sees every prefix key (no mask is built or applied).
    """
    h, g, rows, dim = q.shape
    t0 = key.shape[-2]
    visible = any_last(mask).expand(h, g, rows) if mask is not None else None
    kernel = fused_kernel(q, fused)
    if kernel is not None:
        bias = None
        if mask is not None:
            bias = _bias(mask, q.dtype)
            bias = bias.expand(bias.shape[0], g, rows, t0).reshape(1, bias.shape[0], g * rows, t0)
        out, lse = kernel(q.reshape(1, h, g * rows, dim), key[None], value[None], bias, scale)
        return _empty_rows_out(out.view(h, g, rows, dim).float(), lse.view(h, g, rows).float(), visible)
    scores = float32_bmm(q.reshape(h, g * rows, dim), key.transpose(-1, -2)).view(h, g, rows, t0).mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    probs, lse = _softmax_rows(scores, visible)
    out = float32_bmm(probs.to(value.dtype).view(h, g * rows, t0), value).view(h, g, rows, dim)
    return out, lse


def _own_part(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    suffix: int,
    k: int,
    scale: float,
    fused: bool | None = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of variant ``v``'s rows over its own ``S`` keys: ``(out [h, g, rows, D] float32, lse [h, g, rows])``.

    ``q [h, g, k*Q, D]`` (``Q`` rows per variant); ``key/value [h, k*S, D]``; ``mask [h|1, g|1, k*Q, S]``.
    A fused kernel with the variants as its batch (the query groups of a key/value head folded into
    its rows, as in :func:`_prefix_part`), or products batched over heads and variants with float32
    scores and softmax. Rows that may see no own key get ``lse = -inf`` and output 0.
    """
    h, g, rows, dim = q.shape
    per_variant = rows // k
    m = mask.reshape(*mask.shape[:2], k, per_variant, suffix)  # [h|1, g|1, k, Q, S]
    visible = any_last(m).expand(h, g, k, per_variant)  # [h, g, k, Q]
    qb = q.view(h, g, k, per_variant, dim).permute(2, 0, 1, 3, 4)  # [k, h, g, Q, D]
    kb = key.view(h, k, suffix, dim).transpose(0, 1)  # [k, h, S, D]
    vb = value.view(h, k, suffix, dim).transpose(0, 1)
    kernel = fused_kernel(q, fused)
    if kernel is not None:
        bias = _bias(m, q.dtype).permute(2, 0, 1, 3, 4).expand(k, m.shape[0], g, per_variant, suffix)
        bias = bias.reshape(k, bias.shape[1], g * per_variant, suffix)  # [k, h|1, g*Q, S]
        out, lse = kernel(qb.reshape(k, h, g * per_variant, dim), kb, vb, bias, scale)
        out, lse = out.float(), lse.float()  # [k, h, g*Q, D], [k, h, g*Q]
    else:
        qf = qb.reshape(k * h, g * per_variant, dim)
        scores = float32_bmm(qf, kb.reshape(k * h, suffix, dim).transpose(-1, -2)).mul_(scale)  # [k*h, g*Q, S]
        scores = scores.view(k, h, g, per_variant, suffix).masked_fill_(~m.permute(2, 0, 1, 3, 4), float("-inf"))
        probs, lse = _softmax_rows(scores, visible.permute(2, 0, 1, 3))
        out = float32_bmm(probs.to(value.dtype).view(k * h, g * per_variant, suffix), vb.reshape(k * h, suffix, dim))
    out = out.view(k, h, g, per_variant, dim).permute(1, 2, 0, 3, 4).reshape(h, g, rows, dim)
    lse = lse.reshape(k, h, g, per_variant).permute(1, 2, 0, 3).reshape(h, g, rows)
    return _empty_rows_out(out, lse, visible.reshape(h, g, rows))


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
