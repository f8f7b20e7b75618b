"""What a run directory still has to compute: new samples, retried errors, flows a sample lacks.

A rerun of the same run (same identity) computes only what is missing:

* a sample with no row yet: the whole sample;
* with ``retry_errors``: a sample recorded as an error (the whole sample again), and a flow of a
  computed sample recorded as an error (that flow only);
* for an experiment whose flow set may grow (``FlowSettings.flows`` is declared ``identity="grows"``):
  the flows a computed, kept sample has neither rows nor an error for (a flow added since).

A work item for a computed sample is an *extension*: the experiment runs restricted to the missing
flows (the clean pass is repeated, deterministically), and only its ``flows`` and ``errors`` rows
are committed (the store accepts rows added to a computed sample, never a second ``samples`` row).
Flows no sample of a task can resolve (:mod:`vlmflow.experiments.route_check`) are left out of
every item of that task's samples.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from vlmflow.data.sample import Sample

__all__ = ["Work", "pending", "work_tables"]


@dataclass(frozen=True)
class Work:
    """One sample to compute.

    Attributes:
        sample: the sample.
        experiment: the experiment to run on it (``None``: the run's; else restricted to some flows).
        extends: the sample is computed already: only rows of more flows are added.
    """

    sample: Sample
    experiment: Any = None
    extends: bool = False


def pending(
    store: Any,
    samples: Sequence[Sample],
    experiment: Any,
    *,
    skipped: Callable[[Sample], Collection[str]] | None = None,
) -> list[Work]:
    """The work left in ``store`` (a :class:`~vlmflow.results.store.RunStore`) for ``samples``, in data order.

    ``skipped(sample)``: the flows (as text) not to compute for that sample. A sample left with no
    flow to compute gets no work item (the caller records why).
    """
    retry = bool(getattr(experiment, "retry_errors", False))
    done = store.done_sample_ids()
    errored = store.error_sample_ids() if retry else set()
    grows = hasattr(experiment, "with_flows")
    have: dict[str, set[str]] = {}
    kept: set[str] = set()
    if grows:
        have = store.flow_keys("flows")
        if not retry:  # a flow recorded as an error counts as done unless errors are retried
            for sid, flows in store.flow_errors().items():
                have.setdefault(sid, set()).update(flows)
        computed = store.read("samples", columns=["sample_id", "kept"])
        kept = set(computed.loc[computed["kept"], "sample_id"])
    out: list[Work] = []
    for sample in samples:
        sid = sample.sample_id
        skip = set(skipped(sample)) if skipped is not None else set()
        fresh = sid not in done or sid in errored
        if not grows:
            if fresh:
                out.append(Work(sample))
            continue
        if fresh:
            wanted = tuple(f for f in experiment.flows if str(f) not in skip)
        elif sid in kept:
            wanted = tuple(f for f in experiment.flows if str(f) not in have.get(sid, set()) and str(f) not in skip)
        else:
            continue  # computed, not kept: no flows are computed for it
        if not wanted:
            continue
        restricted = None if len(wanted) == len(experiment.flows) and fresh else experiment.with_flows(wanted)
        out.append(Work(sample, restricted, extends=not fresh))
    return out


def work_tables(work: Work, tables: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The tables to commit for ``work``: an extension drops the sample's ``samples`` row (committed already).

    >>> work_tables(Work(sample=None, extends=True), {"samples": ["s"], "flows": ["f"], "errors": []})
    {'flows': ['f']}
    """
    if not work.extends:
        return tables
    return {name: rows for name, rows in tables.items() if name != "samples" and rows}
