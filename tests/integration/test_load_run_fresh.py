"""`vlmflow.load_run(run).lens` (and `.controls`, `.attention`, every table) in a fresh Python process,
for runs made by the command line on the shipped organism, before and after `parts/` is deleted.

A fresh process has imported no experiment module, so this checks that every table is known from its
static declaration alone. Skipped (with the reason) only when the organism is not in the package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_scene_task
from vlmflow.cli.main import main
from vlmflow.results.store import PARTS_DIR, RunStore


def _organism_dir() -> Path | None:
    path = Path(str(resources.files("vlmflow").joinpath("resources", "organism")))
    return path if (path / "config.json").is_file() else None


pytestmark = [
    pytest.mark.skipif(
        _organism_dir() is None, reason="the trained organism is not in the package (vlmflow/resources/organism has no config.json)"
    ),
    pytest.mark.slow,  # ~30 s; tests/unit/results/test_tables.py checks the same in a fresh process on a stored run
]

#: The Run property of each table (``Run.table(name)`` for the others).
PROPERTIES = {"lens": "lens", "lens_top": "lens_top", "attention": "attention", "controls": "controls", "samples": "samples"}

#: A study with the random-patch control only (plus the flows it is compared with), on two scenes.
CONTROLS_STUDY = """
name: controls
models:
  - {label: organism, model: organism, device: cpu, dtype: float32}
tasks:
  - {synthetic: {task: ChooseAttr, n: 2, seed: 1}}
flows: [related->question]
keep_all: true
lens: false
controls: {random_draws: 2}
report: {viewer_samples: 0}
"""


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A lens run with attention summaries (``vlmflow lens``) and a study's controls run (``vlmflow reproduce``)."""
    root = tmp_path_factory.mktemp("cli-runs")
    csv = write_scene_task(root / "data", n_samples=2)
    rc = main(["lens", "--model", "organism", "--data", str(csv), "--out", str(root / "runs"), "--name", "lens",
               "--device", "cpu", "--keep-all", "--attention", "--readout", "raw", "--top-k", "2", "--no-plot"])
    assert rc == 0
    config = root / "controls.yaml"
    config.write_text(CONTROLS_STUDY)
    assert main(["reproduce", str(config), "--out", str(root / "study"), "--no-report"]) == 0
    return {"lens": root / "runs" / "lens", "controls": root / "study" / "runs" / "organism" / "scenes-ChooseAttr" / "controls"}


def _read_in_fresh_process(run: Path, out: Path) -> dict[str, pd.DataFrame]:
    """Every table of ``run`` read by ``vlmflow.load_run`` in a new interpreter (through the Run
    properties where there is one), pickled to ``out``; asserts the reader imported no experiment."""
    code = f"""
import json, sys
from pathlib import Path
import vlmflow

run = vlmflow.load_run({str(run)!r})
out = Path({str(out)!r})
out.mkdir()
names = run.tables
properties = {json.dumps(PROPERTIES)}
for name in names:
    frame = getattr(run, properties[name]) if name in properties else run.table(name)
    frame.to_pickle(out / f"{{name}}.pkl")
declarations = {{"vlmflow.experiments", "vlmflow.experiments.settings", "vlmflow.experiments.windows"}}
loaded = sorted(m for m in sys.modules if (m.startswith("vlmflow.experiments") and m not in declarations) or m in ("torch", "transformers"))
print(json.dumps({{"tables": names, "imported": loaded}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    # The API imports the torch-free settings declarations, never an experiment's code (or torch).
    assert report["imported"] == [], "reading a run must not import an experiment (or torch)"
    return {name: pd.read_pickle(out / f"{name}.pkl") for name in report["tables"]}


@pytest.mark.parametrize("which, tables", [
    ("lens", ["attention", "errors", "lens", "lens_top", "samples"]),
    ("controls", ["controls", "errors", "samples"]),
])
def test_load_run_reads_every_table_of_a_cli_run_in_a_fresh_process_also_without_parts(cli_runs, tmp_path, which, tables):
    run = tmp_path / "run"
    shutil.copytree(cli_runs[which], run)
    assert (run / PARTS_DIR).is_dir()
    expected = {name: RunStore.load(run).read(name) for name in tables}
    assert all(len(expected[name]) for name in tables if name != "errors")

    fresh = _read_in_fresh_process(run, tmp_path / "with-parts")
    assert sorted(fresh) == tables
    for name in tables:
        pd.testing.assert_frame_equal(fresh[name], expected[name], obj=name)

    shutil.rmtree(run / PARTS_DIR)  # allowed once the run is finalized
    fresh = _read_in_fresh_process(run, tmp_path / "without-parts")
    assert sorted(fresh) == tables
    for name in tables:
        pd.testing.assert_frame_equal(fresh[name], expected[name], obj=name)
