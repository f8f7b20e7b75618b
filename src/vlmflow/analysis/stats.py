"""Statistics of layer curves: bootstrap confidence intervals, the largest drop, significant bands.

A *curve* is the mean over samples of a per-sample, per-layer value (the flows' relative change of
the answer probability, a lens probability, a paired difference), with a percentile bootstrap
confidence interval at every layer. Samples, not layer points, are resampled: one bootstrap draw
picks samples with replacement and takes all their layers, so the intervals of derived quantities
(the layer of the largest drop) respect the correlation between layers.

An *effect* needs a size as well as a sign: a flow has an effect at a layer when its mean change
reaches :data:`EFFECT_THRESHOLD` (5% of the answer's probability) there, and "no effect" means the
mean stays within that at every layer, however narrow its interval (a -0.007% mean with a tight
interval is no effect). Bands are layers with a clear drop: the mean is at least the threshold
below zero *and* the layer's own interval lies below zero. Both are pointwise (no correction for
looking at many layers; the report says so).

>>> m = np.array([[-10.0, -1.0], [-12.0, 1.0], [-11.0, 0.0]])
>>> c = bootstrap_curve(m, layers=[0, 1], n_layers=2)
>>> float(round(c.mean[0], 1)), bool(c.high[0] < 0), bool(c.low[1] < 0 < c.high[1])
(-11.0, True, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: The smallest mean change (in % of the answer's probability) that counts as an effect of a flow.
EFFECT_THRESHOLD = 5.0


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap settings: resamples, seed and confidence level.

    >>> Bootstrap().n_boot
    1000
    """

    n_boot: int = 1000
    seed: int = 0
    confidence: float = 0.95


@dataclass(frozen=True)
class Curve:
    """Mean and confidence interval of a value at each layer over ``n`` samples.

    Attributes:
        layers: ``[P]`` layer indices (window centres for flows, ``j = 0..L`` for the lens).
        mean, low, high: ``[P]`` mean and interval bounds.
        n: number of samples.
        depth: the model's number of layers ``L`` (relative depth of a flows centre ``l`` is
            ``l / (L - 1)``; of a lens boundary ``j`` it is ``j / L``, see :meth:`relative`).
        boots: ``[B, P]`` bootstrap means (kept for derived intervals).
    """

    layers: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int
    depth: int
    boots: np.ndarray

    def at(self, layer: int) -> tuple[float, float, float]:
        """``(mean, low, high)`` at ``layer``."""
        i = int(np.flatnonzero(self.layers == layer)[0])
        return float(self.mean[i]), float(self.low[i]), float(self.high[i])

    def relative(self, layer: float) -> float:
        """Relative depth of ``layer`` in ``[0, 1]`` (0 = lowest, 1 = top)."""
        span = max(int(self.layers.max()), 1)
        return float(layer) / span


