"""The fold plan: how the fast engine runs many knockouts of one sample together, as a pure value.

The fast engine (:mod:`vlmflow.knockout.fast`) runs every knockout (and ablation) of one sample
with the same first affected position ``t0`` "folded" into the query axis of one batch row:
variant ``v``'s suffix ``t0..n-1`` occupies query rows ``[v*S, (v+1)*S)``. A :class:`FoldPlan`
says everything about such a run that does not need the model:

* the **order** of the variants and the **layer each starts** in: a variant is computed from its
  first blocked layer on, or, when another variant with the same edges agrees with it below layer
  ``b`` (the windows of a sweep clipped at layer 0), from ``b`` on, starting from that **parent**'s
  hidden states (:func:`branch_plan`);
* per layer (:meth:`FoldPlan.step`), **how many variants are active** (a prefix of the order: starts
  never decrease), which ones start there, and **which attention edges** each active variant may use
  (the clean pattern minus the edges its window blocks there);
* **which rows each layer computes**: every row, except in the top layer, where only the rows that
  are read come out: the last ``read_rows`` rows of each variant (when every variant is a knockout;
  one row for the next-token logits, several for a teacher-forced answer).

Unit tests check plans without a model; :mod:`vlmflow.knockout.executor` runs them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from vlmflow.adapters.pattern import AttentionPattern
from vlmflow.knockout.ablation import Ablation
from vlmflow.knockout.mask import check_no_empty_rows
from vlmflow.knockout.spec import Knockout

#: What the fast engine runs: blocked attention edges or a module-level ablation.
Intervention = Knockout | Ablation


@dataclass(frozen=True, eq=False)
class FoldPlan:
    """One folded run of ``variants`` that share their first affected position ``t0``.

    Attributes:
        variants: the interventions in folded order (``order[i]`` is the caller's index of
            ``variants[i]``).
        order: caller index of each folded variant.
        starts: per folded variant, the first layer it is computed in (never decreasing).
        parents: per folded variant, the folded index whose hidden states it starts from, or
            ``None`` for the clean states.
        t0: first recomputed position; ``n``: sequence length; ``n_layers``: decoder depth.
        pattern: the sample's clean attention pattern.
        blocked: ``[V, S, n]`` bool, the edges each variant blocks where its window is open.
        in_window: ``[V, n_layers]`` bool, whether variant ``v``'s window is open in a layer.
        heads: ``[V, H]`` bool, the heads each variant's edges apply to (``None``: all heads).
        last_rows_only: the top layer computes only the rows read of each variant.
        read_rows: ``R``, the trailing rows of each variant whose outputs are read (``1 <= R <= S``).

    >>> from vlmflow.adapters.pattern import CausalPattern
    >>> edges = (((5,), (1, 2)),)
    >>> plan = plan_fold([Knockout(edges, (0, 1)), Knockout(edges, (2,))], CausalPattern(), t0=5, n=6, n_layers=3)
    >>> [plan.active(layer) for layer in range(3)], plan.step(2).allowed.shape
    ([1, 1, 2], torch.Size([2, 1, 1, 6]))
    """

    variants: tuple[Intervention, ...]
    order: tuple[int, ...]
    starts: tuple[int, ...]
    parents: tuple[int | None, ...]
    t0: int
    n: int
    n_layers: int
    pattern: AttentionPattern
    blocked: torch.Tensor
    in_window: torch.Tensor
    heads: torch.Tensor | None
    last_rows_only: bool
    read_rows: int = 1

    @property
    def suffix(self) -> int:
        """Query rows (and own keys) per variant, ``S``."""
        return self.n - self.t0

    @property
    def first_layer(self) -> int:
        return self.starts[0]

    @property
    def rows(self) -> torch.Tensor:
        """``[S]`` absolute positions of each variant's rows."""
        return torch.arange(self.t0, self.n, device=self.blocked.device)

    def active(self, layer: int) -> int:
        """How many variants (a prefix of the folded order) are computed in ``layer``."""
        return sum(1 for start in self.starts if start <= layer)

    @cached_property
    def cuts_prefix(self) -> tuple[bool, ...]:
        """Per folded variant, whether its blocked edges include a prefix key (``< t0``)."""
        return tuple(bool(x) for x in self.blocked[:, :, : self.t0].flatten(1).any(dim=1))

    @cached_property
    def host_windows(self) -> list[list[bool]]:
        """``in_window`` as host values: per folded variant, per layer, whether its window is open."""
        return self.in_window.tolist()

    @cached_property
    def host_masks(self) -> FoldMasks:
        """The mask inputs where the plan's own tensors are (the host)."""
        return FoldMasks(self, self.blocked.device)

    def facts(self, layer: int) -> LayerFacts:
        """What ``layer`` computes, as host values (no mask, nothing read back from a device)."""
        k = self.active(layer)
        now = [row[layer] for row in self.host_windows[:k]]
        cut = any(c and o for c, o in zip(self.cuts_prefix, now, strict=False))
        return LayerFacts(
            layer=layer,
            active=k,
            entering=tuple((v, self.parents[v]) for v in range(k) if self.starts[v] == layer),
            window_open=any(now),
            prefix_visible=self.host_masks.base_sees_prefix(layer) and not cut,
            last_rows_only=self.last_rows_only and layer == self.n_layers - 1,
            read_rows=self.read_rows,
        )

    def step(self, layer: int) -> LayerStep:
        """What ``layer`` computes: active variants, the ones starting there, their allowed keys, which rows.

        Raises:
            SampleError: a knockout leaves a query row with no key at all.
        """
        facts = self.facts(layer)
        allowed = self.host_masks.allowed(facts)
        if facts.window_open:
            check_no_empty_rows(allowed.reshape(-1, self.n), self.rows.repeat(facts.active * allowed.shape[1]))
        return LayerStep(**vars(facts), allowed=allowed)

    def steps(self) -> Iterator[LayerStep]:
        """The layer steps from the first variant's start to the top layer."""
        for layer in range(self.first_layer, self.n_layers):
            yield self.step(layer)


