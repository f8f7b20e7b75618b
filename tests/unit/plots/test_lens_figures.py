"""Lens figures from synthetic tables (no model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlmflow.plots.attention import plot_attention_mass
from vlmflow.plots.common import curves, mean_ci
from vlmflow.plots.lens import plot_flows_over_lens, plot_lens, plot_lens_positions


def _lens(n_samples=3, n_layers=4, forms=("answer", "answer_capitalized", "false_option", "generated")):
    rows = []
    for s in range(n_samples):
        for readout in ("raw", "normed"):
            for j in range(n_layers + 1):
                for k, form in enumerate(forms):
                    rows.append({"sample_id": f"s{s}", "readout": readout, "group": "last", "position": 20,
                                 "layer": j, "form": form, "prob": (j + k + s) / 100.0, "rank": 1})
    return pd.DataFrame(rows)


def test_curves_average_over_samples_and_scale():
    table = curves(_lens(), "form", "prob", scale=100.0)
    row = table[(table["form"] == "answer") & (table["layer"] == 2)].iloc[0]
    assert row["mean"] == pytest.approx(np.mean([2 + s for s in range(3)]))
    assert row["low"] <= row["mean"] <= row["high"]


def test_mean_ci_of_a_constant_is_a_point():
    assert mean_ci(np.array([2.0, 2.0])) == (2.0, 2.0, 2.0)
    assert all(np.isnan(v) for v in mean_ci(np.array([])))


def test_lens_figure_draws_the_papers_four_curves_in_percent():
    fig = plot_lens(_lens(), "raw")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    # The paper's legend; the generated-token line is only drawn when asked for.
    assert labels == ["Noncapitalized Answer", "Capitalized Answer", "Noncapitalized False Option"]
    y = ax.get_lines()[0].get_ydata()
    assert list(y) == pytest.approx([1.0 + j for j in range(5)])  # mean over samples of (j + s), in %
    assert ax.get_ylabel() == "Probability (%)"


def test_flows_over_lens_shares_the_layer_axis_and_uses_common_samples():
    flows = pd.DataFrame([
        {"sample_id": s, "flow": flow, "layer": layer, "rel_change": -10.0 * layer}
        for s in ("s0", "s1", "other") for flow in ("question->last", "image->question") for layer in range(4)
    ])
    fig = plot_flows_over_lens(flows, _lens())
    top, bottom = fig.axes[:2]
    assert top.get_shared_x_axes().joined(top, bottom)
    assert [line.get_label() for line in top.get_lines()][:2] == ["question ↛ last", "image ↛ question"]
    assert "2 samples" in top.get_title()  # s0 and s1 are in both tables; s2 and 'other' are not


def test_position_heat_map_and_attention_figure_build():
    lens = _lens()
    lens.loc[:, "group"] = "question"
    assert plot_lens_positions(lens, "question", "answer", "normed").axes
    attention = pd.DataFrame([
        {"sample_id": "s0", "layer": layer, "target": "last", "source": source, "mass": 0.5}
        for layer in range(3) for source in ("image", "question")
    ])
    ax = plot_attention_mass(attention, "last").axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["image", "question"]
