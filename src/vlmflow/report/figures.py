"""Static figures of a study: written as PNG, PDF and SVG for papers, and inlined in the report.

Per model x task: the flows figure, the lens figure of each readout and the random-patch control;
per task: the cross-model comparison on the common set. The flows and lens figures are the
project's own (:mod:`vlmflow.plots`); this module only adds the control and cross-model figures and
writes files.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmflow.analysis.evidence import ControlComparison
from vlmflow.analysis.stats import Curve
from vlmflow.plots.common import FIGURE_FORMATS, draw_curves
from vlmflow.plots.common import save_figure as write_figure
from vlmflow.positions.groups import Group
from vlmflow.positions.routes import Flow

FORMATS = FIGURE_FORMATS


def save_figure(fig: Figure, folder: Path, stem: str, formats: Sequence[str] = FORMATS, *, inline: str = "svg") -> str:
    """Write ``fig`` as ``folder/stem.<format>`` for each format; return it for inlining in HTML.

    ``inline="svg"`` returns the ``<svg>`` element (text kept as text, ids salted with ``stem`` so
    several figures can share one page); ``inline="png"`` returns a ``data:`` URI ``<img>``.
    """
    salt = re.sub(r"[^A-Za-z0-9]", "", f"{folder.parent.name}{folder.name}{stem}")
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        if formats:
            write_figure(fig, folder, stem, formats)
        buffer = io.BytesIO()
        fig.savefig(buffer, format=inline, dpi=110)
    data = buffer.getvalue()
    if inline == "png":
        return f'<img alt="{stem}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
    text = data.decode("utf-8")
    # The element only: no XML prolog or DOCTYPE, and no RDF metadata block (it names web namespaces).
    return re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg") :], flags=re.S)


def _table(curve: Curve, key: str, x: np.ndarray | None = None) -> pd.DataFrame:
    """A :class:`Curve` as a :func:`vlmflow.plots.common.curves` table (``x`` replaces the layers)."""
    layers = curve.layers if x is None else x
    return pd.DataFrame({"key": key, "layer": layers, "mean": curve.mean, "low": curve.low, "high": curve.high})


def plot_control(comparison: ControlComparison, title: str = "") -> Figure:
    """Related patches vs size-matched random patches (top) and their paired difference (bottom).

    >>> fig = plot_control(analysis.cells[("organism", "ChooseAttr")].evidence.control["question"])  # doctest: +SKIP
    """
    fig = Figure(figsize=(6.0, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    related, random = Flow(Group.RELATED, comparison.target), Flow(Group.RANDOM, comparison.target)
    labels = {"related": related.label, "random": f"{random.label} ({comparison.draws} draws, same size)"}
    table = pd.concat([_table(comparison.related, "related"), _table(comparison.random, "random")])
    colors = {"related": "C4", "random": "C7"}
    draw_curves(top, table, "key", ["related", "random"], labels=labels, colors=colors, styles={"random": "--"})
    top.axhline(0.0, color="grey", linewidth=0.5)
    top.set_ylabel("Change in probability (%)")
    top.legend(loc="lower left", fontsize="small", frameon=False)
    top.set_title(title or f"Size-matched random-patch control ({comparison.related.n} samples)", fontsize="small")
    labels = {"difference": "related − random (paired)"}
    draw_curves(bottom, _table(comparison.difference, "difference"), "key", ["difference"], labels=labels, colors={"difference": "C3"})
    bottom.axhline(0.0, color="grey", linewidth=0.5)
    bottom.set_ylabel("Difference (points)")
    bottom.set_xlabel("Layer (window centre)")
    bottom.legend(loc="lower left", fontsize="small", frameon=False)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_cross_model(curves: dict[str, dict[Flow, Curve]], flows: Sequence[Flow], title: str) -> Figure:
    """One panel per flow, one line per model, on relative depth (so models of any depth line up).

    ``curves`` maps a model label to its flow curves (on the common set of questions).
    """
    n = max(1, len(flows))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.0 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False)).ravel()
    for ax, flow in zip(axes, flows, strict=False):
        parts, labels = [], {}
        for model, by_flow in curves.items():
            curve = by_flow.get(flow)
            if curve is not None and curve.n:
                parts.append(_table(curve, model, curve.layers / max(int(curve.layers.max()), 1)))
                labels[model] = f"{model} (L={curve.depth})"
        if parts:
            draw_curves(ax, pd.concat(parts), "key", list(curves), labels=labels)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_title(flow.label, fontsize="small")
        ax.set_xlabel("Relative depth (window centre / (L − 1))")
        ax.set_ylabel("Change (%)")
        ax.legend(fontsize="x-small", frameon=False, loc="lower right")
    for ax in axes[len(flows) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize="small")
    return fig
