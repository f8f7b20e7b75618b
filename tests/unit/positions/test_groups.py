from __future__ import annotations

import pytest

from vlmflow.errors import ConfigError, SampleError
from vlmflow.positions.groups import PAPER_FLOWS, Flow, Group, PositionGroups


@pytest.mark.parametrize(
    "text, flow",
    [
        ("image->last", Flow(Group.IMAGE, Group.LAST)),
        ("question -> last", Flow(Group.QUESTION, Group.LAST)),
        ("Related->Question", Flow(Group.RELATED, Group.QUESTION)),
    ],
    ids=["plain", "spaces", "case"],
)
def test_flow_parse_round_trips(text, flow):
    assert Flow.parse(text) == flow
    assert Flow.parse(str(flow)) == flow


@pytest.mark.parametrize("text", ["pixels->last", "image-last", "->last", "image->"])
def test_flow_parse_names_the_bad_value(text):
    with pytest.raises(ConfigError, match="valid|expected"):
        Flow.parse(text)


def test_paper_flows_are_the_six():
    assert [str(f) for f in PAPER_FLOWS] == [
        "question->last", "image->last", "last->last", "image->question", "related->question", "other->question"
    ]


def test_position_groups_validate_and_explain_missing():
    g = PositionGroups(4, {Group.LAST: (3,)}, missing={Group.RELATED: "no boxes"})
    with pytest.raises(SampleError, match="no boxes"):
        g[Group.RELATED]
    with pytest.raises(SampleError, match="outside"):
        PositionGroups(3, {Group.LAST: (3,)})
    with pytest.raises(SampleError, match="sorted"):
        PositionGroups(5, {Group.IMAGE: (2, 1)})
