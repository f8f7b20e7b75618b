"""The paper's claims checklist (its replication spec, section 10), evaluated from the results.

Every claim is a rule over the curves of :mod:`vlmflow.analysis.evidence` with explicit thresholds
(:class:`ClaimThresholds`, settable in the study config under ``claims:``). Each evaluation gives
``holds``, ``does not hold`` or ``not run`` (an experiment or flow the rule needs is missing), the
conditions it checked, and the numbers. ``docs/study.md`` states every rule in words.

Conventions used by the rules:

* flow curves are mean relative changes of the answer probability (%), negative = a drop; the
  *drop* at a layer is ``-mean``. A *significant* drop has its 95% bootstrap interval below zero.
* relative depth of a window centre ``l`` of an ``L``-layer model is ``l / (L - 1)``; of a lens
  point ``j`` it is ``j / L``. "Lowest layers" are below ``lower_band``, "middle" inside
  ``middle_band``, "upper" at or above ``upper_band``.
* dips are found by :func:`vlmflow.analysis.stats.find_dips` (deep enough, significant, and
  separated by a recovery of at least ``separation`` of the shallower dip).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from vlmflow.analysis.evidence import EITHER_ANSWER, EITHER_FALSE, CellEvidence, capitalization
from vlmflow.analysis.stats import Curve, Dip, find_dips
from vlmflow.errors import ConfigError
from vlmflow.positions.groups import PAPER_FLOWS, Flow

#: The paper's six flows, in its order.
Q2L, I2L, L2L, I2Q, R2Q, O2Q = PAPER_FLOWS


class Status(StrEnum):
    """Outcome of one claim."""

    HOLDS = "holds"
    FAILS = "does not hold"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class ClaimThresholds:
    """Numbers the rules compare against (percentages are of the answer probability).

    Attributes:
        majority_accuracy: baseline: "most questions answered correctly" means accuracy >= this.
        capitalized_share: baseline: the first token is the capitalised answer in >= this share.
        pronounced_drop: a "pronounced dip" is a mean drop of at least this many %.
        dip: a dip counts when its mean drop is at least this many % (and significant).
        near_zero: "near zero (at most a few %)": ``|mean|`` below this at every layer.
        zero: "about 0 everywhere": ``|mean|`` below this at every layer.
        exact_zero: "exactly 0": ``|rel_change|`` of every sample below this (a window confined to
            the last layer, measured only when one exists, i.e. window 1).
        small_fraction: a curve is "small" somewhere when ``|mean|`` there is at most this fraction
            of its largest drop; it "has started" where the drop reaches this fraction.
        separation: how much a curve must recover between two dips for them to be separate.
        lower_band / middle_band / upper_band: relative-depth bands (see the module docstring).
        prob_floor: lens: "about 0" probability (%); a form that never reaches it never "rises".
        rise_fraction: lens: a form rises at the first layer where it reaches this fraction of its
            own maximum.
        option_ratio: lens: "true option >> false option" means at least this ratio at the top.
        depth_spread: cross-model: peak layers "scale with depth" when their relative depths
            differ by at most this much.
    """

    majority_accuracy: float = 0.5
    capitalized_share: float = 0.5
    pronounced_drop: float = 10.0
    dip: float = 5.0
    near_zero: float = 5.0
    zero: float = 2.0
    exact_zero: float = 1e-3
    small_fraction: float = 0.5
    separation: float = 0.5
    lower_band: float = 0.25
    middle_band: tuple[float, float] = (0.15, 0.7)
    upper_band: float = 0.75
    prob_floor: float = 1.0
    rise_fraction: float = 0.5
    option_ratio: float = 5.0
    depth_spread: float = 0.15

    def __post_init__(self) -> None:
        lo, hi = self.middle_band
        if not (0.0 <= lo < hi <= 1.0 and 0.0 < self.lower_band < 1.0 and 0.0 < self.upper_band <= 1.0):
            raise ConfigError(
                f"claims bands must be relative depths in [0, 1] with middle_band low < high; got lower_band="
                f"{self.lower_band}, middle_band={self.middle_band}, upper_band={self.upper_band}"
            )
        if not 0.0 < self.separation < 1.0 or not 0.0 < self.small_fraction < 1.0 or not 0.0 < self.rise_fraction <= 1.0:
            raise ConfigError("claims separation, small_fraction and rise_fraction must lie in (0, 1)")


@dataclass(frozen=True)
class Claim:
    """One line of the checklist: identifier, the paper's wording, and the rule in words."""

    id: str
    text: str
    rule: str


