"""Run a :class:`~vlmflow.experiments.runner.RunSpec` on a Ray cluster.

The driver (this process) reads the data, opens the run directory exactly as a single-process run
does (:func:`~vlmflow.experiments.runner.open_run`: same name, same ``spec.json`` identity, which
the first replica computes from its loaded model), cuts the samples still to do into shards and
hands them to model replicas (:class:`~vlmflow.distributed.worker.ShardWorker` actors, one model
each, loaded once), one shard at a time per replica so fast replicas take more. Replicas commit
samples into the run directory themselves, so it must be on a filesystem every node sees at the
same path. The driver aggregates progress and finally consolidates the directory
(:func:`~vlmflow.experiments.runner.finish_run`).

Failures: a replica that dies (process killed, node lost) is restarted by Ray and its shard
retried, up to ``max_restarts`` times; the retry skips the samples the dead incarnation had
committed. A replica that stays dead gives its shard back to the others. A Python error in a
shard (not a per-sample :class:`~vlmflow.errors.SampleError`, which becomes an ``errors`` row)
stops the run like it does in a single process; what was committed stays, and a rerun resumes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vlmflow.distributed.cluster import Placement, RayOptions, connected, plan_placement, shard_size_for
from vlmflow.distributed.worker import ProgressTracker, ShardResult, ShardWorker
from vlmflow.errors import RunInterrupted, VlmflowError
from vlmflow.experiments.pending import Work
from vlmflow.experiments.runner import (
    OpenRun,
    ProgressCallback,
    RunOutcome,
    RunSpec,
    announce,
    check_data,
    finish_run,
    load_data,
    open_run,
    run_path,
    run_to_store,
)
from vlmflow.load_spec import LoadSpec

log = logging.getLogger(__name__)


class RayRunError(VlmflowError, RuntimeError):
    """The Ray run could not finish (no replica left, or samples not committed); rerun to resume."""


@dataclass
class RayRunStats:
    """What the last :meth:`RayExecutor.run` did, for logs and tests."""

    shards: int = 0
    shard_size: int = 0
    workers: int = 0
    retried_shards: list[int] = field(default_factory=list)  # shards that found samples already committed
    reassigned_shards: list[int] = field(default_factory=list)  # shards moved off a dead replica
    worker_pids: set[int] = field(default_factory=set)


@dataclass
class _Replica:
    handle: Any
    loading: Any  # ObjectRef of describe(): resolves once the model is loaded
    ready: bool = False
    alive: bool = True


class RayExecutor:
    """Run specs on a Ray cluster with a pool of model replicas kept across runs of the same model.

    >>> from vlmflow.distributed import RayExecutor, RayOptions
    >>> with RayExecutor(RayOptions("auto")) as executor:            # doctest: +SKIP
    ...     for spec in specs:                                        # e.g. one model, six tasks
    ...         outcome = executor.run(spec, "runs", progress=update)
    """

    def __init__(self, options: RayOptions | None = None, *, poll_seconds: float = 0.25) -> None:
        self.options = options or RayOptions()
        self.poll_seconds = poll_seconds
        self.last_stats = RayRunStats()
        self._stack: ExitStack | None = None
        self._ray: Any = None
        self._pool: list[_Replica] = []
        self._pool_key: tuple[LoadSpec, Placement] | None = None

    # --- lifetime --------------------------------------------------------------------------------

    def __enter__(self) -> RayExecutor:
        self._connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the replicas and disconnect (a cluster started for this executor shuts down)."""
        self._kill_pool()
        if self._stack is not None:
            self._stack.close()
            self._stack = None
            self._ray = None

    def _connect(self) -> Any:
        if self._ray is None:
            stack = ExitStack()
            self._ray = stack.enter_context(connected(self.options))
            self._stack = stack
        return self._ray

    @property
    def replicas(self) -> list[Any]:
        """Actor handles of the live replicas (e.g. for ``ray.kill`` in a failure drill)."""
        return [r.handle for r in self._pool if r.alive]

    def start(self, model: LoadSpec, *, wait: bool = True) -> int:
        """Start all replicas of ``model`` now and, with ``wait``, until each has loaded it.

        :meth:`run` starts replicas itself; this is for failing fast on a model that does not load,
        or for having every replica ready before a series of runs. Returns the number of replicas.

        >>> executor.start(LoadSpec("llava-hf/llava-1.5-7b-hf"))   # doctest: +SKIP
        8
        """
        ray = self._connect()
        placement = plan_placement(ray.cluster_resources(), self.options, model.device)
        self._ensure_pool(_replica_model(model, placement), placement, placement.workers)
        if wait:
            for replica in self._pool:
                self._call(replica.loading)
                replica.ready = True
        return len(self._pool)

    # --- running ---------------------------------------------------------------------------------

    def run(self, spec: RunSpec, out: Path | str, *, progress: ProgressCallback | None = None) -> RunOutcome:
        """Run ``spec`` into ``out/<run name>`` on the cluster (resuming it if it exists).

        Same result, run directory and summary as :func:`~vlmflow.experiments.runner.run_to_store`;
        ``out`` must be reachable at the same path from every node.
        """
        from vlmflow.results.lock import check_unlocked

        data = load_data(spec.data)  # bad data fails here, before any replica starts
        check_data(spec.experiment, data[0])
        check_unlocked(run_path(spec, out))  # so does a run directory another process is computing
        ray = self._connect()
        placement = plan_placement(ray.cluster_resources(), self.options, spec.model.device)
        model = _replica_model(spec.model, placement)
        # Start every replica the run can use now (they load in parallel); the first one tells the
        # run's identity, which depends on the loaded model (resolved dtype, checkpoint fingerprint).
        guess = shard_size_for(len(data[0]), placement.workers, self.options.shard_size)
        self._ensure_pool(model, placement, min(placement.workers, math.ceil(len(data[0]) / guess)))
        first = self._pool[0].handle.stored_spec.remote(spec)
        since = time.monotonic()
        while not self._ray.wait([first], timeout=self.poll_seconds * 4)[0]:
            since = self._warn_if_waiting(since)
        stored = self._call(first)
        stored["provenance"]["executor"] = {
            "kind": "ray",
            "cluster": str(self.options.target),
            "workers": placement.workers,
            "worker_gpus": placement.num_gpus,
            "worker_cpus": placement.num_cpus,
        }
        run = open_run(spec, out, stored, data)  # the driver holds the run's lock; replicas commit without it
        try:
            return self._run_open(spec, run, placement, progress)
        finally:
            run.close()

    def _run_open(
        self, spec: RunSpec, run: OpenRun, placement: Placement, progress: ProgressCallback | None
    ) -> RunOutcome:
        size = shard_size_for(len(run.todo), placement.workers, self.options.shard_size)
        shards = [run.todo[i : i + size] for i in range(0, len(run.todo), size)]
        self.last_stats = RayRunStats(shards=len(shards), shard_size=size, workers=len(self._pool))
        started = time.perf_counter()
        announce(run, progress)
        if shards:
            try:
                self._dispatch(spec, str(run.path.resolve()), str(run.images.resolve()), shards, run.done_before, progress)
            except KeyboardInterrupt as exc:
                done = len(run.store.done_sample_ids() & {w.sample.sample_id for w in run.todo})
                raise RunInterrupted(run.path, done=run.done_before + done, total=run.total) from exc
        done = run.store.done_sample_ids()
        missing = [w.sample.sample_id for w in run.todo if w.sample.sample_id not in done]
        if missing:
            raise RayRunError(
                f"{len(missing)} samples were not committed (e.g. {missing[:5]}); rerun the same command to resume"
            )
        computed = len(run.todo)
        return finish_run(run, time.perf_counter() - started, computed)

    def _dispatch(
        self,
        spec: RunSpec,
        run_dir: str,
        images: str,
        shards: Sequence[Sequence[Work]],
        done_before: int,
        progress: ProgressCallback | None,
    ) -> None:
        ray = self._ray
        stats = self.last_stats
        todo = sum(len(s) for s in shards)
        total = done_before + todo
        tracker = ray.remote(ProgressTracker).options(num_cpus=0).remote()
        queue: deque[tuple[int, bool]] = deque((i, False) for i in range(len(shards)))
        in_flight: dict[Any, tuple[_Replica, int]] = {}

        def feed() -> None:
            """Give a shard to every live replica that has loaded its model and is idle.

            A replica still waiting for resources gets nothing: a shard queued on it could wait
            forever while the others are idle.
            """
            self._mark_ready()
            busy = {id(replica) for replica, _ in in_flight.values()}
            for replica in self._pool:
                if queue and replica.alive and replica.ready and id(replica) not in busy:
                    index, recheck = queue.popleft()
                    ref = replica.handle.run_tracked.remote(
                        tracker, index, spec, run_dir, list(shards[index]), images, recheck
                    )
                    in_flight[ref] = (replica, index)

        idle_since = time.monotonic()
        try:
            feed()
            while in_flight or queue:
                if not in_flight:  # nobody can work yet: replicas wait for resources
                    idle_since = self._warn_if_waiting(idle_since)
                    time.sleep(self.poll_seconds)
                    feed()
                    continue
                idle_since = time.monotonic()
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.poll_seconds)
                for ref in ready:
                    replica, index = in_flight.pop(ref)
                    try:
                        result: ShardResult = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        queue.appendleft((index, True))
                        stats.reassigned_shards.append(index)
                        if isinstance(exc, ray.exceptions.ActorUnavailableError):
                            log.warning(
                                "a Ray replica is unreachable (%s); shard %d is tried again", exc, index
                            )
                            continue
                        # Ray restarted it and retried the shard max_restarts times already: retire it.
                        log.warning(
                            "a Ray replica died for good (%s); its shard %d goes to another", exc, index
                        )
                        replica.alive = False
                        if not any(r.alive for r in self._pool):
                            raise RayRunError(
                                "every Ray replica died; what was committed is kept, rerun the same command to resume"
                            ) from exc
                        continue
                    except ray.exceptions.RayTaskError as exc:
                        raise _cause(exc) from None
                    stats.worker_pids.add(result.pid)
                    if result.skipped:
                        stats.retried_shards.append(index)
                feed()
                if progress:
                    progress(done_before + ray.get(tracker.count.remote()), total, "")
        except BaseException:
            self._kill_pool()  # running shards cannot be interrupted otherwise
            raise
        finally:
            ray.kill(tracker)
        if progress:
            progress(total, total, "")

    # --- the replica pool ------------------------------------------------------------------------

    def _ensure_pool(self, model: LoadSpec, placement: Placement, count: int) -> None:
        """At least ``count`` live replicas of ``model`` (a pool of another model is stopped first).

        Does not wait for them to load (they load in parallel); a replica that cannot load raises
        the loading error from its first call.
        """
        if self._pool_key != (model, placement):
            self._kill_pool()
            self._pool_key = (model, placement)
        self._pool = [r for r in self._pool if r.alive]
        if len(self._pool) >= count:
            return
        actor = self._ray.remote(ShardWorker).options(
            num_cpus=placement.num_cpus,
            num_gpus=placement.num_gpus,
            max_restarts=self.options.max_restarts,
            max_task_retries=self.options.max_restarts,
            scheduling_strategy="SPREAD",
        )
        threads = None if placement.uses_gpu else max(1, int(placement.num_cpus))
        log.info("starting %d Ray replicas of %s", count - len(self._pool), model.name)
        for _ in range(count - len(self._pool)):
            handle = actor.remote(model, threads)
            self._pool.append(_Replica(handle, handle.describe.remote()))

    def _mark_ready(self) -> None:
        """Note which replicas have loaded their model (raising a loading error as itself)."""
        loading = [r for r in self._pool if r.alive and not r.ready]
        if not loading:
            return
        done, _ = self._ray.wait([r.loading for r in loading], num_returns=len(loading), timeout=0)
        for replica in loading:
            if replica.loading in done:
                self._call(replica.loading)
                replica.ready = True

    def _warn_if_waiting(self, since: float, every: float = 60.0) -> float:
        """Log, every ``every`` seconds, that no replica could start; return the new reference time."""
        if time.monotonic() - since < every:
            return since
        key = self._pool_key
        need = f"{key[1].num_cpus} CPU, {key[1].num_gpus} GPU" if key else "?"
        log.warning(
            "no Ray replica is ready after %.0f s: still loading the model, or waiting for resources "
            "(each needs %s; available now: %s)",
            time.monotonic() - since,
            need,
            self._ray.available_resources(),
        )
        return time.monotonic()

    def _kill_pool(self) -> None:
        for replica in self._pool:
            try:
                self._ray.kill(replica.handle, no_restart=True)
            except Exception as exc:  # already gone, or the cluster is unreachable
                log.debug("could not kill a replica: %s", exc)
        self._pool = []
        self._pool_key = None

    def _call(self, refs: Any) -> Any:
        """``ray.get`` that surfaces the remote vlmflow error (bad model, refused resume) as itself."""
        ray = self._ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None
        except ray.exceptions.RayActorError as exc:
            self._kill_pool()
            raise RayRunError(f"a Ray replica could not start: {exc}") from exc


