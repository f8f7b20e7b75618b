"""The paper's information-flow experiment for one prepared sample.

Per sample: one clean forward with greedy decoding gives the baseline answer token ``a`` and its
probability ``p_base`` (softmax over the full vocabulary at the last position); the sample is kept
when the decoded answer, stripped and lower-cased, equals the gold answer (or always, with
``keep_all``). Then, for every flow and every window centre, the knockout's probability of the same
token gives ``rel_change = 100 * (p_blocked - p_base) / p_base``, the log-probability difference and
whether the greedy token changed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vlmflow.errors import SampleError
from vlmflow.experiments.engines import ENGINES
from vlmflow.experiments.prepare import PreparedSample
from vlmflow.experiments.settings import FlowSettings
from vlmflow.experiments.windows import sweep
from vlmflow.knockout.clean import CleanRun, clean_run
from vlmflow.knockout.fast import affected_starts
from vlmflow.knockout.spec import Knockout
from vlmflow.loading import LoadedModel
from vlmflow.positions.groups import Flow, Group, PositionGroups
from vlmflow.results.tables import FlowRow, Row, SampleRow

log = logging.getLogger(__name__)


def flow_tables(loaded: LoadedModel, prepared: PreparedSample, settings: FlowSettings) -> dict[str, list[Row]]:
    """Tables for one sample (:meth:`FlowSettings.analyse`): its ``samples`` row and its ``flows`` rows."""
    result = analyse_sample(loaded, prepared, settings)
    return {"samples": [result.sample], "flows": result.rows}


@dataclass
class SampleResult:
    """Rows produced for one sample: its ``samples`` row and its ``flows`` rows."""

    sample: SampleRow
    rows: list[FlowRow] = field(default_factory=list)
    clean: CleanRun | None = None


def check_flows_available(groups: PositionGroups, flows: Sequence[Flow]) -> None:
    """Raise :class:`SampleError` (stage ``groups``) if a flow's group is missing for this sample."""
    for flow in flows:
        for group in (flow.source, flow.target):
            groups[group]  # raises with the reason


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
    if not bool(torch.isfinite(clean.logits).all()):
        raise SampleError(f"the clean forward produced non-finite logits ({_non_finite(clean.logits)})", stage="forward")
    log_probs = torch.log_softmax(clean.logits, dim=-1)
    answer_id = int(torch.argmax(clean.logits))
    generated = clean.generated if clean.generated is not None else torch.tensor([answer_id])
    prediction = tokenizer.decode(generated, skip_special_tokens=True).strip()
    sample = prepared.sample
    correct = prediction.lower() == sample.answer.strip().lower()
    return SampleRow(
        sample_id=sample.sample_id,
        task=sample.task.value if sample.task else "",
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
    """Run the flow experiment on one prepared sample (baseline, then every flow x window)."""
    plan = knockout_plan(loaded, prepared, prepared.groups, settings.flows, settings.window_for(loaded.n_layers))
    capture_from = clean_capture_start(loaded, prepared, [knockout for _, _, knockout in plan])
    clean, sample_row = baseline(loaded, prepared, settings, capture_from)
    result = SampleResult(sample=sample_row, clean=clean)
    if not sample_row.kept:
        return result
    result.rows = knockout_rows(loaded, prepared, clean, sample_row, plan, settings)
    return result


def clean_capture_start(loaded: LoadedModel, prepared: PreparedSample, knockouts: Sequence[Knockout]) -> int:
    """First position whose clean states the fast engine needs kept for ``knockouts``.

    Positions before the first one any knockout can change keep their clean states (see
    :func:`~vlmflow.knockout.fast.affected_starts`; with bidirectional image blocks this can be before
    the first target).
    """
    pattern = loaded.decoder.attention_pattern(prepared.encoded)
    starts = affected_starts(pattern, loaded.n_layers, prepared.encoded.seq_len, list(knockouts))
    return min((s for s in starts if s >= 0), default=0)


def knockout_plan(
    loaded: LoadedModel, prepared: PreparedSample, groups: PositionGroups, flows: Sequence[Flow], k: int
) -> list[tuple[Flow, int, Knockout]]:
    """``(flow, centre, knockout)`` for every flow and window centre, flows outermost.

    ``groups`` are the sample's position groups (``prepared.groups``, or another draw of them).

    Raises:
        SampleError: a flow's group is missing for this sample, or a flow blocks no attention edge.
    """
    check_flows_available(groups, flows)
    plan: list[tuple[Flow, int, Knockout]] = []
    for flow in flows:
        for center, layers in sweep(k, loaded.n_layers):
            plan.append((flow, center, Knockout.for_flows(groups, [flow], layers)))
        _check_flow_blocks_something(loaded, prepared, flow, plan[-1][2])
    return plan


def knockout_rows(
    loaded: LoadedModel,
    prepared: PreparedSample,
    clean: CleanRun,
    sample_row: SampleRow,
    plan: Sequence[tuple[Flow, int, Knockout]],
    settings: FlowSettings,
) -> list[FlowRow]:
    """One ``flows`` row per ``(flow, centre, knockout)`` of ``plan``, in plan order.

    ``clean`` and ``sample_row`` come from :func:`baseline`; ``settings`` gives the engine and the
    window size recorded in the rows.

    >>> rows = knockout_rows(loaded, prepared, clean, row, plan, FlowSettings())   # doctest: +SKIP
    """
    knockouts = [knockout for _, _, knockout in plan]
    logits = ENGINES[settings.engine].knockout_logits(loaded, prepared.encoded, clean, knockouts, settings.max_fold_queries)
    return rows_of_logits(loaded, prepared, clean, sample_row, plan, settings, logits)


def rows_of_logits(
    loaded: LoadedModel,
    prepared: PreparedSample,
    clean: CleanRun,
    sample_row: SampleRow,
    plan: Sequence[tuple[Flow, int, Knockout]],
    settings: FlowSettings,
    logits: torch.Tensor,
) -> list[FlowRow]:
    """The ``flows`` rows of ``plan`` from the knockouts' last-position ``logits [len(plan), vocab]``.

    Raises:
        SampleError: a knockout's logits are not finite.
    """
    k = settings.window_for(loaded.n_layers)
    if not bool(torch.isfinite(logits).all()):
        bad = int(torch.nonzero(~torch.isfinite(logits).all(dim=-1))[0])
        flow, center, _ = plan[bad]
        raise SampleError(
            f"a knockout forward produced non-finite logits (first at flow {flow}, layer {center}: "
            f"{_non_finite(logits[bad])})",
            stage="knockout",
        )
    answer_id = sample_row.answer_token_id
    logp_base = torch.log_softmax(clean.logits.cpu(), dim=-1)[answer_id]
    logp = torch.log_softmax(logits, dim=-1)[:, answer_id]  # [n_knockouts]
    top = torch.argmax(logits, dim=-1)
    p_base = float(logp_base.exp())
    rows: list[FlowRow] = []
    for i, (flow, center, knockout) in enumerate(plan):
        p_blocked = float(logp[i].exp())
        target, source = knockout.edges[0]
        rows.append(
            FlowRow(
                sample_id=prepared.sample.sample_id,
                task=sample_row.task,
                flow=flow,
                layer=center,
                layers_blocked=list(knockout.layers),
                window=k,
                p_base=p_base,
                p_blocked=p_blocked,
                rel_change=100.0 * (p_blocked - p_base) / p_base,
                logprob_diff=float(logp[i] - logp_base),
                answer_changed=int(top[i]) != answer_id,
                answer_token_id=answer_id,
                blocked_token_id=int(top[i]),
                n_source=len(source),
                n_target=len(target),
                engine=str(settings.engine),
            )
        )
    return rows


def _non_finite(logits: torch.Tensor) -> str:
    """``"3 NaN and 0 infinite of 32000 values; finite logits are expected (float16 overflows: use bfloat16 or float32)"``."""
    nan = int(torch.isnan(logits).sum())
    inf = int(torch.isinf(logits).sum())
    return (
        f"{nan} NaN and {inf} infinite of {logits.numel()} values; finite logits are expected "
        "(float16 overflows easily: use bfloat16 or float32)"
    )


def _check_flow_blocks_something(loaded: LoadedModel, prepared: PreparedSample, flow: Flow, knockout: Knockout) -> None:
    """A flow whose edges exist in no layer of the clean model (sources after targets) would be a no-op.

    Every layer is checked: with sliding windows an edge may exist in full-attention layers only.
    """
    encoded = prepared.encoded
    targets = torch.as_tensor(knockout.edges[0][0]).to(loaded.device)
    blocked = knockout.blocked_rows(targets, encoded.seq_len)
    pattern = loaded.decoder.attention_pattern(encoded)
    if not any(
        bool((pattern.allowed(layer, targets, encoded.seq_len) & blocked).any()) for layer in range(loaded.n_layers)
    ):
        raise SampleError(
            f"flow {flow} blocks no attention edge of this model ({flow.target.value} positions never attend to "
            f"{flow.source.value} positions), so its knockout would change nothing",
            stage="knockout",
        )