@dataclass(frozen=True)
class LayerFacts:
    """One layer of a :class:`FoldPlan`, as host values.

    Attributes:
        layer: the decoder layer.
        active: ``k``, the variants computed here (the first ``k`` of the folded order).
        entering: ``(variant, parent)`` of the variants that start here (``parent`` ``None``: clean states).
        window_open: some active variant's window is open here (else every one keeps the clean pattern).
        prefix_visible: every active row may read every prefix key (``< t0``): no open window cuts
            one and the clean pattern hides none.
        last_rows_only: only each variant's last ``read_rows`` rows are computed (their outputs are all
            that is read).
        read_rows: ``R``, the trailing rows of each variant that are read.
    """

    layer: int
    active: int
    entering: tuple[tuple[int, int | None], ...]
    window_open: bool
    prefix_visible: bool
    last_rows_only: bool
    read_rows: int = 1


@dataclass(frozen=True, eq=False)
class LayerStep(LayerFacts):
    """:class:`LayerFacts` plus ``allowed``, ``[k, H|1, S, n]`` bool: the keys each active variant's rows may read."""

    allowed: torch.Tensor | None = None


class FoldMasks:
    """A plan's mask inputs on one device, and the per-layer allowed masks built from them there.

    Building a mask reads nothing back to the host (what decides *how* it is built are host values,
    :meth:`FoldPlan.facts`), so an accelerator's layer loop never waits for one.
    """

    def __init__(self, plan: FoldPlan, device: torch.device | str) -> None:
        self.plan = plan
        self.rows = plan.rows.to(device)  # [S]
        self.blocked = plan.blocked.to(device)  # [V, S, n]
        self.in_window = plan.in_window.to(device)  # [V, L]
        self.heads = None if plan.heads is None else plan.heads.to(device)  # [V, H]
        self._base: dict[int, torch.Tensor] = {}

    def base(self, layer: int) -> torch.Tensor:
        """``[S, n]`` bool: the clean pattern of the suffix rows in ``layer`` (one for all layers when causal)."""
        key = 0 if self.plan.pattern.is_causal else layer
        if key not in self._base:
            self._base[key] = self.plan.pattern.allowed(layer, self.rows, self.plan.n)
        return self._base[key]

    def base_sees_prefix(self, layer: int) -> bool:
        """Whether the clean pattern lets every suffix row read every prefix key in ``layer`` (reads the mask:
        for host masks)."""
        return bool(self.base(layer)[:, : self.plan.t0].all())

    def allowed(self, facts: LayerFacts) -> torch.Tensor:
        """``[k, H|1, S, n]`` bool: the keys each active variant's rows may read in ``facts.layer``."""
        k, base = facts.active, self.base(facts.layer)
        if not facts.window_open:  # every variant keeps the clean pattern
            return base[None, None].expand(k, 1, -1, -1)
        blocked = self.blocked[:k] & self.in_window[:k, facts.layer, None, None]  # [k, S, n]
        if self.heads is None:
            return (base[None] & ~blocked)[:, None]  # [k, 1, S, n]
        # Per head: the blocked edges apply only in the selected heads of each variant.
        return base[None, None] & ~(blocked[:, None] & self.heads[:k, :, None, None])  # [k, H, S, n]