def _replica_model(model: LoadSpec, placement: Placement) -> LoadSpec:
    """The model spec replicas load: a local checkpoint by absolute path, an explicit device.

    The run's identity keeps the user's spelling (``spec.model``), so the run directory is the one a
    single-process run would use; this copy only tells replicas (other working directories, one
    visible GPU each) where and how to load.
    """
    name = model.name
    if Path(name).exists():
        name = str(Path(name).resolve())
    device = model.device
    if placement.uses_gpu and device.startswith("cuda:"):
        device = "cuda"  # Ray exposes the replica's GPU as the only visible one
    elif not placement.uses_gpu:
        device = "cpu"
    return replace(model, name=name, device=device)


def _cause(exc: Exception) -> BaseException:
    """The error raised inside a replica when it is one of ours, else the Ray error itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, VlmflowError) else exc


def execute(
    spec: RunSpec,
    out: Path | str,
    *,
    ray: RayOptions | None = None,
    progress: ProgressCallback | None = None,
) -> RunOutcome:
    """Run ``spec`` in this process, or on Ray when ``ray`` is given; same run directory either way.

    >>> execute(spec, "runs")                                           # doctest: +SKIP
    >>> execute(spec, "runs", ray=RayOptions("local", workers=2))       # doctest: +SKIP
    """
    if ray is None:
        return run_to_store(spec, out, progress=progress)
    with RayExecutor(ray) as executor:
        return executor.run(spec, out, progress=progress)
