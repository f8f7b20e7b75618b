"""Scores of a readout against planted bands: how well knockouts (or attention weights) localise a route.

A *curve* is one number per layer (a flow's mean % change of the answer probability at each window
centre, or its mean attention mass per layer). Against a flow's band, for window size ``k``, a layer
is *planted* when the window centred on it blocks a layer of the band
(:func:`~vlmflow.validation.routes.touches`; with ``k = 1``, the band itself):

* ``precision``: the share of the curve's total ``|value|`` that lies in planted layers (``None``
  for an empty band: then ``max_abs`` is the score, which should be about 0);
* ``peak_layer`` / ``peak_in_band`` / ``peak_error``: the layer of the largest ``|value|``, whether it
  is planted, and its distance (layers) to the nearest layer of the band;
* ``auroc``: how well ``|value|`` separates the planted layers from the others (Mann-Whitney; ties
  count one half; ``None`` when either side is empty).

Across flows, ``overall`` is the mean precision and the mean AUROC over the planted flows (non-empty
bands), and ``pooled_auroc`` the AUROC over every scored (flow, layer) cell, the empty bands' cells
counting as unplanted.

>>> s = flow_score([0.1, -40.0, 0.3, -2.0], band=(1,), window=1)
>>> round(s.precision, 3), s.peak_layer, s.peak_error, s.auroc
(0.943, 1, 0, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vlmflow.validation.routes import touches


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(a planted score > an unplanted one), ties counting one half; ``None`` if a side is empty.

    >>> auroc([3.0, 2.0], [1.0, 2.0])
    0.875
    """
    if not len(positive) or not len(negative):
        return None
    pos = np.asarray(positive, dtype=float)[:, None]
    neg = np.asarray(negative, dtype=float)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@dataclass(frozen=True)
class FlowScore:
    """One flow's curve scored against its band (see the module docstring)."""

    band: tuple[int, ...]
    planted: tuple[bool, ...]
    curve: tuple[float, ...]
    precision: float | None
    peak_layer: int
    peak_value: float
    peak_in_band: bool | None
    peak_error: int | None
    max_abs: float
    auroc: float | None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["band"] = list(self.band)
        out["planted"] = list(self.planted)
        out["curve"] = [round(v, 4) for v in self.curve]
        return out


def flow_score(curve: Sequence[float], band: Sequence[int], window: int) -> FlowScore:
    """Score one curve (a value per layer, layers ``0..len(curve)-1``) against ``band`` at window size ``window``."""
    values = np.asarray(curve, dtype=float)
    n = len(values)
    planted = [touches(layer, band, window, n) for layer in range(n)]
    magnitude = np.abs(values)
    total = float(magnitude.sum())
    peak = int(np.argmax(magnitude)) if n else 0
    if band:
        precision = float(magnitude[planted].sum() / total) if total > 0 else None
        peak_in_band: bool | None = planted[peak]
        peak_error: int | None = min(abs(peak - b) for b in band)
    else:
        precision, peak_in_band, peak_error = None, None, None
    score = auroc(magnitude[planted].tolist(), magnitude[[not p for p in planted]].tolist())
    return FlowScore(
        band=tuple(band),
        planted=tuple(planted),
        curve=tuple(float(v) for v in values),
        precision=precision,
        peak_layer=peak,
        peak_value=float(values[peak]) if n else 0.0,
        peak_in_band=peak_in_band,
        peak_error=peak_error,
        max_abs=float(magnitude.max()) if n else 0.0,
        auroc=score,
    )


@dataclass(frozen=True)
class ScoreTable:
    """Every flow's score for one readout and window size, and the summary over flows."""

    flows: Mapping[str, FlowScore]

    @property
    def planted(self) -> list[str]:
        return [name for name, s in self.flows.items() if s.band]

    def overall(self) -> dict[str, float | None]:
        """Mean precision and mean AUROC over the planted flows, and the pooled AUROC over every cell."""
        precisions = [s.precision for s in self.flows.values() if s.band and s.precision is not None]
        aurocs = [s.auroc for s in self.flows.values() if s.band and s.auroc is not None]
        cells = [(abs(v), p) for s in self.flows.values() for v, p in zip(s.curve, s.planted, strict=True)]
        return {
            "precision": float(np.mean(precisions)) if precisions else None,
            "auroc": float(np.mean(aurocs)) if aurocs else None,
            "pooled_auroc": auroc([v for v, p in cells if p], [v for v, p in cells if not p]),
            "peaks_in_band": sum(bool(self.flows[f].peak_in_band) for f in self.planted),
            "planted_flows": len(self.planted),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"overall": self.overall(), "flows": {name: s.as_dict() for name, s in self.flows.items()}}


def score_curves(curves: Mapping[str, Sequence[float]], bands: Mapping[str, Sequence[int]], window: int) -> ScoreTable:
    """Score every flow of ``curves`` that has a band in ``bands`` (others are left out).

    >>> table = score_curves({"a->b": [0.0, -9.0], "c->b": [0.1, 0.2]}, {"a->b": (1,), "c->b": ()}, 1)
    >>> table.overall()["precision"], table.flows["c->b"].max_abs
    (1.0, 0.2)
    """
    return ScoreTable({flow: flow_score(curve, tuple(bands[flow]), window) for flow, curve in curves.items() if flow in bands})


def lens_score(first_top1: Sequence[int], after: int) -> dict[str, Any]:
    """Does the answer appear in the logit lens only after layer boundary ``after``?

    ``first_top1`` holds, per sample, the first layer boundary ``j`` where the answer is the lens'
    top-1 (-1: never). ``after`` is the output boundary of the question->last band (its last
    layer + 1). Returns the share of samples whose answer first becomes top-1 at ``j >= after``
    (``after_band``), the share where it already is before (``before_band``), the share that never
    reaches it, and the median first boundary.

    >>> lens_score([7, 7, 3, -1], after=7)["after_band"]
    0.5
    """
    firsts = np.asarray(list(first_top1), dtype=int)
    reached = firsts[firsts >= 0]
    n = max(1, len(firsts))
    return {
        "expected_from": after,
        "samples": int(len(firsts)),
        "after_band": float((firsts >= after).sum() / n),
        "before_band": float(((firsts >= 0) & (firsts < after)).sum() / n),
        "never": float((firsts < 0).sum() / n),
        "median_first_top1": float(np.median(reached)) if len(reached) else None,
    }