@dataclass
class ClaimResult:
    """A claim evaluated on one model x task (or on the whole study).

    ``conditions`` lists ``(condition in words, passed or None if it could not be checked)``;
    ``numbers`` holds the evidence as plain numbers (JSON-able).
    """

    claim: Claim
    status: Status
    evidence: str
    conditions: list[tuple[str, bool | None]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.claim.id,
            "claim": self.claim.text,
            "status": self.status.value,
            "evidence": self.evidence,
            "conditions": [{"condition": c, "passed": p} for c, p in self.conditions],
            "numbers": self.numbers,
        }


CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in (
        Claim(
            "baseline-accuracy",
            "Baseline: with the exact prompt and greedy decoding, most questions are answered correctly.",
            "accuracy (exact match of the decoded answer) >= majority_accuracy.",
        ),
        Claim(
            "baseline-capitalized",
            "Baseline: the first generated token is the capitalised answer's first sub-token (Vicuna).",
            "among correctly answered samples, the share whose first generated token is the first sub-token of "
            "answer.capitalize() >= capitalized_share (needs the lens run, which records the token ids).",
        ),
        Claim(
            "question-last",
            "Question↛Last: a pronounced dip confined to a middle/upper band of layers; it starts after the "
            "Image↛Question stages and is small in the lowest and top layers.",
            "largest drop >= pronounced_drop and significant; its layer at relative depth >= lower_band; |mean| at "
            "the lowest and the top layer <= small_fraction x the largest drop; the drop starts (first layer "
            "reaching small_fraction of it) after the first Image↛Question dip (when that flow was run).",
        ),
        Claim(
            "image-last",
            "Image↛Last: near zero at all layers (at most a few %).",
            "|mean| <= near_zero at every layer.",
        ),
        Claim("last-last", "Last↛Last: about 0 everywhere.", "|mean| <= zero at every layer."),
        Claim(
            "image-question",
            "Image↛Question: two separate dips, a larger one in the lowest layers and a second one in the middle "
            "layers; back to about 0 in the upper layers, exactly 0 for a window confined to the last layer.",
            "at least two separate dips (find_dips with dip, separation); the first at relative depth <= "
            "lower_band and the deepest; a later one inside middle_band; |mean| <= near_zero at relative depth >= "
            "upper_band; every sample's |change| <= exact_zero for a window confined to the last layer (checked "
            "only when such a window exists, i.e. window 1).",
        ),
        Claim(
            "other-question",
            "Other Image Patches↛Question carries the lower-layer dip.",
            "at the lower-layer dip (the first Image↛Question dip, else Other's largest drop below lower_band) "
            "Other's drop >= dip and significant, and larger than Related's there (when run).",
        ),
        Claim(
            "related-question",
            "Related Image Patches↛Question carries the middle-layer dip, although it blocks far fewer tokens.",
            "at the middle-layer dip (the Image↛Question dip inside middle_band, else Related's largest drop "
            "there) Related's drop >= dip and significant, and at least Other's there (when run); Related blocks "
            "fewer tokens than Other (reported).",
        ),
        Claim(
            "random-control",
            "Control (not in the paper): related patches matter more than as many random non-related patches.",
            "at the middle-layer dip, Related's drop is >= dip and related minus size-matched random (paired by "
            "sample, random averaged over draws) is negative with its interval below zero.",
        ),
        Claim(
            "lens-low",
            "Logit lens (last position, no final norm below the top): answer probability about 0 in lower layers.",
            "raw readout: the answer's probability (either case, per sample) <= prob_floor at every layer of "
            "relative depth < lower_band.",
        ),
        Claim(
            "lens-lowercase-first",
            "Logit lens: the lowercase form rises first, in the middle/upper layers after the Question→Last transfer.",
            "the lowercase answer rises (reaches rise_fraction of its maximum, which is >= prob_floor) at relative "
            "depth >= lower_band, before the capitalised form rises (or the capitalised form never does), and "
            "after the Question↛Last drop has started (when run).",
        ),
        Claim(
            "lens-capitalized-last",
            "Logit lens: the capitalised form overtakes in the last few layers.",
            "at the top layer the capitalised form is more probable than the lowercase one, and it stays ahead "
            "from a layer at relative depth >= upper_band on.",
        ),
        Claim(
            "lens-true-false",
            "Logit lens: true option >> false option for Choose tasks.",
            "at the top layer, P(answer, either case) >= option_ratio x P(false option, either case) and >= "
            "prob_floor; not run for tasks without a false option.",
        ),
        Claim(
            "ordering",
            "Stage order: whole-image (lower) dip, then the object-specific (middle) dip, then Question→Last, "
            "then the answer emerges.",
            "first Image↛Question dip < the middle-layer dip (when found) < Question↛Last's largest drop <= the "
            "layer where the lowercase answer rises (lens, when run).",
        ),
    )
}

