"""Run a whole study (models x tasks x experiments) resumably into one study directory.

For every model (loaded once) and every task, up to three runs go through the ordinary runner
(:func:`~vlmflow.experiments.runner.run_to_store`), each into its own run directory:

* ``flows``: the configured flows with the model's window;
* ``controls``: the size-matched random-patch control of every ``related->TARGET`` flow;
* ``lens``: the answer-emergence readout.

Every run resumes where it stopped (finished samples are skipped), so rerunning ``reproduce`` after
an interruption, or with more models or tasks in the config, computes only what is missing. A model
that cannot be loaded is recorded in the manifest with the reason and the study goes on with the
others; data problems (a missing file or images folder) stop the study before any model is loaded.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmflow.data.sample import Sample
from vlmflow.errors import ConfigError, VlmflowError
from vlmflow.experiments.runner import DataSpec, Experiment, RunSpec, load_data, run_to_store
from vlmflow.experiments.settings import ControlSettings, FlowSettings, LensSettings
from vlmflow.loading import LoadedModel, load_model
from vlmflow.results.store import RunStore
from vlmflow.study.config import ModelEntry, StudyConfig, TaskEntry
from vlmflow.study.directory import StudyDir, run_key
from vlmflow.study.viewer import write_viewer

if TYPE_CHECKING:
    from vlmflow.distributed import RayExecutor, RayOptions

log = logging.getLogger(__name__)

#: ``(done, total, message)`` for the samples of the current run; ``message`` names the run.
Progress = Callable[[int, int, str], None]
Loader = Callable[[ModelEntry], LoadedModel]


@dataclass
class StudyOutcome:
    """What a :func:`reproduce` call did."""

    path: Path
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedTask:
    """A task with its data spec resolved (synthetic sets generated) and its samples read."""

    entry: TaskEntry
    data: DataSpec
    samples: list[Sample]
    images: Path


def planned_runs(config: StudyConfig) -> list[tuple[ModelEntry, TaskEntry, str]]:
    """``(model, task, experiment)`` for every run the study makes, in run order.

    >>> from vlmflow.study.config import parse_config
    >>> cfg = parse_config({"models": ["m"], "tasks": ["gqa:QueryAttr"], "controls": False})
    >>> [e for _, _, e in planned_runs(cfg)]
    ['flows', 'lens']
    """
    experiments = []
    if config.flows:
        experiments.append("flows")
    if config.controls is not None and config.control_flows:
        experiments.append("controls")
    if config.lens is not None:
        experiments.append("lens")
    return [(m, t, e) for m in config.models for t in config.tasks for e in experiments]


def experiment_settings(config: StudyConfig, experiment: str, window: int) -> Experiment:
    """The runner settings of one experiment of the study, with the model's window."""
    common = {"keep_all": config.keep_all, "max_new_tokens": config.max_new_tokens}
    knockout = FlowSettings(window=window, engine=config.engine, **common)
    if experiment == "flows":
        return replace(knockout, flows=config.flows)
    if experiment == "controls":
        assert config.controls is not None
        targets = tuple(dict.fromkeys(f.target for f in config.control_flows))
        return ControlSettings(targets=targets, draws=config.controls.random_draws, flow_settings=knockout)
    if experiment == "lens":
        assert config.lens is not None
        return LensSettings(readouts=config.lens.readouts, top_k=config.lens.top_k, **common)
    raise ConfigError(f"unknown experiment {experiment!r}; valid: flows, controls, lens")


def resolve_tasks(config: StudyConfig, study: StudyDir) -> dict[str, ResolvedTask]:
    """Generate synthetic scene sets and read every task's samples; :class:`ConfigError` on bad data."""
    resolved = {}
    for task in config.tasks:
        if task.synthetic is not None:
            csv = generate_scenes(task, study.data_dir(task.label))
            spec = task.data_spec(data=str(csv), images=str(csv.parent))
        else:
            spec = task.data_spec()
        try:
            samples, _errors, images = load_data(spec)
        except ConfigError as exc:
            raise ConfigError(f"task {task.label!r}: {exc}") from None
        resolved[task.label] = ResolvedTask(task, spec, samples, images)
    return resolved


def generate_scenes(task: TaskEntry, folder: Path) -> Path:
    """Write the task's synthetic scene set into ``folder`` (once; deterministic in its seed) and
    return its CSV."""
    assert task.synthetic is not None
    try:
        from vlmflow.data.scene_sets import write_scene_set
    except ImportError:
        raise ConfigError(
            f"task {task.label!r} asks for synthetic scenes, but this vlmflow has no scene generator "
            "(vlmflow.data.scene_sets)"
        ) from None
    syn = task.synthetic
    done = folder / ".complete"  # written last: a set cut short by a crash is written again
    if not done.is_file():
        written = write_scene_set(folder, syn.n, syn.seed, tasks=(syn.task,))
        done.write_text(written[syn.task].name)
    return folder / done.read_text().strip()


