"""The stage order of one model x task, the study-level rules, and the evaluation of a cell (every
rule, in checklist order) and of a study."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vlmflow.analysis.claims.checklist import CLAIMS, STUDY_CLAIMS, ClaimResult, ClaimThresholds, Status
from vlmflow.analysis.claims.flow_rules import (
    _baseline_accuracy,
    _baseline_capitalized,
    _image_question,
    _near_zero,
    _other_question,
    _question_last,
    _random_control,
    _related_question,
)
from vlmflow.analysis.claims.landmarks import (
    I2L,
    I2Q,
    L2L,
    Q2L,
    R2Q,
    _lens_readout,
    _lower_dip,
    _middle_dip,
    _middle_layer,
    _not_run,
    _peak,
    _result,
    _rise,
)
from vlmflow.analysis.claims.lens_rules import (
    _lens_capitalized_last,
    _lens_low,
    _lens_lowercase_first,
    _lens_true_false,
)
from vlmflow.analysis.evidence import CellEvidence


def _ordering(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["ordering"]
    q2l = ev.flows.get(Q2L)
    if q2l is None or I2Q not in ev.flows:
        return _not_run(claim, f"needs flows {I2Q} and {Q2L}")
    lower = _lower_dip(th, ev)
    if lower is None:
        return _result(claim, [("a lower-layer Image↛Question dip exists", False)], "no lower-layer Image↛Question dip", {})
    stages = [("whole-image dip", lower.layer)]
    related = ev.flows.get(R2Q)
    middle, _ = _middle_layer(th, ev, related) if related is not None else (getattr(_middle_dip(th, ev), "layer", None), "")
    if middle is not None:
        stages.append(("object-specific dip", middle))
    stages.append(("Question↛Last", _peak(q2l)))
    readout = _lens_readout(ev)
    lower_lens = ev.lens.get((readout or "", "answer"))
    rise = _rise(lower_lens, th) if lower_lens is not None else None
    cond: list[tuple[str, bool | None]] = []
    for (a, la), (b, lb) in zip(stages, stages[1:], strict=False):
        cond.append((f"{a} (layer {la}) before {b} (layer {lb})", la < lb))
    if lower_lens is None:
        cond.append(("answer emerges after Question↛Last (lens not run)", None))
    else:
        cond.append((f"answer emerges (layer {rise}) at or after Question↛Last (layer {stages[-1][1]})", rise is not None and rise >= stages[-1][1]))
    order = "; ".join(f"{name} at layer {layer}" for name, layer in stages) + (
        f"; answer rises at lens layer {rise}" if rise is not None else ""
    )
    return _result(claim, cond, order, {name: layer for name, layer in stages} | {"answer_rise": rise})


RULES: dict[str, Callable[[ClaimThresholds, CellEvidence], ClaimResult]] = {
    "baseline-accuracy": _baseline_accuracy,
    "baseline-capitalized": _baseline_capitalized,
    "question-last": _question_last,
    "image-last": _near_zero("image-last", I2L, lambda th: th.near_zero),
    "last-last": _near_zero("last-last", L2L, lambda th: th.zero),
    "image-question": _image_question,
    "other-question": _other_question,
    "related-question": _related_question,
    "random-control": _random_control,
    "lens-low": _lens_low,
    "lens-lowercase-first": _lens_lowercase_first,
    "lens-capitalized-last": _lens_capitalized_last,
    "lens-true-false": _lens_true_false,
    "ordering": _ordering,
}


def evaluate_cell(ev: CellEvidence, thresholds: ClaimThresholds | None = None) -> list[ClaimResult]:
    """Every per-model-and-task claim, in checklist order.

    >>> [r.status.value for r in evaluate_cell(CellEvidence("m", "t"))][:2]
    ['not run', 'not run']
    """
    th = thresholds or ClaimThresholds()
    return [rule(th, ev) for rule in RULES.values()]


def evaluate_study(
    cells: Sequence[CellEvidence],
    results: dict[tuple[str, str], list[ClaimResult]],
    thresholds: ClaimThresholds | None = None,
    variants: Sequence[tuple[str, str]] = (),
) -> list[ClaimResult]:
    """The study-level claims from every cell's evidence and results.

    ``variants`` lists pairs of model labels that are the same checkpoint with and without
    HD/pad tokens (for ``nohd-nopad``).
    """
    th = thresholds or ClaimThresholds()
    return [_consistency(th, cells, results), _nohd(results, variants)]


def _consistency(th: ClaimThresholds, cells: Sequence[CellEvidence], results: dict[tuple[str, str], list[ClaimResult]]) -> ClaimResult:
    claim = STUDY_CLAIMS["consistency"]
    ordering = {key: next(r for r in rs if r.claim.id == "ordering") for key, rs in results.items()}
    evaluated = {key: r for key, r in ordering.items() if r.status is not Status.NOT_RUN}
    if not evaluated:
        return _not_run(claim, "'ordering' was not evaluated for any model x task")
    failing = sorted(f"{m}/{t}" for (m, t), r in evaluated.items() if r.status is Status.FAILS)
    cond: list[tuple[str, bool | None]] = [
        (f"ordering holds in {len(evaluated) - len(failing)}/{len(evaluated)} model x task" + (f" (not: {', '.join(failing)})" if failing else ""), not failing)
    ]
    numbers: dict[str, Any] = {"ordering_fails": failing}
    models = {c.model for c in cells}
    if len(models) < 2:
        cond.append(("peak layers scale with depth across models (one model only)", None))
    else:
        spreads = {}
        for task in sorted({c.task for c in cells}):
            for name, locate in (("question-last peak", lambda c: _peak(c.flows[Q2L]) if Q2L in c.flows else None),
                                 ("first image-question dip", lambda c: getattr(_lower_dip(th, c), "layer", None))):  # fmt: skip
                depths = {}
                for c in cells:
                    if c.task != task:
                        continue
                    layer = locate(c)
                    if layer is not None and c.depth:
                        depths[c.model] = layer / max(c.depth - 1, 1)
                if len(depths) >= 2:
                    spreads[f"{task} {name}"] = (max(depths.values()) - min(depths.values()), depths)
        if spreads:
            worst = max(spreads.items(), key=lambda kv: kv[1][0])
            cond.append((f"relative depths differ by at most {worst[1][0]:.2f} ({worst[0]}) <= {th.depth_spread}", worst[1][0] <= th.depth_spread))
            numbers["relative_depths"] = {k: v[1] for k, v in spreads.items()}
        else:
            cond.append(("peak layers scale with depth (no task with two models' peaks)", None))
    evidence = "; ".join(text for text, _ in cond)
    return _result(claim, cond, evidence, numbers)


def _nohd(results: dict[tuple[str, str], list[ClaimResult]], variants: Sequence[tuple[str, str]]) -> ClaimResult:
    claim = STUDY_CLAIMS["nohd-nopad"]
    if not variants:
        return _not_run(claim, "needs the same LLaVA-1.6/NeXT checkpoint twice with different image_mode")
    cond: list[tuple[str, bool | None]] = []
    for a, b in variants:
        tasks = sorted({t for m, t in results if m == a} & {t for m, t in results if m == b})
        for task in tasks:
            sa = {r.claim.id: r.status for r in results[(a, task)]}
            sb = {r.claim.id: r.status for r in results[(b, task)]}
            differ = sorted(k for k in sa if sa[k] != sb.get(k))
            cond.append((f"{a} vs {b} on {task}: " + (f"differ on {', '.join(differ)}" if differ else "same conclusions"), not differ))
    if not cond:
        return _not_run(claim, "the two variants share no task")
    return _result(claim, cond, "; ".join(t for t, _ in cond), {})
