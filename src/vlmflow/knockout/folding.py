"""How the fast engine lays out folded variants: their masks, and which variant starts from which.

The fast engine (:mod:`vlmflow.knockout.fast`) runs many knockouts of one sample "folded" into the
query axis of one batch row; this module builds what each folded layer call needs: the blocked
edges of each variant, the allowed mask in the compact (shared-prefix attention) or the dense
block-diagonal layout, the per-head selection of head-level knockouts, and the branch plan that lets
windows with the same start share the layers where they agree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlmflow.adapters.base import VLMAdapter
from vlmflow.knockout.ablation import Ablation
from vlmflow.knockout.spec import Knockout

#: What the fast engine runs: blocked attention edges or a module-level ablation.
Intervention = Knockout | Ablation


def branch_plan(variants: Sequence[Intervention]) -> tuple[list[int], list[int], list[int | None]]:
    """Where each folded variant starts, and from whose hidden states: ``(order, starts, parents)``.

    Two knockouts with the same edges, heads and first layer whose layer sets agree below layer
    ``b`` compute the same hidden states below ``b`` (same inputs, same masks), so the second can
    start at ``b`` from the first one's states there instead of at its first layer from the clean
    ones. In a window sweep these are the windows clipped at layer 0 (``[0, 4]``, ``[0, 5]``, ...:
    each branches off the previous one where it first differs). ``order`` permutes the variants so
    that starts never decrease and a parent comes before its children; ``starts`` and ``parents``
    (indices into the permuted list, ``None``: clean states) follow that order.

    >>> from vlmflow.knockout.spec import Knockout
    >>> e = (((5,), (1, 2)),)
    >>> branch_plan([Knockout(e, (0, 1, 2)), Knockout(e, (0, 1)), Knockout(e, (3, 4))])
    ([1, 0, 2], [0, 2, 3], [None, 0, None])
    """
    start = [v.first_layer for v in variants]
    parent: list[int | None] = [None] * len(variants)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, v in enumerate(variants):
        if isinstance(v, Knockout):
            groups[(v.edges, v.heads, v.first_layer)].append(i)
    for members in groups.values():
        members.sort(key=lambda i: tuple(sorted(variants[i].layers)))
        for j, i in enumerate(members):
            best: tuple[int, int] | None = None
            for u in members[:j]:
                differ = set(variants[u].layers) ^ set(variants[i].layers)
                # u must be running before b so that its states entering b exist when i starts.
                if differ and start[u] < min(differ) and (best is None or min(differ) > best[0]):
                    best = (min(differ), u)
            if best is not None:
                start[i], parent[i] = best
    order = sorted(range(len(variants)), key=lambda i: start[i])  # stable; start[parent] < start[child]
    new_index = {old: new for new, old in enumerate(order)}
    return order, [start[i] for i in order], [None if parent[i] is None else new_index[parent[i]] for i in order]


def blocked_edges(variants: Sequence[Intervention], rows: torch.Tensor, n: int) -> torch.Tensor:
    """``[V, S, n]`` bool: the edges each variant blocks (computed once per distinct edge set)."""
    by_edges: dict[Any, torch.Tensor] = {}
    out = torch.zeros(len(variants), len(rows), n, dtype=torch.bool, device=rows.device)
    for i, v in enumerate(variants):
        if isinstance(v, Knockout):
            if v.edges not in by_edges:
                by_edges[v.edges] = v.blocked_rows(rows, n)
            out[i] = by_edges[v.edges]
    return out


def compact_mask(base: torch.Tensor, blocked: torch.Tensor | None, k: int = 0) -> torch.Tensor:
    """Compact allowed mask ``[1, 1|H, k*S, n]``: variant ``v``'s rows see the prefix and its own suffix.

    ``base`` ``[S, n]``: clean allowed edges of the suffix rows; ``blocked`` ``[k, S, n]`` or
    ``[k, H, S, n]``, or ``None`` for ``k`` variants that block nothing here. Columns ``< t0`` are
    the shared prefix, columns ``>= t0`` the variant's own keys.
    """
    if blocked is None:
        return base.repeat(k, 1)[None, None]
    allowed = ~blocked & base  # [k, S, n] or [k, H, S, n]
    if allowed.dim() == 3:
        return allowed.reshape(1, 1, -1, allowed.shape[-1])
    return allowed.transpose(0, 1).reshape(1, allowed.shape[1], -1, allowed.shape[-1])


def dense_mask(base: torch.Tensor, blocked: torch.Tensor, t0: int) -> torch.Tensor:
    """Dense folded allowed mask ``[1, 1|H, k*S, t0 + k*S]`` (block diagonal over the suffix keys)."""
    if blocked.dim() == 3:
        return fold_mask(base, blocked, t0)[None, None]
    return torch.stack([fold_mask(base, blocked[:, h], t0) for h in range(blocked.shape[1])])[None]


def fold_mask(base: torch.Tensor, blocked: torch.Tensor, t0: int) -> torch.Tensor:
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


def head_selection(adapter: VLMAdapter, model: nn.Module, variants: Sequence[Intervention], device: torch.device) -> torch.Tensor | None:
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
