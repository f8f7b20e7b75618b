"""The information-flow experiment for one prepared sample.

Per sample: one clean forward with greedy decoding gives the baseline answer and its probability;
the sample is kept when the decoded answer, stripped and lower-cased, equals the gold answer (or
always, with ``keep_all``). Then every flow is resolved for the sample (its routes' expressions,
:mod:`vlmflow.positions.resolve`) into blocked edges (:mod:`vlmflow.positions.edges`: knockout or
keep-only), and knocked out at every point of the window sweep (:mod:`vlmflow.experiments.windows`:
the window style, or the flow's fixed layer range). The metric (:mod:`vlmflow.experiments.metrics`)
turns each knockout's logits into ``rel_change``, the log-probability difference, the KL divergence
and whether the greedy answer changed.

A flow that cannot be resolved for this sample (a group it lacks, an expression that selects
nothing, a route that blocks no edge of the model) is an ``errors`` row for that (sample, flow);
the sample's other flows are computed.

For the ``sequence`` metric the greedy answer ``a_0..a_{R-1}`` is appended to the prompt
(``a_0..a_{R-2}``: teacher forcing), the clean run is repeated on that sequence, and the engine
reads the last ``R`` rows of every knockout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vlmflow.errors import SampleError
from vlmflow.experiments.engines import ENGINES
from vlmflow.experiments.metrics import answer_tokens, effects
from vlmflow.experiments.prepare import PreparedSample
from vlmflow.experiments.settings import FlowSettings, Metric
from vlmflow.experiments.windows import FIXED_RANGE, window_points
from vlmflow.inputs import Encoded
from vlmflow.knockout.clean import CleanRun, clean_run
from vlmflow.knockout.fast import affected_starts
from vlmflow.knockout.spec import Edge, Knockout
from vlmflow.loading import LoadedModel
from vlmflow.positions.edges import keep_only_edges, route_positions
from vlmflow.positions.groups import Group, PositionGroups
from vlmflow.positions.resolve import Resolver
from vlmflow.positions.routes import Flow
from vlmflow.results.tables import ErrorRow, FlowRow, Row, SampleRow

log = logging.getLogger(__name__)


def flow_tables(loaded: LoadedModel, prepared: PreparedSample, settings: FlowSettings) -> dict[str, list[Row]]:
    """Tables for one sample (:meth:`FlowSettings.analyse`): its ``samples`` row, its ``flows`` rows and
    an ``errors`` row per flow it could not compute."""
    result = analyse_sample(loaded, prepared, settings)
    tables: dict[str, list[Row]] = {"samples": [result.sample], "flows": list(result.rows)}
    if result.errors:
        tables["errors"] = list(result.errors)
    return tables


@dataclass
class SampleResult:
    """Rows produced for one sample: its ``samples`` row, its ``flows`` rows and its flows' errors."""

    sample: SampleRow
    rows: list[FlowRow] = field(default_factory=list)
    clean: CleanRun | None = None
    errors: list[ErrorRow] = field(default_factory=list)


@dataclass(frozen=True)
class Point:
    """One knockout of a flow's sweep: the point (x axis), its layers and the knockout itself."""

    flow: Flow
    layer: int
    window: int
    style: str
    knockout: Knockout
    n_source: int
    n_target: int


def baseline(loaded: LoadedModel, prepared: PreparedSample, settings: FlowSettings, capture_from: int) -> tuple[CleanRun, SampleRow]:
    """Clean run with greedy decoding, and the sample row (prediction, correctness, p_base).

    The answer stops at any of the model's stop ids (:attr:`LoadedModel.stop_token_ids`).
    """
    clean = clean_run(
        loaded.decoder,
        prepared.encoded,
        capture_from=capture_from,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=list(loaded.stop_token_ids) or None,
    )
    return clean, sample_row(loaded, prepared, settings, clean)


