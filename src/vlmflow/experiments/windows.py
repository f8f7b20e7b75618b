"""Layer windows: the paper's centred sweep and the other window styles.

For each centre layer ``c`` the paper's window is ``range(max(0, c - k//2), min(L, c + ceil(k/2)))``:
``k`` consecutive layers centred on ``c``, clipped at both ends (so the first and last points block
only ``ceil(k/2)`` layers; the blocked layers of every point are recorded with the results).

A :class:`WindowStyle` says which layers the point at layer ``l`` of a sweep blocks
(:func:`window_points`): ``centred`` (the paper's), ``start`` (``k`` layers from ``l``),
``cumulative-up`` (layers ``0..l``), ``cumulative-down`` (``l..L-1``) and ``inverse`` (every layer
outside the centred window). A flow with a fixed layer range (``@A-B``) is one point, not a sweep.
Only the layer sets change: the engines and rows are the same for every style.
"""

from __future__ import annotations

import math
from enum import StrEnum

from vlmflow.errors import ConfigError


class WindowStyle(StrEnum):
    """Which layers the point at layer ``l`` blocks (values are what users type).

    >>> [layers for _, layers in window_points(WindowStyle.CUMULATIVE_UP, 3, 3)]
    [(0,), (0, 1), (0, 1, 2)]
    """

    CENTRED = "centred"  # the paper's: k layers centred on l, clipped at both ends
    START = "start"  # k layers starting at l, clipped at the top
    CUMULATIVE_UP = "cumulative-up"  # layers 0..l (k unused)
    CUMULATIVE_DOWN = "cumulative-down"  # layers l..L-1 (k unused)
    INVERSE = "inverse"  # every layer outside the centred window of l

    @property
    def uses_window(self) -> bool:
        """Whether the window size ``k`` matters for this style."""
        return self not in (WindowStyle.CUMULATIVE_UP, WindowStyle.CUMULATIVE_DOWN)

    @classmethod
    def parse(cls, text: str) -> WindowStyle:
        """A style by name (any case; ``centered`` and ``_`` for ``-`` accepted).

        >>> WindowStyle.parse("Cumulative_Up")
        <WindowStyle.CUMULATIVE_UP: 'cumulative-up'>
        """
        key = text.strip().lower().replace("_", "-").replace("centered", "centred")
        try:
            return cls(key)
        except ValueError:
            raise ConfigError(f"unknown window style {text!r}; valid: {', '.join(s.value for s in cls)}") from None


#: The ``window_style`` of rows of a flow with a fixed layer range (``@A-B``).
FIXED_RANGE = "fixed"


def window_points(style: WindowStyle, k: int, n_layers: int) -> list[tuple[int, tuple[int, ...]]]:
    """``(point, layers)`` for every layer ``l`` of an ``n_layers`` model in window style ``style``.

    >>> window_points(WindowStyle.START, 2, 3)
    [(0, (0, 1)), (1, (1, 2)), (2, (2,))]
    >>> window_points(WindowStyle.INVERSE, 1, 3)
    [(0, (1, 2)), (1, (0, 2)), (2, (0, 1))]
    """
    check_window(style, k, n_layers)
    out = []
    for point in range(n_layers):
        if style is WindowStyle.CENTRED:
            layers = window_layers(point, k, n_layers)
        elif style is WindowStyle.START:
            layers = tuple(range(point, min(n_layers, point + k)))
        elif style is WindowStyle.CUMULATIVE_UP:
            layers = tuple(range(0, point + 1))
        elif style is WindowStyle.CUMULATIVE_DOWN:
            layers = tuple(range(point, n_layers))
        else:
            inside = set(window_layers(point, k, n_layers))
            layers = tuple(layer for layer in range(n_layers) if layer not in inside)
        out.append((point, layers))
    return out


def check_window(style: WindowStyle, k: int, n_layers: int) -> None:
    """Refuse a window that does not fit the model, naming the valid range.

    >>> check_window(WindowStyle.CENTRED, 100, 6)
    Traceback (most recent call last):
    ...
    vlmflow.errors.ConfigError: window 100 does not fit the model's 6 layers; valid windows: 1..6
    """
    if k < 1:
        raise ConfigError(f"window must be at least 1 layer, got {k}")
    largest = n_layers - 1 if style is WindowStyle.INVERSE else n_layers
    if style.uses_window and k > largest:
        why = " (an inverse window must leave some layer outside it)" if style is WindowStyle.INVERSE else ""
        raise ConfigError(f"window {k} does not fit the model's {n_layers} layers{why}; valid windows: 1..{largest}")


def check_layer_range(layers: tuple[int, int], n_layers: int, what: str = "layer range") -> None:
    """Refuse a fixed layer range ``(A, B)`` outside the model, naming the valid range.

    >>> check_layer_range((2, 9), 6)
    Traceback (most recent call last):
    ...
    vlmflow.errors.ConfigError: layer range @2-9 lies outside the model's layers; valid: A-B with 0 <= A <= B <= 5
    """
    a, b = layers
    if not 0 <= a <= b < n_layers:
        raise ConfigError(f"{what} @{a}-{b} lies outside the model's layers; valid: A-B with 0 <= A <= B <= {n_layers - 1}")


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
