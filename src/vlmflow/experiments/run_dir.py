"""Opening a run directory for computing, and closing it: what is left to do, and the summary.

:func:`open_run` is where every executor (this process, a Ray cluster) starts: it finds or creates
the run directory (:meth:`RunSpec.run_name <vlmflow.experiments.runner.RunSpec.run_name>`; a run
written before the name left out the flows is found by its identity), records the data's malformed
lines and the routes no sample of a task can resolve (:mod:`vlmflow.experiments.route_check`), and
lists the work left (:mod:`vlmflow.experiments.pending`). :func:`finish_run` summarises and
consolidates the directory (idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmflow.data.sample import Sample
from vlmflow.errors import ConfigError
from vlmflow.experiments.pending import Work, pending
from vlmflow.experiments.route_check import (
    RouteProblem,
    check_routes,
    route_error_rows,
    skipped_flows,
    task_of,
)
from vlmflow.results.tables import ErrorRow

if TYPE_CHECKING:
    from vlmflow.experiments.runner import RunOutcome, RunSpec

log = logging.getLogger(__name__)

#: summary.json lists at most this many error rows (all of them are in errors.parquet).
MAX_SUMMARY_ERRORS = 100


@dataclass
class OpenRun:
    """A run directory opened for computing: its store, the work still to do, and its lock.

    Attributes:
        todo: the work items (:class:`~vlmflow.experiments.pending.Work`), in data order.
        total: all samples of the run.
        tables: the experiment's own tables, written (empty if need be) when the run finishes.
        route_problems: flows no sample of a task can resolve (recorded as ``errors`` rows).
        lock: the :class:`~vlmflow.results.lock.RunLock` held while computing (released by :meth:`close`).
    """

    path: Path
    store: Any  # RunStore (imported lazily)
    todo: list[Work]
    images: Path
    total: int
    tables: tuple[str, ...] = ()
    route_problems: list[RouteProblem] = field(default_factory=list)
    lock: Any = None

    @property
    def done_before(self) -> int:
        """Samples committed before this session (whole samples still to do are not)."""
        return self.total - len({w.sample.sample_id for w in self.todo if not w.extends})

    def close(self) -> None:
        """Release the run directory's lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def open_run(
    spec: RunSpec,
    out: Path | str,
    stored: dict[str, Any],
    data: tuple[list[Sample], list[ErrorRow], Path],
) -> OpenRun:
    """Create or resume the run directory of ``spec`` under ``out`` for ``stored`` (its ``spec.json``),
    holding its lock.

    ``data`` is :func:`~vlmflow.experiments.runner.load_data`'s result. Commits the read errors and
    route errors not yet recorded and returns the work left, in data order. Every executor calls
    :meth:`OpenRun.close` when done (the lock is the coordinator's: other writers of the same run,
    such as Ray replicas, commit without it).

    Raises:
        ConfigError: no flow can be resolved for any sample (found from the data), or the
            directory holds another run.
        RunLockedError: another process is computing this run.
    """
    from vlmflow.results.lock import RunLock
    from vlmflow.results.store import RunStore

    samples, read_errors, images = data
    experiment = spec.experiment
    flows = tuple(getattr(experiment, "flows", ())) if hasattr(experiment, "with_flows") else ()
    problems = check_routes(samples, flows) if flows else []
    for problem in problems:
        log.warning("configuration error: %s", problem.message)
    path = find_run_dir(spec, Path(out))
    lock = RunLock(path)
    lock.acquire()
    try:
        store = RunStore.open(path, stored, growing=spec.growing_keys())
        done = store.done_sample_ids()
        _commit_new_errors(store, [e for e in read_errors if e.sample_id not in done] + route_error_rows(problems))
        skip = skipped_flows(problems)
        todo = pending(store, samples, experiment, skipped=lambda s: skip.get(task_of(s), set()))
        # A new sample of a task every flow of which is a route error has nothing to compute.
        idle = [
            ErrorRow(sample_id=s.sample_id, stage="route", reason=f"no flow of this run can be resolved for task {task_of(s) or 'all'}")
            for s in samples
            if s.sample_id not in done and flows and set(map(str, flows)) <= skip.get(task_of(s), set())
        ]
        _commit_new_errors(store, idle)
    except BaseException:
        lock.release()
        raise
    log.info("%s: %d samples, %d work items left", path, len(samples), len(todo))
    return OpenRun(
        path=path,
        store=store,
        todo=todo,
        images=images,
        total=len(samples),
        tables=tuple(getattr(experiment, "tables", ())),
        route_problems=problems,
        lock=lock,
    )


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


