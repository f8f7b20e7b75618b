"""Attention-summary settings (no model)."""

from __future__ import annotations

import pytest

from vlmflow.errors import ConfigError
from vlmflow.experiments.attention import AttentionSettings, attention_capture_from
from vlmflow.positions.groups import Group, PositionGroups
from vlmflow.results.tables import TABLES


def test_capture_starts_at_the_first_available_target():
    groups = PositionGroups(10, {Group.IMAGE: (2, 3, 4), Group.QUESTION: (6, 7), Group.LAST: (9,)})
    assert attention_capture_from(groups, AttentionSettings()) == 2
    assert attention_capture_from(groups, AttentionSettings(targets=(Group.QUESTION, Group.LAST))) == 6
    # A target the sample lacks is skipped rather than failing the sample.
    assert attention_capture_from(groups, AttentionSettings(targets=(Group.RELATED, Group.LAST))) == 9


@pytest.mark.parametrize("kwargs, match", [
    ({"targets": ()}, "at least one target"),
    ({"sources": (Group.IMAGE, Group.IMAGE)}, "duplicate sources"),
    ({"max_chunk_queries": 0}, "max_chunk_queries"),
], ids=["no-targets", "duplicate", "chunk"])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AttentionSettings(**kwargs)


def test_chunk_size_is_not_part_of_the_identity():
    assert AttentionSettings(max_chunk_queries=1).identity() == AttentionSettings().identity()
    assert TABLES["attention"].key == ("sample_id", "layer", "target", "source")
