"""`vlmflow reproduce` and `vlmflow report` end to end on a tiny LLaVA: runs, resume, controls, report.

The tiny model has random weights, so the claims' verdicts mean nothing here (their rules are tested
on synthetic tables); what is checked is that every run lands in the study directory, that a rerun
computes nothing, that the random-patch control is exactly a knockout of size-matched non-related
patches, and that the report and its figures are written.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import make_scene_sample
from vlmflow.analysis.claims import CLAIMS, Status
from vlmflow.data.csvio import write_task_csv
from vlmflow.experiments.controls import ControlSettings
from vlmflow.experiments.flows import FlowSettings, analyse_sample
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.positions.groups import Flow, Group
from vlmflow.results.store import RunStore
from vlmflow.study.config import load_config
from vlmflow.study.directory import StudyDir
from vlmflow.study.reproduce import reproduce

SHAPE = "sp-gqa"


def write_study(folder: Path, checkpoint: Path, n: int = 3, *, variant: bool = False) -> Path:
    """A task CSV of ``n`` scene samples, its image, and a study config using ``checkpoint``
    (``variant``: a second model entry, the same checkpoint with ``image_mode: resize``)."""
    folder.mkdir(parents=True, exist_ok=True)
    sample, image = make_scene_sample()
    image.save(folder / "img1.png")
    write_task_csv([replace(sample, sample_id=f"q{i}") for i in range(n)], folder / "ChooseAttr.csv")
    config = folder / "study.yaml"
    config.write_text(
        f"""
name: tiny
models:
  - {{label: tiny, model: {checkpoint}, dtype: float32, device: cpu}}
{f"  - {{label: tiny-resize, model: {checkpoint}, dtype: float32, device: cpu, image_mode: resize}}" if variant else ""}
tasks:
  - {{data: ChooseAttr.csv}}