def per_sample_matrix(frame: pd.DataFrame, value: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(matrix [n_samples, P], layers [P], sample_ids)`` of ``value``; samples missing a layer are dropped.

    >>> f = pd.DataFrame({"sample_id": ["a", "a", "b"], "layer": [0, 1, 0], "v": [1.0, 2.0, 3.0]})
    >>> m, layers, ids = per_sample_matrix(f, "v")
    >>> m.tolist(), layers.tolist(), ids
    ([[1.0, 2.0]], [0, 1], ['a'])
    """
    wide = frame.pivot_table(index="sample_id", columns="layer", values=value, aggfunc="mean").dropna()
    return wide.to_numpy(dtype=float), wide.columns.to_numpy(dtype=int), [str(i) for i in wide.index]


def bootstrap_curve(
    matrix: np.ndarray, layers: Sequence[int] | np.ndarray, n_layers: int, boot: Bootstrap | None = None
) -> Curve:
    """Curve of ``matrix [n_samples, P]`` with a percentile bootstrap interval over samples."""
    boot = boot or Bootstrap()
    matrix = np.asarray(matrix, dtype=float)
    n = matrix.shape[0]
    layers = np.asarray(layers, dtype=int)
    if n == 0:
        nan = np.full(len(layers), np.nan)
        return Curve(layers, nan, nan, nan, 0, n_layers, np.empty((0, len(layers))))
    mean = matrix.mean(axis=0)
    rng = np.random.default_rng(boot.seed)
    # One multinomial row = how often each sample is drawn in one resample; [B, n] @ [n, P] / n.
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=boot.n_boot).astype(float)
    boots = counts @ matrix / n  # [B, P]
    alpha = (1.0 - boot.confidence) / 2.0
    low, high = np.quantile(boots, [alpha, 1.0 - alpha], axis=0)
    if n == 1:
        low, high = mean.copy(), mean.copy()
    return Curve(layers, mean, low, high, n, n_layers, boots)


def frame_curve(frame: pd.DataFrame, value: str, n_layers: int | None = None, boot: Bootstrap | None = None) -> Curve:
    """Curve of ``value`` over the samples of a long table with ``sample_id``, ``layer`` and ``value``."""
    matrix, layers, _ = per_sample_matrix(frame, value)
    depth = n_layers if n_layers is not None else (int(layers.max()) + 1 if len(layers) else 0)
    return bootstrap_curve(matrix, layers, depth, boot)


def significant_bands(curve: Curve, *, below: bool = True, min_effect: float = 0.0) -> list[tuple[int, int]]:
    """Maximal runs of consecutive layers whose interval lies below (or above) zero and whose mean
    is at least ``min_effect`` away from zero.

    >>> c = Curve(np.arange(5), np.array([-9, -9, -2, 0, -9.0]), np.zeros(5), np.array([1, -1, -1, 1, -1.0]), 9, 5, np.zeros((0, 5)))
    >>> significant_bands(c), significant_bands(c, min_effect=5.0)
    ([(1, 2), (4, 4)], [(1, 1), (4, 4)])
    """
    if below:
        hit = (curve.high < 0) & (curve.mean <= -min_effect)
    else:
        hit = (curve.low > 0) & (curve.mean >= min_effect)
    bands: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate(hit):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            bands.append((int(curve.layers[start]), int(curve.layers[i - 1])))
            start = None
    if start is not None:
        bands.append((int(curve.layers[start]), int(curve.layers[-1])))
    return bands


def format_bands(bands: Iterable[tuple[int, int]]) -> str:
    """``"3-9, 12"`` (``"none"`` when empty).

    >>> format_bands([(3, 9), (12, 12)]), format_bands([])
    ('3-9, 12', 'none')
    """
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in bands]
    return ", ".join(parts) if parts else "none"


@dataclass(frozen=True)
class CurveSummary:
    """The per-flow summary: where the largest drop is, how big, how sure, and where it is clear.

    Attributes:
        peak_layer: layer of the largest drop (the curve's minimum).
        peak_layer_low / peak_layer_high: bootstrap interval of that layer (argmin per resample).
        peak, peak_low, peak_high: mean and interval at ``peak_layer``.
        bands: layers with a clear drop (mean at least :data:`EFFECT_THRESHOLD` below zero and
            pointwise interval below zero).
    """

    n: int
    depth: int
    peak_layer: int
    peak_layer_low: int
    peak_layer_high: int
    peak: float
    peak_low: float
    peak_high: float
    bands: tuple[tuple[int, int], ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "depth": self.depth,
            "peak_layer": self.peak_layer,
            "peak_layer_ci": [self.peak_layer_low, self.peak_layer_high],
            "peak": self.peak,
            "peak_ci": [self.peak_low, self.peak_high],
            "significant_bands": [list(b) for b in self.bands],
            "drop": self.drop,
        }

    @property
    def drop(self) -> bool:
        """Whether the largest drop reaches :data:`EFFECT_THRESHOLD` (else: "no drop")."""
        return self.peak <= -EFFECT_THRESHOLD


def summarise_curve(curve: Curve, confidence: float = 0.95) -> CurveSummary | None:
    """Largest drop of ``curve`` with intervals; ``None`` for a curve without samples.

    >>> m = np.array([[0.0, -20.0, -5.0], [0.0, -30.0, -5.0], [0.0, -25.0, -6.0]])
    >>> s = summarise_curve(bootstrap_curve(m, [0, 1, 2], 3))
    >>> s.peak_layer, s.peak, s.bands
    (1, -25.0, ((1, 2),))
    """
    if curve.n == 0:
        return None
    i = int(np.argmin(curve.mean))
    alpha = (1.0 - confidence) / 2.0
    if len(curve.boots):
        arg = curve.layers[np.argmin(curve.boots, axis=1)]
        layer_low, layer_high = (int(x) for x in np.quantile(arg, [alpha, 1.0 - alpha], method="nearest"))
    else:
        layer_low = layer_high = int(curve.layers[i])
    return CurveSummary(
        n=curve.n,
        depth=curve.depth,
        peak_layer=int(curve.layers[i]),
        peak_layer_low=layer_low,
        peak_layer_high=layer_high,
        peak=float(curve.mean[i]),
        peak_low=float(curve.low[i]),
        peak_high=float(curve.high[i]),
        bands=tuple(significant_bands(curve, min_effect=EFFECT_THRESHOLD)),
    )


@dataclass(frozen=True)
class Dip:
    """A local minimum of a curve that is deep enough, significant, and separate from deeper ones."""

    layer: int
    mean: float
    low: float
    high: float


def find_dips(curve: Curve, depth: float, separation: float) -> list[Dip]:
    """Separate dips of ``curve``, in layer order.

    A candidate is a local minimum (``<=`` both neighbours) with ``mean <= -depth`` whose interval
    lies below zero. Candidates are taken deepest first; one is kept when, between it and every
    dip kept so far, the curve recovers by at least ``separation`` times the shallower one's depth
    (it rises above ``shallower * (1 - separation)``). So a plateau or a noisy valley is one dip.

    >>> y = np.array([-40.0, -10.0, -1.0, -20.0, -2.0, 0.0])
    >>> c = Curve(np.arange(6), y, y - 1, y + 1, 10, 6, np.zeros((0, 6)))
    >>> [d.layer for d in find_dips(c, depth=5, separation=0.5)]
    [0, 3]
    >>> [d.layer for d in find_dips(c, depth=5, separation=0.99)]
    [0]
    """
    mean = curve.mean
    n = len(mean)
    candidates = []
    for i in range(n):
        left = mean[i - 1] if i > 0 else np.inf
        right = mean[i + 1] if i < n - 1 else np.inf
        if mean[i] <= left and mean[i] <= right and mean[i] <= -depth and curve.high[i] < 0:
            candidates.append(i)
    kept: list[int] = []
    for i in sorted(candidates, key=lambda j: (mean[j], j)):
        separate = True
        for k in kept:
            lo, hi = sorted((i, k))
            between = mean[lo + 1 : hi]
            shallower = max(mean[i], mean[k])
            if len(between) == 0 or between.max() < shallower * (1.0 - separation):
                separate = False
                break
        if separate:
            kept.append(i)
    return [
        Dip(int(curve.layers[i]), float(mean[i]), float(curve.low[i]), float(curve.high[i])) for i in sorted(kept)
    ]


def common_samples(kept: dict[str, Iterable[str]]) -> set[str]:
    """Sample ids in every set of ``kept`` (e.g. questions every model answers correctly).

    >>> sorted(common_samples({"a": ["1", "2"], "b": ["2", "3"]}))
    ['2']
    """
    sets = [set(v) for v in kept.values()]
    return set.intersection(*sets) if sets else set()
