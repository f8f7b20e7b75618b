"""The paper's flow figure: change of the answer's probability (%) vs layer, one line per flow.

A point at layer ``l`` is the mean over kept samples of the per-sample relative change
``100 * (p_blocked - p_base) / p_base`` when attention from the flow's source to its target is cut
in the window centred on ``l`` (0-based; the window is clipped at both ends), with a 95% bootstrap
band. Legends use the paper's "does not flow to" arrow (``image ↛ question``).

Flows are drawn in the paper's three panels (:func:`flow_panels`): the flows into the last position,
the whole image into the question, and parts of the image (related / other patches) into the
question; flows into any other group get a panel per target. A run holding several tasks gets one
row of panels per task in :func:`plot_flows`, and one file per task from :func:`write_flow_figures`.
Figures name the window style (what a point's layers are) and the metric (what its value is): the y
axis is the relative change of the metric's probability, or the KL divergence for the ``kl`` metric;
keep-only flows get a panel of their own. By default the x axis spans every layer of the model and
the y axis has its usual ticks. With ``paper_axes=True`` (``vlmflow plot --paper-axes``) the figure
is drawn on the paper's axes, and says so in its title: only y ticks <= 0 are kept, and the x axis
ends at layer 31 as in the original plotting script (``xlim(0, 31)``), which cut the 40-layer
LLaVA-1.5-13b at layer 31.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmflow.plots.common import DEFAULT_FORMATS, curves, draw_curves, legend_outside, save_figure, wrapped
from vlmflow.positions.groups import Group
from vlmflow.positions.routes import Flow
from vlmflow.results.tables import flows_of

if TYPE_CHECKING:
    from vlmflow.results.store import RunStore

#: Last layer on the x axis of the paper's figures (its plotting script's ``xlim(0, 31)``).
PAPER_LAST_LAYER = 31

#: Panel titles of the paper's grouping, in the order they are drawn.
PANEL_LAST = "Flows to the last position"
PANEL_IMAGE_QUESTION = "Whole image to question"
PANEL_PARTS_QUESTION = "Image parts to question"
PANEL_KEEP_ONLY = "Keep-only pathways"

#: The x axis of each window style (``flows.window_style``): what the point at layer l knocks out.
STYLE_AXIS = {
    "centred": "Layer (centre of the knocked-out window)",
    "start": "Layer (first of the knocked-out window)",
    "cumulative-up": "Layer l (layers 0..l knocked out)",
    "cumulative-down": "Layer l (layers l..L-1 knocked out)",
    "inverse": "Layer (centre of the window kept; every other layer knocked out)",
    "fixed": "First layer of the flow's fixed range",
}


def _panel_of(flow: Flow) -> str:
    if flow.keep_only:
        return PANEL_KEEP_ONLY
    if flow.target == Group.LAST:
        return PANEL_LAST
    if flow.target == Group.QUESTION:
        return PANEL_IMAGE_QUESTION if flow.source == Group.IMAGE else PANEL_PARTS_QUESTION
    return f"Flows to {flow.target}"


def effect_column(flows: pd.DataFrame) -> tuple[str, str]:
    """The column a figure plots and its axis label, from the rows' ``metric``.

    >>> effect_column(pd.DataFrame({"metric": ["kl"]}))
    ('kl', 'KL divergence, next token (nats)')
    """
    from vlmflow.experiments.settings import Metric

    metrics = set(flows["metric"]) if "metric" in flows.columns and len(flows) else {Metric.FIRST_TOKEN.value}
    metric = Metric(metrics.pop()) if len(metrics) == 1 else Metric.FIRST_TOKEN
    return metric.column, metric.axis_label


def style_label(flows: pd.DataFrame) -> str:
    """The x-axis label of the rows' window style(s)."""
    styles = sorted(set(flows["window_style"])) if "window_style" in flows.columns and len(flows) else ["centred"]
    return " / ".join(STYLE_AXIS.get(style, style) for style in styles)


def flow_panels(flows: Sequence[str | Flow]) -> list[tuple[str, list[str]]]:
    """Group flows into the paper's panels: ``[(title, [flow, ...]), ...]`` in drawing order.

    >>> flow_panels(["question->last", "image->last", "image->question", "related->question", "other->question"])
    ... # doctest: +NORMALIZE_WHITESPACE
    [('Flows to the last position', ['question->last', 'image->last']),
     ('Whole image to question', ['image->question']),
     ('Image parts to question', ['related->question', 'other->question'])]
    """
    order = [PANEL_LAST, PANEL_IMAGE_QUESTION, PANEL_PARTS_QUESTION, PANEL_KEEP_ONLY]
    panels: dict[str, list[str]] = {}
    for flow in flows_of(str(item) for item in flows).values():
        panels.setdefault(_panel_of(flow), []).append(str(flow))
    ranked = sorted(panels, key=lambda t: (order.index(t) if t in order else len(order), t))
    return [(title, panels[title]) for title in ranked]


