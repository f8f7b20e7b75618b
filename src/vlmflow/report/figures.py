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
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmflow.analysis.evidence import ControlComparison
from vlmflow.analysis.stats import Curve

FORMATS = ("png", "pdf", "svg")


def save_figure(fig: Figure, folder: Path, stem: str, formats: Sequence[str] = FORMATS, *, inline: str = "svg") -> str:
    """Write ``fig`` as ``folder/stem.<format>`` for each format; return it for inlining in HTML.

    ``inline="svg"`` returns the ``<svg>`` element (text kept as text, ids salted with ``stem`` so
    several figures can share one page); ``inline="png"`` returns a ``data:`` URI ``<img>``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    salt = re.sub(r"[^A-Za-z0-9]", "", f"{folder.name}{stem}")
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        for fmt in formats:
            fig.savefig(folder / f"{stem}.{fmt}", dpi=150)
        buffer = io.BytesIO()
        fig.savefig(buffer, format=inline, dpi=110)
    data = buffer.getvalue()
    if inline == "png":
        return f'<img alt="{stem}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
    text = data.decode("utf-8")
    # The element only: no XML prolog or DOCTYPE, and no RDF metadata block (it names web namespaces).
    return re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg") :], flags=re.S)


def _band(ax: Axes, x: np.ndarray, curve: Curve, color: str, label: str, style: str = "-") -> None:
    ax.plot(x, curve.mean, color=color, linestyle=style, label=label)
    ax.fill_between(x, curve.low, curve.high, color=color, alpha=0.15, linewidth=0)


def plot_control(comparison: ControlComparison, title: str = "") -> Figure:
    """Related patches vs size-matched random patches (top) and their paired difference (bottom).

    >>> fig = plot_control(analysis.cells[("organism", "ChooseAttr")].evidence.control["question"])  # doctest: +SKIP
    """
    fig = Figure(figsize=(6.0, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = comparison.related.layers
    target = comparison.target
    _band(top, x, comparison.related, "C4", f"related ↛ {target}")
    _band(top, x, comparison.random, "C7", f"random ↛ {target} ({comparison.draws} draws, same size)", "--")
    top.axhline(0.0, color="grey", linewidth=0.5)
    top.set_ylabel("Change in probability (%)")
    top.legend(loc="lower left", fontsize="small", frameon=False)
    top.set_title(title or f"Size-matched random-patch control ({comparison.related.n} samples)", fontsize="small")
    _band(bottom, x, comparison.difference, "C3", "related − random (paired)")
    bottom.axhline(0.0, color="grey", linewidth=0.5)
    bottom.set_ylabel("Difference (points)")
    bottom.set_xlabel("Layer (window centre)")
    bottom.legend(loc="lower left", fontsize="small", frameon=False)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_cross_model(curves: dict[str, dict[str, Curve]], flows: Sequence[str], title: str) -> Figure:
    """One panel per flow, one line per model, on relative depth (so models of any depth line up).

    ``curves`` maps a model label to its flow curves (on the common set of questions).
    """
    n = max(1, len(flows))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.0 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False)).ravel()
    for ax, flow in zip(axes, flows, strict=False):
        for i, (model, by_flow) in enumerate(curves.items()):
            curve = by_flow.get(flow)
            if curve is None or curve.n == 0:
                continue
            x = curve.layers / max(int(curve.layers.max()), 1)
            _band(ax, x, curve, f"C{i % 10}", f"{model} (L={curve.depth})")
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_title(flow.replace("->", " ↛ "), fontsize="small")
        ax.set_xlabel("Relative depth (window centre / (L − 1))")
        ax.set_ylabel("Change (%)")
        ax.legend(fontsize="x-small", frameon=False, loc="lower right")
    for ax in axes[len(flows) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize="small")
    return fig
