"""Figure of the attention summaries: how much a group's queries attend to each source group, per layer.

Takes the ``attention`` table (see :mod:`vlmflow.experiments.attention`) and returns a matplotlib
:class:`~matplotlib.figure.Figure` without writing files.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmflow.plots.common import curves, draw_curves


def plot_attention_mass(attention: pd.DataFrame, target: str) -> Figure:
    """Head-averaged attention mass (%) from ``target``'s queries to each source group vs layer.

    >>> fig = plot_attention_mass(store.read("attention"), "last")    # doctest: +SKIP
    """
    frame = attention[attention["target"] == target]
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    table = curves(frame, "source", "mass", scale=100.0)
    draw_curves(ax, table, "source", list(dict.fromkeys(frame["source"])))
    ax.set_xlabel("Layer")
    ax.set_ylabel("Attention mass (%)")
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Attention from '{target}' positions ({frame['sample_id'].nunique()} samples)", fontsize="small")
    if len(frame):
        ax.legend(loc="upper right", fontsize="small", frameon=False)
    return fig