STUDY_CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in (
        Claim(
            "consistency",
            "The same ordering holds for all models and tasks; layer positions scale with depth.",
            "'ordering' holds for every model x task where it was evaluated; per task, the relative depths of "
            "Question↛Last's largest drop and of the first Image↛Question dip differ across models by at most "
            "depth_spread (needs two models).",
        ),
        Claim(
            "nohd-nopad",
            "Sanity: with noHD_noPad, LLaVA-1.6/NeXT use 576 tokens and the conclusions survive.",
            "two model entries with the same checkpoint and different image_mode: every claim has the same status "
            "for both, on every task.",
        ),
    )
}


# --- helpers ----------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x:+.1f}%"


def _at(curve: Curve, layer: int) -> str:
    mean, low, high = curve.at(layer)
    return f"{_pct(mean)} [{low:+.1f}, {high:+.1f}] at layer {layer}"


def _result(claim: Claim, conditions: list[tuple[str, bool | None]], evidence: str, numbers: dict[str, Any]) -> ClaimResult:
    checked = [p for _, p in conditions if p is not None]
    status = Status.HOLDS if checked and all(checked) else Status.FAILS
    return ClaimResult(claim, status, evidence, conditions, numbers)


def _not_run(claim: Claim, why: str) -> ClaimResult:
    return ClaimResult(claim, Status.NOT_RUN, why)


def _peak(curve: Curve) -> int:
    return int(curve.layers[int(np.argmin(curve.mean))])


def _onset(curve: Curve, fraction: float) -> int:
    """First layer where the drop reaches ``fraction`` of the largest drop."""
    peak = float(curve.mean.min())
    hit = np.flatnonzero(curve.mean <= fraction * peak)
    return int(curve.layers[hit[0]])


def _in(curve: Curve, layer: float, band: tuple[float, float]) -> bool:
    return band[0] <= curve.relative(layer) <= band[1]


def _lower_dip(th: ClaimThresholds, ev: CellEvidence) -> Dip | None:
    curve = ev.flows.get(I2Q)
    if curve is None:
        return None
    dips = find_dips(curve, th.dip, th.separation)
    return dips[0] if dips and curve.relative(dips[0].layer) <= th.lower_band else None


def _middle_dip(th: ClaimThresholds, ev: CellEvidence) -> Dip | None:
    curve = ev.flows.get(I2Q)
    if curve is None:
        return None
    dips = find_dips(curve, th.dip, th.separation)
    lower = _lower_dip(th, ev)
    later = [d for d in dips if (lower is None or d.layer > lower.layer) and _in(curve, d.layer, th.middle_band)]
    return later[0] if later else None


