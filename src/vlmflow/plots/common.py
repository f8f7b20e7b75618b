"""What every figure shares: mean with a 95% bootstrap band, drawing such curves, saving figures.

Curves are the mean over samples with a 95% bootstrap confidence band (1000 resamples, fixed seed),
as seaborn's ``lineplot`` draws the paper's figures. Figures are built with
:class:`matplotlib.figure.Figure` directly, never through pyplot's global state, so library code can
make them in threads or notebooks without side effects.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vlmflow.errors import ConfigError

#: File formats a figure can be written in (``vlmflow plot --format``).
FIGURE_FORMATS: tuple[str, ...] = ("png", "pdf", "svg")
#: Formats written when none are asked for: PNG to look at, PDF for papers.
DEFAULT_FORMATS: tuple[str, ...] = ("png", "pdf")
#: Marker of each curve by its position in the drawing order, hollow, so curves lying on top of
#: each other (e.g. several flows flat at 0) all stay visible.
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def mean_ci(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% bootstrap confidence interval of ``values`` (``(mean, low, high)``); NaNs ignored.

    >>> mean_ci(np.array([1.0, 1.0, 1.0]))
    (1.0, 1.0, 1.0)
    >>> m, low, high = mean_ci(np.arange(10.0))
    >>> m, low < m < high
    (4.5, True)
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"),) * 3
    mean = float(values.mean())
    if len(values) == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)  # [n_boot]
    low, high = np.percentile(boots, [2.5, 97.5])
    return mean, float(low), float(high)


def curves(frame: pd.DataFrame, by: str, value: str, *, scale: float = 1.0) -> pd.DataFrame:
    """Mean and CI of ``value`` per (``by``, ``layer``) over samples: columns by, layer, n, mean, low, high.

    ``frame`` holds one row per sample, ``by`` key and layer (e.g. the ``flows`` table).

    >>> f = pd.DataFrame({"form": ["a", "a"], "layer": [0, 0], "prob": [0.1, 0.3], "sample_id": ["1", "2"]})
    >>> curves(f, "form", "prob", scale=100)[["form", "layer", "n", "mean"]].to_dict("records")
    [{'form': 'a', 'layer': 0, 'n': 2, 'mean': 20.0}]
    """
    rows = []
    for (key, layer), group in frame.groupby([by, "layer"], sort=True):
        values = group[value].to_numpy() * scale
        mean, low, high = mean_ci(values)
        rows.append({by: key, "layer": int(layer), "n": int(np.isfinite(values).sum()), "mean": mean, "low": low, "high": high})
    return pd.DataFrame(rows, columns=[by, "layer", "n", "mean", "low", "high"])


def draw_curves(
    ax: Axes,
    table: pd.DataFrame,
    by: str,
    order: Sequence[str],
    *,
    labels: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
    styles: Mapping[str, str] | None = None,
) -> list[str]:
    """Draw one line with its band per key of ``order`` from a :func:`curves` table; return the keys drawn.

    Keys absent from ``table`` are skipped. Colours default to the ``C0, C1, ...`` cycle by position in
    ``order``, so a key keeps its colour whichever keys are present.
    """
    drawn = []
    for i, key in enumerate(order):
        line = table[table[by] == key].sort_values("layer")
        if line.empty:
            continue
        color = (colors or {}).get(key, f"C{i % 10}")
        style = (styles or {}).get(key, "-")
        label = (labels or {}).get(key, str(key))
        ax.plot(
            line["layer"], line["mean"], color=color, linestyle=style, label=label,
            marker=MARKERS[i % len(MARKERS)], markersize=_marker_size(len(line)), markerfacecolor="none",
        )  # fmt: skip
        ax.fill_between(line["layer"], line["low"], line["high"], color=color, alpha=0.15, linewidth=0)
        drawn.append(key)
    return drawn


def _marker_size(points: int) -> float:
    """Smaller markers on longer curves (a 40-layer curve stays a line, a 6-layer one shows its points)."""
    return 6.0 if points <= 10 else 4.0 if points <= 24 else 2.5


def legend_outside(ax: Axes, where: str = "right", ncols: int = 1) -> None:
    """The axes' legend outside the plotting area, so it never hides a curve.

    ``where``: ``"right"`` (beside the axes, top-aligned) or ``"below"`` (under the x label).
    With a ``layout="constrained"`` figure the figure makes room for it.
    """
    if where == "right":
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="medium", frameon=False, borderaxespad=0.0)
    else:
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=ncols, fontsize="medium", frameon=False,
            borderaxespad=0.0, columnspacing=1.2, handlelength=2.4,
        )  # fmt: skip


def wrapped(text: str, width_inches: float, fontsize: float = 10.0) -> str:
    """``text`` broken into lines that fit ``width_inches`` at ``fontsize`` points (titles never cut off).

    >>> print(wrapped("Answer at the last position: raw readout (no final norm below the top layer)", 3.0))
    Answer at the last position: raw
    readout (no final norm below the top
    layer)
    """
    per_line = max(20, int(width_inches * 72 / (0.55 * fontsize)))  # an average glyph is ~0.55 em wide
    return textwrap.fill(text, per_line)


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Normalise figure formats (lower case, no dot, no duplicates); :class:`ConfigError` on an unknown one.

    >>> check_formats(["PNG", ".pdf", "png"])
    ('png', 'pdf')
    """
    out = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in formats))
    bad = [f for f in out if f not in FIGURE_FORMATS]
    if bad or not out:
        raise ConfigError(f"unknown figure format {bad[0] if bad else ''!r}; valid: {', '.join(FIGURE_FORMATS)}")
    return out


def save_figure(fig: Figure, folder: Path, stem: str, formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Write ``fig`` as ``folder/stem.<format>`` for each format (folder created); return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in check_formats(formats):
        path = folder / f"{stem}.{fmt}"
        fig.savefig(path, dpi=150)
        paths.append(path)
    return paths
