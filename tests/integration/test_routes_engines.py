"""Routes, keep-only, window styles and metrics through the engines, checked against the reference.

* keep-only of a route is exactly a knockout of the complementary edges (built here independently:
  every key but the route's sources and targets, for each target row), on the reference engine;
* every window style and every metric (including ``sequence``: the greedy answer teacher-forced
  under the knockout) gives the same rows with the fast engine as with the reference, on LLaVA and
  Gemma-3 (a bidirectional image block, token types extended for the answer) and PaliGemma (the
  answer appended outside its bidirectional prefix);
* several routes and both directions block the union of their edges.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import make_scene_sample
from vlmflow.experiments.flows import analyse_sample
from vlmflow.experiments.metrics import answer_tokens
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.settings import Engine, FlowSettings, Metric, WindowStyle
from vlmflow.knockout.reference import reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.positions.edges import flow_edges
from vlmflow.positions.groups import Group
from vlmflow.positions.resolve import Resolver
from vlmflow.positions.routes import Flow


@pytest.fixture(scope="module")
def family(tiny_family):
    """``family(name)`` -> ``(loaded, prepared)`` for the scene sample."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            loaded = tiny_family(name)
            sample, image = make_scene_sample()
            cache[name] = (loaded, prepare_sample(loaded, sample, image))
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["llava", "gemma3"])
@pytest.mark.parametrize("route", ["question->last", "(image|question)->last", "related->question", "image<->question"])
def test_keep_only_is_a_knockout_of_the_complementary_edges(family, name, route):
    loaded, prepared = family(name)
    g, n = prepared.groups, prepared.encoded.seq_len
    flow = Flow.parse(route)
    # The complement, written out: per target row, every key but the route's sources and targets.
    complement = []
    for directed in flow.directed():
        resolver = Resolver(prepared)
        targets, sources = resolver.positions(directed.target), resolver.positions(directed.source)
        for row in targets:
            kept = {*sources, *targets}
            complement.append(((row,), tuple(k for k in range(n) if k not in kept)))
    if flow.both:  # a row that is a target of both directions keeps both routes' keys: no such row here
        assert not set(g[Group.IMAGE]) & set(g[Group.QUESTION])
    layers = (1, 2)
    keep = Knockout(flow_edges(flow.with_mode(True), Resolver(prepared)), layers)
    manual = Knockout(tuple(complement), layers)
    plain = Knockout(flow_edges(flow, Resolver(prepared)), layers)
    logits = torch.log_softmax(reference_logits(loaded.decoder, prepared.encoded, [keep, manual, plain]), -1)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)
    assert (logits[0] - logits[2]).abs().max() > 1e-4  # keep-only is not the route's own knockout
    # Every row still reads its own key: no keep-only row is ever emptied.
    rows = torch.arange(n)
    assert not bool((keep.blocked_rows(rows, n) & torch.eye(n, dtype=torch.bool)).any())


def test_several_routes_and_both_directions_block_the_union_of_their_edges(family):
    loaded, prepared = family("llava")
    resolver = Resolver(prepared)
    both = flow_edges(Flow.parse("image<->question+question->last"), resolver)
    g = prepared.groups
    assert both == ((g[Group.QUESTION], g[Group.IMAGE]), (g[Group.IMAGE], g[Group.QUESTION]), (g[Group.LAST], g[Group.QUESTION]))


def _rows(loaded, prepared, **settings):
    result = analyse_sample(loaded, prepared, FlowSettings(keep_all=True, max_new_tokens=4, **settings))
    assert result.rows, result.errors
    return result


FLOWS = ("question->last", "image->question", "keep-only:(related|question)->last", "image->last+last->last@1-2")