def sample_row(loaded: LoadedModel, prepared: PreparedSample, settings: FlowSettings, clean: CleanRun) -> SampleRow:
    """The ``samples`` row of a sample's clean run (prediction, correctness, p_base).

    Raises:
        SampleError: the clean forward produced non-finite logits.
    """
    tokenizer = loaded.tokenizer
    _check_finite(clean.logits, "the clean forward")
    log_probs = torch.log_softmax(clean.logits, dim=-1)
    answer_id = int(torch.argmax(clean.logits))
    generated = clean.generated if clean.generated is not None else torch.tensor([answer_id])
    prediction = tokenizer.decode(generated, skip_special_tokens=True).strip()
    sample = prepared.sample
    correct = prediction.lower() == sample.answer.strip().lower()
    return SampleRow(
        sample_id=sample.sample_id,
        task=sample.task_name,
        image_id=sample.image_id,
        question=sample.question,
        answer=sample.answer,
        prediction=prediction,
        correct=correct,
        kept=bool(correct or settings.keep_all),
        answer_token_id=answer_id,
        answer_token=str(tokenizer.convert_ids_to_tokens(answer_id)),
        p_base=float(log_probs[answer_id].exp()),
        seq_len=prepared.encoded.seq_len,
        n_image_tokens=len(prepared.groups[Group.IMAGE]),
        group_sizes=json.dumps(prepared.groups.sizes(), sort_keys=True),
    )


def analyse_sample(loaded: LoadedModel, prepared: PreparedSample, settings: FlowSettings) -> SampleResult:
    """Run the flow experiment on one prepared sample (baseline, then every flow x point)."""
    if settings.metric is Metric.SEQUENCE:
        return _analyse_sequence(loaded, prepared, settings)
    plan, errors = knockout_plan(loaded, prepared, prepared.groups, settings.flows, settings)
    capture_from = clean_capture_start(loaded, prepared.encoded, [p.knockout for p in plan])
    clean, sample_row = baseline(loaded, prepared, settings, capture_from)
    result = SampleResult(sample=sample_row, clean=clean)
    if not sample_row.kept:
        return result
    result.errors = errors
    result.rows = knockout_rows(loaded, prepared, clean, sample_row, plan, settings)
    return result


def _analyse_sequence(loaded: LoadedModel, prepared: PreparedSample, settings: FlowSettings) -> SampleResult:
    """The sequence metric: baseline, then the greedy answer teacher-forced under every knockout."""
    n = prepared.encoded.seq_len
    clean, sample_row = baseline(loaded, prepared, settings, capture_from=n - 1)
    result = SampleResult(sample=sample_row, clean=clean)
    if not sample_row.kept:
        return result
    assert clean.generated is not None
    answer = answer_tokens(clean.generated.tolist(), loaded.stop_token_ids)
    if not answer:
        raise SampleError("the greedy answer is empty (the model stops at once), so the sequence metric has nothing to read", stage="answer")
    extended = loaded.inputs.append_tokens(prepared.encoded, answer[:-1])
    answer_rows = tuple(range(n, extended.seq_len))
    plan, result.errors = knockout_plan(
        loaded, prepared, prepared.groups, settings.flows, settings, answer_rows=answer_rows, encoded=extended
    )
    capture_from = clean_capture_start(loaded, extended, [p.knockout for p in plan])
    clean_answer = clean_run(loaded.decoder, extended, capture_from=capture_from, read_rows=len(answer))
    _check_finite(clean_answer.row_logits, "the clean teacher-forced forward")
    result.rows = knockout_rows(loaded, prepared, clean_answer, sample_row, plan, settings, answer=answer, encoded=extended)
    return result


def clean_capture_start(loaded: LoadedModel, encoded: Encoded, knockouts: Sequence[Knockout]) -> int:
    """First position whose clean states the fast engine needs kept for ``knockouts``.

    Positions before the first one any knockout can change keep their clean states (see
    :func:`~vlmflow.knockout.fast.affected_starts`; with bidirectional image blocks this can be before
    the first target).
    """
    pattern = loaded.decoder.attention_pattern(encoded)
    starts = affected_starts(pattern, loaded.n_layers, encoded.seq_len, list(knockouts))
    return min((s for s in starts if s >= 0), default=max(0, encoded.seq_len - 1))


