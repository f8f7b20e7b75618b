"""The flow figure on the paper's axes (``vlmflow plot --paper-axes``): y ticks <= 0, x cut at layer 31."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from vlmflow.plots.flows import PAPER_LAST_LAYER, plot_flows


def _flows(n_layers: int, rise: float = 0.0) -> pd.DataFrame:
    """Two samples of image->last and question->last: a dip to about -40 % mid-depth, plus ``rise``."""
    rows = []
    for sample in ("a", "b"):
        for flow in ("question->last", "image->last"):
            for layer in range(n_layers):
                dip = -40.0 * (1 - abs(layer - n_layers / 2) / (n_layers / 2)) + rise
                rows.append({"sample_id": sample, "task": "ChooseAttr", "flow": flow, "layer": layer,
                             "rel_change": dip + (sample == "b"), "window": 9})
    return pd.DataFrame(rows)


def _layers_shown(ax) -> tuple[int, int]:
    """The first and last whole layer inside the x range (the range has a margin for the end markers)."""
    low, high = ax.get_xlim()
    assert high - low < (math.floor(high) - math.ceil(low)) + 1  # a margin below one layer on each side
    return math.ceil(low), math.floor(high)


def test_default_axes_are_unchanged():
    fig = plot_flows(_flows(40, rise=10.0))
    ax = fig.axes[0]
    assert _layers_shown(ax) == (0, 39)
    assert any(t > 0 for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1])
    assert "paper" not in fig.get_suptitle()


def test_paper_axes_cut_a_40_layer_model_at_31_and_keep_ticks_at_or_below_zero():
    fig = plot_flows(_flows(40, rise=10.0), paper_axes=True)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert _layers_shown(ax) == (0, PAPER_LAST_LAYER) == (0, 31)
    assert high > 0 and all(t <= 0 for t in ax.get_yticks()) and len(ax.get_yticks()) >= 2
    assert ax.get_ylim() == (low, high)  # the curves' range is kept, only the ticks go
    title = fig.get_suptitle()
    assert "paper's axes: layers 32-39 cut, y ticks ≤ 0" in title
    assert ax.get_xlabel().endswith("cut at 31")


def test_paper_axes_leave_a_32_layer_model_whole_and_say_only_the_ticks():
    fig = plot_flows(_flows(32), paper_axes=True)
    assert _layers_shown(fig.axes[0]) == (0, 31)
    assert fig.get_suptitle().endswith("\npaper's axes: y ticks ≤ 0")


def test_plot_command_has_the_option(tmp_path: Path):
    from vlmflow.cli.main import main
    from vlmflow.positions.groups import Flow
    from vlmflow.results.store import RunStore
    from vlmflow.results.tables import FlowRow, SampleRow

    store = RunStore.open(tmp_path / "run", {"model": {"name": "m"}, "settings": {"flows": ["image->last"]}}, fsync=False)
    frame = _flows(40)
    frame = frame[(frame["flow"] == "image->last") & (frame["sample_id"] == "a")]
    flows = [
        FlowRow(sample_id="a", task="ChooseAttr", flow=Flow.parse("image->last"), layer=int(r.layer), layers_blocked=[int(r.layer)],
                window=9, p_base=0.5, p_blocked=0.5 * (1 + r.rel_change / 100), rel_change=float(r.rel_change),
                logprob_diff=0.0, answer_changed=False, answer_token_id=7, blocked_token_id=7, n_source=3,
                n_target=1, engine="fast")
        for r in frame.itertuples()
    ]  # fmt: skip
    sample = SampleRow(
        sample_id="a", task="ChooseAttr", image_id="img", question="Is it red or blue?", answer="red",
        prediction="red", correct=True, kept=True, answer_token_id=7, answer_token="red", p_base=0.5, seq_len=50,
        n_image_tokens=16, group_sizes="{}",
    )  # fmt: skip
    store.commit({"samples": [sample], "flows": flows})
    store.finalize({})
    assert main(["plot", str(tmp_path / "run"), "--paper-axes", "--format", "svg", "--out", str(tmp_path / "figs")]) == 0
    svg = (tmp_path / "figs" / "flows_ChooseAttr.svg").read_text()
    assert "paper" in svg


def test_paper_axes_do_not_change_the_curves():
    default, paper = plot_flows(_flows(40)), plot_flows(_flows(40), paper_axes=True)
    for a, b in zip(default.axes[0].get_lines(), paper.axes[0].get_lines(), strict=True):
        assert list(a.get_xdata()) == list(b.get_xdata()) and list(a.get_ydata()) == list(b.get_ydata())
