"""The benchmark's re-implementation of the paper's procedure agrees with ``vlmflow flows``.

The baseline (benchmarks/paper_baseline.py) shares no knockout code with the engine: one
``generate`` per window with hooks putting the paper's mask in place. Its probabilities must equal
the fast engine's for all six flows at every window centre, and the knockouts must move the output
by far more than the tolerance (so agreement is not trivial).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from vlmflow.experiments.flows import FlowSettings, analyse_sample
from vlmflow.positions.groups import PAPER_FLOWS

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def paper_baseline():  # noqa: ANN201 - a module
    return _load("paper_baseline")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_paper_procedure_matches_vlmflow_for_the_six_flows(tiny_prepared, paper_baseline, impl):
    loaded, prepared = tiny_prepared("sp-gqa", impl)
    window = 3
    ours = analyse_sample(loaded, prepared, FlowSettings(window=window, keep_all=True, max_new_tokens=2))
    theirs = paper_baseline.paper_flow_probabilities(loaded, prepared, PAPER_FLOWS, window, max_new_tokens=2)
    by_key = {(r.flow, r.layer): r for r in ours.rows}
    assert len(by_key) == len(PAPER_FLOWS) * loaded.n_layers
    for flow in PAPER_FLOWS:
        rows = theirs[str(flow)]
        assert [c for c, _, _ in rows] == list(range(loaded.n_layers))
        effect = 0.0
        for centre, p_base, p_blocked in rows:
            row = by_key[(flow, centre)]
            assert math.log(p_base) == pytest.approx(math.log(row.p_base), abs=1e-5)
            assert math.log(p_blocked) == pytest.approx(math.log(row.p_blocked), abs=1e-4)
            effect = max(effect, abs(math.log(p_blocked) - math.log(p_base)))
        assert effect > 1e-2, f"{flow}: the paper's knockout changed nothing, agreement would be trivial"


def test_paper_mask_blocks_only_the_flow_edges(paper_baseline):
    import torch

    mask = paper_baseline.paper_mask(5, [3, 4], [1, 2], torch.float32, torch.device("cpu"))[0, 0]
    blocked = mask < 0
    expected = ~torch.tril(torch.ones(5, 5, dtype=torch.bool))
    expected[3:, 1:3] = True
    assert torch.equal(blocked, expected)


def test_analytic_minimum_counts_by_hand():
    analytic = _load("analytic")
    # One flow, targets 5 and 6 of n = 8 (suffix 3), L = 4, f_kv = 0.25; windows (0,0), (0,1), (2,3).
    # (0,0): layer 0 targets 2, layers 1-2 suffix 3+3, layer 3 last row 1 + 0.25*2   -> 9.5
    # (0,1): agrees with (0,0) through layer 0; layer 1 targets 2, layer 2: 3, layer 3: 1.5 -> 6.5
    # (2,3): layer 2 targets 2, layer 3: 1.5                                             -> 3.5
    got = analytic.knockout_minimum([5, 6], [(0, 0), (0, 1), (2, 3)], n=8, n_layers=4, f_kv=0.25)
    assert got == pytest.approx(19.5)
    dims = analytic.DecoderDims(64, 4, 2, 128, vision_tokens=17, vision_layers=1, vision_hidden=32, vision_intermediate=64)
    plan = analytic.FlowPlan("x", (5, 6), ((0, 0), (0, 1), (2, 3)))
    w = analytic.work(dims, n=8, n_layers=4, new_tokens=1, flows=[plan])
    assert w.baseline == pytest.approx(4 * (8 * 4 + dims.vision_equivalent))
    # vlmflow: (0,0) suffix rows in layers 0-2 and the last row + 2 rows' q/k/v in layer 3; (0,1)
    # branches off (0,0) at layer 1; (2,3) from layer 2.
    f = dims.f_qkv
    assert analytic.knockout_scheduled([5, 6], [(0, 0), (0, 1), (2, 3)], n=8, n_layers=4, f_qkv=f) == pytest.approx(21 + 6 * f)
    assert w.vlmflow == pytest.approx(8 * 4 + dims.vision_equivalent + 21 + 6 * f)
    assert w.minimum < w.vlmflow < w.baseline
    # Counting attention scores: a causal row scores (n + 1) / 2 = 4.5 keys, a recomputed row and a row
    # of a window call's masked layers all 8; each key costs share = 2 * d_model / layer_macs.
    share = dims.score_share
    causal, full = 1 + share * 4.5, 1 + share * 8
    windows = sum(8 * (m * full + (4 - m) * causal) for m in (1, 2, 2))  # window calls: 1, 2, 2 masked layers
    vision = dims.vision_equivalent
    baseline = causal * 8 * 4 + windows + 4 * vision
    clean_min = 7 * (3 + dims.f_kv) + 4
    knockouts = analytic.knockout_minimum([5, 6], [(0, 0), (0, 1), (2, 3)], n=8, n_layers=4, f_kv=dims.f_kv)
    assert w.attention_limit == pytest.approx(baseline / (clean_min * causal + vision + knockouts * full))
    # Recomputed rows score every key and most of the baseline's rows half of them, so counting the
    # scores lowers the ratio.
    assert w.attention_limit < w.limit
