"""Layer windows, exactly as the paper's code sweeps them.

For each centre layer ``c`` the window is ``range(max(0, c - k//2), min(L, c + ceil(k/2)))``: ``k``
consecutive layers centred on ``c``, clipped at both ends (so the first and last points block only
``ceil(k/2)`` layers; the blocked layers of every point are recorded with the results).
"""

from __future__ import annotations

import math

from vlmflow.errors import ConfigError


def window_layers(center: int, k: int, n_layers: int) -> tuple[int, ...]:
    """Layers knocked out for the point at ``center``.

    >>> window_layers(0, 9, 32)
    (0, 1, 2, 3, 4)
    >>> window_layers(10, 9, 32)
    (6, 7, 8, 9, 10, 11, 12, 13, 14)
    >>> window_layers(31, 7, 32)
    (28, 29, 30, 31)
    """
    if k < 1:
        raise ConfigError(f"window must be at least 1 layer, got {k}")
    if not 0 <= center < n_layers:
        raise ConfigError(f"centre layer {center} out of range 0..{n_layers - 1}")
    return tuple(range(max(0, center - k // 2), min(n_layers, center + math.ceil(k / 2))))


def sweep(k: int, n_layers: int) -> list[tuple[int, tuple[int, ...]]]:
    """``(centre, layers)`` for every centre layer of an ``n_layers`` model.

    >>> [c for c, _ in sweep(3, 4)]
    [0, 1, 2, 3]
    """
    return [(center, window_layers(center, k, n_layers)) for center in range(n_layers)]


def default_window(n_layers: int) -> int:
    """The paper's window for a model depth: 9 for 40 layers, 7 for 32 (about 22% of depth, odd).

    >>> default_window(40), default_window(32), default_window(4)
    (9, 7, 1)
    """
    k = max(1, round(n_layers * 0.22))
    return k if k % 2 == 1 else k + 1 if k + 1 <= n_layers else k - 1
