from __future__ import annotations

import pytest

from vlmflow.errors import ConfigError
from vlmflow.experiments.windows import default_window, sweep, window_layers


@pytest.mark.parametrize("k, n", [(9, 40), (7, 32), (9, 32), (4, 10), (1, 5), (12, 8)])
def test_windows_follow_the_papers_rule(k, n):
    import math

    for center, layers in sweep(k, n):
        expected = tuple(range(max(0, center - k // 2), min(n, center + math.ceil(k / 2))))
        assert layers == expected
        assert center in layers
        assert len(layers) <= k
    interior = [layers for c, layers in sweep(k, n) if c - k // 2 >= 0 and c + math.ceil(k / 2) <= n]
    assert all(len(layers) == k for layers in interior)


def test_edge_windows_are_clipped():
    assert len(window_layers(0, 9, 40)) == 5
    assert len(window_layers(39, 9, 40)) == 5
    assert len(window_layers(31, 7, 32)) == 4
    assert len(window_layers(0, 7, 32)) == 4


def test_bad_windows_are_refused():
    with pytest.raises(ConfigError, match="at least 1"):
        window_layers(0, 0, 32)
    with pytest.raises(ConfigError, match="out of range"):
        window_layers(32, 7, 32)


def test_default_window_matches_the_paper():
    assert default_window(32) == 7
    assert default_window(40) == 9