def knockout_plan(
    loaded: LoadedModel,
    prepared: PreparedSample,
    groups: PositionGroups,
    flows: Sequence[Flow],
    settings: FlowSettings,
    *,
    answer_rows: Sequence[int] = (),
    encoded: Encoded | None = None,
) -> tuple[list[Point], list[ErrorRow]]:
    """The points of every flow that resolves for this sample, flows outermost, and an ``errors`` row
    (stage ``groups`` or ``knockout``) for each flow that does not.

    ``groups`` are the sample's position groups (``prepared.groups``, or another draw of them);
    ``encoded``: the sequence the knockouts run on (default the prompt; for the sequence metric the
    prompt with the answer appended, whose ``answer_rows`` stand with the last position).
    """
    encoded = encoded or prepared.encoded
    n_layers = loaded.n_layers
    k = settings.window_for(n_layers)
    sweep = window_points(settings.window_style, k, n_layers)
    resolver = Resolver(prepared, groups)
    plan: list[Point] = []
    errors: list[ErrorRow] = []
    for flow in flows:
        try:
            pairs = route_positions(flow, resolver, answer_rows=answer_rows)
            edges = keep_only_edges(pairs, encoded.seq_len) if flow.keep_only else tuple(pairs)
            check_blocks_something(loaded, encoded, flow, edges)
        except SampleError as exc:
            log.info("sample %s, flow %s: %s", prepared.sample.sample_id, flow, exc.reason)
            errors.append(ErrorRow(sample_id=prepared.sample.sample_id, stage=exc.stage, reason=exc.reason, flow=str(flow)))
            continue
        n_source = len({p for _, sources in pairs for p in sources})
        n_target = len({p for targets, _ in pairs for p in targets})
        if flow.layers is not None:
            first, last = flow.layers
            points = [(first, tuple(range(first, last + 1)), last - first + 1, FIXED_RANGE)]
        else:
            size = k if settings.window_style.uses_window else 0
            points = [(point, layers, size, settings.window_style.value) for point, layers in sweep]
        for point, layers, size, style in points:
            knockout = Knockout(edges=edges, layers=layers)
            plan.append(Point(flow, point, size, style, knockout, n_source, n_target))
    return plan, errors


def knockout_rows(
    loaded: LoadedModel,
    prepared: PreparedSample,
    clean: CleanRun,
    sample_row: SampleRow,
    plan: Sequence[Point],
    settings: FlowSettings,
    *,
    answer: Sequence[int] | None = None,
    encoded: Encoded | None = None,
) -> list[FlowRow]:
    """One ``flows`` row per point of ``plan``, in plan order.

    ``clean`` and ``sample_row`` come from :func:`baseline`; ``settings`` gives the engine, the
    metric and the window recorded in the rows. For the sequence metric, ``answer`` is the greedy
    answer, ``encoded`` the prompt with it appended and ``clean`` the clean run on that.

    >>> rows = knockout_rows(loaded, prepared, clean, row, plan, FlowSettings())   # doctest: +SKIP
    """
    if not plan:
        return []
    encoded = encoded or prepared.encoded
    knockouts = [p.knockout for p in plan]
    rows_read = len(answer) if answer is not None else None
    engine = ENGINES[settings.engine]
    logits = engine.knockout_logits(loaded, encoded, clean, knockouts, settings.max_fold_queries, rows=rows_read)
    return rows_of_logits(loaded, prepared, clean, sample_row, plan, settings, logits, answer=answer)