keep_all: true          # random weights answer wrongly; keep every sample
windows: {{4: 3}}
controls: {{random_draws: 2}}
lens: {{readouts: [raw], top_k: 3}}
statistics: {{n_boot: 200}}
report: {{viewer_samples: 2, figure_format: svg}}
"""
    )
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_checkpoint, tiny_loaded) -> Path:
    folder = tmp_path_factory.mktemp("study")
    config = load_config(write_study(folder / "input", tiny_checkpoint(SHAPE)))
    outcome = reproduce(config, folder / "out", loader=lambda entry: tiny_loaded(SHAPE))
    assert not outcome.failed, outcome.failed
    return folder / "out"


def test_every_run_lands_in_the_study_directory(study: Path):
    manifest = StudyDir.open(study).manifest()
    assert sorted(manifest["runs"]) == ["tiny/ChooseAttr/controls", "tiny/ChooseAttr/flows", "tiny/ChooseAttr/lens"]
    for key, entry in manifest["runs"].items():
        assert entry["status"] == "done", key
        assert entry["window"] == 3 and entry["n_layers"] == 4
        store = RunStore.load(study / entry["path"])
        assert len(store.read("samples")) == 3
    flows = RunStore.load(study / "runs/tiny/ChooseAttr/flows").read("flows")
    assert set(flows["flow"]) == {str(f) for f in FlowSettings().flows} and set(flows["window"]) == {3}
    records = json.loads((study / "viewer/tiny/ChooseAttr/records.json").read_text())
    assert len(records) == 2 and records[0]["n_related_tokens"] > 0 and (study / "viewer/tiny/ChooseAttr/0_related.png").is_file()


def test_rerunning_computes_nothing(study: Path, tiny_loaded, tiny_checkpoint):
    config = load_config(study.parent / "input" / "study.yaml")
    outcome = reproduce(config, study, loader=lambda entry: tiny_loaded(SHAPE))
    assert {k: v["summary"]["computed_this_session"] for k, v in outcome.runs.items()} == dict.fromkeys(outcome.runs, 0)


def test_a_changed_config_does_not_mix_into_existing_runs(study: Path, tiny_loaded):
    config = load_config(study.parent / "input" / "study.yaml")
    outcome = reproduce(replace(config, windows={4: 1}), study, loader=lambda entry: tiny_loaded(SHAPE))
    assert "tiny/ChooseAttr/flows" in outcome.failed and "holds a different run" in outcome.failed["tiny/ChooseAttr/flows"]
    # The manifest keeps the failure; the stored runs are untouched.
    assert StudyDir.open(study).manifest()["runs"]["tiny/ChooseAttr/flows"]["status"] == "failed"
    reproduce(config, study, loader=lambda entry: tiny_loaded(SHAPE))  # restore for the other tests
    assert StudyDir.open(study).manifest()["runs"]["tiny/ChooseAttr/flows"]["status"] == "done"


def test_random_control_is_a_knockout_of_size_matched_non_related_patches(tiny_loaded):
    loaded = tiny_loaded(SHAPE)
    sample, image = make_scene_sample()
    settings = ControlSettings(draws=3, flow_settings=FlowSettings(window=3, keep_all=True))
    rows = pd.DataFrame(settings.analyse(loaded, prepare_sample(loaded, sample, image))["controls"])
    assert sorted(rows["draw"].unique()) == [0, 1, 2] and len(rows) == 3 * loaded.n_layers
    drawn = []
    for draw in range(3):
        prepared = prepare_sample(loaded, sample, image, random_draw=draw)
        groups = prepared.groups
        random, related = set(groups[Group.RANDOM]), set(groups[Group.RELATED])
        assert len(random) == len(related) and not random & related and random <= set(groups[Group.OTHER])
        drawn.append(frozenset(random))
        # The same knockout through the plain flow experiment on this draw's groups.
        direct = analyse_sample(loaded, prepared, FlowSettings(flows=(Flow(Group.RANDOM, Group.QUESTION),), window=3, keep_all=True))
        mine = rows[rows["draw"] == draw].sort_values("layer")
        torch.testing.assert_close(
            torch.tensor(mine["p_blocked"].to_numpy()), torch.tensor([r.p_blocked for r in direct.rows], dtype=torch.float64), rtol=1e-5, atol=1e-7
        )
        assert (mine["n_source"] == len(related)).all()
    assert len(set(drawn)) > 1  # the draws differ


@pytest.mark.slow  # a CLI subprocess: over 3 s
def test_report_is_written_with_every_section_and_static_figures(study: Path):
    from vlmflow.report.html import SECTIONS, write_report

    path = write_report(study, formats=("png", "pdf", "svg"))
    text = path.read_text()
    for sid, _ in SECTIONS:
        assert f'id="{sid}"' in text
    # Nothing to fetch: every src/href is a data: URI or an in-page anchor.
    assert [u for u in re.findall(r'(?:src|href)="([^"]*)"', text) if not u.startswith(("data:", "#"))] == []
    assert "<metadata>" not in text and "<?xml" not in text
    for claim in CLAIMS:
        assert f'data-claim="{claim}"' in text
    figures = study / "figures/tiny/ChooseAttr"
    for stem in ("flows", "lens_raw", "control_question"):
        for fmt in ("png", "pdf", "svg"):
            assert (figures / f"{stem}.{fmt}").stat().st_size > 1000, (stem, fmt)
    analysis = json.loads((study / "analysis.json").read_text())
    cell = analysis["cells"]["tiny/ChooseAttr"]
    assert {c["status"] for c in cell["claims"]} <= {s.value for s in Status}
    summary = cell["flow_summaries"]["image->question"]
    assert summary["n"] == 3 and summary["peak_ci"][0] <= summary["peak"] <= summary["peak_ci"][1]


@pytest.mark.slow  # a CLI subprocess: over 3 s
def test_cli_reproduce_and_report(tmp_path: Path, tiny_checkpoint):
    from vlmflow.cli.main import main

    config = write_study(tmp_path / "input", tiny_checkpoint(SHAPE), n=1, variant=True)
    assert main(["reproduce", str(config), "--out", str(tmp_path / "s"), "--no-report"]) == 0
    assert main(["report", str(tmp_path / "s"), "--formats", "svg"]) == 0
    assert (tmp_path / "s/report.html").is_file() and (tmp_path / "s/figures/tiny/ChooseAttr/flows.svg").is_file()
    # Two models on one task: the cross-model comparison on the common set, and the two image modes
    # of one checkpoint are compared by the noHD/noPad rule.
    analysis = json.loads((tmp_path / "s/analysis.json").read_text())
    assert analysis["common"]["ChooseAttr"]["models"] == ["tiny", "tiny-resize"] and analysis["common"]["ChooseAttr"]["n"] == 1
    assert (tmp_path / "s/figures/cross-model/ChooseAttr.svg").is_file()
    nohd = next(c for c in analysis["study_claims"] if c["id"] == "nohd-nopad")
    assert nohd["status"] != Status.NOT_RUN.value and "tiny vs tiny-resize on ChooseAttr" in nohd["evidence"]
    assert main(["report", str(tmp_path / "s"), "--formats", "gif"]) == 2
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert main(["reproduce", str(config), "--dry-run"]) == 0
