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

import hashlib
import json
import logging
import platform
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch

from vlmflow.data.sample import IMAGE_EXTENSIONS, Sample, find_frames, find_image
from vlmflow.errors import ConfigError, RunInterrupted, SampleError
from vlmflow.experiments.batching import batched_tables, free_memory, memory_reason
from vlmflow.experiments.pending import Work, work_tables
from vlmflow.experiments.prepare import PreparedSample, open_visuals, prepare_sample
from vlmflow.experiments.run_dir import (
    MAX_SUMMARY_ERRORS,
    OpenRun,
    check_folder,
    finish_run,
    open_run,
    run_path,
    summarise,
)
from vlmflow.experiments.settings import Engine, FlowSettings
from vlmflow.load_spec import LoadSpec
from vlmflow.loading import LoadedModel, load_model
from vlmflow.notices import notice
from vlmflow.quiet import quiet_libraries
from vlmflow.results.tables import ErrorRow, Row

__all__ = [
    "MAX_SUMMARY_ERRORS",
    "DataSpec",
    "Experiment",
    "ModelSpec",
    "OpenRun",
    "RunOutcome",
    "RunSpec",
    "announce",
    "check_data",
    "check_folder",
    "check_model",
    "finish_run",
    "iter_samples",
    "load_data",
    "open_run",
    "run_path",
    "run_to_store",
    "stored_spec",
    "summarise",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SEED = 0
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

    # Optional: ``tables`` (names written even when empty), ``check_model(loaded)`` (refuse what the
    # model cannot run), ``retry_errors``, and ``flows`` with ``with_flows(flows)`` for a flow set
    # that may grow between sessions (see vlmflow.experiments.pending).


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

    def growing_keys(self) -> tuple[tuple[str, ...], ...]:
        """Identity keys (paths into :meth:`identity`) whose stored value may grow between sessions."""
        from vlmflow.settings import Settings, growing

        return tuple(("settings", key) for key in growing(self.experiment)) if isinstance(self.experiment, Settings) else ()

    def run_name(self) -> str:
        """The run directory's name: ``name`` if given, else ``EXPERIMENT-MODEL-DATA-HASH``.

        The hash is of the identity (:meth:`identity`) without what may grow, so another setting is
        another directory and a rerun with more flows finds the same one.

        >>> RunSpec(LoadSpec("llava-hf/llava-1.5-7b-hf"), DataSpec("gqa:ChooseAttr")).run_name()
        'flows-llava-1.5-7b-hf-gqa-ChooseAttr-...'
        """
        if self.name:
            return self.name
        return f"{_slug(self.experiment.name)}-{self.legacy_run_name()}"

    def legacy_run_name(self) -> str:
        """The name vlmflow gave run directories before it began with the experiment (``MODEL-DATA-HASH``);
        :func:`~vlmflow.experiments.run_dir.run_path` still resumes a directory of that name."""
        if self.name:
            return self.name
        from vlmflow.results.identity import without_keys

        blob = json.dumps(without_keys(self.identity(), self.growing_keys()), sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
        return f"{_slug(self.model.name)}-{_slug(self.data.data)}-{digest}"


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
            if sample.frames is not None:
                find_frames(images, sample.frames)
            else:
                find_image(images, sample.images[0] if sample.images else sample.image_id)
            return
        except SampleError:
            continue
    raise ConfigError(
        f"none of the {len(samples)} samples' images is in {str(images)!r} (e.g. {samples[0].image_id!r} with "
        f"extension {', '.join(IMAGE_EXTENSIONS)}); pass the folder that holds them with --images DIR"
    )


def iter_samples(
    loaded: LoadedModel,
    work: Sequence[Work | Sample],
    images: Path,
    experiment: Experiment,
) -> Iterator[dict[str, list[Row]]]:
    """Yield, per work item (:class:`~vlmflow.experiments.pending.Work`, or a whole sample), the tables
    to commit: the experiment's tables, or an ``errors`` row. An item that extends a computed sample
    yields only the rows it adds; a failure there is an error of each flow it was to add.

    An experiment with ``analyse_batch`` computes whole samples ``batch_size`` at a time
    (:mod:`vlmflow.experiments.batching`; ``None``: chosen from the free accelerator memory, 1 on
    CPU); the tables still come one sample at a time. Extensions of computed samples (added flows)
    go one at a time.
    """
    items = [item if isinstance(item, Work) else Work(item) for item in work]

    def prepare(sample: Sample) -> PreparedSample:
        return prepare_sample(loaded, sample, open_visuals(sample, images))

    size = getattr(experiment, "batch_size", 1)
    whole = all(not item.extends and item.experiment is None for item in items)
    if hasattr(experiment, "analyse_batch") and (size is None or size > 1) and whole:
        yield from batched_tables(loaded, [item.sample for item in items], prepare, experiment, size)
        return
    for item in items:
        sample = item.sample
        current = item.experiment or experiment
        out_of_memory: BaseException | None = None
        try:
            tables = work_tables(item, current.analyse(loaded, prepare(sample)))
        except SampleError as exc:
            log.warning("sample %s skipped at %s: %s", sample.sample_id, exc.stage, exc.reason)
            yield {"errors": _failed(item, current, exc.stage, exc.reason)}
            continue
        except torch.OutOfMemoryError as exc:  # the engine already retried with smaller folds
            out_of_memory = exc
        if out_of_memory is not None:
            # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
            free_memory()
            reason = memory_reason(out_of_memory)
            log.warning("sample %s skipped: %s", sample.sample_id, reason)
            yield {"errors": _failed(item, current, "memory", reason)}
            continue
        yield tables


def _failed(item: Work, experiment: Experiment, stage: str, reason: str) -> list[ErrorRow]:
    """The error rows of a failed work item: the sample's, or, for an extension, one per flow it was to add."""
    sid = item.sample.sample_id
    if not item.extends:
        return [ErrorRow(sample_id=sid, stage=stage, reason=reason)]
    return [ErrorRow(sample_id=sid, stage=stage, reason=reason, flow=str(f)) for f in getattr(experiment, "flows", ())]


def check_data(experiment: Experiment, samples: Sequence[Sample]) -> None:
    """Refuse, before the model is loaded, flows no sample of the data can resolve (see
    :mod:`vlmflow.experiments.route_check`; flows only some tasks cannot resolve are recorded later)."""
    if hasattr(experiment, "with_flows"):
        from vlmflow.experiments.route_check import check_routes

        check_routes(samples, getattr(experiment, "flows", ()))


def check_model(experiment: Experiment, loaded: LoadedModel) -> None:
    """Refuse, before any sample, settings the loaded model cannot run (a window larger than its depth, ...)."""
    check = getattr(experiment, "check_model", None)
    if check is not None:
        check(loaded)


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
    data = load_data(spec.data)
    check_data(spec.experiment, data[0])  # before the model loads
    check_unlocked(run_path(spec, out))  # before minutes of loading a model
    with quiet_libraries():
        loaded = loaded or load_model(spec.model)
        check_model(spec.experiment, loaded)
        report = run_self_test(loaded, spec.experiment.engine) if self_test else None
        torch.manual_seed(SEED)
        run = open_run(spec, out, stored_spec(spec, loaded, report.as_dict() if report is not None else None), data)
        try:
            started = time.perf_counter()
            count, before = 0, run.done_before
            announce(run, progress)
            try:
                for tables in iter_samples(loaded, run.todo, run.images, spec.experiment):
                    run.store.commit(tables)
                    count += 1
                    if progress:
                        progress(min(run.total, before + count), run.total, "")
            except KeyboardInterrupt as exc:
                raise RunInterrupted(run.path, done=before + count, total=run.total) from exc
            return finish_run(run, time.perf_counter() - started, computed=count)
        finally:
            run.close()


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
