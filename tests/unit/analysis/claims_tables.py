"""Synthetic result tables with known curves, for testing the statistics and the claims rules.

:func:`paper_like` gives per-flow mean curves shaped as the paper reports them for a 16-layer model
(two Image->Question dips, a middle Question->Last dip, ...); tests replace single curves to make a
claim fail. :func:`tables` turns curves into ``flows``/``lens``/``samples``/``controls`` tables with
per-sample noise, exactly the columns the runs write.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

L = 16  # layers
CENTRES = np.arange(L)  # flows: window centres 0..L-1
J = np.arange(L + 1)  # lens: layer boundaries 0..L


def bump(x: np.ndarray, at: float, width: float, height: float) -> np.ndarray:
    return height * np.exp(-(((x - at) / width) ** 2))


def sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def paper_like() -> dict[str, np.ndarray]:
    """Mean curves (%, flows over centres; lens probabilities over J) shaped as the paper reports."""
    lower = 60 * sig((J - 11) * 1.5) * (1 - sig((J - 15) * 3))
    return {
        "question->last": bump(CENTRES, 9, 2, -40),
        "image->last": np.full(L, -1.0),
        "last->last": np.zeros(L),
        "image->question": bump(CENTRES, 1, 1.2, -50) + bump(CENTRES, 6, 1.0, -20),
        "other->question": bump(CENTRES, 1, 1.2, -45) + bump(CENTRES, 6, 1.0, -2),
        "related->question": bump(CENTRES, 1, 1.2, -3) + bump(CENTRES, 6, 1.0, -18),
        "random->question": bump(CENTRES, 6, 1.0, -3),
        "lens:answer": lower,
        "lens:answer_capitalized": 80 * sig((J - 14.5) * 3),
        "lens:false_option": np.full(L + 1, 1.0),
        "lens:false_option_capitalized": np.full(L + 1, 0.5),
        "lens:generated": 80 * sig((J - 14.5) * 3),
    }


def tables(
    curves: Mapping[str, np.ndarray],
    *,
    n: int = 40,
    noise: float = 2.0,
    seed: int = 0,
    correct: int | None = None,
    capitalized: int | None = None,
    window: int = 3,
) -> dict[str, pd.DataFrame]:
    """``flows``, ``controls``, ``lens`` and ``samples`` tables of ``n`` samples around ``curves``.

    ``correct`` samples answer correctly (default all; only those are kept); ``capitalized`` of
    them generate the capitalised answer's token (default all).
    """
    rng = np.random.default_rng(seed)
    correct = n if correct is None else correct
    capitalized = correct if capitalized is None else capitalized
    ids = [f"s{i:03d}" for i in range(n)]
    kept = ids[:correct]
    samples = pd.DataFrame(
        {"sample_id": ids, "correct": [i < correct for i in range(n)], "kept": [i < correct for i in range(n)]}
    )
    flows, controls, lens = [], [], []
    sizes = {"related": 6, "other": 30, "image": 36, "question": 8, "last": 1, "random": 6}
    for name, curve in curves.items():
        if name.startswith("lens:"):
            continue
        source = name.split("->")[0]
        for draw in range(3 if source == "random" else 1):
            for sid in kept:
                values = curve + rng.normal(0.0, noise, size=len(curve))
                for layer, value in zip(CENTRES, values, strict=True):
                    row = {
                        "sample_id": sid,
                        "flow": name,
                        "layer": int(layer),
                        "layers_blocked": list(range(max(0, layer - window // 2), min(L, layer + window // 2 + 1))),
                        "window": window,
                        "rel_change": float(max(value, -100.0)),
                        "n_source": sizes[source],
                    }
                    (controls if source == "random" else flows).append({**row, "draw": draw} if source == "random" else row)
    token_ids = {"answer": 10, "answer_capitalized": 11, "false_option": 20, "false_option_capitalized": 21}
    for k, sid in enumerate(kept):
        for name, curve in curves.items():
            if not name.startswith("lens:"):
                continue
            form = name[5:]
            values = np.clip(curve + rng.normal(0.0, noise / 4, size=len(curve)), 0.0, 100.0) / 100.0
            token = token_ids.get(form, 11 if k < capitalized else 10)
            for j, p in zip(J, values, strict=True):
                lens.append(
                    {"sample_id": sid, "readout": "raw", "group": "last", "layer": int(j), "form": form, "prob": float(p), "token_id": token}
                )
    out = {"samples": samples}
    for key, rows in (("flows", flows), ("controls", controls), ("lens", lens)):
        if rows:
            out[key] = pd.DataFrame(rows)
    return out
