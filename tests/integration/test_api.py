"""The Python API a notebook user reaches for: vlmflow.run_flows / load_run / Run / load_model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import vlmflow
from conftest import write_scene_task
from vlmflow.errors import ConfigError


def test_import_is_cheap_and_names_are_lazy():
    code = (
        "import sys, vlmflow; heavy = ('torch', 'transformers', 'matplotlib', 'pandas', 'numpy', 'pyarrow');"
        "print(sorted(m for m in heavy if m in sys.modules)); vlmflow.load_run; vlmflow.Flow;"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "[]"]
    assert {"run_flows", "run_lens", "load_run", "load_model", "Run"} <= set(dir(vlmflow))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vlmflow.nope  # noqa: B018


def test_run_flows_returns_a_run_with_tables_curves_and_a_figure(tiny_checkpoint, tmp_path: Path):
    csv = write_scene_task(tmp_path / "data", n_samples=2)
    calls = []
    run = vlmflow.run_flows(
        model=tiny_checkpoint("word-mqa"), data=csv, flows=["image->last", "image->question"], window=3,
        out=tmp_path / "runs", keep_all=True, device="cpu", progress=lambda *a: calls.append(a),
    )
    assert isinstance(run, vlmflow.Run) and run.experiment == "flows"
    assert calls[-1][:2] == (2, 2)
    n_layers = 6  # the word-mqa tiny shape
    assert len(run.flows) == 2 * 2 * n_layers and set(run.flows["flow"]) == {"image->last", "image->question"}
    assert run.samples["kept"].all() and run.errors.empty
    assert run.summary["samples"] == 2 and "2 samples" in repr(run)
    curves = run.curves()
    assert list(curves.columns) == ["task", "flow", "layer", "n", "mean", "low", "high"]
    image_last = run.flows[run.flows["flow"] == "image->last"].groupby("layer")["rel_change"].mean()
    got = curves[curves["flow"] == "image->last"].set_index("layer")["mean"]
    assert got.to_dict() == pytest.approx(image_last.to_dict())
    fig = run.plot()
    assert [ax.get_title().split(":")[1].strip() for ax in fig.axes] == [
        "Flows to the last position (2 samples)", "Whole image to question (2 samples)"]
    assert len(run.plot(flows=["image->last"]).axes) == 1
    with pytest.raises(ConfigError, match="no flow rows for task 'QueryAttr'"):
        run.plot(task="QueryAttr")
    paths = run.save_figures(tmp_path / "figs", formats=["png"])
    assert [p.name for p in paths] == ["flows_ChooseAttr.png"]

    # The same call resumes the run: nothing is recomputed; load_run reads the same directory.
    again = vlmflow.run_flows(
        model=tiny_checkpoint("word-mqa"), data=csv, flows=["image->last", "image->question"], window=3,
        out=tmp_path / "runs", keep_all=True, device="cpu",
    )
    assert again.path == run.path and again.summary["computed_this_session"] == 0
    assert vlmflow.load_run(run.path).flows.equals(run.flows)


def test_run_flows_takes_a_loaded_model_and_run_lens_works_too(tiny_checkpoint, tmp_path: Path):
    csv = write_scene_task(tmp_path / "data", n_samples=1)
    loaded = vlmflow.load_model(tiny_checkpoint("sp-gqa"), device="cpu", dtype="float32")
    run = vlmflow.run_flows(loaded, csv, flows=["question->last"], window=1, out=tmp_path, keep_all=True)
    assert run.spec["model"]["name"] == str(tiny_checkpoint("sp-gqa"))
    assert (run.flows["layers_blocked"].map(len) == 1).all()
    lens = vlmflow.run_lens(loaded, csv, readouts=["raw"], out=tmp_path, keep_all=True)
    assert lens.experiment == "lens" and set(lens.lens["readout"]) == {"raw"}
    assert lens.plot().axes[0].get_ylabel() == "Probability (%)"


def test_bad_inputs_are_named(tiny_checkpoint, tmp_path: Path):
    csv = write_scene_task(tmp_path / "data", n_samples=1)
    with pytest.raises(ConfigError, match="unknown position group 'picture'"):
        vlmflow.run_flows(tiny_checkpoint("sp-gqa"), csv, flows=["picture->last"], out=tmp_path)
    with pytest.raises(ConfigError, match="not a run directory"):
        vlmflow.load_run(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="model must be a checkpoint path"):
        vlmflow.run_flows(42, csv, out=tmp_path)  # type: ignore[arg-type]