def rows_of_logits(
    loaded: LoadedModel,
    prepared: PreparedSample,
    clean: CleanRun,
    sample_row: SampleRow,
    plan: Sequence[Point],
    settings: FlowSettings,
    logits: torch.Tensor,
    *,
    answer: Sequence[int] | None = None,
) -> list[FlowRow]:
    """The ``flows`` rows of ``plan`` from the knockouts' ``logits``: ``[len(plan), vocab]`` at the last
    position, or ``[len(plan), R, vocab]`` at the rows of a teacher-forced ``answer`` of ``R`` tokens.

    Raises:
        SampleError: a knockout's logits are not finite.
    """
    finite = torch.isfinite(logits).reshape(len(plan), -1).all(dim=1)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0])
        raise SampleError(
            f"a knockout forward produced non-finite logits (first at flow {plan[bad].flow}, layer {plan[bad].layer}: "
            f"{_non_finite(logits[bad])})",
            stage="knockout",
        )
    if answer is None:
        clean_logits, read = clean.logits, [sample_row.answer_token_id]
    else:
        clean_logits, read = clean.read_rows_logits(len(answer)), list(answer)
    effect = effects(settings.metric, clean_logits, logits, read)
    p_blocked, rel, diff = effect.p_blocked.tolist(), effect.rel_change.tolist(), effect.logprob_diff.tolist()
    changed, blocked_token, kl = effect.answer_changed.tolist(), effect.blocked_token.tolist(), effect.kl.tolist()
    rows: list[FlowRow] = []
    for i, point in enumerate(plan):
        rows.append(
            FlowRow(
                sample_id=prepared.sample.sample_id,
                task=sample_row.task,
                flow=point.flow,
                layer=point.layer,
                layers_blocked=list(point.knockout.layers),
                window=point.window,
                p_base=effect.p_base,
                p_blocked=p_blocked[i],
                rel_change=rel[i],
                logprob_diff=diff[i],
                answer_changed=bool(changed[i]),
                answer_token_id=sample_row.answer_token_id,
                blocked_token_id=int(blocked_token[i]),
                n_source=point.n_source,
                n_target=point.n_target,
                engine=str(settings.engine),
                metric=settings.metric.value,
                window_style=point.style,
                kl=kl[i],
                n_answer_tokens=effect.n_tokens,
            )
        )
    return rows


def _check_finite(logits: torch.Tensor | None, what: str) -> None:
    if logits is not None and not bool(torch.isfinite(logits).all()):
        raise SampleError(f"{what} produced non-finite logits ({_non_finite(logits)})", stage="forward")


def _non_finite(logits: torch.Tensor) -> str:
    """``"3 NaN and 0 infinite of 32000 values; finite logits are expected (float16 overflows: use bfloat16 or float32)"``."""
    nan = int(torch.isnan(logits).sum())
    inf = int(torch.isinf(logits).sum())
    return (
        f"{nan} NaN and {inf} infinite of {logits.numel()} values; finite logits are expected "
        "(float16 overflows easily: use bfloat16 or float32)"
    )


def check_blocks_something(loaded: LoadedModel, encoded: Encoded, flow: Flow, edges: Sequence[Edge]) -> None:
    """Raise :class:`SampleError` (stage ``knockout``) when ``edges`` exist in no layer of the clean
    model (e.g. sources after targets): the knockout would be a no-op.

    Every layer is checked: with sliding windows an edge may exist in full-attention layers only.
    """
    probe = Knockout(edges=tuple(edges), layers=(0,))
    targets = sorted({p for t, _ in edges for p in t})
    if targets:
        rows = torch.as_tensor(targets).to(loaded.device)
        blocked = probe.blocked_rows(rows, encoded.seq_len)
        pattern = loaded.decoder.attention_pattern(encoded)
        if any(bool((pattern.allowed(layer, rows, encoded.seq_len) & blocked).any()) for layer in range(loaded.n_layers)):
            return
    what = "keeps every edge its targets have" if flow.keep_only else "blocks no attention edge of this model"
    raise SampleError(
        f"flow {flow} {what} (its targets never attend to what it would block), so its knockout would change nothing",
        stage="knockout",
    )
