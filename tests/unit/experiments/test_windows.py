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


# --- window styles -------------------------------------------------------------------------------

from vlmflow.experiments.windows import WindowStyle, check_layer_range, check_window, window_points  # noqa: E402


@pytest.mark.parametrize("k, n", [(3, 6), (1, 4), (5, 5), (4, 9)])
def test_every_style_blocks_the_layers_it_names(k, n):
    centred = dict(sweep(k, n))
    expected = {
        WindowStyle.CENTRED: lambda p: centred[p],
        WindowStyle.START: lambda p: tuple(range(p, min(n, p + k))),
        WindowStyle.CUMULATIVE_UP: lambda p: tuple(range(p + 1)),
        WindowStyle.CUMULATIVE_DOWN: lambda p: tuple(range(p, n)),
        WindowStyle.INVERSE: lambda p: tuple(sorted(set(range(n)) - set(centred[p]))),
    }
    for style, layers in expected.items():
        if style is WindowStyle.INVERSE and k >= n:
            continue
        points = window_points(style, k, n)
        assert [p for p, _ in points] == list(range(n))
        assert all(got == layers(p) and got for p, got in points), style


def test_a_window_or_range_that_does_not_fit_the_model_is_refused_with_the_valid_range():
    with pytest.raises(ConfigError, match=r"window 100 does not fit the model's 6 layers; valid windows: 1\.\.6"):
        window_points(WindowStyle.CENTRED, 100, 6)
    with pytest.raises(ConfigError, match=r"window 6 does not fit .* must leave some layer outside it\); valid windows: 1\.\.5"):
        check_window(WindowStyle.INVERSE, 6, 6)
    check_window(WindowStyle.CUMULATIVE_UP, 100, 6)  # the cumulative styles have no window size
    with pytest.raises(ConfigError, match=r"@2-9 lies outside the model's layers; valid: A-B with 0 <= A <= B <= 5"):
        check_layer_range((2, 9), 6)
    assert WindowStyle.parse("centered") is WindowStyle.CENTRED
    with pytest.raises(ConfigError, match="unknown window style 'middle'; valid: centred, start"):
        WindowStyle.parse("middle")


def test_flow_settings_check_the_depth_before_any_sample():
    from vlmflow.experiments.settings import FlowSettings

    FlowSettings(window=6).check_depth(6)
    with pytest.raises(ConfigError, match="valid windows: 1..6"):
        FlowSettings(window=7).check_depth(6)
    with pytest.raises(ConfigError, match=r"flow question->last@4-8: layer range @4-8 lies outside .* B <= 5"):
        FlowSettings(flows=["image->last", "question->last@4-8"]).check_depth(6)
