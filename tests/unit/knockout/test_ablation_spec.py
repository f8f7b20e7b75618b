"""The Ablation value: validation and the positions/layers the fast engine relies on."""

from __future__ import annotations

import pytest

from vlmflow.errors import ConfigError, SampleError
from vlmflow.knockout.ablation import Ablation, AblationMode, Site, check_ablations
from vlmflow.positions.groups import Group, PositionGroups


def test_first_target_and_layer_bound_what_can_change():
    a = Ablation(Site.ATTENTION, layers=(3, 5), positions=(4, 8, 9))
    assert (a.first_target, a.first_layer, a.is_empty) == (4, 3, False)
    assert Ablation(Site.MLP, layers=(0,), positions=()).is_empty


def test_mean_defaults_to_the_ablated_positions():
    a = Ablation(Site.MLP, (1,), (2, 3), mode=AblationMode.MEAN)
    assert a.averaged_positions == (2, 3)
    b = Ablation(Site.MLP, (1,), (2, 3), mode=AblationMode.MEAN, mean_over=(0, 1, 2, 3))
    assert b.averaged_positions == (0, 1, 2, 3)


def test_for_group_resolves_positions_and_refuses_missing_groups():
    groups = PositionGroups(8, {Group.IMAGE: (1, 2, 3), Group.LAST: (7,)}, missing={Group.RELATED: "no boxes"})
    a = Ablation.for_group(groups, Group.IMAGE, Site.MLP, [2, 1], AblationMode.MEAN, mean_over=Group.LAST)
    assert (a.positions, a.layers, a.mean_over) == ((1, 2, 3), (1, 2), (7,))
    with pytest.raises(SampleError, match="no boxes"):
        Ablation.for_group(groups, Group.RELATED, Site.MLP, [0])


@pytest.mark.parametrize("kwargs, match", [
    ({"site": "mlp"}, "Site"),
    ({"mode": "zero"}, "AblationMode"),
    ({"layers": ()}, "at least one layer"),
    ({"positions": (3, 2)}, "sorted and unique"),
    ({"mean_over": (1,)}, "only meaningful with mode=mean"),
    ({"mode": AblationMode.MEAN, "mean_over": ()}, "averages nothing"),
], ids=["site-string", "mode-string", "no-layers", "unsorted", "mean-over-zero", "empty-mean-over"])
def test_bad_ablations_are_refused(kwargs, match):
    base = {"site": Site.ATTENTION, "layers": (0,), "positions": (1, 2)}
    with pytest.raises(ConfigError, match=match):
        Ablation(**{**base, **kwargs})


def test_check_names_the_bad_layer_or_position():
    with pytest.raises(ConfigError, match=r"layers \[4\] out of range"):
        check_ablations([Ablation(Site.MLP, (4,), (1,))], n_layers=4, seq_len=10)
    with pytest.raises(ConfigError, match=r"positions \[10\] out of range"):
        check_ablations([Ablation(Site.MLP, (0,), (10,))], n_layers=4, seq_len=10)
    with pytest.raises(ConfigError, match=r"mean_over \[12\]"):
        check_ablations([Ablation(Site.MLP, (0,), (1,), AblationMode.MEAN, (12,))], n_layers=4, seq_len=10)
