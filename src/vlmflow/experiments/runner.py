"""Run an experiment (flows, lens, ...) over a dataset into a resumable run directory.

Configuration problems (unreadable data file, unknown model family, a flow that names an unknown
group, a missing images folder) stop the run before any sample is computed. Per-sample problems
become rows of the ``errors`` table and the run goes on. Results are committed sample by sample, so
an interrupted run resumes where it stopped; rerunning the same spec skips finished samples (and
says so: a notice, :mod:`vlmflow.notices`). Ctrl-C raises :class:`~vlmflow.errors.RunInterrupted`
saying how far the run got. One process at a time computes a run directory: its lock
(:mod:`vlmflow.results.lock`) refuses a second one, naming the first.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import platform
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch

from vlmflow.data.sample import IMAGE_EXTENSIONS, Sample, find_image
from vlmflow.errors import ConfigError, RunInterrupted, SampleError
from vlmflow.experiments.prepare import PreparedSample, open_image, prepare_sample
from vlmflow.experiments.settings import Engine, FlowSettings
from vlmflow.knockout.fast import release_cached_memory
from vlmflow.load_spec import LoadSpec
from vlmflow.loading import LoadedModel, load_model
from vlmflow.notices import notice
from vlmflow.quiet import quiet_libraries
from vlmflow.results.tables import ErrorRow, Row

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SEED = 0
#: summary.json lists at most this many error rows (all of them are in errors.parquet).
MAX_SUMMARY_ERRORS = 100
#: ``progress(done, total, message)``: samples of the run done so far (those of earlier sessions
#: included), of all its samples.
ProgressCallback = Callable[[int, int, str], None]


#: The old name of :class:`~vlmflow.load_spec.LoadSpec` (how to load the model; the model part of a run spec).
ModelSpec = LoadSpec


@dataclass(frozen=True)
class DataSpec:
    """Which samples: a task CSV (or ``gqa:TASK``), the images folder, and an optional limit."""

    data: str
    images: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")


class Experiment(Protocol):
    """What the runner needs from an experiment's settings (see :class:`FlowSettings`)."""

    name: str  # "flows", "lens", ...
    engine: Engine  # the engine the start-up self-test checks

    def identity(self) -> dict[str, Any]:
        """JSON-able settings that must match for a run directory to be resumed."""
        ...

    def analyse(self, loaded: LoadedModel, prepared: PreparedSample) -> dict[str, list[Row]]:
        """Tables to commit for one sample (always including its ``samples`` row)."""
        ...


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run: model, data and experiment; its hash names the run directory."""

    model: LoadSpec
    data: DataSpec
    experiment: Experiment = field(default_factory=FlowSettings)
    name: str | None = None

    def identity(self, loaded: LoadedModel | None = None) -> dict[str, Any]:
        """The part of the spec that must match for a run directory to be resumed.

        The model's and the experiment's parts are their fields declared part of the identity
        (:func:`vlmflow.settings.setting`); with ``loaded``, what the model resolved to as well.
        """
        model = self.model.identity()
        if loaded is not None:
            model["resolved_dtype"] = loaded.info["dtype"]
            model["prompt_template"] = loaded.info["prompt_template"]
            model["fingerprint"] = loaded.info["fingerprint"]
        return {
            "experiment": self.experiment.name,
            "schema_version": SCHEMA_VERSION,
            "model": model,
            "data": {**asdict(self.data), "sha256": data_digest(self.data.data)},
            "settings": self.experiment.identity(),
        }

    def run_name(self) -> str:
        """The run directory's name: ``name`` if given, else ``EXPERIMENT-MODEL-DATA-HASH``.

        The hash is of the identity (:meth:`identity`), so another setting is another directory.

        >>> RunSpec(LoadSpec("llava-hf/llava-1.5-7b-hf"), DataSpec("gqa:ChooseAttr")).run_name()
        'flows-llava-1.5-7b-hf-gqa-ChooseAttr-...'
        """
        if self.name:
            return self.name
        return f"{_slug(self.experiment.name)}-{self.legacy_run_name()}"

    def legacy_run_name(self) -> str:
        """The name vlmflow gave run directories before it began with the experiment (``MODEL-DATA-HASH``);
        :func:`run_path` still resumes a directory of that name."""
        if self.name:
            return self.name
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
        return f"{_slug(self.model.name)}-{_slug(self.data.data)}-{digest}"


def run_path(spec: RunSpec, out: Path | str) -> Path:
    """The run directory of ``spec`` under ``out``: ``out/<run name>``, or the directory of the same
    run under its older name (:meth:`RunSpec.legacy_run_name`) when only that one exists.

    Raises:
        ConfigError: ``out`` (or a folder above it) is a file.
    """
    out = Path(out)
    check_folder(out, "output folder")
    path = out / spec.run_name()
    legacy = out / spec.legacy_run_name()
    if not path.exists() and legacy != path and (legacy / "spec.json").is_file():
        return legacy
    return path


def check_folder(path: Path, what: str) -> None:
    """Raise :class:`ConfigError` when ``path`` or a folder above it exists and is not a folder.

    >>> check_folder(Path("README.md/runs"), "output folder")   # doctest: +SKIP
    Traceback (most recent call last):
    ...
    vlmflow.errors.ConfigError: output folder 'README.md/runs': 'README.md' is a file, not a folder
    """
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "" if folder == path else f": {str(folder)!r}"
                raise ConfigError(f"{what} {str(path)!r}{where} is a file, not a folder")
            return


@dataclass
class RunOutcome:
    """Where the run is, and its summary (also written to ``summary.json``)."""

    path: Path
    summary: dict[str, Any]


def _slug(text: str) -> str:
    stem = Path(str(text).rstrip("/")).name or str(text)
    stem = re.sub(r"\.csv$", "", stem)
    return re.sub(r"[^A-Za-z0-9_.]+", "-", stem).strip("-")[:40] or "run"


def data_digest(data: str) -> str | None:
    """First 16 hex digits of the sha256 of the data file's bytes (``gqa:TASK``: the packaged file).

    Part of a run's identity, so an edited CSV under the same path is another run, not a resume
    that would mix rows of two datasets. ``None`` when ``data`` names nothing readable (the data
    reader then says why).
    """
    from vlmflow.data.datasets import GQA_SCHEME, released_file
    from vlmflow.data.sample import TaskType

    try:
        if data.lower().startswith(GQA_SCHEME):
            blob = released_file(TaskType.parse(data[len(GQA_SCHEME) :])).read_bytes()
        elif Path(data).is_file():
            blob = Path(data).read_bytes()
        else:
            return None
    except (ValueError, OSError, ConfigError):
        return None
    return hashlib.sha256(blob).hexdigest()[:16]


def provenance(loaded: LoadedModel) -> dict[str, Any]:
    """Versions, device and time, recorded with the run but not part of its identity."""
    versions = {}
    for package in ("vlmflow", "torch", "transformers", "tokenizers", "numpy", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": loaded.info.get("device"),
        "model_revision": loaded.info.get("revision"),
        "model_fingerprint": loaded.info.get("fingerprint"),
        "model_info": loaded.info,
        # Nothing in a run draws random numbers (greedy decoding, eval mode; the random control group
        # is seeded by sha256 of the sample id); torch is seeded anyway and the seed recorded.
        "seeds": {"torch": SEED, "random_control": "sha256(sample_id/draw)"},
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def load_data(spec: DataSpec) -> tuple[list[Sample], list[ErrorRow], Path]:
    """Read the samples and resolve the images folder; raise :class:`ConfigError` on bad config.

    Returns the samples (limited), error rows for malformed lines, and the images folder.
    """
    from vlmflow.data.datasets import load_samples

    result, _task = load_samples(spec.data)
    samples = result.samples[: spec.limit] if spec.limit else result.samples
    errors = [ErrorRow(sample_id=f"line:{err.line}", stage="read", reason=err.reason) for err in result.errors]
    if spec.images is not None:
        images = Path(spec.images)
    else:
        images = Path(spec.data).parent if Path(spec.data).is_file() else Path(".")
    if not images.is_dir():
        raise ConfigError(f"images folder {str(images)!r} does not exist (pass --images DIR)")
    if not samples:
        raise ConfigError(f"no samples could be read from {spec.data!r} ({len(errors)} malformed rows)")
    _check_some_image_exists(samples, images)
    return samples, errors, images


def _check_some_image_exists(samples: list[Sample], images: Path) -> None:
    """A wrong images folder would turn every sample into an error row: refuse it up front instead."""
    for sample in samples:
        try:
            find_image(images, sample.image_id)
            return
        except SampleError:
            continue
    raise ConfigError(
        f"none of the {len(samples)} samples' images is in {str(images)!r} (e.g. {samples[0].image_id!r} with "
        f"extension {', '.join(IMAGE_EXTENSIONS)}); pass the folder that holds them with --images DIR"
    )


def iter_samples(
    loaded: LoadedModel,
    samples: list[Sample],
    images: Path,
    experiment: Experiment,
) -> Iterator[dict[str, list[Row]]]:
    """Yield, per sample, the tables to commit (the experiment's tables, or an ``errors`` row)."""
    for sample in samples:
        out_of_memory: str | None = None
        try:
            image = open_image(sample, images)
            prepared = prepare_sample(loaded, sample, image)
            tables = experiment.analyse(loaded, prepared)
        except SampleError as exc:
            log.warning("sample %s skipped at %s: %s", sample.sample_id, exc.stage, exc.reason)
            yield {"errors": [ErrorRow(sample_id=sample.sample_id, stage=exc.stage, reason=exc.reason)]}
            continue
        except torch.OutOfMemoryError as exc:  # the engine already retried with smaller folds
            out_of_memory = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
        if out_of_memory is not None:
            # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
            free_memory()
            reason = f"out of memory even at the smallest fold size: {out_of_memory}"
            log.warning("sample %s skipped: %s", sample.sample_id, reason)
            yield {"errors": [ErrorRow(sample_id=sample.sample_id, stage="memory", reason=reason)]}
            continue
        yield tables


def free_memory() -> None:
    """Release cached accelerator memory after an out-of-memory error (CPU: collect garbage only)."""
    gc.collect()
    release_cached_memory()


def run_to_store(
    spec: RunSpec,
    out: Path | str,
    *,
    progress: ProgressCallback | None = None,
    loaded: LoadedModel | None = None,
    self_test: bool = True,
) -> RunOutcome:
    """Run ``spec`` into ``out/<run name>`` (resuming if it exists) and return where it is.

    Before any sample (and before the run directory is created), the model is checked with
    :func:`~vlmflow.experiments.selftest.run_self_test` through the experiment's engine; a failure
    stops the run with :class:`~vlmflow.experiments.selftest.SelfTestError`. ``self_test=False``
    skips it (for benchmarks that time the samples alone). Another process computing the same run
    directory makes it refuse (:class:`~vlmflow.results.lock.RunLockedError`); Ctrl-C raises
    :class:`~vlmflow.errors.RunInterrupted`.

    >>> spec = RunSpec(LoadSpec("tiny-llava"), DataSpec("scenes/ChooseAttr.csv"))   # doctest: +SKIP
    >>> run_to_store(spec, "runs").path                                              # doctest: +SKIP
    PosixPath('runs/flows-tiny-llava-ChooseAttr-1a2b3c4d')
    """
    from vlmflow.experiments.selftest import run_self_test
    from vlmflow.results.lock import check_unlocked

    data = load_data(spec.data)
    check_unlocked(run_path(spec, out))  # before minutes of loading a model
    with quiet_libraries():
        loaded = loaded or load_model(spec.model)
        report = run_self_test(loaded, spec.experiment.engine) if self_test else None
        torch.manual_seed(SEED)
        run = open_run(spec, out, stored_spec(spec, loaded, report.as_dict() if report is not None else None), data)
        try:
            started = time.perf_counter()
            count = 0
            announce(run, progress)
            try:
                for tables in iter_samples(loaded, run.todo, run.images, spec.experiment):
                    run.store.commit(tables)
                    count += 1
                    if progress:
                        progress(run.done_before + count, run.total, "")
            except KeyboardInterrupt as exc:
                raise RunInterrupted(run.path, done=run.done_before + count, total=run.total) from exc
            return finish_run(run, time.perf_counter() - started, computed=count)
        finally:
            run.close()


@dataclass
class OpenRun:
    """A run directory opened for computing: its store, the samples still to do, and its lock.

    ``total``: all samples of the run; ``done_before``: those committed before this session.
    """

    path: Path
    store: Any  # RunStore (imported lazily)
    todo: list[Sample]
    images: Path
    total: int
    lock: Any = None  # RunLock held while computing (imported lazily)

    @property
    def done_before(self) -> int:
        return self.total - len(self.todo)

    def close(self) -> None:
        """Release the run directory's lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def announce(run: OpenRun, progress: ProgressCallback | None) -> None:
    """Say a resumed run resumes (a notice), and start the progress at the samples already done."""
    if run.done_before and run.todo:
        notice("resuming %s: %d of %d samples already done", run.path, run.done_before, run.total)
    elif run.done_before:
        notice("%s is complete (%d samples): nothing to compute", run.path, run.total)
    if progress:
        progress(run.done_before, run.total, "resuming" if run.done_before else "starting")


def stored_spec(spec: RunSpec, loaded: LoadedModel, self_test: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``spec.json`` holds for ``spec`` run on ``loaded``: its identity plus provenance.

    ``self_test`` is the start-up self-test's report (provenance only: not part of the identity).
    """
    record = provenance(loaded)
    record["self_test"] = dict(self_test) if self_test is not None else None
    return {**spec.identity(loaded), "provenance": record}


def open_run(
    spec: RunSpec,
    out: Path | str,
    stored: dict[str, Any],
    data: tuple[list[Sample], list[ErrorRow], Path],
) -> OpenRun:
    """Create or resume ``out/<run name>`` for ``stored`` (see :func:`stored_spec`), holding its lock.

    ``data`` is :func:`load_data`'s result. Commits the read errors not yet committed and returns
    the samples not yet done, in data order. Any executor (this process, a Ray cluster) starts here
    and calls :meth:`OpenRun.close` when done (the lock is the coordinator's: other writers of the
    same run, such as Ray replicas, commit without it).
    """
    from vlmflow.results.lock import RunLock
    from vlmflow.results.store import RunStore

    samples, read_errors, images = data
    path = run_path(spec, out)
    lock = RunLock(path)
    lock.acquire()
    try:
        store = RunStore.open(path, stored)
        done = store.done_sample_ids()
        fresh_read_errors = [e for e in read_errors if e.sample_id not in done]
        if fresh_read_errors:
            store.commit({"errors": fresh_read_errors})
    except BaseException:
        lock.release()
        raise
    todo = [s for s in samples if s.sample_id not in done]
    log.info("%s: %d samples, %d already done", path, len(samples), len(samples) - len(todo))
    return OpenRun(path=path, store=store, todo=todo, images=images, total=len(samples), lock=lock)


def finish_run(run: OpenRun, elapsed: float, computed: int) -> RunOutcome:
    """Summarise and consolidate the run directory (idempotent); the end of every executor."""
    summary = summarise(run.store, elapsed, computed=computed)
    run.store.finalize(summary)
    return RunOutcome(path=run.path, summary=summary)


def summarise(store: Any, elapsed: float, computed: int) -> dict[str, Any]:
    """Counts and accuracy of a run directory (all committed samples, not only this session's)."""
    samples = store.read("samples")
    errors = store.read("errors")
    flows = store.read("flows") if "flows" in store.tables() else None
    n = len(samples)
    summary: dict[str, Any] = {
        "samples": n,
        "correct": int(samples["correct"].sum()) if n else 0,
        "kept": int(samples["kept"].sum()) if n else 0,
        "errors": len(errors),
        "flow_rows": 0 if flows is None else len(flows),
        "accuracy": float(samples["correct"].mean()) if n else None,
        "computed_this_session": computed,
        "seconds_this_session": round(elapsed, 3),
    }
    if len(errors):
        summary["errors_by_stage"] = {str(k): int(v) for k, v in errors["stage"].value_counts().items()}
        listed = errors.sort_values("sample_id").head(MAX_SUMMARY_ERRORS)
        summary["error_rows"] = [
            {"sample_id": str(r.sample_id), "stage": str(r.stage), "reason": str(r.reason)} for r in listed.itertuples()
        ]
    if flows is not None and len(flows):
        kept_ids = set(samples.loc[samples["kept"], "sample_id"])
        kept = flows[flows["sample_id"].isin(kept_ids)]
        per_flow: dict[str, Mapping[str, Any]] = {}
        for flow, frame in kept.groupby("flow"):
            curve = frame.groupby("layer")["rel_change"].mean()
            per_flow[str(flow)] = {
                "min_mean_rel_change": float(curve.min()),
                "layer_of_min": int(curve.idxmin()),
            }
        summary["flows"] = per_flow
    return summary
