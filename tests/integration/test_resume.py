"""Kill-and-resume of the real command line, resume rules, and determinism.

The CLI runs as a separate process (``python -m vlmflow flows ...``) on a tiny model and is killed
with SIGKILL at random points (mid-sample, mid-commit) several times, resuming each time; the final
run directory must then hold exactly what an uninterrupted run holds: no row twice, none missing.
The kill points are drawn from a fixed seed (``VLMFLOW_KILL_SEED`` picks another, and a failure
message names it). Where a kill lands still depends on the machine's speed (a session may even
finish before its kill), so what is asserted holds wherever the kills land: never how many landed.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from support.dataset import write_scene_dataset
from vlmflow.cli.main import main
from vlmflow.results.store import PARTS_DIR, RunStore
from vlmflow.results.tables import TABLES

N_SAMPLES = 14
N_KILLS = 3
KILL_SEED = 18  # the kill points' seed (a constant: the drill is the same on every run)
FLOW_ARGS = ["--flow", "image->last", "--flow", "question->last", "--keep-all", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, set[str]]:
    """N_SAMPLES samples (the last one's image is missing) and one malformed CSV row."""
    folder = tmp_path_factory.mktemp("resume-data")
    csv = write_scene_dataset(folder, N_SAMPLES)
    (folder / f"img{N_SAMPLES - 1}.png").unlink()  # the last sample's image is missing
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join(lines) + "broken,row\n")
    expected = {f"s{i}" for i in range(N_SAMPLES)} | {f"line:{len(lines) + 1}"}
    return csv, expected