def plan_fold(
    variants: Sequence[Intervention],
    pattern: AttentionPattern,
    *,
    t0: int,
    n: int,
    n_layers: int,
    n_heads: int | None = None,
    device: torch.device | str = "cpu",
    read_rows: int = 1,
) -> FoldPlan:
    """The :class:`FoldPlan` of ``variants`` (all with first affected position ``t0``).

    ``n_heads`` is needed only when some knockout names heads. ``read_rows``: how many trailing rows
    of each variant are read (``1``: the last position's next-token logits; ``R``: the logits of a
    teacher-forced answer of ``R`` tokens); at most the ``n - t0`` rows the fold computes.

    >>> from vlmflow.adapters.pattern import CausalPattern
    >>> e = (((5,), (1, 2)),)
    >>> plan = plan_fold([Knockout(e, (0, 1, 2)), Knockout(e, (0, 1))], CausalPattern(), t0=5, n=6, n_layers=4)
    >>> plan.order, plan.starts, plan.parents
    ((1, 0), (0, 2), (None, 0))
    """
    if not 1 <= read_rows <= n - t0:
        raise ValueError(f"a fold of rows {t0}..{n - 1} can read 1..{n - t0} trailing rows, not {read_rows}")
    order, starts, parents = branch_plan(variants)
    folded = tuple(variants[i] for i in order)
    rows = torch.arange(t0, n, device=device)
    in_window = torch.tensor(
        [[isinstance(v, Knockout) and layer in v.layers for layer in range(n_layers)] for v in folded],
        dtype=torch.bool,
        device=device,
    ).reshape(len(folded), n_layers)
    return FoldPlan(
        variants=folded,
        order=tuple(order),
        starts=tuple(starts),
        parents=tuple(parents),
        t0=t0,
        n=n,
        n_layers=n_layers,
        pattern=pattern,
        blocked=blocked_edges(folded, rows, n),
        in_window=in_window,
        heads=head_selection(folded, n_heads, rows.device),
        # Ablations replace module outputs row by row; their top layer keeps every row.
        last_rows_only=n - t0 > read_rows and all(isinstance(v, Knockout) for v in folded),
        read_rows=read_rows,
    )


def branch_plan(variants: Sequence[Intervention]) -> tuple[list[int], list[int], list[int | None]]:
    """Where each folded variant starts, and from whose hidden states: ``(order, starts, parents)``.

    Two knockouts with the same edges, heads and first layer whose layer sets agree below layer
    ``b`` compute the same hidden states below ``b`` (same inputs, same masks), so the second can
    start at ``b`` from the first one's states there instead of at its first layer from the clean
    ones. In a window sweep these are the windows clipped at layer 0 (``[0, 4]``, ``[0, 5]``, ...:
    each branches off the previous one where it first differs). ``order`` permutes the variants so
    that starts never decrease and a parent comes before its children; ``starts`` and ``parents``
    (indices into the permuted list, ``None``: clean states) follow that order.

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


def head_selection(variants: Sequence[Intervention], n_heads: int | None, device: torch.device) -> torch.Tensor | None:
    """``[V, H]`` bool: the heads each variant's blocked edges apply to; ``None`` when all apply to all heads."""
    if all(not isinstance(v, Knockout) or v.heads is None for v in variants):
        return None
    if n_heads is None:
        raise ValueError("a knockout names heads: plan_fold needs n_heads")
    sel = torch.zeros(len(variants), n_heads, dtype=torch.bool, device=device)
    for i, v in enumerate(variants):
        if not isinstance(v, Knockout) or v.heads is None:
            sel[i] = True
        else:
            sel[i, list(v.heads)] = True
    return sel
