"""The attention edges a flow blocks for one sample, from its routes' resolved positions.

An edge set is ``(targets, sources)``: the query rows ``targets`` may not read the keys ``sources``
(:class:`vlmflow.knockout.spec.Knockout` takes these).

* **knockout** (``SRC->TGT``): the edges ``TGT x SRC``, for every directed route of the flow
  (``a<->b`` is ``a->b`` and ``b->a``; ``r1+r2`` blocks both routes' edges in one knockout).
* **keep-only** (``keep-only:SRC->TGT``): each target row may read only the route's sources and the
  route's target positions ("themselves" is the whole target group, so attention inside the target
  group is kept: in Map the Flow's effective pathways the question tokens keep reading question
  tokens); every other key is blocked. A row that is a target of several routes keeps the union of
  what each allows. The own key of a row is always a target position, so no row is ever left with
  nothing to read. A keep-only flow is a knockout of the complementary edges: the engines need no
  special case.

With a teacher-forced answer appended (the ``sequence`` metric), the rows that predict answer
tokens after the first (the appended answer tokens but the final one) stand where the final prompt
position stands: wherever a route's targets (or sources) hold the last prompt position, they hold
those rows too, as a knockout applied during generation would block every newly generated row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from vlmflow.positions.resolve import Resolver
from vlmflow.positions.routes import Flow

Edge = tuple[tuple[int, ...], tuple[int, ...]]  # (target positions, source positions)


def route_positions(
    flow: Flow, resolver: Resolver, *, answer_rows: Sequence[int] = ()
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(targets, sources)`` of every directed route of ``flow`` for the resolver's sample.

    ``answer_rows``: positions of appended answer tokens that stand with the last prompt position.

    Raises:
        SampleError: an expression cannot be resolved for this sample (stage ``groups``).
    """
    last = resolver.seq_len - 1
    extra = tuple(answer_rows)

    def extended(positions: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted({*positions, *extra})) if extra and last in positions else positions

    cache: dict[object, tuple[int, ...]] = {}

    def resolve(expr: object) -> tuple[int, ...]:
        if expr not in cache:
            cache[expr] = extended(resolver.positions(expr))  # type: ignore[arg-type]
        return cache[expr]

    return [(resolve(route.target), resolve(route.source)) for route in flow.directed()]


def flow_edges(flow: Flow, resolver: Resolver, *, n_keys: int | None = None, answer_rows: Sequence[int] = ()) -> tuple[Edge, ...]:
    """The blocked edge sets of ``flow`` (knockout or keep-only, see the module docstring).

    ``n_keys``: the sequence length the knockout runs on (default: the sample's; more with an
    appended answer).

    >>> flow_edges(Flow.parse("keep-only:question->last"), resolver)   # doctest: +SKIP
    (((47,), (0, 1, ..., 40, 46)),)
    """
    pairs = route_positions(flow, resolver, answer_rows=answer_rows)
    if not flow.keep_only:
        return tuple(pairs)
    n = n_keys if n_keys is not None else resolver.seq_len + len(answer_rows)
    return keep_only_edges(pairs, n)


def keep_only_edges(pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], n_keys: int) -> tuple[Edge, ...]:
    """The complement of keep-only routes: per target row, every key but its routes' sources and targets.

    Rows with the same kept keys share one edge set.

    >>> keep_only_edges([((3, 4), (1,))], 6)
    (((3, 4), (0, 2, 5)),)
    >>> keep_only_edges([((3,), (1,)), ((3, 4), (0,))], 5)
    (((3,), (2,)), ((4,), (1, 2)))
    """
    kept: dict[int, set[int]] = defaultdict(set)
    for targets, sources in pairs:
        for row in targets:
            kept[row] |= set(sources) | set(targets)
    by_kept: dict[frozenset[int], list[int]] = defaultdict(list)
    for row in sorted(kept):
        by_kept[frozenset(kept[row])].append(row)
    edges = []
    for keys, rows in by_kept.items():
        blocked = tuple(k for k in range(n_keys) if k not in keys)
        edges.append((tuple(rows), blocked))
    return tuple(sorted(edges))