def _command(model: Path, csv: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlmflow", "flows", "--model", str(model), "--data", str(csv), "--out", str(out),
            "--device", "cpu", "--no-plot", *FLOW_ARGS, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _run_dir(out: Path) -> Path:
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _parts(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return [p for run in out.iterdir() if (run / PARTS_DIR).is_dir() for p in (run / PARTS_DIR).iterdir() if not p.name.startswith(".")]


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    store = RunStore.load(run)
    out = {}
    for name in store.tables():
        frame = store.read(name)
        out[name] = frame.sort_values(list(TABLES[name].key)).reset_index(drop=True)
    return out


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tiny_checkpoint, dataset, tmp_path):
    csv, expected_ids = dataset
    model = tiny_checkpoint("word-mqa")
    seed = int(os.environ.get("VLMFLOW_KILL_SEED", KILL_SEED))
    rng = random.Random(seed)
    env = _env()

    # The uninterrupted run: the same command line, in this process, with the killed runs' one thread.
    reference_out = tmp_path / "uninterrupted"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_command(model, csv, reference_out)[3:]) == 0
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "killed"
    kills = []
    gap = 0.05  # seconds per sample, until a session has shown two commits
    for attempt in range(N_KILLS):
        before = len(_parts(out))
        target = before + rng.randint(1, 2)  # wait for one or two more commits ...
        fraction = rng.uniform(0.0, 1.0)  # ... then a random moment into the next sample or commit
        proc = subprocess.Popen(_command(model, csv, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        seen, seen_at = before, time.monotonic()
        while proc.poll() is None and seen < target and time.monotonic() < deadline:
            time.sleep(0.002)
            count = len(_parts(out))
            if count != seen:
                now = time.monotonic()
                if seen > before:  # two commits seen in this session: the time one sample takes here
                    gap = (now - seen_at) / (count - seen)
                seen, seen_at = count, now
        # A fraction of one sample's time, however fast the engine is, so the kill lands inside the next one.
        extra_sleep = fraction * gap
        time.sleep(extra_sleep)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append((attempt, len(_parts(out)), round(extra_sleep, 3)))
        proc.wait(timeout=60)
        if proc.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"attempt {attempt} (seed {seed}) failed with {proc.returncode}: {proc.stderr.read().decode()}")
        proc.stderr.close()

    resumed = subprocess.run(_command(model, csv, out), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, f"seed {seed}: {resumed.stderr}"

    run, reference = _run_dir(out), _run_dir(reference_out)
    # Raw parts: every sample committed exactly once across all sessions (the reader's deduplication
    # would hide a double commit, so look beneath it).
    committed = collections.Counter()
    for part in _parts(out):
        for name in ("samples", "errors"):
            if (part / f"{name}.parquet").is_file():
                committed.update(pq.read_table(part / f"{name}.parquet", columns=["sample_id"]).column("sample_id").to_pylist())
    doubles = {k: v for k, v in committed.items() if v > 1}
    assert not doubles, f"seed {seed}, kills {kills}: committed twice: {doubles}"
    assert set(committed) == expected_ids, f"seed {seed}, kills {kills}"
    assert not [p for p in (run / PARTS_DIR).iterdir() if p.name.startswith(".")], "stale temp directories left behind"

    got, want = _tables(run), _tables(reference)
    assert sorted(got) == sorted(want) == ["errors", "flows", "samples"]
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True, obj=f"{name} (seed {seed}, kills {kills})")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples"] == N_SAMPLES - 1 and summary["errors"] == 2
    assert summary["flow_rows"] == len(want["flows"])


def test_same_spec_skips_done_samples_and_a_different_spec_is_refused(tiny_checkpoint, dataset, tmp_path, capsys):
    csv, _ = dataset
    model = tiny_checkpoint("word-mqa")
    args = ["flows", "--model", str(model), "--data", str(csv), "--out", str(tmp_path), "--name", "run", "--device", "cpu",
            "--no-plot", *FLOW_ARGS]
    assert main([*args, "--limit", "4"]) == 0
    first = _tables(tmp_path / "run")
    # A larger limit is another spec (the data part of the identity differs).
    capsys.readouterr()
    assert main([*args, "--limit", "5"]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "run directory" in message and "holds a different run: data.limit: stored 4, now 5" in message
    assert "Use another output directory or run name" in message
    assert main([*args, "--limit", "4", "--window", "3"]) == 2
    assert "settings.window: stored None, now 3" in " ".join(capsys.readouterr().err.split())
    # The same path with other content is another dataset.
    edited = tmp_path / "edited.csv"
    edited.write_text(csv.read_text().replace("Is the square", "Is that square", 1))
    edited_args = [a if a != str(csv) else str(edited) for a in args]
    for image in csv.parent.glob("*.png"):
        (tmp_path / image.name).write_bytes(image.read_bytes())
    assert main([*edited_args, "--name", "edited", "--limit", "4"]) == 0
    edited.write_text(csv.read_text())
    capsys.readouterr()
    assert main([*edited_args, "--name", "edited", "--limit", "4"]) == 2
    assert re.search(r"data\.sha256: stored '[0-9a-f]{16}', now '[0-9a-f]{16}'", " ".join(capsys.readouterr().err.split()))
    # The same spec again: nothing is recomputed, nothing changes.
    assert main([*args, "--limit", "4"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["computed_this_session"] == 0 and summary["samples"] == 4
    again = _tables(tmp_path / "run")
    for name in first:
        pd.testing.assert_frame_equal(again[name], first[name], check_exact=True)


def test_same_spec_twice_gives_identical_rows_and_records_seeds_versions_and_revision(tiny_checkpoint, dataset, tmp_path):
    from vlmflow.experiments.flows import FlowSettings
    from vlmflow.experiments.runner import DataSpec, RunSpec, run_to_store
    from vlmflow.load_spec import LoadSpec
    from vlmflow.positions.groups import PAPER_FLOWS

    csv, _ = dataset
    spec = RunSpec(
        LoadSpec(str(tiny_checkpoint("bpe-mha")), device="cpu"),
        DataSpec(str(csv), limit=3),
        FlowSettings(flows=PAPER_FLOWS, keep_all=True, max_new_tokens=3),
    )
    first = run_to_store(spec, tmp_path / "a")  # each run loads the model itself
    second = run_to_store(spec, tmp_path / "b")
    a, b = _tables(first.path), _tables(second.path)
    assert sorted(a) == sorted(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True)
    assert len(a["flows"]) > 0
    stored = json.loads((first.path / "spec.json").read_text())
    assert stored["model"]["fingerprint"] and len(stored["model"]["fingerprint"]) == 16
    record = stored["provenance"]
    assert record["seeds"]["torch"] == 0
    assert {"vlmflow", "torch", "transformers", "tokenizers", "numpy", "pillow"} <= set(record["versions"])
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    assert record["model_fingerprint"] == stored["model"]["fingerprint"] and "model_revision" in record
    assert record["torch_threads"] >= 1
    other = json.loads((second.path / "spec.json").read_text())
    assert {k: v for k, v in other.items() if k != "provenance"} == {k: v for k, v in stored.items() if k != "provenance"}
