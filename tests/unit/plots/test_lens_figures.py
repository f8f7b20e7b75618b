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


def _extent(artist, fig):
    return artist.get_window_extent(fig.canvas.get_renderer())


def test_the_lens_figure_is_legible_at_its_size():
    """The title is whole inside the figure, the legend lies outside the plotting area (it hides no
    curve), and curves at 0 % and 100 % stay off the frame."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot_lens(_lens(), "raw")
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    figure_box = fig.bbox
    title = _extent(ax.title, fig)
    assert figure_box.x0 <= title.x0 and title.x1 <= figure_box.x1 and title.y1 <= figure_box.y1
    legend = _extent(ax.get_legend(), fig)
    assert legend.x0 >= ax.get_window_extent().x1  # beside the axes, not over them
    assert legend.x1 <= figure_box.x1
    low, high = ax.get_ylim()
    assert low < 0 and high > 100


def test_flat_curves_keep_their_own_hollow_markers():
    flows = pd.DataFrame([
        {"sample_id": s, "flow": flow, "layer": layer, "rel_change": 0.0}
        for s in ("s0", "s1") for flow in ("image->last", "question->last", "image->question") for layer in range(4)
    ])  # fmt: skip
    fig = plot_flows_over_lens(flows, _lens())
    lines = [line for line in fig.axes[0].get_lines() if line.get_label() and not line.get_label().startswith("_")]
    assert len({line.get_marker() for line in lines}) == len(lines) == 3
    assert all(line.get_markerfacecolor() == "none" for line in lines)


def test_the_position_heat_map_labels_rows_with_their_tokens():
    lens = _lens(n_samples=2)
    lens = pd.concat([lens.assign(position=10 + k) for k in range(3)], ignore_index=True)
    lens.loc[:, "group"] = "question"
    tokens = pd.DataFrame([
        {"sample_id": f"s{s}", "position": 10 + k, "input_token": token}
        for s in range(2) for k, token in enumerate(("▁Is", "▁the", "▁square" if s == 0 else "▁circle"))
    ])  # fmt: skip
    ax = plot_lens_positions(lens, "question", "answer", "normed", tokens=tokens).axes[0]
    labels = [tick.get_text() for tick in ax.get_yticklabels()]
    assert labels[:2] == ["0 Is", "1 the"]  # every sample has this token here
    assert labels[2] in ("2 square (1/2)", "2 circle (1/2)")  # the most common token and how many have it
