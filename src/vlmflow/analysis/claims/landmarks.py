"""What the rules look for in a curve (largest drop, onset, dips in a band, the rise of a lens
curve) and how they report (a result from its conditions, "not run")."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmflow.analysis.claims.checklist import Claim, ClaimResult, ClaimThresholds, Status
from vlmflow.analysis.evidence import CellEvidence
from vlmflow.analysis.stats import Curve, Dip, find_dips
from vlmflow.positions.routes import PAPER_FLOWS

#: The paper's six flows, in its order.
Q2L, I2L, L2L, I2Q, R2Q, O2Q = PAPER_FLOWS


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


def _middle_layer(th: ClaimThresholds, ev: CellEvidence, related: Curve) -> tuple[int | None, str]:
    middle = _middle_dip(th, ev)
    if middle is not None:
        return middle.layer, "the middle Image↛Question dip"
    return _band_peak(related, th.middle_band), "Related's largest drop in the middle layers"