def reproduce(
    config: StudyConfig,
    out: Path | str,
    *,
    progress: Progress | None = None,
    loader: Loader | None = None,
    ray: RayOptions | None = None,
) -> StudyOutcome:
    """Run every model x task x experiment of ``config`` into the study directory ``out``.

    ``loader`` loads a model entry (default: its ``spec.load()``); tests pass one
    that returns cached models. With ``ray`` the runs' samples are computed by model replicas on a
    Ray cluster (one pool per model, kept across its runs; see ``docs/scale-out.md``); this process
    still loads each model once, for its layer count and the report's sample viewer.

    >>> outcome = reproduce(load_config("organism.yaml"), "studies/organism")   # doctest: +SKIP
    >>> outcome.failed                                                         # doctest: +SKIP
    {}
    """
    study = StudyDir(Path(out))
    manifest = study.manifest()
    manifest.update(name=config.name, config=dict(config.raw))
    study.write_manifest(manifest)
    tasks = resolve_tasks(config, study)
    outcome = StudyOutcome(path=study.path)
    plan = planned_runs(config)
    with ExitStack() as stack:
        executor = None
        if ray is not None:
            from vlmflow.distributed import RayExecutor

            executor = stack.enter_context(RayExecutor(ray))
        for model in config.models:
            _reproduce_model(config, model, plan, tasks, study, outcome, progress, loader, executor)
    return outcome


def _reproduce_model(
    config: StudyConfig,
    model: ModelEntry,
    plan: list[tuple[ModelEntry, TaskEntry, str]],
    tasks: dict[str, ResolvedTask],
    study: StudyDir,
    outcome: StudyOutcome,
    progress: Progress | None,
    loader: Loader | None,
    executor: RayExecutor | None,
) -> None:
    """Every run of one model entry (``executor``: a RayExecutor, or None for this process)."""
    runs = [(t, e) for m, t, e in plan if m is model]
    try:
        loaded = loader(model) if loader is not None else load_model(model.spec)
    except VlmflowError as exc:
        log.error("model %s cannot be loaded: %s", model.label, exc)
        for task, experiment in runs:
            key = run_key(model.label, task.label, experiment)
            outcome.failed[key] = f"model cannot be loaded: {exc}"
            study.record(key, _entry(model, task, experiment, study, status="failed", reason=outcome.failed[key]))
        return
    window = config.window_for(model, loaded.n_layers)
    for task, experiment in runs:
        key = run_key(model.label, task.label, experiment)
        resolved = tasks[task.label]
        spec = RunSpec(model.spec, resolved.data, experiment_settings(config, experiment, window), name=experiment)
        folder = study.run_path(model.label, task.label, experiment).parent

        def report(done: int, total: int, message: str, key: str = key) -> None:
            if progress:
                progress(done, total, key)

        try:
            if executor is None:
                result = run_to_store(spec, folder, progress=report, loaded=loaded)
            else:
                result = executor.run(spec, folder, progress=report)
        except VlmflowError as exc:
            log.error("run %s failed: %s", key, exc)
            outcome.failed[key] = str(exc)
            study.record(key, _entry(model, task, experiment, study, status="failed", reason=str(exc)))
            continue
        entry = _entry(model, task, experiment, study, status="done", summary=result.summary)
        entry.update(n_layers=loaded.n_layers, window=window, model_info=_model_info(loaded))
        outcome.runs[key] = entry
        study.record(key, entry)
    for task in config.tasks:
        _viewer(config, study, model, tasks[task.label], loaded)
    del loaded
    gc.collect()
    _empty_cuda_cache()


def _entry(model: ModelEntry, task: TaskEntry, experiment: str, study: StudyDir, **extra: Any) -> dict[str, Any]:
    path = study.run_path(model.label, task.label, experiment)
    return {
        "model": model.label,
        "model_name": model.model,
        "image_mode": model.image_mode,
        "patch_rule": model.spec.patch_rule or "overlap",
        "task": task.label,
        "experiment": experiment,
        "path": str(path.relative_to(study.path)),
        **extra,
    }


def _model_info(loaded: LoadedModel) -> dict[str, Any]:
    keep = ("name", "family", "dtype", "device", "prompt_template", "fingerprint", "revision", "patch_rule", "stop_token_ids")
    return {k: v for k, v in loaded.info.items() if k in keep}


def _viewer(config: StudyConfig, study: StudyDir, model: ModelEntry, task: ResolvedTask, loaded: LoadedModel) -> None:
    """Viewer records of the first kept samples (or the first samples when none is kept)."""
    n = config.report.viewer_samples
    if n == 0:
        return
    predictions: dict[str, dict[str, Any]] = {}
    for experiment in ("flows", "lens", "controls"):
        path = study.run_path(model.label, task.entry.label, experiment)
        if (path / "spec.json").is_file():
            frame = RunStore.load(path).read("samples")
            predictions = {str(r["sample_id"]): r for r in frame.to_dict("records")}
            break
    kept = [s for s in task.samples if predictions.get(s.sample_id, {}).get("kept")]
    chosen = (kept or task.samples)[:n]
    write_viewer(loaded, chosen, task.images, study.viewer_dir(model.label, task.entry.label), predictions)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