@pytest.mark.parametrize("name", ["llava", "gemma3"])
@pytest.mark.parametrize("style", list(WindowStyle))
def test_every_window_style_fast_equals_reference(family, name, style):
    loaded, prepared = family(name)
    settings = {"flows": FLOWS, "window": 2, "window_style": style}
    fast = _rows(loaded, prepared, engine=Engine.FAST, **settings)
    ref = _rows(loaded, prepared, engine=Engine.REFERENCE, **settings)
    _same_rows(fast.rows, ref.rows)
    swept = [r for r in fast.rows if r.window_style != "fixed"]
    assert {r.window_style for r in swept} == {style.value} and len(swept) == 3 * loaded.n_layers
    fixed = [r for r in fast.rows if r.window_style == "fixed"]
    assert [(r.layer, r.layers_blocked, r.window) for r in fixed] == [(1, [1, 2], 2)]
    assert {tuple(r.layers_blocked) for r in swept} == {layers for _, layers in _points(style, 2, loaded.n_layers)}


def _points(style, k, n):
    from vlmflow.experiments.windows import window_points

    return window_points(style, k, n)


@pytest.mark.parametrize("name", ["llava", "gemma3", "paligemma"])
@pytest.mark.parametrize("metric", list(Metric))
def test_every_metric_fast_equals_reference(family, name, metric):
    loaded, prepared = family(name)
    settings = {"flows": FLOWS[:3], "window": 2, "metric": metric}
    fast = _rows(loaded, prepared, engine=Engine.FAST, **settings)
    ref = _rows(loaded, prepared, engine=Engine.REFERENCE, **settings)
    _same_rows(fast.rows, ref.rows)
    assert {r.metric for r in fast.rows} == {metric.value}
    if metric is Metric.SEQUENCE:
        assert {r.n_answer_tokens for r in fast.rows} == {len(answer_tokens(fast.clean.generated.tolist(), loaded.stop_token_ids))}
    else:
        assert {r.n_answer_tokens for r in fast.rows} == {1}


def test_the_sequence_metric_reads_the_whole_teacher_forced_answer(family):
    """p_base is the geometric mean of the answer tokens' probabilities in one clean teacher-forced
    forward; with one answer token it is the first-token probability."""
    loaded, prepared = family("llava")
    result = _rows(loaded, prepared, flows=("question->last",), window=2, metric=Metric.SEQUENCE)
    answer = answer_tokens(result.clean.generated.tolist(), loaded.stop_token_ids)
    # The tiny model's greedy answer runs to max_new_tokens: several tokens.
    assert len(answer) > 1 and {r.n_answer_tokens for r in result.rows} == {len(answer)}
    ids = torch.cat([prepared.encoded.input_ids, torch.tensor(answer[:-1])])
    extended = loaded.inputs.append_tokens(prepared.encoded, answer[:-1])
    assert torch.equal(extended.input_ids, ids) and torch.equal(extended.inputs["input_ids"][0].cpu(), ids)
    with torch.no_grad():
        logits = loaded.model(**extended.inputs).logits[0, -len(answer):].float()
    log_p = torch.log_softmax(logits, -1)[torch.arange(len(answer)), torch.tensor(answer)]
    assert result.rows[0].p_base == pytest.approx(float(log_p.mean().exp()), rel=1e-5)
    first = _rows(loaded, prepared, flows=("question->last",), window=2)
    assert first.rows[0].p_base == pytest.approx(float(torch.softmax(result.clean.logits, -1)[answer[0]]), rel=1e-5)


def _same_rows(fast, ref):
    assert [(r.flow, r.layer, r.layers_blocked) for r in fast] == [(r.flow, r.layer, r.layers_blocked) for r in ref]
    for a, b in zip(fast, ref, strict=True):
        assert a.logprob_diff == pytest.approx(b.logprob_diff, abs=1e-5), (a.flow, a.layer)
        assert a.kl == pytest.approx(b.kl, abs=1e-5), (a.flow, a.layer)
        assert a.p_blocked == pytest.approx(b.p_blocked, rel=1e-5) and a.rel_change == pytest.approx(b.rel_change, abs=1e-3)
        floats = {"engine": "", "p_blocked": 0.0, "rel_change": 0.0, "logprob_diff": 0.0, "kl": 0.0}
        assert replace(a, **floats) == replace(b, **floats), (a.flow, a.layer)
    assert max(abs(r.logprob_diff) for r in ref) > 1e-3  # the knockouts do something
