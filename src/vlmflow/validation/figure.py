"""Figures with the planted bands shaded behind the curves.

:func:`plot_validation` draws the benchmark: one column per flow, knockout curves (one line per
window size) on top and attention mass below, each flow's band shaded in its colour.
:func:`shade_flow_figure` shades the bands on the paper's flow figure
(:func:`vlmflow.plots.flows.plot_flows`), for the demo.

>>> fig = plot_validation({1: {"image->last": [0.0, -0.5]}}, {}, None)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmflow.plots.flows import flow_colors, flow_panels
from vlmflow.positions.groups import Flow
from vlmflow.validation.routes import PlantedRoutes

BAND_ALPHA = 0.15
_WINDOW_STYLES = ("-", "--", ":", "-.")


def shade_band(ax: Axes, band: Sequence[int], color: str, label: str | None = None) -> None:
    """Shade the layers of ``band`` (each from ``layer - 0.5`` to ``layer + 0.5``) behind the curves of ``ax``."""
    for i, layer in enumerate(band):
        ax.axvspan(layer - 0.5, layer + 0.5, color=color, alpha=BAND_ALPHA, zorder=0, linewidth=0, label=label if i == 0 else None)


def shade_flow_figure(fig: Figure, flow_order: Sequence[str], bands: Mapping[str, Sequence[int]]) -> None:
    """Shade each flow's band on a one-task :func:`~vlmflow.plots.flows.plot_flows` figure drawn with ``flow_order``."""
    colors = flow_colors(list(flow_order))
    for ax, (_, names) in zip(fig.axes, flow_panels(flow_order), strict=False):
        for name in names:
            if bands.get(name):
                shade_band(ax, bands[name], colors[name])
        ax.text(
            0.99, 0.02, "shaded: planted band", transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small", color="grey"
        )


def plot_validation(
    curves: Mapping[int, Mapping[str, Sequence[float]]],
    attention: Mapping[str, Sequence[float]],
    routes: PlantedRoutes | None,
    *,
    title: str = "planted-route benchmark",
) -> Figure:
    """One column per flow: knockout curves per window size (top), attention mass per layer (bottom, when given).

    ``curves``: ``{window: {flow: mean % change per window centre}}``; ``attention``: ``{flow: mass per layer}``.
    """
    names = list(dict.fromkeys(flow for per_window in curves.values() for flow in per_window))
    bands = {str(f): band for f, band in routes.flows.items()} if routes is not None else {}
    colors = flow_colors(names)
    rows = 2 if attention else 1
    fig = Figure(figsize=(2.9 * max(1, len(names)), 2.6 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, max(1, len(names)), squeeze=False, sharex=True)
    for col, name in enumerate(names):
        band = bands.get(name)
        state = "not scored" if band is None else ("band: none" if not band else f"band: {', '.join(map(str, band))}")
        top = axes[0][col]
        for i, (window, per_window) in enumerate(sorted(curves.items())):
            if name in per_window:
                values = per_window[name]
                top.plot(range(len(values)), values, _WINDOW_STYLES[i % len(_WINDOW_STYLES)], color=colors[name], marker=".", label=f"window {window}")
        top.axhline(0.0, color="grey", linewidth=0.5)
        # Flat curves stay flat: at least 5 points of change on the axis, so noise of 1e-6 % is not blown up.
        values = [v for per_window in curves.values() for v in per_window.get(name, ())]
        top.set_ylim(min(-5.0, 1.1 * min(values, default=0.0)), max(1.0, 1.1 * max(values, default=0.0)))
        top.set_title(f"{Flow.parse(name).label}\n({state})", fontsize="small")
        if band:
            shade_band(top, band, colors[name])
        if col == 0:
            top.set_ylabel("Change in probability (%)")
            top.legend(fontsize="x-small", frameon=False, loc="lower left")
        if rows == 2:
            bottom = axes[1][col]
            if name in attention:
                bottom.plot(range(len(attention[name])), attention[name], color=colors[name], marker=".")
            if band:
                shade_band(bottom, band, colors[name])
            bottom.set_ylim(0, max(0.05, 1.1 * max(attention.get(name, ()), default=0.0)))
            if col == 0:
                bottom.set_ylabel("Attention mass")
        for row in range(rows):
            axes[row][col].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[rows - 1][col].set_xlabel("Layer")
    fig.suptitle(f"{title} (shaded: planted band)", fontsize="medium")
    return fig
