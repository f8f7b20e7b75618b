"""Every group-expression form resolves to the positions it names, on tiny models of four families:
LLaVA-1.5 (one padded view), LLaVA-NeXT (anyres: base view, high-resolution grid, newlines),
Gemma-3 (a bidirectional image block) and Idefics3 (tiles and a global view).

Expected positions come from the named groups, the token sequence and Python's own slicing and set
operations, not from the resolver: ``box:`` on the sample's own box is ``related``; a ``grid:`` of a
whole view is that view's group; ``text:`` covers exactly the tokens that spell the word.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import make_scene_sample
from vlmflow.errors import SampleError
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.positions.expressions import Custom, parse_expression
from vlmflow.positions.groups import Group
from vlmflow.positions.resolve import Resolver

FAMILIES = ["llava", "next", "gemma3", "idefics3"]
EXTRA = {"target": "square", "where": "6,8,12,12", "empty": ""}


@pytest.fixture(scope="module")
def prepared_of(tiny_family):
    """``prepared_of(family)`` -> ``(loaded, prepared)`` for the scene sample with extra data columns."""
    cache: dict[str, tuple] = {}

    def get(family: str) -> tuple:
        if family not in cache:
            loaded = tiny_family(family)
            sample, image = make_scene_sample()
            cache[family] = (loaded, prepare_sample(loaded, replace(sample, extra=EXTRA), image))
        return cache[family]

    return get


def _positions(prepared, text):
    return set(Resolver(prepared).positions(parse_expression(text)))


def _group(prepared, group):
    return set(prepared.groups[group])


@pytest.mark.parametrize("family", FAMILIES)
def test_set_algebra_items_and_token_ranges(prepared_of, family):
    _, prepared = prepared_of(family)
    g = prepared.groups
    n = prepared.encoded.seq_len
    q, image, last = list(g[Group.QUESTION]), _group(prepared, Group.IMAGE), _group(prepared, Group.LAST)
    assert _positions(prepared, "question") == set(q)
    assert _positions(prepared, "related | question") == _group(prepared, Group.RELATED) | set(q)
    assert _positions(prepared, "image & related") == _group(prepared, Group.RELATED)
    assert _positions(prepared, "question - true_option - false_option") == set(q) - _group(prepared, Group.TRUE_OPTION) - _group(prepared, Group.FALSE_OPTION)
    assert _positions(prepared, "question_without_options") == _positions(prepared, "question - true_option - false_option")
    assert _positions(prepared, "(image - related) | last") == (image - _group(prepared, Group.RELATED)) | last
    assert _positions(prepared, f"tokens:{q[0]}:{q[-1] + 1}") == set(q)
    assert _positions(prepared, "tokens:-1") == last == {n - 1}
    assert _positions(prepared, "tokens:-3:") == set(range(n)[-3:])
    assert _positions(prepared, "question[0:2]") == set(q[:2])
    assert _positions(prepared, "question[-1]") == {q[-1]}
    assert _positions(prepared, "(question | last)[-1]") == last
    # One image: image[0] and image[-1] are the whole image; image[1] is nothing.
    assert _positions(prepared, "image[0]") == _positions(prepared, "image[-1]") == image
    with pytest.raises(SampleError, match=r"image\[1\] selects no position"):
        _positions(prepared, "image[1]")


@pytest.mark.parametrize("family", FAMILIES)
def test_text_regex_columns_and_callables_select_the_tokens_that_spell_them(prepared_of, family):
    loaded, prepared = prepared_of(family)
    ids = prepared.encoded.input_ids.tolist()
    q = set(prepared.groups[Group.QUESTION])

    def spelled(positions):
        return loaded.tokenizer.decode([ids[p] for p in sorted(positions)]).strip()

    for word in ("red", "square", "or blue"):
        found = _positions(prepared, f'text:"{word}"')
        assert found <= q and word in spelled(found)
        for p in found:  # every token is needed: drop one and the word is no longer spelled whole
            assert word not in spelled(found - {p}), (word, p)
    assert _positions(prepared, 'text:"red"#1') == _positions(prepared, 'text:"red"')
    with pytest.raises(SampleError, match="holds 'red' 1 time"):
        _positions(prepared, 'text:"red"#2')
    with pytest.raises(SampleError, match='text:"purple" selects no position'):
        _positions(prepared, 'question - text:"purple"')
    assert _positions(prepared, 'regex:"r.d|bl.e"') == _positions(prepared, 'text:"red" | text:"blue"')
    assert _positions(prepared, "col:target") == _positions(prepared, 'text:"square"')
    assert _positions(prepared, "col:where") == _group(prepared, Group.RELATED)
    with pytest.raises(SampleError, match="no value in column 'empty'"):
        _positions(prepared, "col:empty")
    first = Custom.of(lambda p: p.groups[Group.QUESTION][:1])
    assert Resolver(prepared).positions(first) == prepared.groups[Group.QUESTION][:1]
    with pytest.raises(SampleError, match="outside the sequence"):
        Resolver(prepared).positions(Custom.of(lambda p: [10_000]))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_box_on_the_samples_own_box_is_related(prepared_of, family):
    _, prepared = prepared_of(family)
    box = prepared.sample.boxes[0]
    assert _positions(prepared, f"box:{box.x},{box.y},{box.w},{box.h}") == _group(prepared, Group.RELATED)
    width, height = prepared.sample.image_size
    whole = _positions(prepared, f"box:0,0,{width},{height}")
    no_patch = {p for g in (Group.PADDING, Group.IMAGE_NEWLINE) for p in prepared.groups.positions.get(g, ())}
    assert whole == _group(prepared, Group.IMAGE) - no_patch
    with pytest.raises(SampleError, match="lies outside the 40x30 image"):
        _positions(prepared, "box:100,100,5,5")


#: family -> (group of the base view's tokens, group of the "hd" view's tokens or None).
VIEWS = {
    "llava": (Group.IMAGE, None),
    "next": (Group.IMAGE_BASE, Group.IMAGE_GRID),
    "gemma3": (Group.IMAGE, None),
    "idefics3": (Group.IMAGE_BASE, Group.IMAGE_GRID),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_addresses_rows_and_columns_of_each_view(prepared_of, family):
    _, prepared = prepared_of(family)
    base, hd = VIEWS[family]
    layout = prepared.images[0].layout
    image = list(prepared.groups[Group.IMAGE])
    views = layout.views()
    assert _positions(prepared, "grid::,:") == _group(prepared, base)
    rows, cols = views["base"].shape
    # Row-major order: the top-left patch is the view's first token, the bottom row its last `cols`.
    assert _positions(prepared, "grid:0,0") == {image[int(views["base"][0, 0])]} == {min(_group(prepared, base))}
    assert _positions(prepared, "grid:-1,:") == {image[int(i)] for i in views["base"][-1]}
    assert len(_positions(prepared, f"grid:0:{rows},0:1")) == rows
    if hd is None:
        with pytest.raises(SampleError, match="no view 'hd' in this image; views: base"):
            _positions(prepared, "grid:hd:0,0")
    else:
        assert _positions(prepared, "grid:hd::,:") == _group(prepared, hd)
        assert _positions(prepared, "grid:hd:0:1,:") < _group(prepared, hd)


def test_anyres_aliases_of_the_paper_code(prepared_of):
    _, prepared = prepared_of("next")
    related, grid, newline, other = (_group(prepared, g) for g in (Group.RELATED, Group.IMAGE_GRID, Group.IMAGE_NEWLINE, Group.OTHER))
    assert _group(prepared, Group.RELATED_IN_GRID) == related & grid
    assert _group(prepared, Group.GRID_WITHOUT_RELATED) == grid - related
    assert _group(prepared, Group.GRID_WITH_NEWLINES) == grid | newline
    assert _group(prepared, Group.OTHER_WITH_NEWLINES) == other | newline
    _, single = prepared_of("llava")
    with pytest.raises(SampleError, match="'related_in_grid' is not available for this sample: needs image_grid"):
        single.groups[Group.RELATED_IN_GRID]


def test_a_group_the_sample_lacks_names_the_reason(prepared_of):
    _, prepared = prepared_of("llava")
    plain = prepare_sample(prepared_of("llava")[0], replace(prepared.sample, true_option=None, objects=()), make_scene_sample()[1])
    with pytest.raises(SampleError, match="position group 'true_option' is not available for this sample: the sample has no true option"):
        Resolver(plain).positions(parse_expression("question | true_option"))
    with pytest.raises(SampleError, match="'related' is not available for this sample: the sample has no object boxes"):
        Resolver(plain).positions(parse_expression("related"))
    assert set(Resolver(plain).positions(parse_expression("question_without_options"))) < set(plain.groups[Group.QUESTION])
