"""What a knockout is, as a value: blocked attention edges, in which layers and heads.

A :class:`Knockout` says: in every layer of ``layers`` (and every head of ``heads``, or all heads),
the query positions ``targets`` of each edge set may not attend to its key positions ``sources``.
It carries positions, not group names, so the engine needs no knowledge of groups or models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from vlmflow.errors import ConfigError
from vlmflow.positions.edges import flow_edges
from vlmflow.positions.groups import PositionGroups
from vlmflow.positions.resolve import Resolver
from vlmflow.positions.routes import Flow

Edge = tuple[tuple[int, ...], tuple[int, ...]]  # (target positions, source positions)


@dataclass(frozen=True)
class Knockout:
    """Blocked edges ``targets x sources`` in ``layers`` (and ``heads``; ``None`` = all heads).

    >>> k = Knockout(edges=(((4,), (1, 2)),), layers=(0, 1))
    >>> k.first_target
    4
    >>> k.blocked_matrix(5)[4].tolist()
    [False, True, True, False, False]
    """

    edges: tuple[Edge, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("a knockout needs at least one layer")
        if self.heads is not None and not self.heads:
            raise ConfigError("heads=() blocks nothing; use heads=None for all heads")

    @classmethod
    def for_flows(
        cls,
        groups: PositionGroups,
        flows: Iterable[Flow],
        layers: Iterable[int],
        heads: Iterable[int] | None = None,
    ) -> Knockout:
        """The knockout of one or more flows of a sample from its groups alone (raises if a group is
        unavailable); flows whose expressions read the prompt or the images need the prepared sample:
        :func:`vlmflow.positions.edges.flow_edges`."""
        resolver = Resolver(None, groups)
        edges = tuple(edge for f in flows for edge in flow_edges(f, resolver))
        return cls(edges=edges, layers=tuple(sorted(set(layers))), heads=None if heads is None else tuple(sorted(set(heads))))

    @property
    def is_empty(self) -> bool:
        """True when no edge is blocked (every edge set has no targets or no sources)."""
        return all(not t or not s for t, s in self.edges)

    @property
    def first_target(self) -> int:
        """The first position whose attention changes; everything before it is untouched."""
        targets = [min(t) for t, s in self.edges if t and s]
        return min(targets) if targets else -1

    @property
    def first_layer(self) -> int:
        return min(self.layers)

    def blocked_rows(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        """``[len(rows), n_keys]`` bool: True where query position ``rows[i]`` may not read key ``j``."""
        device = rows.device
        out = torch.zeros(len(rows), n_keys, dtype=torch.bool, device=device)
        for targets, sources in self.edges:
            if not targets or not sources:
                continue
            t = torch.as_tensor(targets, device=device)
            s = torch.as_tensor(sources, device=device)
            row_hit = (rows[:, None] == t[None, :]).any(dim=1)  # [rows]
            col_hit = torch.zeros(n_keys, dtype=torch.bool, device=device)
            col_hit[s[s < n_keys]] = True
            out |= row_hit[:, None] & col_hit[None, :]
        return out

    def blocked_matrix(self, seq_len: int) -> torch.Tensor:
        """``[seq, seq]`` bool matrix of blocked (query, key) pairs."""
        return self.blocked_rows(torch.arange(seq_len), seq_len)


def check_layers(knockouts: Sequence[Knockout], n_layers: int, n_heads: int) -> None:
    """Raise :class:`ConfigError` if a knockout names a layer or head the model does not have."""
    for k in knockouts:
        bad = [layer for layer in k.layers if not 0 <= layer < n_layers]
        if bad:
            raise ConfigError(f"layers {bad} out of range; the model has layers 0..{n_layers - 1}")
        if k.heads is not None:
            bad = [h for h in k.heads if not 0 <= h < n_heads]
            if bad:
                raise ConfigError(f"heads {bad} out of range; the model has heads 0..{n_heads - 1}")
