"""The fold plan as a value: which variants run in which layer, from whose states, with which masks,
and which rows the top layer computes (no model involved)."""

from __future__ import annotations

import pytest
import torch

from vlmflow.adapters.pattern import CausalPattern, PrefixLMPattern
from vlmflow.errors import SampleError
from vlmflow.knockout.ablation import Ablation, Site
from vlmflow.knockout.plan import plan_fold
from vlmflow.knockout.prefix_attention import compact_to_dense
from vlmflow.knockout.spec import Knockout
from vlmflow.knockout.strategy import compact_mask, dense_mask

N, T0, L = 10, 6, 5
EDGES = (((7, 9), (1, 2, 8)),)  # targets 7 and 9 may not read 1, 2 and 8


def _plan(variants, pattern=None, n_heads=None):
    return plan_fold(variants, pattern or CausalPattern(), t0=T0, n=N, n_layers=L, n_heads=n_heads)


def test_variants_start_at_their_window_and_branches_share_the_layers_below_a_difference():
    windows = [(0, 1, 2), (0, 1), (3, 4), (2, 3, 4)]
    plan = _plan([Knockout(EDGES, w) for w in windows])
    assert plan.order == (1, 0, 3, 2)  # starts never decrease
    assert plan.starts == (0, 2, 2, 3) and plan.parents == (None, 0, None, None)
    steps = list(plan.steps())
    assert [s.layer for s in steps] == list(range(L))
    assert [s.active for s in steps] == [1, 1, 3, 4, 4]
    assert [s.entering for s in steps] == [((0, None),), (), ((1, 0), (2, None)), ((3, None),), ()]


def test_each_step_blocks_exactly_the_open_windows_edges_on_the_clean_pattern():
    plan = _plan([Knockout(EDGES, (1, 2)), Knockout(EDGES, (3,))])
    rows = torch.arange(T0, N)
    causal = CausalPattern().allowed(0, rows, N)
    for step in plan.steps():
        for v in range(step.active):
            knockout = plan.variants[v]
            expected = causal & ~(knockout.blocked_rows(rows, N) if step.layer in knockout.layers else False)
            assert torch.equal(step.allowed[v, 0], expected), (step.layer, v)
    # A window that cuts prefix keys (1, 2 < t0) withdraws the promise that the prefix is visible.
    assert [(s.layer, s.prefix_visible) for s in plan.steps()] == [(1, False), (2, False), (3, False), (4, True)]


def test_only_the_top_layer_computes_last_rows_and_never_with_ablations():
    plan = _plan([Knockout(EDGES, (0,)), Knockout(EDGES, (4,))])
    assert [s.last_rows_only for s in plan.steps()] == [False, False, False, False, True]
    mixed = _plan([Knockout(EDGES, (0,)), Ablation(Site.MLP, (1,), positions=(7,))])
    assert not any(s.last_rows_only for s in mixed.steps())


def test_head_level_knockouts_block_only_their_heads():
    plan = _plan([Knockout(EDGES, (0,), heads=(1,)), Knockout(EDGES, (0,))], n_heads=3)
    step = plan.step(0)
    assert step.allowed.shape == (2, 3, N - T0, N)
    v_heads = plan.order.index(0)
    blocked = ~step.allowed[v_heads]  # [H, S, n]
    assert bool(blocked[1, 1, 2]) and not bool(blocked[0, 1, 2]) and not bool(blocked[2, 1, 2])  # position 7 reading 2
    assert bool((~step.allowed[plan.order.index(1)])[:, 1, 2].all())
    with pytest.raises(ValueError, match="n_heads"):
        _plan([Knockout(EDGES, (0,), heads=(1,))])


def test_a_knockout_that_empties_a_row_is_refused_when_its_window_opens():
    everything = (((7,), tuple(range(8))),)
    plan = _plan([Knockout(everything, (2,))])
    plan.step(1)  # window closed: fine
    with pytest.raises(SampleError, match="no key to attend to"):
        plan.step(2)


def test_a_pattern_that_reads_ahead_is_the_base_of_every_mask():
    prefix = torch.zeros(N, dtype=torch.bool)
    prefix[: N - 1] = True
    plan = plan_fold([Knockout(EDGES, (1,))], PrefixLMPattern(prefix, (None,) * L), t0=0, n=N, n_layers=L)
    allowed = plan.step(1).allowed[0, 0]
    assert bool(allowed[0, N - 2]) and not bool(allowed[0, N - 1])


def test_compact_and_dense_layouts_hold_the_same_edges():
    gen = torch.Generator().manual_seed(0)
    for heads in (1, 3):
        allowed = torch.rand(4, heads, N - T0, N, generator=gen) > 0.4  # [k, H, S, n]
        compact = compact_mask(allowed)
        assert compact.shape == (1, heads, 4 * (N - T0), N)
        assert torch.equal(dense_mask(allowed, T0, N - T0), compact_to_dense(compact, T0, N - T0))
        last = allowed[:, :, -1:]  # the top layer's last rows only
        assert torch.equal(dense_mask(last, T0, N - T0), compact_to_dense(compact_mask(last), T0, N - T0, queries=1))
