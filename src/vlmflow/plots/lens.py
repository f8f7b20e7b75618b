"""Figures of the lens experiment: the paper's answer-emergence figure, and flows over lens.

Functions take result tables (pandas DataFrames as :meth:`RunStore.read` returns them) and return a
matplotlib :class:`~matplotlib.figure.Figure`; they never write files or touch pyplot's global state.

Curves are the mean over samples with a 95% bootstrap confidence band
(:func:`vlmflow.plots.common.mean_ci`), as seaborn's ``lineplot`` draws the paper's figures.

Layer axis: a lens point ``j`` is the residual stream after ``j`` decoder layers (``j = 0``: the
embeddings; ``j = L``: the last layer's output), the paper's "layer j". A flow point ``l`` is the
centre (0-based) of the knocked-out window. In the combined figure both share one axis, so an
effect of knocking out layer ``l`` is visible in the lens from ``j = l + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmflow.experiments.lens import FORM_LABELS, Form, Readout
from vlmflow.plots.common import DEFAULT_FORMATS, curves, draw_curves, save_figure
from vlmflow.plots.flows import draw_flows
from vlmflow.positions.groups import Group

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
    draw_curves(
        ax,
        table,
        "form",
        [f.value for f in chosen],
        labels={f.value: FORM_LABELS[f] for f in chosen},
        colors={f.value: _FORM_STYLE[f][0] for f in chosen},
        styles={f.value: _FORM_STYLE[f][1] for f in chosen},
    )
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


def write_lens_figures(
    run_dir: Path | str,
    *,
    flows_run: Path | str | None = None,
    out: Path | str | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> list[Path]:
    """Write the lens figures of a run directory; return their paths (nothing without a ``lens`` table).

    Into ``out`` (default ``run_dir/figures``): ``lens_<readout>`` (the paper's figure per readout)
    and ``flows_over_lens`` when ``flows_run`` (or this run itself) has a ``flows`` table, in every
    format of ``formats``; ``lens_<group>_positions`` for extra groups and ``attention_<target>``
    when attention was recorded, in the first format only.

    >>> write_lens_figures("runs/lens-run", flows_run="runs/flows-run")   # doctest: +SKIP
    """
    from vlmflow.results.store import RunStore

    store = RunStore.load(run_dir)
    tables = store.tables()
    if "lens" not in tables:
        return []
    folder = Path(out) if out is not None else Path(run_dir) / "figures"
    written: list[Path] = []
    frame = store.read("lens")
    readouts = [r for r in Readout if r.value in set(frame["readout"])]
    for readout in readouts:
        written += save_figure(plot_lens(frame, readout), folder, f"lens_{readout.value}", formats)
    for group in sorted(set(frame["group"]) - {Group.LAST.value}):
        fig = plot_lens_positions(frame, group, readout=readouts[-1])
        written += save_figure(fig, folder, f"lens_{group}_positions", formats[:1])
    if "attention" in tables:
        from vlmflow.plots.attention import plot_attention_mass

        attention = store.read("attention")
        for target in dict.fromkeys(attention["target"]):
            written += save_figure(plot_attention_mass(attention, target), folder, f"attention_{target}", formats[:1])
    flows_store = RunStore.load(flows_run) if flows_run is not None else store
    if "flows" in flows_store.tables():
        fig = plot_flows_over_lens(flows_store.read("flows"), frame, readouts[0])
        written += save_figure(fig, folder, "flows_over_lens", formats)
    return written
