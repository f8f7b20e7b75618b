"""Runs on a local Ray cluster equal single-process runs, survive killed replicas and resume either way.

One small local cluster and one pool of two replicas serve the whole module; every run uses
the tiny random LLaVA on CPU. Results are compared bit for bit: replicas on CPU use one torch thread,
and so does this process while the module runs (another thread count changes float sums in the last
bits). The shard worker's skip logic is also checked without Ray.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from vlmflow.data.csvio import write_task_csv
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.experiments.flows import FlowSettings
from vlmflow.experiments.runner import (
    DataSpec,
    RunSpec,
    load_data,
    open_run,
    run_to_store,
    stored_spec,
)
from vlmflow.load_spec import LoadSpec
from vlmflow.results.identity import identity_of, read_spec
from vlmflow.results.store import RunStore
from vlmflow.results.tables import table_spec

N_SAMPLES = 10
MISSING = "q7"  # its image file does not exist: an ``errors`` row, in every executor alike
_PART_PID = re.compile(r"^\d{8,}-[A-Za-z0-9]+-p(\d+)-[0-9a-f]+$")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ChooseAttr CSV of coloured squares with its images beside it (one image missing)."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("scenes")
    colours = [("red", (220, 20, 20)), ("blue", (20, 20, 220))]
    samples = []
    for i in range(N_SAMPLES):
        (name, rgb), (other, _) = colours[i % 2], colours[1 - i % 2]
        image = Image.new("RGB", (40, 30), (30, 120, 30))
        ImageDraw.Draw(image).rectangle((4 + i, 8, 15 + i, 19), fill=rgb)
        image.save(folder / f"img{i}.png")
        samples.append(
            Sample(
                f"q{i}",
                "absent" if f"q{i}" == MISSING else f"img{i}",
                f"Is the square {name} or {other}?",
                name,
                task=TaskType.CHOOSE_ATTR,
                true_option=name,
                false_option=other,
                objects=(SceneObject("square", "1", Box(4 + i, 8, 12, 12)),),
                image_size=(40, 30),
            )
        )
    write_task_csv(samples, folder / "squares_ChooseAttr.csv")
    return folder / "squares_ChooseAttr.csv"


@pytest.fixture(scope="module")
def spec(tiny_checkpoint, dataset) -> RunSpec:
    return RunSpec(
        LoadSpec(str(tiny_checkpoint("sp-gqa")), dtype="float32", device="cpu"),
        DataSpec(str(dataset)),
        FlowSettings(keep_all=True),
    )


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory) -> Path:
    """The single-process run every Ray run must equal, row for row."""
    outcome = run_to_store(spec, tmp_path_factory.mktemp("single"))
    assert outcome.summary["samples"] == N_SAMPLES - 1 and outcome.summary["errors"] == 1
    return outcome.path


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module, shut down at its end.

    3 logical CPUs: the module's two replicas plus the CLI test's own (a replica that finds no free
    CPU waits for one).
    """
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=3,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        logging_level="WARNING",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def executor(ray_cluster, spec):
    """Two replicas (loaded once, restarted when a test kills one), shards of five samples."""
    from vlmflow.distributed import RayExecutor, RayOptions

    options = RayOptions("local", workers=2, shard_size=N_SAMPLES // 2)
    with RayExecutor(options, poll_seconds=0.05) as executor:
        assert executor.start(spec.model) == 2  # both loaded: each test's shards go to both
        yield executor


def _tables(run_dir: Path, names: tuple[str, ...] | None = None) -> dict[str, pd.DataFrame]:
    """The run's tables (``names``, or every table it has), rows sorted by each table's key."""
    store = RunStore.load(run_dir)
    out = {}
    for name in names or store.tables():
        key = list(table_spec(name).key)
        out[name] = store.read(name).sort_values(key).reset_index(drop=True)
    return out


def assert_same_tables(run_dir: Path, reference: Path, names: tuple[str, ...] | None = None) -> None:
    """Same tables (``names``, or all of them and the same set), equal row for row, bit for bit."""
    ours, theirs = _tables(run_dir, names), _tables(reference, names)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        pd.testing.assert_frame_equal(ours[name], theirs[name], check_exact=True, obj=f"{reference.name}/{name}")


def assert_same_results(run_dir: Path, reference: Path) -> None:
    assert_same_tables(run_dir, reference, ("samples", "errors", "flows"))
    assert identity_of(read_spec(run_dir / "spec.json")) == identity_of(read_spec(reference / "spec.json"))
    assert run_dir.name == reference.name  # same run name: either executor resumes the other


def assert_no_duplicate_rows_on_disk(run_dir: Path) -> None:
    """Every committed part, read raw (not through the store's defensive de-duplication)."""
    for name in ("samples", "errors", "flows"):
        frames = [pq.read_table(p).to_pandas() for p in sorted((run_dir / "parts").glob(f"*/{name}.parquet"))]
        rows = pd.concat(frames) if frames else pd.DataFrame(columns=list(table_spec(name).key))
        assert not rows.duplicated(list(table_spec(name).key)).any(), f"duplicate {name} rows on disk"


def _worker_pids_with_parts(run_dir: Path, *, count: bool = False) -> Any:
    """Pids of the processes that committed parts, in order of appearance (not this process); with
    ``count``, how many parts each committed."""
    parts_by_pid: dict[int, int] = {}
    parts = run_dir / "parts"
    for entry in sorted(os.listdir(parts)) if parts.is_dir() else []:
        match = _PART_PID.match(entry)
        if match and int(match.group(1)) != os.getpid():
            parts_by_pid[int(match.group(1))] = parts_by_pid.get(int(match.group(1)), 0) + 1
    return parts_by_pid if count else list(parts_by_pid)


def test_a_fresh_shard_worker_skips_what_a_dead_incarnation_committed(spec, tmp_path):
    """The dedup rule of retried shards, without Ray: a new incarnation re-reads the run directory."""
    from vlmflow.distributed.worker import ShardWorker

    first = ShardWorker(spec.model)
    run = open_run(spec, tmp_path, stored_spec(spec, first.loaded), load_data(spec.data))
    shard, images = run.todo[:4], str(run.images)

    class Died(Exception):
        pass

    def die_after_two(ids: list[str]) -> None:
        if len(run.store.done_sample_ids()) >= 2:
            raise Died

    with pytest.raises(Died):
        first.run_shard(0, spec, str(run.path), shard, images, on_commit=die_after_two)
    committed = sorted(run.store.done_sample_ids())
    assert committed == ["q0", "q1"]

    second = ShardWorker(spec.model)  # what Ray's restart builds: no stores opened yet
    result = second.run_shard(0, spec, str(run.path), shard, images)
    assert result.skipped == committed and result.committed == ["q2", "q3"]
    # A replica that already had the directory open re-reads it only when asked (a reassigned shard).
    again = first.run_shard(0, spec, str(run.path), shard, images, recheck=True)
    assert again.committed == [] and again.skipped == ["q0", "q1", "q2", "q3"]
    assert_no_duplicate_rows_on_disk(run.path)


@pytest.mark.slow
def test_local_ray_run_equals_the_single_process_run_and_each_resumes_the_other(
    executor, spec, reference, tmp_path
):
    class Interrupted(Exception):
        pass

    def stop_after_three(done: int, total: int, message: str) -> None:
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_to_store(spec, tmp_path, progress=stop_after_three)  # single process, interrupted
    seen: list[tuple[int, int]] = []
    outcome = executor.run(spec, tmp_path, progress=lambda done, total, _: seen.append((done, total)))
    stats = executor.last_stats
    assert outcome.summary["computed_this_session"] == N_SAMPLES - 3
    assert stats.workers == 2 and len(stats.worker_pids) == 2 and os.getpid() not in stats.worker_pids
    # The progress counts the run's samples, those done before the interruption included.
    assert seen[0] == (3, N_SAMPLES) and seen[-1] == (N_SAMPLES, N_SAMPLES) and all(t == N_SAMPLES for _, t in seen)
    assert_same_results(outcome.path, reference)
    assert_no_duplicate_rows_on_disk(outcome.path)
    # ... and a single-process rerun finds nothing left to do.
    assert run_to_store(spec, tmp_path).summary["computed_this_session"] == 0


@pytest.mark.slow
def test_a_replica_killed_mid_shard_is_restarted_and_nothing_is_lost_or_doubled(
    executor, spec, reference, tmp_path
):
    """SIGKILL of a replica's process (a crash) right after it committed the first sample of its shard.

    Where the kill lands depends on the machine's speed (on a slow one the replica may have finished
    its shard already), so what is asserted holds wherever it lands: the results are whole, and a
    shard the kill cut short was run again by a restarted replica.
    """
    run_dir = tmp_path / spec.run_name()
    killed: list[tuple[int, int]] = []  # (pid, samples it had committed when it died)

    def kill_a_busy_replica() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = _worker_pids_with_parts(run_dir)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                while _alive(pids[0]) and time.monotonic() < deadline:
                    time.sleep(0.01)
                killed.append((pids[0], _worker_pids_with_parts(run_dir, count=True).get(pids[0], 0)))
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_busy_replica, daemon=True)
    killer.start()
    outcome = executor.run(spec, tmp_path)
    killer.join(timeout=60)
    stats = executor.last_stats
    assert stats.shards == 2 and len(stats.worker_pids) == 2
    assert_same_results(outcome.path, reference)
    assert_no_duplicate_rows_on_disk(outcome.path)
    shard_size = N_SAMPLES // 2
    for pid, committed in killed:
        if committed < shard_size:  # cut short: a restarted replica finished the shard, skipping what was done
            assert stats.retried_shards and pid not in stats.worker_pids, (pid, committed, stats)
    # A rerun (same replicas) finds every shard finished.
    rerun = executor.run(spec, tmp_path)
    assert executor.last_stats.shards == 0 and rerun.summary["computed_this_session"] == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_cli_lens_with_ray_local_writes_the_single_process_run(
    ray_cluster, tiny_checkpoint, dataset, tmp_path
):
    """The CLI path (``flows`` shares it): ``--ray local`` on a running cluster uses that cluster."""
    from vlmflow.cli.main import main

    args = ["lens", "--model", str(tiny_checkpoint("sp-gqa")), "--data", str(dataset), "--limit", "4"]
    args += ["--device", "cpu", "--dtype", "float32", "--top-k", "3", "--keep-all", "--no-plot"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert (
        main([*args, "--out", str(tmp_path / "ray"), "--ray", "local", "--workers", "1", "--shard-size", "2"])
        == 0
    )
    assert ray_cluster.is_initialized()  # the CLI left the cluster it found running
    for single in sorted((tmp_path / "single").iterdir()):
        assert "lens" in RunStore.load(single).tables()
        assert_same_tables(tmp_path / "ray" / single.name, single)


@pytest.mark.slow
def test_reproduce_on_ray_writes_the_single_process_study(ray_cluster, tiny_checkpoint, tiny_loaded, tmp_path):
    """``vlmflow reproduce --ray``: every run of a study (flows, controls, lens) equals the run this
    process computes, row for row, and lands at the same place in the study directory."""
    from test_study import SHAPE, write_study

    from vlmflow.distributed import RayOptions
    from vlmflow.study.config import load_config
    from vlmflow.study.directory import StudyDir
    from vlmflow.study.reproduce import reproduce

    config = load_config(write_study(tmp_path / "input", tiny_checkpoint(SHAPE)))
    single = reproduce(config, tmp_path / "single", loader=lambda entry: tiny_loaded(SHAPE))
    on_ray = reproduce(
        config, tmp_path / "ray", loader=lambda entry: tiny_loaded(SHAPE), ray=RayOptions("local", workers=1)
    )
    assert not single.failed and not on_ray.failed
    runs = StudyDir.open(tmp_path / "single").manifest()["runs"]
    assert sorted(runs) == sorted(StudyDir.open(tmp_path / "ray").manifest()["runs"]) and len(runs) == 3
    for entry in runs.values():
        assert_same_tables(tmp_path / "ray" / entry["path"], tmp_path / "single" / entry["path"])
