"""The group-expression and route grammar: every form parses into its typed value, prints back to text
that parses to an equal value, binds as documented, and a mistake names its character and what was
expected."""

from __future__ import annotations

import pytest

from vlmflow.errors import ConfigError
from vlmflow.positions.expressions import (
    BoxRegion,
    Column,
    Custom,
    Difference,
    GridRegion,
    Intersection,
    Items,
    Regex,
    Slice,
    Text,
    Tokens,
    Union,
    as_expression,
    parse_expression,
)
from vlmflow.positions.groups import Group
from vlmflow.positions.routes import PAPER_FLOWS, Flow, Route, parse_route
from vlmflow.results.tables import flows_of

Q, T, F, L, IMG, R = Group.QUESTION, Group.TRUE_OPTION, Group.FALSE_OPTION, Group.LAST, Group.IMAGE, Group.RELATED

FORMS = {
    "question": Q,
    "Other_Content": Group.OTHER_CONTENT,
    'text:"red"': Text("red"),
    "text:'the big one'#2": Text("the big one", 2),
    'text:"say \\"hi\\""': Text('say "hi"'),
    'regex:"colou?r"': Regex("colou?r"),
    'regex:"\\d+"': Regex("\\d+"),
    "tokens:5:9": Tokens(Slice(5, 9)),
    "tokens:-3:": Tokens(Slice(-3, None)),
    "tokens::4": Tokens(Slice(None, 4)),
    "tokens:-1": Tokens(-1),
    "question[0:2]": Items(Q, Slice(0, 2)),
    "image[-1]": Items(IMG, -1),
    "question[1:][0]": Items(Items(Q, Slice(1, None)), 0),
    "(question | last)[-1]": Items(Union(Q, L), -1),
    "related | question": Union(R, Q),
    "image_grid & related": Intersection(Group.IMAGE_GRID, R),
    "question - true_option": Difference(Q, T),
    "box:10,20,30.5,40": BoxRegion(10, 20, 30.5, 40),
    "grid:0:2,3:5": GridRegion(Slice(0, 2), Slice(3, 5)),
    "grid:hd:0:4,-4:": GridRegion(Slice(0, 4), Slice(-4, None), "hd"),
    "grid:1,2": GridRegion(1, 2),
    "col:target": Column("target"),
    'col:"object name"': Column("object name"),
    "custom:my_module.positions": Custom("my_module.positions"),
}


@pytest.mark.parametrize("text", list(FORMS))
def test_every_form_parses_to_its_value_and_prints_back(text):
    expr = parse_expression(text)
    assert expr == FORMS[text]
    assert parse_expression(str(expr)) == expr


@pytest.mark.parametrize("text, expected", [
    ("question - true_option | last", Union(Difference(Q, T), L)),
    ("question | true_option - last", Union(Q, Difference(T, L))),
    ("question & true_option | last", Union(Intersection(Q, T), L)),
    ("question - true_option & last", Intersection(Difference(Q, T), L)),
    ("question - true_option - false_option", Difference(Difference(Q, T), F)),
    ("question - (true_option - false_option)", Difference(Q, Difference(T, F))),
    ("(question | last) & (image | last)", Intersection(Union(Q, L), Union(IMG, L))),
])
def test_precedence_is_pythons_and_parentheses_group(text, expected):
    expr = parse_expression(text)
    assert expr == expected
    assert parse_expression(str(expr)) == expr  # printing keeps the grouping


@pytest.mark.parametrize("text, message", [
    ("qestion", "unknown position group 'qestion' at character 1; expected one of: image, question"),
    ("image - pixels", "unknown position group 'pixels' at character 9; expected one of"),
    ("other-content", "unknown position group 'content' at character 7 (names are written with '_': other_content"),
    ('text:"red', "unterminated string starting at character 6; expected a closing \""),
    ("text:red", "found 'red' at character 6; expected the words in quotes, e.g. text:\"red\""),
    ('text:""', 'text:"" is empty; expected non-empty words'),
    ('text:"red"#0', 'occurrence #0 at character 12; expected an occurrence from 1'),
    ("text", "found the end at character 5; expected ':' after text"),
    ("tokens:a:b", "found 'a' at character 8; expected an index such as 0, -1 or a slice such as 0:2"),
    ("question[0:2", "found the end at character 13; expected ']' closing the index"),
    ("(question | last", "found the end at character 17; expected ')' closing the parenthesis"),
    ("question last", "found 'last' at character 10; expected the end, or an operator | & -"),
    ("box:1,2,3", "found the end at character 10; expected ',' and the box h (box:X,Y,W,H)"),
    ("grid:0:2", "found the end at character 9; expected ',' and the columns (grid:R0:R1,C0:C1)"),
    ('regex:"("', "does not compile"),
    ("question $ last", "unexpected character '$' at character 10"),
    ("| last", "found '|' at character 1; expected a group name, ( or a form such as text:\"WORDS\""),
])
def test_a_parse_error_names_the_character_and_what_was_expected(text, message):
    with pytest.raises(ConfigError) as info:
        parse_expression(text)
    assert str(info.value).startswith(f"group expression {text!r}: ")
    assert message in str(info.value)


