"""The rules of one model x task over the baseline, the knockout curves and the random-patch control."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vlmflow.analysis.claims.checklist import CLAIMS, ClaimResult, ClaimThresholds
from vlmflow.analysis.claims.landmarks import (
    I2Q,
    O2Q,
    Q2L,
    R2Q,
    _at,
    _band_peak,
    _in,
    _lower_dip,
    _middle_layer,
    _not_run,
    _onset,
    _pct,
    _peak,
    _result,
)
from vlmflow.analysis.evidence import CellEvidence, capitalization
from vlmflow.analysis.stats import find_dips
from vlmflow.positions.routes import Flow


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
