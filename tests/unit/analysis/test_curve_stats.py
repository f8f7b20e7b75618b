"""Bootstrap intervals, the per-flow summary, significant bands, dips and the common set."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vlmflow.analysis.stats import (
    Bootstrap,
    bootstrap_curve,
    common_samples,
    find_dips,
    format_bands,
    frame_curve,
    significant_bands,
    summarise_curve,
)


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    values = rng.normal(-10.0, 5.0, size=(400, 1))
    curve = bootstrap_curve(values, [0], 1, Bootstrap(n_boot=2000, seed=1))
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(curve.mean[0] - values.mean()) < 1e-12
    assert abs((curve.high[0] - curve.low[0]) - 2 * 1.96 * se) < 0.15 * 2 * 1.96 * se
    assert curve.low[0] < values.mean() < curve.high[0]


def test_constant_values_give_a_zero_width_interval_and_one_sample_a_point():
    curve = bootstrap_curve(np.full((5, 3), -7.0), [0, 1, 2], 3)
    assert np.allclose(curve.low, -7.0) and np.allclose(curve.high, -7.0)
    one = bootstrap_curve(np.array([[1.0, 2.0]]), [0, 1], 2)
    assert one.n == 1 and np.allclose(one.low, one.mean) and np.allclose(one.high, one.mean)


def test_bootstrap_is_deterministic_for_a_seed():
    values = np.random.default_rng(3).normal(size=(30, 4))
    a = bootstrap_curve(values, range(4), 4, Bootstrap(seed=5))
    b = bootstrap_curve(values, range(4), 4, Bootstrap(seed=5))
    assert np.array_equal(a.low, b.low) and np.array_equal(a.high, b.high)


def test_summary_finds_the_largest_drop_its_interval_and_the_significant_band():
    rng = np.random.default_rng(0)
    layers = np.arange(12)
    truth = -30.0 * np.exp(-(((layers - 5) / 1.5) ** 2))
    matrix = truth + rng.normal(0.0, 3.0, size=(60, 12))
    summary = summarise_curve(bootstrap_curve(matrix, layers, 12))
    assert summary.peak_layer == 5
    assert summary.peak_low < summary.peak < summary.peak_high < 0
    assert summary.peak_layer_low <= 5 <= summary.peak_layer_high
    (band,) = summary.bands  # a drop of at least 5% (layers 3..7 of the truth) and an interval below 0
    assert 3 <= band[0] <= 4 and 6 <= band[1] <= 7
    assert format_bands(summary.bands) == f"{band[0]}-{band[1]}"
    assert summary.drop


def test_a_tiny_drop_with_a_tight_interval_is_no_effect():
    """A -0.007% mean is 'significant' by its interval alone; it is not a drop, and has no band."""
    matrix = -0.007 + np.random.default_rng(2).normal(0.0, 0.001, size=(40, 6))
    curve = bootstrap_curve(matrix, range(6), 6)
    assert (curve.high < 0).all()  # the interval alone would call every layer significant
    summary = summarise_curve(curve)
    assert summary.bands == () and not summary.drop
    assert summary.as_dict()["drop"] is False


def test_no_band_when_nothing_is_significant():
    matrix = np.random.default_rng(1).normal(0.0, 5.0, size=(20, 6))
    curve = bootstrap_curve(matrix, range(6), 6)
    assert significant_bands(curve) == [] or all(curve.high[i] < 0 for b in significant_bands(curve) for i in range(b[0], b[1] + 1))
    assert significant_bands(bootstrap_curve(np.full((4, 6), 2.0), range(6), 6)) == []
    assert significant_bands(bootstrap_curve(np.full((4, 6), 2.0), range(6), 6), below=False) == [(0, 5)]


def test_frame_curve_drops_samples_missing_a_layer():
    frame = pd.DataFrame({"sample_id": ["a", "a", "b"], "layer": [0, 1, 0], "v": [1.0, 3.0, 100.0]})
    curve = frame_curve(frame, "v")
    assert curve.n == 1 and curve.mean.tolist() == [1.0, 3.0]


def test_dips_are_separate_only_when_the_curve_recovers():
    layers = np.arange(10)
    two = -40 * np.exp(-(((layers - 1) / 1.0) ** 2)) - 20 * np.exp(-(((layers - 6) / 1.0) ** 2))
    curve = bootstrap_curve(np.tile(two, (5, 1)), layers, 10)
    assert [d.layer for d in find_dips(curve, depth=5, separation=0.5)] == [1, 6]
    valley = -30 + 0.5 * np.sin(layers)  # one wide noisy valley: many local minima, one dip
    curve = bootstrap_curve(np.tile(valley, (5, 1)), layers, 10)
    assert len(find_dips(curve, depth=5, separation=0.5)) == 1
    assert find_dips(curve, depth=40, separation=0.5) == []


def test_common_samples():
    assert common_samples({"a": ["1", "2", "3"], "b": ["2", "3"], "c": ["3", "2", "9"]}) == {"2", "3"}
    assert common_samples({}) == set()


def test_the_study_report_says_no_drop_instead_of_a_layer_and_a_band():
    """The report's per-flow row: a flat flow reads "no drop", with no layer and no band; a real drop
    keeps its layer and band."""
    from vlmflow.positions.groups import Flow
    from vlmflow.report.sections import SectionBuilder

    flat = bootstrap_curve(-0.007 + np.random.default_rng(2).normal(0.0, 0.001, size=(40, 6)), range(6), 6)
    row = SectionBuilder._summary_row(Flow.parse("image->last"), summarise_curve(flat), 576.0)
    assert row[2] == "no drop (within 5%)" and row[5] == "none" and row[6] == "576"
    deep = np.zeros((40, 6))
    deep[:, 2] = -50.0 + np.random.default_rng(3).normal(0.0, 1.0, size=40)
    row = SectionBuilder._summary_row(Flow.parse("question->last"), summarise_curve(bootstrap_curve(deep, range(6), 6)), None)
    assert row[2].startswith("2") and row[5] == "2" and row[6] == "–"
