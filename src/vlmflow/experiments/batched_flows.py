"""The flow experiment (and its random-patch control) for several samples at once.

Per batch: one clean pass for all samples (:func:`~vlmflow.knockout.clean.clean_runs`: their prompts
padded into one batch, each decoded greedily to its own answer), then the kept samples' knockouts
through the engine together (:meth:`~vlmflow.experiments.engines.KnockoutEngine.knockout_logits_batch`:
the folds of different samples share each layer call). Every sample's rows are computed from its
own clean run and its own logits with the same functions as one sample alone
(:func:`~vlmflow.experiments.flows.sample_row`, :func:`~vlmflow.experiments.flows.rows_of_logits`),
so they are the rows batch size 1 gives.

A problem with one sample is that sample's outcome (a :class:`SampleError` in its place); the
other samples' results are kept. Errors that cannot be pinned on one sample (out of memory, say)
propagate: the runner then splits the batch (:mod:`vlmflow.experiments.batching`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlmflow.errors import SampleError
from vlmflow.experiments.controls import control_plan
from vlmflow.experiments.engines import ENGINES
from vlmflow.experiments.flows import (
    Point,
    SampleResult,
    clean_capture_start,
    flow_tables,
    knockout_plan,
    rows_of_logits,
    sample_row,
)
from vlmflow.experiments.prepare import PreparedSample
from vlmflow.experiments.settings import ControlSettings, FlowSettings, Metric
from vlmflow.knockout.clean import clean_runs
from vlmflow.knockout.fast import FoldRequest
from vlmflow.loading import LoadedModel
from vlmflow.results.tables import ControlRow, ErrorRow, Row

__all__ = ["analyse_samples", "control_tables_batch", "flow_tables_batch", "knockout_results"]

#: The knockout points of one sample, as :func:`~vlmflow.experiments.flows.knockout_plan` makes them.
Plan = list[Point]
Tables = dict[str, list[Row]]


@dataclass(frozen=True)
class _Live:
    """A sample whose plan was made: its index in the batch, its prepared inputs, plan and flow errors."""

    index: int
    prepared: PreparedSample
    plan: Plan
    errors: list[ErrorRow]


def knockout_results(
    loaded: LoadedModel,
    prepared: Sequence[PreparedSample],
    plans: Sequence[tuple[Plan, list[ErrorRow]] | SampleError],
    settings: FlowSettings,
) -> list[SampleResult | SampleError]:
    """Per sample, its :class:`SampleResult` (samples row, and flows rows and flow errors when kept) or its error.

    ``plans[i]`` is sample ``i``'s knockouts and the ``errors`` rows of its flows that could not be
    planned (or the :class:`SampleError` making them raised). The first-token metric only (the
    sequence metric runs sample by sample).

    >>> results = knockout_results(loaded, prepared, [knockout_plan(...) for ...], FlowSettings())   # doctest: +SKIP
    """
    out: list[SampleResult | SampleError | None] = [p if isinstance(p, SampleError) else None for p in plans]
    live = [_Live(i, prepared[i], *p) for i, p in enumerate(plans) if not isinstance(p, SampleError)]
    if live:
        captures = [clean_capture_start(loaded, item.prepared.encoded, [p.knockout for p in item.plan]) for item in live]
        cleans = clean_runs(
            loaded.decoder,
            [item.prepared.encoded for item in live],
            capture_from=captures,
            max_new_tokens=settings.max_new_tokens,
            stop_ids=frozenset(loaded.stop_token_ids),
        )
        kept = []
        for item, clean in zip(live, cleans, strict=True):
            try:
                result = SampleResult(sample=sample_row(loaded, item.prepared, settings, clean), clean=clean)
            except SampleError as exc:
                out[item.index] = exc
                continue
            out[item.index] = result
            if result.sample.kept:
                result.errors = list(item.errors)
                if item.plan:
                    kept.append((item, result))
        requests = [FoldRequest(item.prepared.encoded, result.clean, [p.knockout for p in item.plan]) for item, result in kept]
        logits = ENGINES[settings.engine].knockout_logits_batch(loaded, requests, settings.max_fold_queries) if kept else []
        for (item, result), found in zip(kept, logits, strict=True):
            try:
                if isinstance(found, SampleError):
                    raise found
                result.rows = rows_of_logits(loaded, item.prepared, result.clean, result.sample, item.plan, settings, found)
            except SampleError as exc:
                out[item.index] = exc
    return [o for o in out if o is not None]


def _plan_or_error(loaded: LoadedModel, prepared: PreparedSample, settings: FlowSettings) -> tuple[Plan, list[ErrorRow]] | SampleError:
    try:
        return knockout_plan(loaded, prepared, prepared.groups, settings.flows, settings)
    except SampleError as exc:
        return exc


def analyse_samples(
    loaded: LoadedModel, prepared: Sequence[PreparedSample], settings: FlowSettings
) -> list[SampleResult | SampleError]:
    """The flow experiment on several prepared samples at once (per sample: its result or its error).

    >>> results = analyse_samples(loaded, [a, b, c], FlowSettings(batch_size=3))   # doctest: +SKIP
    """
    return knockout_results(loaded, prepared, [_plan_or_error(loaded, p, settings) for p in prepared], settings)


def flow_tables_batch(loaded: LoadedModel, prepared: Sequence[PreparedSample], settings: FlowSettings) -> list[Tables | SampleError]:
    """Per sample, its ``samples`` and ``flows`` rows (:meth:`FlowSettings.analyse_batch`), or its error."""
    out: list[Tables | SampleError] = []
    if settings.metric is Metric.SEQUENCE:  # its teacher-forced clean run and knockouts go sample by sample
        for item in prepared:
            try:
                out.append(flow_tables(loaded, item, settings))
            except SampleError as exc:
                out.append(exc)
        return out
    for r in analyse_samples(loaded, prepared, settings):
        if isinstance(r, SampleError):
            out.append(r)
            continue
        tables: Tables = {"samples": [r.sample], "flows": list(r.rows)}
        if r.errors:
            tables["errors"] = list(r.errors)
        out.append(tables)
    return out


def control_tables_batch(
    loaded: LoadedModel, prepared: Sequence[PreparedSample], control: ControlSettings
) -> list[Tables | SampleError]:
    """Per sample, its ``samples`` and ``controls`` rows (:meth:`ControlSettings.analyse_batch`), or its error."""
    plans: list[tuple[Plan, list[ErrorRow]] | SampleError] = []
    draws: list[list[int]] = []
    for item in prepared:
        try:
            plan, draw_of = control_plan(loaded, item, control)
            plans.append((plan, []))
        except SampleError as exc:
            plans.append(exc)
            draw_of = []
        draws.append(draw_of)
    out: list[Tables | SampleError] = []
    for result, draw_of in zip(knockout_results(loaded, prepared, plans, control.flow_settings), draws, strict=True):
        if isinstance(result, SampleError):
            out.append(result)
            continue
        tables: Tables = {"samples": [result.sample]}
        if result.sample.kept:
            tables["controls"] = [ControlRow.of(r, draw=d) for r, d in zip(result.rows, draw_of, strict=True)]
        out.append(tables)
    return out
