"""Routes the data cannot serve, found before any model is loaded.

A flow names groups and columns; some need the data to provide something (a true option, object
boxes, a value in column ``NAME``: :func:`vlmflow.positions.resolve.data_needs`). When no sample of a
task provides it, the flow cannot be resolved for any sample of that task: a configuration error of
that route for that task, found from the data alone. It is recorded once, as an ``errors`` row
``task:TASK`` (stage ``route``) naming the flow and what the data lacks; the flow is computed for no
sample of the task, and the task's samples compute their other flows. When no flow is left for any
sample, the run is refused before the model is loaded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from vlmflow.data.sample import Sample
from vlmflow.errors import ConfigError
from vlmflow.positions.resolve import data_needs
from vlmflow.positions.routes import Flow
from vlmflow.results.tables import ErrorRow

__all__ = ["RouteProblem", "check_routes", "route_error_rows"]


@dataclass(frozen=True)
class RouteProblem:
    """A flow no sample of ``task`` can resolve, and what the data lacks for it."""

    task: str
    flow: Flow
    lacks: str

    @property
    def message(self) -> str:
        where = f"task {self.task}" if self.task else "the data"
        return f"flow {self.flow} cannot be resolved for any sample of {where}: no sample has {self.lacks}"


def task_of(sample: Sample) -> str:
    """The task name a sample is grouped under ('' when the data names none)."""
    return sample.task_name


def check_routes(samples: Sequence[Sample], flows: Sequence[Flow]) -> list[RouteProblem]:
    """The (task, flow) pairs the data cannot serve; :class:`ConfigError` when no flow is left for any sample.

    >>> from vlmflow.data.sample import TaskType
    >>> qa = [Sample("q1", "i", "What colour is it?", "red", task=TaskType.QUERY_ATTR)]
    >>> [p.message for p in check_routes(qa, [Flow.parse("true_option->last"), Flow.parse("question->last")])]
    ['flow true_option->last cannot be resolved for any sample of task QueryAttr: no sample has a true option']
    """
    by_task: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_task[task_of(sample)].append(sample)
    problems = []
    for task, members in by_task.items():
        for flow in flows:
            needs = [need for route in flow.directed() for expr in (route.source, route.target) for need in data_needs(expr)]
            for what, test in needs:
                if not any(test(s) for s in members):
                    problems.append(RouteProblem(task, flow, what))
                    break
    blocked = {(p.task, str(p.flow)) for p in problems}
    if flows and all((task, str(f)) in blocked for task in by_task for f in flows):
        shown = "; ".join(p.message for p in problems[:4])
        raise ConfigError(f"no flow can be resolved for any sample: {shown}; check the flows against the data's columns (docs/data.md)")
    return problems


def route_error_rows(problems: Sequence[RouteProblem]) -> list[ErrorRow]:
    """One ``errors`` row per problem: sample id ``task:TASK``, stage ``route``, the flow."""
    return [
        ErrorRow(sample_id=f"task:{p.task or 'all'}", stage="route", reason=p.message, flow=str(p.flow)) for p in problems
    ]


def skipped_flows(problems: Sequence[RouteProblem]) -> dict[str, set[str]]:
    """Per task, the flows (as text) to compute for none of its samples."""
    out: dict[str, set[str]] = defaultdict(set)
    for p in problems:
        out[p.task].add(str(p.flow))
    return dict(out)
