"""Planted bands are shaded behind the curves, in each flow's colour, on the panels that draw the flow."""

from __future__ import annotations

import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.patches import Rectangle

from vlmflow.organism.planted import PlantedRecipe, planted_routes
from vlmflow.plots.flows import flow_colors, plot_flows
from vlmflow.positions.groups import PAPER_FLOWS
from vlmflow.validation.figure import plot_validation, shade_flow_figure


def _spans(ax) -> list[tuple[float, float]]:
    return sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches if isinstance(p, Rectangle))


def _flows_table(n_layers: int = 8) -> pd.DataFrame:
    rows = [
        {"sample_id": s, "task": "ChooseAttr", "flow": str(f), "layer": layer, "rel_change": -1.0, "window": 1}
        for s in ("a", "b")
        for f in PAPER_FLOWS
        for layer in range(n_layers)
    ]
    return pd.DataFrame(rows)


def test_the_demo_figure_shades_each_flows_band_on_its_panel():
    order = [str(f) for f in PAPER_FLOWS]
    bands = {str(f): band for f, band in planted_routes(PlantedRecipe()).flows.items()}
    fig = plot_flows(_flows_table(), flow_order=order)
    shade_flow_figure(fig, order, bands)
    last, whole, parts = fig.axes[:3]
    assert _spans(last) == [(5.5, 6.5)]  # question->last's upper band; image->last is planted nowhere
    assert _spans(whole) == [(1.5, 2.5), (3.5, 4.5)]
    assert _spans(parts) == [(1.5, 2.5), (1.5, 2.5), (3.5, 4.5)]  # related: lower + middle; other: lower
    colors = flow_colors(order)
    assert {p.get_facecolor()[:3] for p in whole.patches} == {to_rgb(colors["image->question"])}


def test_the_validation_figure_has_a_column_per_flow_and_a_row_for_attention():
    routes = planted_routes(PlantedRecipe())
    curves = {1: {str(f): [0.0] * 8 for f in PAPER_FLOWS}, 3: {str(f): [0.0] * 8 for f in PAPER_FLOWS}}
    attention = {str(f): [0.1] * 8 for f in PAPER_FLOWS}
    fig = plot_validation(curves, attention, routes)
    assert len(fig.axes) == 2 * len(PAPER_FLOWS)
    titles = [ax.get_title() for ax in fig.axes[: len(PAPER_FLOWS)]]
    assert "band: 6" in titles[0] and "band: none" in titles[1] and "not scored" in titles[2]
    assert len(fig.axes[0].get_lines()) >= 2  # one line per window size (and the zero line)