def _band_peak(curve: Curve, band: tuple[float, float]) -> int | None:
    inside = [i for i, layer in enumerate(curve.layers) if band[0] <= curve.relative(layer) <= band[1]]
    if not inside:
        return None
    return int(curve.layers[min(inside, key=lambda i: curve.mean[i])])


def _rise(curve: Curve, th: ClaimThresholds) -> int | None:
    """First lens layer where the curve reaches rise_fraction of its maximum (None: it never rises)."""
    top = float(curve.mean.max())
    if top < th.prob_floor:
        return None
    return int(curve.layers[np.flatnonzero(curve.mean >= th.rise_fraction * top)[0]])


def _lens_readout(ev: CellEvidence) -> str | None:
    readouts = {r for r, _ in ev.lens}
    return "raw" if "raw" in readouts else (sorted(readouts)[0] if readouts else None)


# --- per model x task rules ----------------------------------------------------------------------------------


def _baseline_accuracy(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["baseline-accuracy"]
    if ev.samples is None or ev.samples.empty:
        return _not_run(claim, "no samples were run")
    n, correct = len(ev.samples), int(ev.samples["correct"].sum())
    acc = correct / n
    cond = [(f"accuracy {acc:.0%} >= {th.majority_accuracy:.0%}", acc >= th.majority_accuracy)]
    return _result(claim, cond, f"accuracy {acc:.1%} ({correct}/{n})", {"accuracy": acc, "correct": correct, "samples": n})


def _baseline_capitalized(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["baseline-capitalized"]
    counts = capitalization(ev)
    if counts is None or counts["samples"] == 0:
        return _not_run(claim, "needs the lens run (it records the generated and the capitalised token ids)")
    share = counts["capitalized"] / counts["samples"]
    cond = [(f"capitalised share {share:.0%} >= {th.capitalized_share:.0%}", share >= th.capitalized_share)]
    evidence = (
        f"first token capitalised in {counts['capitalized']}/{counts['samples']} kept samples ({share:.0%}), "
        f"lowercase in {counts['lowercase']}"
    )
    return _result(claim, cond, evidence, {**counts, "share": share})


def _question_last(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["question-last"]
    curve = ev.flows.get(Q2L)
    if curve is None:
        return _not_run(claim, f"flow {Q2L} was not run")
    peak = _peak(curve)
    mean, low, high = curve.at(peak)
    drop = -mean
    first, last = float(curve.mean[0]), float(curve.mean[-1])
    cond: list[tuple[str, bool | None]] = [
        (f"largest drop {drop:.1f}% >= {th.pronounced_drop}% and significant", drop >= th.pronounced_drop and high < 0),
        (f"at relative depth {curve.relative(peak):.2f} >= {th.lower_band}", curve.relative(peak) >= th.lower_band),
        (
            f"small at the lowest ({first:+.1f}%) and top ({last:+.1f}%) layers: <= {th.small_fraction:.0%} of the drop",
            max(abs(first), abs(last)) <= th.small_fraction * drop,
        ),
    ]
    lower = _lower_dip(th, ev)
    onset = _onset(curve, th.small_fraction)
    numbers: dict[str, Any] = {"peak_layer": peak, "peak": mean, "peak_ci": [low, high], "onset": onset}
    if I2Q not in ev.flows:
        cond.append((f"starts after the Image↛Question stages ({I2Q} not run)", None))
    elif lower is None:
        cond.append(("starts after the Image↛Question lower-layer dip (no such dip found)", False))
    else:
        cond.append((f"starts (layer {onset}) after the first Image↛Question dip (layer {lower.layer})", onset > lower.layer))
        numbers["image_question_first_dip"] = lower.layer
    evidence = f"largest drop {_at(curve, peak)} (n={curve.n}); starts at layer {onset}; first/top layer {first:+.1f}%/{last:+.1f}%"
    return _result(claim, cond, evidence, numbers)


def _near_zero(claim_id: str, flow: Flow, limit_of: Callable[[ClaimThresholds], float]) -> Callable[[ClaimThresholds, CellEvidence], ClaimResult]:
    def rule(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
        claim = CLAIMS[claim_id]
        curve = ev.flows.get(flow)
        if curve is None:
            return _not_run(claim, f"flow {flow} was not run")
        i = int(np.argmax(np.abs(curve.mean)))
        worst, layer = float(curve.mean[i]), int(curve.layers[i])
        limit = limit_of(th)
        cond = [(f"max |mean| {abs(worst):.2f}% <= {limit}%", abs(worst) <= limit)]
        evidence = f"largest |change| {_at(curve, layer)} (n={curve.n})"
        return _result(claim, cond, evidence, {"max_abs": abs(worst), "layer": layer})

    return rule


def _image_question(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["image-question"]
    curve = ev.flows.get(I2Q)
    if curve is None:
        return _not_run(claim, f"flow {I2Q} was not run")
    dips = find_dips(curve, th.dip, th.separation)
    described = ", ".join(f"{d.mean:+.1f}% at layer {d.layer}" for d in dips) or "none"
    cond: list[tuple[str, bool | None]] = [(f"at least two separate dips (found: {described})", len(dips) >= 2)]
    if dips:
        first = dips[0]
        deepest = min(dips, key=lambda d: d.mean)
        cond.append(
            (
                f"the first dip (layer {first.layer}, relative depth {curve.relative(first.layer):.2f}) is in the "
                f"lowest layers (<= {th.lower_band}) and the deepest",
                curve.relative(first.layer) <= th.lower_band and first is deepest,
            )
        )
        middle = [d for d in dips[1:] if _in(curve, d.layer, th.middle_band)]
        cond.append((f"a later dip in the middle layers {th.middle_band}", bool(middle)))
    upper = [i for i, layer in enumerate(curve.layers) if curve.relative(layer) >= th.upper_band]
    top_abs = float(np.abs(curve.mean[upper]).max()) if upper else 0.0
    cond.append((f"upper layers back near 0: max |mean| {top_abs:.2f}% <= {th.near_zero}%", top_abs <= th.near_zero))
    exact = ev.exact_last.get(I2Q)
    if exact is None:
        cond.append(("exactly 0 for a window confined to the last layer (no such window: window > 1)", None))
    else:
        cond.append((f"window confined to the last layer: max |change| {exact:.2e}% <= {th.exact_zero}", exact <= th.exact_zero))
    numbers = {"dips": [d.__dict__ for d in dips], "upper_max_abs": top_abs, "last_layer_window_max_abs": exact}
    return _result(claim, cond, f"dips: {described} (n={curve.n}); upper layers max |change| {top_abs:.1f}%", numbers)


def _other_question(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["other-question"]
    other = ev.flows.get(O2Q)
    if other is None:
        return _not_run(claim, f"flow {O2Q} was not run")
    lower = _lower_dip(th, ev)
    layer = lower.layer if lower is not None else _band_peak(other, (0.0, th.lower_band))
    where = "the first Image↛Question dip" if lower is not None else "Other's largest drop in the lowest layers"
    if layer is None:
        return _not_run(claim, "the model has no layer in the lowest band")
    mean, low, high = other.at(layer)
    cond: list[tuple[str, bool | None]] = [(f"Other's drop {-mean:.1f}% >= {th.dip}% and significant", -mean >= th.dip and high < 0)]
    numbers: dict[str, Any] = {"layer": layer, "other": mean, "other_ci": [low, high]}
    related = ev.flows.get(R2Q)
    if related is not None:
        r = related.at(layer)[0]
        cond.append((f"larger than Related's ({r:+.1f}%)", mean < r))
        numbers["related"] = r
    evidence = f"at {where}: Other {_at(other, layer)}" + (f"; Related {numbers['related']:+.1f}%" if related is not None else "")
    return _result(claim, cond, evidence, numbers)


def _middle_layer(th: ClaimThresholds, ev: CellEvidence, related: Curve) -> tuple[int | None, str]:
    middle = _middle_dip(th, ev)
    if middle is not None:
        return middle.layer, "the middle Image↛Question dip"
    return _band_peak(related, th.middle_band), "Related's largest drop in the middle layers"


def _related_question(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["related-question"]
    related = ev.flows.get(R2Q)
    if related is None:
        return _not_run(claim, f"flow {R2Q} was not run")
    layer, where = _middle_layer(th, ev, related)
    if layer is None:
        return _not_run(claim, "the model has no layer in the middle band")
    mean, low, high = related.at(layer)
    cond: list[tuple[str, bool | None]] = [
        (f"Related's drop {-mean:.1f}% >= {th.dip}% and significant", -mean >= th.dip and high < 0)
    ]
    numbers: dict[str, Any] = {"layer": layer, "related": mean, "related_ci": [low, high]}
    other = ev.flows.get(O2Q)
    tokens = ""
    if other is not None:
        o = other.at(layer)[0]
        cond.append((f"at least Other's ({o:+.1f}%)", mean <= o))
        numbers["other"] = o
        numbers["tokens"] = {"related": ev.flow_tokens.get(R2Q), "other": ev.flow_tokens.get(O2Q)}
        tokens = f"; blocks {ev.flow_tokens.get(R2Q, 0):.0f} vs {ev.flow_tokens.get(O2Q, 0):.0f} tokens"
    evidence = f"at {where}: Related {_at(related, layer)}" + (f", Other {numbers['other']:+.1f}%" if other is not None else "") + tokens
    return _result(claim, cond, evidence, numbers)


def _random_control(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["random-control"]
    comparison = ev.control.get("question")
    if comparison is None:
        return _not_run(claim, f"the random-patch control of {R2Q} was not run")
    layer, where = _middle_layer(th, ev, comparison.related)
    if layer is None:
        return _not_run(claim, "the model has no layer in the middle band")
    d_mean, d_low, d_high = comparison.difference.at(layer)
    r_mean = comparison.related.at(layer)[0]
    cond = [
        # Without a real related effect there, a "significant" difference of a few hundredths means nothing.
        (f"related's drop there {-r_mean:.1f}% >= {th.dip}%", -r_mean >= th.dip),
        (f"related - random {d_mean:+.1f}% with interval below 0 ({d_high:+.1f})", d_mean < 0 and d_high < 0),
    ]
    evidence = (
        f"at {where}: related {_at(comparison.related, layer)}; random ({comparison.draws} draws, "
        f"{comparison.n_related_tokens:.0f} tokens) {_at(comparison.random, layer)}; difference {_pct(d_mean)} "
        f"[{d_low:+.1f}, {d_high:+.1f}] (n={comparison.difference.n})"
    )
    numbers = {"layer": layer, "difference": d_mean, "difference_ci": [d_low, d_high], "draws": comparison.draws}
    return _result(claim, cond, evidence, numbers)


def _lens_low(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["lens-low"]
    readout = _lens_readout(ev)
    curve = ev.lens.get((readout or "", EITHER_ANSWER))
    if curve is None:
        return _not_run(claim, "the lens was not run")
    low_layers = [i for i, j in enumerate(curve.layers) if curve.relative(j) < th.lower_band]
    worst = float(curve.mean[low_layers].max()) if low_layers else 0.0
    cond = [(f"max probability {worst:.2f}% in the lowest layers <= {th.prob_floor}%", worst <= th.prob_floor)]
    return _result(claim, cond, f"{readout} readout: answer at most {worst:.2f}% below relative depth {th.lower_band}", {"max_low": worst})


def _lens_lowercase_first(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["lens-lowercase-first"]
    readout = _lens_readout(ev)
    lower = ev.lens.get((readout or "", "answer"))
    cap = ev.lens.get((readout or "", "answer_capitalized"))
    if lower is None:
        return _not_run(claim, "the lens was not run")
    rise = _rise(lower, th)
    cap_rise = _rise(cap, th) if cap is not None else None
    numbers: dict[str, Any] = {"lowercase_rise": rise, "capitalized_rise": cap_rise, "lowercase_max": float(lower.mean.max())}
    if rise is None:
        cond: list[tuple[str, bool | None]] = [(f"the lowercase answer rises (its maximum {lower.mean.max():.2f}% < {th.prob_floor}%)", False)]
        return _result(claim, cond, f"{readout} readout: lowercase answer never above {lower.mean.max():.2f}%", numbers)
    cond = [
        (f"rises at layer {rise} (relative depth {lower.relative(rise):.2f} >= {th.lower_band})", lower.relative(rise) >= th.lower_band),
        (
            f"before the capitalised form ({'never' if cap_rise is None else f'layer {cap_rise}'})",
            cap_rise is None or rise < cap_rise,
        ),
    ]
    q2l = ev.flows.get(Q2L)
    if q2l is None:
        cond.append((f"after the Question↛Last drop starts ({Q2L} not run)", None))
    else:
        onset = _onset(q2l, th.small_fraction)
        cond.append((f"after the Question↛Last drop starts (layer {onset})", rise > onset))
        numbers["question_last_onset"] = onset
    evidence = f"{readout} readout: lowercase rises at layer {rise}, capitalised " + ("never" if cap_rise is None else f"at {cap_rise}")
    return _result(claim, cond, evidence, numbers)


def _lens_capitalized_last(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["lens-capitalized-last"]
    readout = _lens_readout(ev)
    lower = ev.lens.get((readout or "", "answer"))
    cap = ev.lens.get((readout or "", "answer_capitalized"))
    if lower is None or cap is None:
        return _not_run(claim, "the lens was not run")
    ahead = cap.mean > lower.mean
    top_ahead = bool(ahead[-1])
    numbers: dict[str, Any] = {"top_capitalized": float(cap.mean[-1]), "top_lowercase": float(lower.mean[-1])}
    cond: list[tuple[str, bool | None]] = [
        (f"at the top, capitalised {cap.mean[-1]:.1f}% > lowercase {lower.mean[-1]:.1f}%", top_ahead)
    ]
    if top_ahead:
        behind = np.flatnonzero(~ahead)
        start = int(cap.layers[behind[-1] + 1]) if len(behind) else int(cap.layers[0])
        numbers["overtakes_at"] = start
        cond.append((f"ahead from layer {start} on (relative depth {cap.relative(start):.2f} >= {th.upper_band})", cap.relative(start) >= th.upper_band))
    evidence = f"{readout} readout, top layer: capitalised {cap.mean[-1]:.1f}%, lowercase {lower.mean[-1]:.1f}%" + (
        f"; capitalised ahead from layer {numbers['overtakes_at']}" if "overtakes_at" in numbers else ""
    )
    return _result(claim, cond, evidence, numbers)


def _lens_true_false(th: ClaimThresholds, ev: CellEvidence) -> ClaimResult:
    claim = CLAIMS["lens-true-false"]
    readout = _lens_readout(ev)
    true = ev.lens.get((readout or "", EITHER_ANSWER))
    false = ev.lens.get((readout or "", EITHER_FALSE))
    if true is None:
        return _not_run(claim, "the lens was not run")
    if false is None:
        return _not_run(claim, "not a choose task (no false option)")
    t, f = float(true.mean[-1]), float(false.mean[-1])
    ratio = t / f if f > 0 else float("inf")
    cond = [(f"top layer: answer {t:.1f}% >= {th.option_ratio} x false option {f:.2f}% and >= {th.prob_floor}%", t >= th.option_ratio * f and t >= th.prob_floor)]
    return _result(claim, cond, f"{readout} readout, top layer: answer {t:.1f}% vs false option {f:.2f}% (ratio {ratio:.1f})", {"answer": t, "false_option": f})


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
