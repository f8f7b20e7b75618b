"""The rules of one model x task over the logit-lens curves."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmflow.analysis.claims.checklist import CLAIMS, ClaimResult, ClaimThresholds
from vlmflow.analysis.claims.landmarks import Q2L, _lens_readout, _not_run, _onset, _result, _rise
from vlmflow.analysis.evidence import EITHER_ANSWER, EITHER_FALSE, CellEvidence


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