def find_run_dir(spec: RunSpec, out: Path) -> Path:
    """:func:`run_path`; without an explicit name, an existing run of the same identity under ``out``
    whose name was made another way (before growing flow sets, its name hashed the flows too; before
    names began with the experiment, it had no prefix)."""
    path = run_path(spec, out)
    if spec.name or path.exists() or not out.is_dir():
        return path
    from vlmflow.results.identity import identity_of, read_spec, spec_differences, without_keys
    from vlmflow.results.store import SPEC_FILE

    keys = spec.growing_keys()
    wanted = without_keys(spec.identity(), keys)
    prefixes = tuple({name.rsplit("-", 1)[0] + "-" for name in (spec.run_name(), spec.legacy_run_name())})
    for candidate in sorted(out.iterdir()):
        if not candidate.name.startswith(prefixes) or not (candidate / SPEC_FILE).is_file():
            continue
        try:
            stored = without_keys(identity_of(read_spec(candidate / SPEC_FILE)), keys)
        except Exception:  # noqa: BLE001 - an unreadable neighbour is simply not this run
            continue
        # The stored identity holds what the model resolved to (dtype, fingerprint) too: compare
        # the keys this spec knows before loading.
        if not spec_differences(_known(stored, wanted), wanted):
            log.info("resuming %s (a run of the same identity)", candidate)
            return candidate
    return path


def _known(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> Any:
    """``stored`` restricted to the keys ``wanted`` has (recursively)."""
    if not isinstance(stored, Mapping) or not isinstance(wanted, Mapping):
        return stored
    return {k: _known(stored[k], wanted[k]) for k in wanted if k in stored}


def _commit_new_errors(store: Any, rows: list[ErrorRow]) -> None:
    """Commit the error rows whose (sample, flow) is not recorded with the same reason already."""
    if not rows:
        return
    current = store.read("errors")
    known = {(r.sample_id, r.flow, r.reason) for r in current.itertuples()} if len(current) else set()
    fresh = [r for r in rows if (r.sample_id, r.flow, r.reason) not in known]
    if fresh:
        store.commit({"errors": fresh})


def finish_run(run: OpenRun, elapsed: float, computed: int) -> RunOutcome:
    """Summarise and consolidate the run directory (idempotent); the end of every executor.

    The experiment's tables are written even when empty (a run that kept no sample has an empty
    ``flows.parquet``).
    """
    from vlmflow.experiments.runner import RunOutcome

    summary = summarise(run.store, elapsed, computed=computed)
    run.store.finalize(summary, tables=run.tables)
    return RunOutcome(path=run.path, summary=summary)


def summarise(store: Any, elapsed: float, computed: int) -> dict[str, Any]:
    """Counts and accuracy of a run directory (all committed samples, not only this session's).

    ``errors`` counts the samples that failed whole, ``flow_errors`` the (sample, flow) pairs that
    failed while the sample's other flows were computed, ``route_errors`` lists the flows no sample of
    a task can resolve.
    """
    samples = store.read("samples")
    errors = store.read("errors")
    flows = store.read("flows") if "flows" in store.tables() else None
    n = len(samples)
    whole = errors[errors["flow"] == ""] if len(errors) else errors
    routes = errors[(errors["stage"] == "route") & (errors["flow"] != "")] if len(errors) else errors
    summary: dict[str, Any] = {
        "samples": n,
        "correct": int(samples["correct"].sum()) if n else 0,
        "kept": int(samples["kept"].sum()) if n else 0,
        "errors": len(whole),
        "flow_errors": len(errors) - len(whole) - len(routes),
        "route_errors": [str(r) for r in routes["reason"]] if len(routes) else [],
        "flow_rows": 0 if flows is None else len(flows),
        "accuracy": float(samples["correct"].mean()) if n else None,
        "computed_this_session": computed,
        "seconds_this_session": round(elapsed, 3),
    }
    if len(errors):
        summary["errors_by_stage"] = {str(k): int(v) for k, v in errors["stage"].value_counts().items()}
        listed = errors.sort_values(["sample_id", "flow"]).head(MAX_SUMMARY_ERRORS)
        summary["error_rows"] = [
            {"sample_id": str(r.sample_id), "flow": str(r.flow), "stage": str(r.stage), "reason": str(r.reason)}
            for r in listed.itertuples()
        ]
    if flows is not None and len(flows):
        summary["flows"] = _per_flow(samples, flows)
    return summary


def _per_flow(samples: Any, flows: Any) -> dict[str, Mapping[str, Any]]:
    """Per flow, the strongest mean effect over kept samples and where it is."""
    kept_ids = set(samples.loc[samples["kept"], "sample_id"])
    kept = flows[flows["sample_id"].isin(kept_ids)]
    per_flow: dict[str, Mapping[str, Any]] = {}
    for flow, frame in kept.groupby("flow"):
        if set(frame["metric"]) == {"kl"}:
            curve = frame.groupby("layer")["kl"].mean()
            per_flow[str(flow)] = {"max_mean_kl": float(curve.max()), "layer_of_max": int(curve.idxmax())}
        else:
            curve = frame.groupby("layer")["rel_change"].mean()
            per_flow[str(flow)] = {"min_mean_rel_change": float(curve.min()), "layer_of_min": int(curve.idxmin())}
    return per_flow
