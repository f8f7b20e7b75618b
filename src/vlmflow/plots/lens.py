"""Figures of the lens experiment: the paper's answer-emergence figure, and flows over lens.

Functions take result tables (pandas DataFrames as :meth:`RunStore.read` returns them) and return a
matplotlib :class:`~matplotlib.figure.Figure`; they never write files or touch pyplot's global state.

Curves are the mean over samples with a 95% bootstrap confidence band (1000 resamples, fixed
seed), as seaborn's ``lineplot`` draws the paper's figures.

Layer axis: a lens point ``j`` is the residual stream after ``j`` decoder layers (``j = 0``: the
embeddings; ``j = L``: the last layer's output), the paper's "layer j". A flow point ``l`` is the
centre (0-based) of the knocked-out window. In the combined figure both share one axis, so an
effect of knocking out layer ``l`` is visible in the lens from ``j = l + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmflow.experiments.lens import FORM_LABELS, Form, Readout
from vlmflow.positions.groups import Flow, Group

#: Forms drawn in the paper's figure, in its legend order.
PAPER_FORMS: tuple[Form, ...] = (Form.ANSWER, Form.ANSWER_CAPITALIZED, Form.FALSE_OPTION, Form.FALSE_OPTION_CAPITALIZED)
_FORM_STYLE = {
    Form.ANSWER: ("tab:blue", "-"),
    Form.ANSWER_CAPITALIZED: ("tab:orange", "-"),
    Form.FALSE_OPTION: ("tab:blue", ":"),
    Form.FALSE_OPTION_CAPITALIZED: ("tab:orange", ":"),
    Form.GENERATED: ("black", "--"),
}
READOUT_TITLES = {
    Readout.RAW: "raw residual stream (no final norm below the top layer, as the paper)",
    Readout.NORMED: "final norm applied at every layer",
}


def mean_ci(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% bootstrap confidence interval of ``values`` (``(mean, low, high)``).

    >>> mean_ci(np.array([1.0, 1.0, 1.0]))
    (1.0, 1.0, 1.0)
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"),) * 3
    mean = float(values.mean())
    if len(values) == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    low, high = np.percentile(boots, [2.5, 97.5])
    return mean, float(low), float(high)


def curves(frame: pd.DataFrame, by: str, value: str, *, scale: float = 1.0) -> pd.DataFrame:
    """Mean and CI of ``value`` per (``by``, ``layer``) over samples: columns by, layer, mean, low, high.

    >>> f = pd.DataFrame({"form": ["a", "a"], "layer": [0, 0], "prob": [0.1, 0.3], "sample_id": ["1", "2"]})
    >>> curves(f, "form", "prob", scale=100)[["form", "layer", "mean"]].to_dict("records")
    [{'form': 'a', 'layer': 0, 'mean': 20.0}]
    """
    rows = []
    for (key, layer), group in frame.groupby([by, "layer"], sort=True):
        mean, low, high = mean_ci(group[value].to_numpy() * scale)
        rows.append({by: key, "layer": int(layer), "mean": mean, "low": low, "high": high})
    return pd.DataFrame(rows, columns=[by, "layer", "mean", "low", "high"])


def draw_lens(
    ax: Axes,
    lens: pd.DataFrame,
    readout: Readout | str = Readout.RAW,
    *,
    group: str = Group.LAST.value,
    forms: Sequence[Form] | None = None,
) -> None:
    """Draw probability (%) vs layer, one line per tracked form, on ``ax``."""
    readout = Readout(readout)
    frame = lens[(lens["readout"] == readout.value) & (lens["group"] == group)]
    present = set(frame["form"])
    chosen = [f for f in (forms or PAPER_FORMS) if f.value in present]
    table = curves(frame[frame["form"].isin([f.value for f in chosen])], "form", "prob", scale=100.0)
    for form in chosen:
        line = table[table["form"] == form.value]
        color, style = _FORM_STYLE[form]
        ax.plot(line["layer"], line["mean"], color=color, linestyle=style, label=FORM_LABELS[form])
        ax.fill_between(line["layer"], line["low"], line["high"], color=color, alpha=0.15, linewidth=0)
    ax.set_ylabel("Probability (%)")
    ax.set_xlabel("Layer")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(frame):
        ax.set_xlim(0, int(frame["layer"].max()))
    if chosen:
        ax.legend(loc="upper left", fontsize="small", frameon=False)


def _samples_note(frame: pd.DataFrame) -> str:
    return f"{frame['sample_id'].nunique()} samples"


def plot_lens(
    lens: pd.DataFrame,
    readout: Readout | str = Readout.RAW,
    *,
    group: str = Group.LAST.value,
    forms: Sequence[Form] | None = None,
    title: str | None = None,
) -> Figure:
    """The paper's answer-emergence figure: probability (%) at the last position vs layer.

    >>> fig = plot_lens(store.read("lens"), "raw")          # doctest: +SKIP
    >>> fig.savefig("lens_raw.pdf")                          # doctest: +SKIP
    """
    readout = Readout(readout)
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    draw_lens(ax, lens, readout, group=group, forms=forms)
    frame = lens[(lens["readout"] == readout.value) & (lens["group"] == group)]
    ax.set_title(title or f"Answer at the {group} position: {READOUT_TITLES[readout]} ({_samples_note(frame)})", fontsize="small")
    return fig


def draw_flows(ax: Axes, flows: pd.DataFrame, flow_order: Sequence[str] | None = None) -> None:
    """Draw the flow curves (mean relative change of the answer probability, %) on ``ax``."""
    order = list(flow_order) if flow_order is not None else list(dict.fromkeys(flows["flow"]))
    table = curves(flows, "flow", "rel_change")
    for i, name in enumerate(order):
        line = table[table["flow"] == name]
        if line.empty:
            continue
        color = f"C{i % 10}"
        ax.plot(line["layer"], line["mean"], color=color, label=Flow.parse(name).label)
        ax.fill_between(line["layer"], line["low"], line["high"], color=color, alpha=0.15, linewidth=0)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_ylabel("Change in probability (%)")
    ax.legend(loc="lower left", fontsize="small", frameon=False)


def plot_flows_over_lens(
    flows: pd.DataFrame,
    lens: pd.DataFrame,
    readout: Readout | str = Readout.RAW,
    *,
    flow_order: Sequence[str] | None = None,
    forms: Sequence[Form] | None = None,
) -> Figure:
    """Flow curves above the lens curves on one layer axis: "flow, then answer".

    Only samples present in both tables are used, so both panels describe the same samples.

    >>> fig = plot_flows_over_lens(flows_run.read("flows"), lens_run.read("lens"))   # doctest: +SKIP
    """
    common = set(flows["sample_id"]) & set(lens["sample_id"])
    flows = flows[flows["sample_id"].isin(common)]
    lens = lens[lens["sample_id"].isin(common)]
    fig = Figure(figsize=(7.0, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    draw_flows(top, flows, flow_order)
    top.set_title(f"Attention knockout (window centre) and answer emergence ({len(common)} samples)", fontsize="small")
    draw_lens(bottom, lens, readout, forms=forms)
    bottom.set_xlabel("Layer (flows: window centre; lens: residual stream after j layers)")
    layers = [int(frame["layer"].max()) for frame in (flows, lens) if len(frame)]
    if layers:
        bottom.set_xlim(0, max(layers))
    return fig


def plot_lens_positions(
    lens: pd.DataFrame,
    group: str,
    form: Form | str = Form.ANSWER,
    readout: Readout | str = Readout.NORMED,
) -> Figure:
    """Heat map of a tracked form's mean probability (%) at each position of ``group`` vs layer.

    Positions are indexed within the group (0 = its first token), so samples of different lengths
    line up at the start of the group.
    """
    form, readout = Form(form), Readout(readout)
    frame = lens[(lens["group"] == group) & (lens["form"] == form.value) & (lens["readout"] == readout.value)].copy()
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    if frame.empty:
        ax.set_title(f"no {group} rows for {form.value} ({readout.value})", fontsize="small")
        return fig
    frame["index"] = frame.groupby(["sample_id", "readout", "layer"])["position"].rank(method="first").astype(int) - 1
    grid = frame.groupby(["index", "layer"])["prob"].mean().unstack("layer") * 100.0  # [index, layer]
    image = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label="Probability (%)")
    ax.set_xlabel("Layer")
    ax.set_ylabel(f"Position within '{group}'")
    ax.set_title(f"{FORM_LABELS[form]} at {group} positions ({readout.value}; {_samples_note(frame)})", fontsize="small")
    return fig
