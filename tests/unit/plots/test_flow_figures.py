"""The paper's flow figure from synthetic tables, and `vlmflow plot` on a hand-made run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlmflow.plots.flows import flow_panels, kept_flows, plot_flows, write_flow_figures
from vlmflow.positions.groups import PAPER_FLOWS
from vlmflow.results.store import RunStore
from vlmflow.results.tables import FlowRow, SampleRow, build_table

SIX = [str(f) for f in PAPER_FLOWS]


def _flow_row(sample_id, task, flow, layer, rel_change, n_layers, window=9):
    half = window // 2
    blocked = list(range(max(0, layer - half), min(n_layers, layer + window - half)))
    p_base = 0.5
    p_blocked = p_base * (1 + rel_change / 100)
    return FlowRow(
        sample_id=sample_id, task=task, flow=flow, layer=layer, layers_blocked=blocked,
        window=window, p_base=p_base, p_blocked=p_blocked, rel_change=rel_change,
        logprob_diff=float(np.log(p_blocked / p_base)), answer_changed=False, answer_token_id=7,
        blocked_token_id=7, n_source=3, n_target=1, engine="fast",
    )


def _sample_row(sample_id, task, kept=True):
    return SampleRow(
        sample_id=sample_id, task=task, image_id="img", question="Is it red or blue?", answer="red",
        prediction="red" if kept else "blue", correct=kept, kept=kept, answer_token_id=7,
        answer_token="▁red", p_base=0.5, seq_len=50, n_image_tokens=16,
        group_sizes=json.dumps({"image": 16}),
    )


def _frame(rows):
    """The ``flows`` table of ``rows`` as a run's reader returns it."""
    return build_table("flows", rows).to_pandas()


def _effect(flow_index: int, layer: int, sample: int) -> float:
    return -float(flow_index + 1) * layer / 10 - sample


def _rows(n_layers=40, tasks=("ChooseAttr",), n_samples=3):
    rows = []
    for task in tasks:
        for s in range(n_samples):
            for i, flow in enumerate(PAPER_FLOWS):
                rows += [_flow_row(f"{task}-{s}", task, flow, layer, _effect(i, layer, s), n_layers)
                         for layer in range(n_layers)]
    return rows


def test_the_six_flows_fall_into_the_papers_three_panels_and_others_get_their_own():
    panels = flow_panels(SIX)
    assert [names for _, names in panels] == [SIX[:3], [SIX[3]], SIX[4:]]
    extra = flow_panels(["image->true_option", "random->question", "question->last"])
    assert [names for _, names in extra] == [["question->last"], ["random->question"], ["image->true_option"]]


def test_a_40_layer_figure_shows_every_layer_with_mean_and_band():
    fig = plot_flows(_frame(_rows(n_layers=40)))
    axes = fig.axes
    assert len(axes) == 3
    first = axes[0]
    assert first.get_xlim()[1] >= 39  # the original script's xlim(0, 31) cut 40-layer models
    lines = {line.get_label(): line for line in first.get_lines() if not line.get_label().startswith("_")}
    assert list(lines) == ["question ↛ last", "image ↛ last", "last ↛ last"]
    x, y = lines["image ↛ last"].get_data()
    assert list(x) == list(range(40))
    expected = [np.mean([_effect(1, layer, s) for s in range(3)]) for layer in range(40)]
    assert list(y) == pytest.approx(expected)
    legend = [t.get_text() for t in first.get_legend().get_texts()]
    assert legend == list(lines)
    assert first.get_ylabel() == "Change in probability (%)"
    assert "3 samples" in first.get_title()


def test_several_tasks_get_one_row_each():
    fig = plot_flows(_frame(_rows(n_layers=8, tasks=("ChooseAttr", "QueryAttr"))))
    assert len(fig.axes) == 6
    assert fig.axes[0].get_title().startswith("ChooseAttr") and fig.axes[3].get_title().startswith("QueryAttr")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    store = RunStore.open(path, {"model": {"name": "models/tiny-llava"}, "settings": {"flows": SIX}}, fsync=False)
    rows = _rows(n_layers=6, tasks=("ChooseAttr", "QueryAttr"), n_samples=2)
    for task in ("ChooseAttr", "QueryAttr"):
        for s in range(2):
            sid = f"{task}-{s}"
            store.commit({"samples": [_sample_row(sid, task)], "flows": [r for r in rows if r.sample_id == sid]})
    # A sample that is not kept (answered wrongly) but has flow rows must not be drawn.
    wrong = [_flow_row("bad", "QueryAttr", flow, layer, 500.0, 6) for flow in PAPER_FLOWS for layer in range(6)]
    store.commit({"samples": [_sample_row("bad", "QueryAttr", kept=False)], "flows": wrong})
    store.finalize({})
    return path


def test_only_kept_samples_are_plotted(run_dir: Path):
    flows = kept_flows(RunStore.load(run_dir))
    assert "bad" not in set(flows["sample_id"]) and flows["sample_id"].nunique() == 4


def test_write_flow_figures_writes_one_png_and_pdf_per_task(run_dir: Path):
    paths = write_flow_figures(run_dir)
    assert sorted(p.name for p in paths) == [
        "flows_ChooseAttr.pdf", "flows_ChooseAttr.png", "flows_QueryAttr.pdf", "flows_QueryAttr.png"]
    assert all(p.parent == run_dir / "figures" and p.stat().st_size > 1000 for p in paths)
    assert (run_dir / "figures" / "flows_ChooseAttr.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_command_formats_and_errors(run_dir: Path, tmp_path: Path):
    from vlmflow.cli.main import main

    out = tmp_path / "figs"
    assert main(["plot", str(run_dir), "--out", str(out), "--format", "svg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["flows_ChooseAttr.svg", "flows_QueryAttr.svg"]
    assert main(["plot", str(run_dir), "--format", "gif"]) == 2
    assert main(["plot", str(tmp_path / "missing")]) == 2
    empty = RunStore.open(tmp_path / "empty", {"model": {"name": "m"}}, fsync=False)
    empty.finalize({})
    assert main(["plot", str(tmp_path / "empty")]) == 2
