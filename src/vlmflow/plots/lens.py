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
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmflow.errors import ConfigError
from vlmflow.experiments.lens import FORM_LABELS, Form, Readout
from vlmflow.plots.common import DEFAULT_FORMATS, curves, draw_curves, legend_outside, save_figure, wrapped
from vlmflow.plots.flows import draw_flows
from vlmflow.positions.groups import Group

if TYPE_CHECKING:
    from vlmflow.results.store import RunStore

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
    Readout.RAW: "raw readout (no final norm below the top layer, as in the paper)",
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
    ax.set_ylim(-3, 103)  # curves at 0 % or 100 % stay off the frame
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(frame):
        ax.set_xlim(-0.3, int(frame["layer"].max()) + 0.3)
    if chosen:
        legend_outside(ax, "right")


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
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    draw_lens(ax, lens, readout, group=group, forms=forms)
    frame = lens[(lens["readout"] == readout.value) & (lens["group"] == group)]
    text = title or f"Answer at the {group} position, {_samples_note(frame)}: {READOUT_TITLES[readout]}"
    ax.set_title(wrapped(text, 5.0, 9.0), fontsize="small")  # the axes' width: the legend takes the rest
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
    if not common:
        raise ConfigError("the flows and lens tables have no sample in common: the figure would be empty")
    flows = flows[flows["sample_id"].isin(common)]
    lens = lens[lens["sample_id"].isin(common)]
    fig = Figure(figsize=(8.5, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    draw_flows(top, flows, flow_order, legend="right")
    top.set_title(f"Attention knockout (window centre) and answer emergence ({len(common)} samples)", fontsize="small")
    draw_lens(bottom, lens, readout, forms=forms)
    bottom.set_xlabel("Layer (flows: window centre; lens: residual stream after j layers)")
    layers = [int(frame["layer"].max()) for frame in (flows, lens) if len(frame)]
    if layers:
        bottom.set_xlim(-0.3, max(layers) + 0.3)
    return fig


def plot_lens_positions(
    lens: pd.DataFrame,
    group: str,
    form: Form | str = Form.ANSWER,
    readout: Readout | str = Readout.NORMED,
    *,
    tokens: pd.DataFrame | None = None,
) -> Figure:
    """Heat map of a tracked form's mean probability (%) at each position of ``group`` vs layer.

    Positions are indexed within the group (0 = its first token), so samples of different lengths
    line up at the start of the group. ``tokens`` (columns ``sample_id, position, input_token``,
    e.g. from the ``lens_top`` table) labels each row with its input token: the token itself when
    every sample has the same one there, else the most common one and how many samples have it.
    """
    form, readout = Form(form), Readout(readout)
    frame = lens[(lens["group"] == group) & (lens["form"] == form.value) & (lens["readout"] == readout.value)].copy()
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if frame.empty:
        ax.set_title(f"no {group} rows for {form.value} ({readout.value})", fontsize="small")
        return fig
    frame["index"] = frame.groupby(["sample_id", "readout", "layer"])["position"].rank(method="first").astype(int) - 1
    grid = frame.groupby(["index", "layer"])["prob"].mean().unstack("layer") * 100.0  # [index, layer]
    image = ax.imshow(grid.to_numpy(), aspect="auto", origin="upper", cmap="viridis", vmin=0.0)  # read top down
    fig.colorbar(image, ax=ax, label="Probability (%)")
    ax.set_xlabel("Layer")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    labels = position_labels(frame, tokens, list(grid.index))
    ax.set_yticks(range(len(labels)), labels, fontsize="small" if len(labels) <= 24 else "x-small")
    ax.set_ylabel(f"'{group}' token (position within the group)")
    ax.set_title(f"{FORM_LABELS[form]} at {group} positions ({readout.value}; {_samples_note(frame)})", fontsize="small")
    return fig


def position_labels(frame: pd.DataFrame, tokens: pd.DataFrame | None, indices: Sequence[int]) -> list[str]:
    """Row labels of a position heat map: ``"2 red"`` (every sample), ``"2 red (7/12)"`` (the most
    common token and its count), or the bare index without ``tokens``.

    >>> f = pd.DataFrame({"sample_id": ["a", "b"], "position": [5, 6], "index": [0, 0]})
    >>> t = pd.DataFrame({"sample_id": ["a", "b"], "position": [5, 6], "input_token": ["▁red", "▁red"]})
    >>> position_labels(f, t, [0])
    ['0 red']
    """
    if tokens is None or tokens.empty:
        return [str(i) for i in indices]
    places = frame[["sample_id", "position", "index"]].drop_duplicates()
    named = places.merge(tokens[["sample_id", "position", "input_token"]].drop_duplicates(), on=["sample_id", "position"])
    labels = []
    for i in indices:
        words = named.loc[named["index"] == i, "input_token"].map(_readable)
        if words.empty:
            labels.append(str(i))
            continue
        counts = words.value_counts()
        top, count = str(counts.index[0]), int(counts.iloc[0])
        labels.append(f"{i} {top}" if count == len(words) else f"{i} {top} ({count}/{len(words)})")
    return labels


def _readable(token: str) -> str:
    """A tokenizer's piece as a reader knows it: word-boundary marks dropped (``'▁red'`` -> ``'red'``)."""
    text = str(token).replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\\n").strip()
    return text or repr(str(token))


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
    flows = flows_for_lens(store, flows_run)  # refuses a flows run on other data before anything is written
    folder = Path(out) if out is not None else Path(run_dir) / "figures"
    written: list[Path] = []
    frame = store.read("lens")
    readouts = [r for r in Readout if r.value in set(frame["readout"])]
    for readout in readouts:
        written += save_figure(plot_lens(frame, readout), folder, f"lens_{readout.value}", formats)
    groups = sorted(set(frame["group"]) - {Group.LAST.value})
    tokens = None
    if groups and "lens_top" in tables:
        tokens = store.read("lens_top", columns=["sample_id", "group", "position", "input_token"])
    for group in groups:
        fig = plot_lens_positions(frame, group, _answer_form(frame), readouts[-1], tokens=tokens)
        written += save_figure(fig, folder, f"lens_{group}_positions", formats[:1])
    if "attention" in tables:
        from vlmflow.plots.attention import plot_attention_mass

        attention = store.read("attention")
        for target in dict.fromkeys(attention["target"]):
            written += save_figure(plot_attention_mass(attention, target), folder, f"attention_{target}", formats[:1])
    if flows is not None:
        fig = plot_flows_over_lens(flows, frame, readouts[0])
        written += save_figure(fig, folder, "flows_over_lens", formats)
    return written


def _answer_form(lens: pd.DataFrame) -> Form:
    """The answer's form the model gives more probability at its top layer (``Red`` or ``red``)."""
    last = lens[(lens["group"] == Group.LAST.value) & (lens["layer"] == lens["layer"].max())]
    means = last.groupby("form")["prob"].mean()
    forms = [f for f in (Form.ANSWER, Form.ANSWER_CAPITALIZED) if f.value in means.index]
    return max(forms, key=lambda f: means[f.value]) if forms else Form.ANSWER


def flows_for_lens(lens_run: RunStore, flows_run: Path | str | None) -> pd.DataFrame | None:
    """The ``flows`` rows to draw over a lens run: the flows run's (or the lens run's own).

    None when there are none to draw (no ``flows_run`` and no flows in the lens run).

    Raises:
        ConfigError: ``flows_run`` is over other data than the lens run, or no sample of one is
            in the other, so a flows-over-lens figure would be empty.
    """
    from vlmflow.results.store import RunStore

    if flows_run is None:
        return lens_run.read("flows") if "flows" in lens_run.tables() else None
    flows_store = RunStore.load(flows_run)
    if "flows" not in flows_store.tables():
        raise ConfigError(f"flows run {str(flows_run)!r} holds no flows to draw over the lens")
    check_same_data(flows_store.spec, lens_run.spec, str(flows_run), str(lens_run.path))
    flows = flows_store.read("flows")
    lens_ids = set(lens_run.read("samples", columns=["sample_id", "kept"]).query("kept")["sample_id"])
    if not set(flows["sample_id"]) & lens_ids:
        raise ConfigError(
            f"flows run {str(flows_run)!r} and lens run {str(lens_run.path)!r} have no kept sample in common: "
            "a flows-over-lens figure would be empty"
        )
    return flows


def check_same_data(flows_spec: dict, lens_spec: dict, flows_name: str, lens_name: str) -> None:
    """Raise :class:`ConfigError` when two runs' specs name different data (file or contents)."""
    a, b = flows_spec.get("data", {}), lens_spec.get("data", {})
    digests = a.get("sha256"), b.get("sha256")
    same = digests[0] == digests[1] if all(digests) else a.get("data") == b.get("data")
    if not same:
        raise ConfigError(
            f"flows run {flows_name!r} is over other data than lens run {lens_name!r} "
            f"({a.get('data')!r}, sha256 {a.get('sha256')} vs {b.get('data')!r}, sha256 {b.get('sha256')}); "
            "pass a flows run over the same data"
        )