def flow_colors(flows: Sequence[str]) -> dict[str, str]:
    """One colour per flow: the paper's six flows always get the same colours, others the next ones.

    >>> flow_colors(["image->question", "related->question"])
    {'image->question': 'C3', 'related->question': 'C4'}
    """
    from vlmflow.positions.routes import PAPER_FLOWS

    paper = [str(f) for f in PAPER_FLOWS]
    colors, extra = {}, len(paper)
    for name in flows:
        if name in paper:
            colors[name] = f"C{paper.index(name)}"
        else:
            colors[name] = f"C{extra % 10}"
            extra += 1
    return colors


def draw_flows(
    ax: Axes, flows: pd.DataFrame, flow_order: Sequence[str] | None = None, *, legend: str | None = "below"
) -> list[str]:
    """Draw the flow curves (mean effect of the metric: relative change of its probability in %, or the
    KL divergence) on ``ax``; return the flows drawn.

    ``flows`` is the ``flows`` table (one row per sample, flow and layer). ``legend``: where the
    legend goes, outside the plotting area (``"below"`` or ``"right"``; None: no legend).
    """
    order = list(flow_order) if flow_order is not None else list(dict.fromkeys(flows["flow"]))
    column, axis_label = effect_column(flows)
    table = curves(flows[flows["flow"].isin(order)], "flow", column)
    labels = {name: flow.label for name, flow in flows_of(order).items()}
    drawn = draw_curves(ax, table, "flow", order, labels=labels, colors=flow_colors(order))
    ax.axhline(0.0, color="grey", linewidth=0.5, zorder=0)
    ax.set_ylabel(axis_label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn and legend is not None:
        legend_outside(ax, legend, ncols=min(len(drawn), 3))
    return drawn


def _task_names(flows: pd.DataFrame) -> list[str]:
    if "task" not in flows.columns:
        return [""]
    return [str(t) for t in dict.fromkeys(flows["task"])] or [""]


def paper_y_ticks(ax: Axes) -> None:
    """Keep only the y ticks at or below 0, as the paper's figures do (the limits stay)."""
    low, high = ax.get_ylim()
    ax.set_yticks([t for t in ax.get_yticks() if low <= t <= 0])
    ax.set_ylim(low, high)


def plot_flows(
    flows: pd.DataFrame,
    *,
    title: str | None = None,
    flow_order: Sequence[str] | None = None,
    paper_axes: bool = False,
) -> Figure:
    """The paper's knockout figure from a ``flows`` table: one panel per flow group, one row per task.

    Args:
        flows: the ``flows`` table (``Run.flows`` or ``RunStore.read("flows")``): columns
            ``sample_id, flow, layer, rel_change`` at least, ``task`` and ``window`` when present.
        title: figure title (default: window size and number of samples).
        flow_order: flows to draw, in legend order (default: as they appear in the table).
        paper_axes: draw on the paper's axes: y ticks <= 0 only, x axis cut at layer
            :data:`PAPER_LAST_LAYER`; the title says so.

    >>> import vlmflow
    >>> fig = vlmflow.load_run("runs/my-run").plot()      # doctest: +SKIP
    >>> fig = plot_flows(run.flows[run.flows["flow"] != "last->last"])   # doctest: +SKIP
    """
    order = list(flow_order) if flow_order is not None else list(dict.fromkeys(flows["flow"]))
    panels = flow_panels(order) if order else [("no flows", [])]
    tasks = _task_names(flows)
    fig = Figure(figsize=(4.4 * len(panels), 4.1 * len(tasks) + 0.5), layout="constrained")
    axes = fig.subplots(len(tasks), len(panels), squeeze=False, sharex=True, sharey="row")
    last_layer = int(flows["layer"].max()) if len(flows) else 0
    x_max = min(max(last_layer, 1), PAPER_LAST_LAYER) if paper_axes else max(last_layer, 1)
    cut = paper_axes and last_layer > PAPER_LAST_LAYER
    for row, task in enumerate(tasks):
        frame = flows if len(tasks) == 1 else flows[flows["task"].astype(str) == task]
        n = frame["sample_id"].nunique()
        for col, (panel, names) in enumerate(panels):
            ax = axes[row][col]
            draw_flows(ax, frame, names)
            ax.set_title(f"{task}: {panel} ({n} samples)" if task else f"{panel} ({n} samples)", fontsize="medium")
            ax.set_xlim(-0.3, x_max + 0.3)  # the end points' markers whole
            if col:
                ax.set_ylabel("")
            ax.set_xlabel(style_label(frame) + (f", cut at {PAPER_LAST_LAYER}" if cut else ""))
        if paper_axes:
            paper_y_ticks(axes[row][0])
    if title is None:
        windows = sorted({int(w) for w in flows["window"] if int(w) > 0}) if "window" in flows.columns and len(flows) else []
        k = f"window of {'/'.join(map(str, windows))} layers, " if windows else ""
        title = f"Attention knockout ({_style_names(flows)}): {k}{flows['sample_id'].nunique()} samples, {last_layer + 1} layers"
    if paper_axes:
        shown = f"layers {PAPER_LAST_LAYER + 1}-{last_layer} cut, " if cut else ""
        title += f"\npaper's axes: {shown}y ticks ≤ 0"
    fig.suptitle("\n".join(wrapped(line, fig.get_figwidth(), 12.0) for line in title.split("\n")), fontsize="large")
    return fig


def _style_names(flows: pd.DataFrame) -> str:
    """The rows' window styles, e.g. ``centred`` or ``cumulative-up``."""
    if "window_style" not in flows.columns or not len(flows):
        return "centred"
    return "/".join(sorted(set(flows["window_style"])))


def kept_flows(store: RunStore) -> pd.DataFrame:
    """The ``flows`` rows of a run's kept samples (empty with the table's columns when there are none).

    Only kept samples enter the figures and curves: the paper drops wrongly answered ones, and a
    sample's ``kept`` flag in the ``samples`` table says whether this run did.
    """
    from vlmflow.results.tables import empty_table

    if "flows" not in store.tables():
        return empty_table("flows").to_pandas()
    flows = store.read("flows")
    samples = store.read("samples", columns=["sample_id", "kept"])
    return flows[flows["sample_id"].isin(set(samples.loc[samples["kept"], "sample_id"]))].reset_index(drop=True)


def write_flow_figures(
    run_dir: Path | str,
    *,
    out: Path | str | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    paper_axes: bool = False,
    decorate: Callable[[Figure, list[str]], None] | None = None,
) -> list[Path]:
    """Write the flow figure of a run directory, one file per task; return the paths written.

    Files are ``<out>/flows_<task>.<format>`` (``flows.<format>`` when the samples have no task),
    ``out`` defaulting to ``run_dir/figures``. Only kept samples are drawn (the ``samples`` table's
    ``kept`` column: correctly answered ones unless the run kept all). A run without a ``flows``
    table writes nothing. ``decorate(figure, flow_order)``, when given, draws on each figure
    before it is saved (e.g. shaded layer bands). ``paper_axes``: the paper's axes (see :func:`plot_flows`).

    >>> write_flow_figures("runs/llava-1.5-7b-hf-ChooseAttr-1a2b3c4d")   # doctest: +SKIP
    [PosixPath('runs/llava-1.5-7b-hf-ChooseAttr-1a2b3c4d/figures/flows_ChooseAttr.png'), ...]
    """
    from vlmflow.results.store import RunStore

    store = RunStore.load(run_dir)
    flows = kept_flows(store)
    if flows.empty:
        return []
    folder = Path(out) if out is not None else Path(run_dir) / "figures"
    model = str(store.spec.get("model", {}).get("name", ""))
    model = Path(model.rstrip("/")).name or model
    flow_order = store.spec.get("settings", {}).get("flows") or None
    written: list[Path] = []
    for task in _task_names(flows):
        frame = flows if task == "" else flows[flows["task"].astype(str) == task]
        if frame.empty:
            continue
        window = "/".join(str(w) for w in sorted({int(w) for w in frame["window"] if int(w) > 0})) or "-"
        title = (
            f"{model}: {task + ', ' if task else ''}{frame['sample_id'].nunique()} samples, "
            f"{_style_names(frame)} window {window}"
        )
        order = [f for f in flow_order if f in set(frame["flow"])] if flow_order else None
        fig = plot_flows(frame, title=title, flow_order=order, paper_axes=paper_axes)
        if decorate is not None:
            decorate(fig, order or list(dict.fromkeys(frame["flow"])))
        written += save_figure(fig, folder, f"flows_{task}" if task else "flows", formats)
    return written
