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


def test_items_are_whole_units_for_image_frame_and_tile_and_positions_otherwise():
    g = PositionGroups(
        9,
        {Group.IMAGE: (1, 2, 3, 4), Group.FRAME: (1, 2, 3, 4), Group.QUESTION: (6, 7), Group.LAST: (8,)},
        units={Group.IMAGE: ((1, 2, 3, 4),), Group.FRAME: ((1, 2), (3, 4))},
    )
    assert g.items(Group.IMAGE) == ((1, 2, 3, 4),)  # a video is one item of `image`
    assert g.items(Group.FRAME) == ((1, 2), (3, 4))
    assert g.items(Group.QUESTION) == ((6,), (7,))
    with pytest.raises(SampleError, match="not available"):
        g.items(Group.TILE)


@pytest.mark.parametrize(
    "units",
    [
        {Group.IMAGE: ((1, 2),)},  # leaves position 3 out
        {Group.IMAGE: ((3,), (1, 2))},  # out of sequence order
        {Group.IMAGE: ((1, 2), (2, 3))},  # overlapping
        {Group.IMAGE: ((1, 2, 3), ())},  # an empty item
        {Group.FRAME: ((1,),)},  # a group without positions
    ],
)
def test_items_must_partition_their_group_in_order(units):
    with pytest.raises(SampleError, match="partition"):
        PositionGroups(5, {Group.IMAGE: (1, 2, 3)}, units=units)
