"""What a user runs: `vlmflow tiny-model`, `vlmflow flows` with the six flows, `vlmflow plot` (real
processes; slow), and the same commands in this process on one sample (the fast tier's CLI check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_scene_task
from vlmflow.cli.main import main

SIX = ["question->last", "image->last", "last->last", "image->question", "related->question", "other->question"]


def vlmflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "vlmflow", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, f"vlmflow {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_tiny_model_then_six_flows_then_plot(tmp_path: Path):
    csv = write_scene_task(tmp_path / "data", n_samples=3)
    vlmflow("tiny-model", "tiny", cwd=tmp_path)
    flow_args = [a for f in SIX for a in ("--flow", f)]
    out = vlmflow("flows", "--model", "tiny", "--data", str(csv), "--images", "data", *flow_args, "--window", "3",
                  "--out", "runs", "--keep-all", "--name", "six", "--device", "cpu", cwd=tmp_path)
    assert "3 samples" in out.stdout and "0 errors" in out.stdout
    run = tmp_path / "runs" / "six"
    assert {"flows_ChooseAttr.png", "flows_ChooseAttr.pdf"} <= {p.name for p in (run / "figures").iterdir()}

    flows = pd.read_parquet(run / "flows.parquet")
    n_layers = 4  # tiny-model's default depth
    assert len(flows) == 3 * len(SIX) * n_layers
    assert sorted(flows["flow"].unique()) == sorted(SIX)
    edge = flows[flows["layer"] == 0]["layers_blocked"].map(list)
    assert edge.map(lambda b: b == [0, 1]).all()  # window 3 centred on layer 0, clipped: 2 layers
    assert (flows["window"] == 3).all() and flows["rel_change"].notna().all()
    # A knockout that did nothing everywhere would be the worst bug: the image->last cut must move p.
    assert flows.loc[flows["flow"] == "image->last", "rel_change"].abs().max() > 1e-3
    spec = json.loads((run / "spec.json").read_text())
    assert spec["settings"]["flows"] == SIX and spec["settings"]["window"] == 3
    assert {"torch", "transformers"} <= set(spec["provenance"]["versions"])

    import duckdb

    query = f"select count(distinct sample_id) from read_parquet('{run / 'flows.parquet'}')"
    assert duckdb.connect().execute(query).fetchall() == [(3,)]

    figures = tmp_path / "figs"
    plotted = vlmflow("plot", "runs/six", "--out", str(figures), "--format", "png,pdf", cwd=tmp_path)
    assert sorted(p.name for p in figures.iterdir()) == ["flows_ChooseAttr.pdf", "flows_ChooseAttr.png"]
    assert "flows_ChooseAttr.png" in plotted.stdout


def test_tiny_model_then_flows_then_plot_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    csv = write_scene_task(tmp_path / "data", n_samples=1)
    monkeypatch.chdir(tmp_path)
    assert main(["tiny-model", "tiny"]) == 0
    assert main(["flows", "--model", "tiny", "--data", str(csv), "--images", "data", "--flow", "image->last",
                 "--flow", "question->last", "--window", "3", "--out", "runs", "--keep-all", "--name", "two",
                 "--device", "cpu", "--max-new-tokens", "2"]) == 0  # fmt: skip
    assert "1 samples" in " ".join(capsys.readouterr().out.split())
    run = tmp_path / "runs" / "two"
    flows = pd.read_parquet(run / "flows.parquet")
    assert len(flows) == 2 * 4 and sorted(flows["flow"].unique()) == ["image->last", "question->last"]
    assert main(["plot", "runs/two", "--out", "figs", "--format", "png"]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["flows_ChooseAttr.png"]