ROUTES = {
    "image->last": Flow(IMG, L),
    "image <-> question": Flow(IMG, Q, both=True),
    "image->question+question->last": Flow(IMG, Q, also=(Route(Q, L),)),
    "question->last@10-20": Flow(Q, L, layers=(10, 20)),
    "keep-only:(image|question)->last": Flow(Union(IMG, Q), L, keep_only=True),
    "knockout:image->last": Flow(IMG, L),
    'keep-only: text:"red" -> last + image<->question @0-3': Flow(
        Text("red"), L, also=(Route(IMG, Q, both=True),), keep_only=True, layers=(0, 3)
    ),
}


@pytest.mark.parametrize("text", list(ROUTES))
def test_every_route_form_parses_and_prints_back(text):
    flow = Flow.parse(text)
    assert flow == ROUTES[text]
    assert Flow.parse(str(flow)) == flow
    assert flows_of([str(flow)])[str(flow)] == flow


def test_routes_split_into_directed_routes_and_carry_their_mode():
    flow = Flow.parse("keep-only:image<->question+question->last@2-5")
    assert [str(r) for r in flow.directed()] == ["image->question", "question->image", "question->last"]
    assert str(flow) == "keep-only:image<->question+question->last@2-5"
    assert flow.label == "only image ↔ question + question → last @ layers 2-5"
    assert not flow.is_simple and Flow.parse("image->last").is_simple
    assert flow.with_mode(False) == Flow.parse("image<->question+question->last@2-5")
    assert parse_route("related | question -> last") == Route(Union(R, Q), L)
    assert str(Flow.parse("(related|question)->last")) == "(related | question)->last"


@pytest.mark.parametrize("text, message", [
    ("image", "flow 'image': found the end at character 6; expected '->' or '<->' between the source and the target"),
    ("image->", "flow 'image->': found the end at character 8; expected a group name"),
    ("question->last@3-1", "layer range 3-1 ends before it starts at character 16; expected @A-B with A <= B"),
    ("question->last@3", "found the end at character 17; expected '-' and the last layer B of @A-B"),
    ("question->last@1-2+image->last", "found '+' at character 19; expected the end, '+' and another route"),
    ("question->last last", "found 'last' at character 16; expected the end, '+' and another route, or '@A-B'"),
])
def test_a_bad_flow_names_the_character_and_what_was_expected(text, message):
    with pytest.raises(ConfigError) as info:
        Flow.parse(text)
    assert message in str(info.value)


def test_the_papers_flows_keep_their_text_and_rows_of_old_runs_read_back():
    assert [str(f) for f in PAPER_FLOWS] == [
        "question->last", "image->last", "last->last", "image->question", "related->question", "other->question"
    ]
    old_column = ["image->last", "related->question", "other_content->question", "random->question"]
    read = flows_of(old_column)
    assert read["related->question"] == Flow(R, Q) and read["other_content->question"].source == Group.OTHER_CONTENT
    assert [read[v].label for v in old_column[:2]] == ["image ↛ last", "related ↛ question"]
    # Flow is still importable where it was.
    from vlmflow.positions.groups import Flow as OldName

    assert OldName is Flow


def test_python_gives_expressions_as_values_strings_or_callables():
    def lasts(prepared):
        return [prepared.encoded.seq_len - 1]

    flow = Flow(lasts, "question[0]")
    assert isinstance(flow.source, Custom) and flow.source.function is lasts
    assert str(flow) == "custom:test_expressions.test_python_gives_expressions_as_values_strings_or_callables._locals_.lasts->question[0]"
    assert Flow.parse(str(flow)) == flow  # equal by name; the text form has no function
    assert as_expression(Group.IMAGE) is Group.IMAGE
    assert Flow.of(("image", "last")) == Flow(IMG, L)
    with pytest.raises(ConfigError, match="expected a group expression"):
        as_expression(3)


def test_a_study_config_flow_may_be_a_mapping():
    assert Flow.from_config({"route": "image->question", "mode": "keep-only", "layers": [5, 19]}) == Flow(
        IMG, Q, keep_only=True, layers=(5, 19)
    )
    assert Flow.from_config({"route": "keep-only:image->last"}).keep_only
    with pytest.raises(ConfigError, match="unknown mode 'keep'"):
        Flow.from_config({"route": "image->last", "mode": "keep"})
    with pytest.raises(ConfigError, match=r"layers must be \[A, B\]"):
        Flow.from_config({"route": "image->last", "layers": [1, 2, 3]})
    with pytest.raises(ConfigError, match="a flow mapping takes route"):
        Flow.from_config({"flow": "image->last"})


def test_the_docs_list_every_group_and_form_and_the_readme_points_there():
    from pathlib import Path

    root = Path(__file__).parents[3]
    routes = (root / "docs" / "routes.md").read_text(encoding="utf-8")
    for group in Group:
        assert f"| `{group.value}` |" in routes, group
    for form in ('text:"', "#2", "regex:", "tokens:", "question[0:2]", "|", "&", " - ", "box:", "grid:", "col:", "custom:",
                 "<->", "+question->last", "@10-20", "keep-only:", "cumulative-up", "inverse", "sequence", "kl"):
        assert form in routes, form
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "[docs/routes.md](docs/routes.md)" in readme and "[docs/data.md](docs/data.md)" in readme
