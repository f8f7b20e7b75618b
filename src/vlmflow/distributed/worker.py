"""One model replica: loads the model once and computes shards of samples into a run directory.

:class:`ShardWorker` is plain Python (testable without Ray); the executor wraps it as a Ray actor.
Every committed sample goes through the same :class:`~vlmflow.results.store.RunStore` a
single-process run uses, so the run directory does not depend on who computed what.

Why a retried shard cannot duplicate rows: a replica opens its store for a run directory on its
first shard there and reads which samples are already committed (by anyone) at that moment. A
replica that is restarted after a crash starts with no stores, so the retried shard re-reads the
directory and skips what the dead incarnation committed. The driver asks for the same re-read
(``recheck``) when it moves a shard from a dead replica to another one. Shards are disjoint, so
replicas never race for a sample.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmflow.data.sample import Sample
from vlmflow.errors import VlmflowError
from vlmflow.experiments.pending import Work, pending
from vlmflow.experiments.runner import RunSpec, iter_samples, stored_spec
from vlmflow.experiments.settings import Engine
from vlmflow.load_spec import LoadSpec
from vlmflow.loading import LoadedModel, load_model

log = logging.getLogger(__name__)

#: Called with the sample ids just committed (the driver's progress tracker).
CommitCallback = Callable[[list[str]], None]


@dataclass
class ShardResult:
    """What one shard did: sample ids committed, ids skipped as already committed, and by whom."""

    shard: int
    committed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    pid: int = 0
    host: str = ""


class ShardWorker:
    """A loaded model that computes shards of a run (one per Ray actor; one per GPU on GPU nodes).

    >>> worker = ShardWorker(LoadSpec("tiny-llava", device="cpu"))                    # doctest: +SKIP
    >>> worker.run_shard(0, spec, "runs/tiny-x", samples, "images").committed          # doctest: +SKIP
    ['q1', 'q2']
    """

    def __init__(self, model: LoadSpec, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        # Ray forwards a replica's output to the driver: loading bars there would garble its progress bar.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self._stores: dict[str, Any] = {}  # run directory -> RunStore opened by this incarnation
        self._load_error: VlmflowError | None = None
        self._self_tests: dict[Engine, dict[str, Any]] = {}  # engine -> self-test report
        try:
            self._loaded: LoadedModel | None = load_model(model)
        except VlmflowError as exc:
            # Raised from the first call instead: a constructor error would reach the driver as a bare
            # "actor died" without the message that says what to fix.
            self._loaded, self._load_error = None, exc

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            assert self._load_error is not None
            raise self._load_error
        return self._loaded

    def describe(self) -> dict[str, Any]:
        """Where this replica runs: process id, host and the loaded model's provenance."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "model_info": dict(self.loaded.info)}

    def stored_spec(self, spec: RunSpec) -> dict[str, Any]:
        """The ``spec.json`` content of ``spec`` on this replica's model (identity + provenance).

        Every replica runs the knockout self-test once per engine before its first sample, on its own
        device and kernel (a replica whose masks do not reach the kernel must not compute anything).
        """
        from vlmflow.experiments.selftest import run_self_test

        engine = spec.experiment.engine
        if engine not in self._self_tests:
            self._self_tests[engine] = run_self_test(self.loaded, engine).as_dict()
        return stored_spec(spec, self.loaded, self._self_tests[engine])

    def run_shard(
        self,
        shard: int,
        spec: RunSpec,
        run_dir: str,
        samples: Sequence[Work | Sample],
        images: str,
        *,
        recheck: bool = False,
        on_commit: CommitCallback | None = None,
    ) -> ShardResult:
        """Compute the work items ``samples`` of ``spec`` into ``run_dir`` (an absolute path every node sees).

        Items no longer pending are skipped when this replica opens the directory for the first
        time or when ``recheck`` is set (see the module docstring).
        """
        from vlmflow.results.store import RunStore

        store = self._stores.get(run_dir)
        fresh = store is None
        if store is None:
            # Identity check: a replica whose model resolves differently (dtype, checkpoint) refuses.
            store = RunStore.open(run_dir, self.stored_spec(spec), growing=spec.growing_keys())
            self._stores[run_dir] = store
        result = ShardResult(shard=shard, pid=os.getpid(), host=socket.gethostname())
        todo = [item if isinstance(item, Work) else Work(item) for item in samples]
        if fresh or recheck:
            still = {w.sample.sample_id for w in pending(store, [w.sample for w in todo], spec.experiment)}
            result.skipped = [w.sample.sample_id for w in todo if w.sample.sample_id not in still]
            todo = [w for w in todo if w.sample.sample_id in still]
            if result.skipped:
                log.info("shard %d: %d samples already committed, skipped", shard, len(result.skipped))
        for tables in iter_samples(self.loaded, todo, Path(images), spec.experiment):
            store.commit(tables)
            ids = sorted({row.sample_id for name in ("samples", "errors") for row in tables.get(name, ())})
            result.committed.extend(ids)
            if on_commit is not None:
                on_commit(ids)
        return result

    def run_tracked(
        self,
        tracker: Any,
        shard: int,
        spec: RunSpec,
        run_dir: str,
        samples: Sequence[Sample],
        images: str,
        recheck: bool,
    ) -> ShardResult:
        """:meth:`run_shard` reporting each commit to a :class:`ProgressTracker` actor (fire and forget)."""
        return self.run_shard(
            shard,
            spec,
            run_dir,
            samples,
            images,
            recheck=recheck,
            on_commit=lambda ids: tracker.add.remote(ids),
        )


class ProgressTracker:
    """Sample ids committed during a run, as reported by the replicas (a Ray actor in the driver's job).

    A set, so a report repeated by a retried task counts once.

    >>> tracker = ProgressTracker(); tracker.add(["q1", "q2"]); tracker.add(["q2"]); tracker.count()
    2
    """

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def add(self, ids: list[str]) -> None:
        self._ids.update(ids)

    def count(self) -> int:
        return len(self._ids)

    def reset(self) -> None:
        self._ids.clear()
