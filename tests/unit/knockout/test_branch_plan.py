"""Which folded knockouts may start from another one's hidden states, and where."""

from __future__ import annotations

from vlmflow.knockout.ablation import Ablation, Site
from vlmflow.knockout.plan import branch_plan
from vlmflow.knockout.spec import Knockout

EDGES = (((9,), (1, 2, 3)),)
OTHER = (((9,), (4, 5)),)


def _plan(variants):
    order, starts, parents = branch_plan(variants)
    # Back in the caller's order: (start, caller index of the parent or None).
    out = {}
    for new, old in enumerate(order):
        out[old] = (starts[new], None if parents[new] is None else order[parents[new]])
    return [out[i] for i in range(len(variants))], order, starts, parents


def test_windows_clipped_at_the_bottom_chain_off_each_other():
    windows = [(0, 1, 2), (0, 1, 2, 3), (0, 1, 2, 3, 4), (1, 2, 3, 4, 5)]
    by_caller, order, starts, parents = _plan([Knockout(EDGES, w) for w in windows])
    assert by_caller == [(0, None), (3, 0), (4, 1), (1, None)]
    assert starts == sorted(starts)
    for new, parent in enumerate(parents):  # a parent runs before its child starts
        assert parent is None or (parent < new and starts[parent] < starts[new])


def test_different_edges_heads_or_first_layers_never_share():
    variants = [
        Knockout(EDGES, (0, 1)),
        Knockout(OTHER, (0, 1, 2)),  # other sources
        Knockout(EDGES, (0, 1, 2), heads=(0,)),  # other heads
        Knockout(EDGES, (1, 2)),  # other first layer
        Knockout(EDGES, (0, 1)),  # the same knockout twice: nothing differs, nothing to branch
    ]
    by_caller, *_ = _plan(variants)
    assert by_caller == [(0, None), (0, None), (0, None), (1, None), (0, None)]


def test_a_branch_starts_where_the_layer_sets_first_differ():
    # Non-contiguous layer sets: equal below layer 3, different at 3.
    by_caller, *_ = _plan([Knockout(EDGES, (0, 2, 5)), Knockout(EDGES, (0, 2, 3))])
    assert by_caller == [(3, 1), (0, None)]


def test_ablations_always_start_from_clean_states():
    ablations = [Ablation(Site.MLP, layers, positions=(9,)) for layers in ((0, 1), (0, 1, 2))]
    by_caller, *_ = _plan([*ablations, Knockout(EDGES, (0,)), Knockout(EDGES, (0, 1))])
    assert by_caller == [(0, None), (0, None), (0, None), (1, 2)]

