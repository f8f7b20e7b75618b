"""``vlmflow demo`` end to end on the shipped organism (quick size), and the organism's other commands."""

from __future__ import annotations

import json

import pytest

from vlmflow.cli.main import main
from vlmflow.data.sample import TaskType
from vlmflow.organism import PLANTED_ALIAS, organism_path

pytestmark = pytest.mark.skipif(
    not all((organism_path(alias) / "config.json").is_file() for alias in ("organism", PLANTED_ALIAS)),
    reason="the trained organisms are not in the package (vlmflow/resources/organism*/ has no config.json)",
)


@pytest.mark.slow
def test_demo_quick_writes_runs_figures_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {t.value for t in TaskType}
    assert summary["n_layers"] >= 6 and summary["window"] >= 1
    for task in TaskType:
        entry = summary["tasks"][task.value]
        assert entry["samples"] == 3
        assert (out / "scenes" / f"scenes_{task.value}.csv").is_file()
        for kind in ("flows", "lens"):
            assert (out / f"{kind}_{task.value}" / "summary.json").is_file()
        if entry["correct"]:
            assert set(entry["flows"]) == {
                "question->last", "image->last", "last->last", "image->question", "related->question", "other->question"
            }
        assert (out / f"lens_{task.value}" / "figures" / "lens_raw.png").is_file()
    # most answers are right, and blocking some flow lowers the answer's probability somewhere
    assert sum(e["correct"] for e in summary["tasks"].values()) >= 0.8 * 3 * len(TaskType)
    drops = [f["min_mean_rel_change"] for e in summary["tasks"].values() for f in e["flows"].values()]
    assert min(drops) < -10
    assert str(out) in printed and "summary.md" in printed
    assert (out / "summary.md").read_text().startswith("# vlmflow demo: organism-planted")
    # the planted organism: the summary says per flow which planted band the knockouts recover
    planted = summary["planted"]
    assert set(planted) == {"question->last", "image->last", "image->question", "related->question", "other->question"}
    assert planted["question->last"]["band_names"].startswith("upper") and planted["question->last"]["recovered"]
    assert planted["image->last"]["band"] == [] and planted["image->last"]["recovered"]
    assert "Planted routes recovered" in (out / "summary.md").read_text()


@pytest.mark.slow  # a CLI subprocess: over 3 s
def test_demo_on_the_plain_organism_keeps_its_summary(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "organism", "--per-task", "1", "--out", str(out), "--no-plot"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_layers"] == 6 and "planted" not in summary
    assert "Planted routes" not in (out / "summary.md").read_text()


@pytest.mark.slow
def test_demo_resumes_without_recomputing(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--per-task", "1", "--out", str(out), "--no-plot"]
    assert main(args) == 0
    first = json.loads((out / "summary.json").read_text())
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text()) == first
    run_summary = json.loads((out / "flows_ChooseAttr" / "summary.json").read_text())
    assert run_summary["computed_this_session"] == 0


def test_organism_scenes_and_path_commands(tmp_path, capsys):
    assert main(["organism", "path"]) == 0
    assert str(organism_path()) in capsys.readouterr().out.replace("\n", "")
    assert main(["organism", "scenes", str(tmp_path), "-n", "2", "--seed", "5"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == sorted(f"scenes_{t.value}.csv" for t in TaskType)
    assert len(list(tmp_path.glob("*.png"))) == 2 * len(TaskType)
