"""Self-tests of the knockout machinery: it really blocks, it blocks only what it should, and it
cleans up after itself."""

from __future__ import annotations

import pytest
import torch

from vlmflow.errors import ConfigError, SampleError
from vlmflow.knockout.fast import clean_run, fast_logits
from vlmflow.knockout.reference import attention_knockout, clean_logits, reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.positions.groups import Flow, Group


def _attention_weights(loaded, prepared, knockout):
    """Per-layer attention probabilities [head, query, key] of a reference forward (eager)."""
    weights = {}
    handles = []
    for layer in range(loaded.n_layers):
        module = loaded.decoder.attention(layer)

        def keep(mod, args, kwargs, out, layer=layer):
            weights[layer] = out[1][0].detach()

        handles.append(module.register_forward_hook(keep, with_kwargs=True))
    try:
        with attention_knockout(loaded.decoder, prepared.encoded, knockout):
            loaded.model(**prepared.encoded.inputs)
    finally:
        for h in handles:
            h.remove()
    return weights


@pytest.mark.parametrize("flow", ["image->question", "related->question", "question->last", "last->last"])
def test_blocked_attention_weights_are_exactly_zero(tiny_prepared, flow):
    loaded, prepared = tiny_prepared("sp-gqa", "eager")
    flow = Flow.parse(flow)
    knockout = Knockout.for_flows(prepared.groups, [flow], [1, 2])
    weights = _attention_weights(loaded, prepared, knockout)
    targets = list(prepared.groups[flow.target])
    sources = list(prepared.groups[flow.source])
    for layer, w in weights.items():
        block = w[:, targets][:, :, sources]
        if layer in (1, 2):
            assert torch.count_nonzero(block) == 0, f"layer {layer} still attends along {flow}"
        else:
            # Outside the window the same edges are used: the knockout did not leak into other layers.
            assert torch.count_nonzero(block) > 0
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_empty_knockout_changes_nothing(tiny_prepared, impl):
    loaded, prepared = tiny_prepared("bpe-mha", impl)
    g = prepared.groups
    base = clean_logits(loaded.decoder, prepared.encoded)
    empty = Knockout(edges=((g[Group.LAST], ()),), layers=tuple(range(loaded.n_layers)))
    # Edges that do not exist in a causal model (the question never attends to the last position).
    acausal = Knockout.for_flows(g, [Flow(Group.LAST, Group.QUESTION)], range(loaded.n_layers))
    ref = reference_logits(loaded.decoder, prepared.encoded, [empty, acausal])
    torch.testing.assert_close(ref, torch.stack([base, base]), atol=1e-5, rtol=0)
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    fast = fast_logits(loaded.decoder, prepared.encoded, clean, [empty, acausal])
    torch.testing.assert_close(fast, torch.stack([base, base]), atol=1e-5, rtol=0)


def test_knockout_leaving_a_query_without_keys_is_refused(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa", "sdpa")
    first_question = prepared.groups[Group.QUESTION][0]
    everything_before = tuple(range(first_question + 1))
    knockout = Knockout(edges=(((first_question,), everything_before),), layers=(0,))
    with pytest.raises(SampleError, match=f"query position {first_question} with no key"):
        reference_logits(loaded.decoder, prepared.encoded, [knockout])
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    with pytest.raises(SampleError, match="no key to attend to"):
        fast_logits(loaded.decoder, prepared.encoded, clean, [knockout])


def _hook_count(loaded):
    n = 0
    for layer in range(loaded.n_layers):
        n += len(loaded.decoder.attention(layer)._forward_pre_hooks)
        n += len(loaded.decoder.layers[layer]._forward_pre_hooks)
    return n


def test_hooks_are_removed_after_an_exception(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa", "sdpa")
    knockout = Knockout.for_flows(prepared.groups, [Flow(Group.IMAGE, Group.LAST)], [0, 1])
    assert _hook_count(loaded) == 0
    with pytest.raises(RuntimeError, match="boom"), attention_knockout(loaded.decoder, prepared.encoded, knockout):
        assert _hook_count(loaded) == 2
        raise RuntimeError("boom")
    assert _hook_count(loaded) == 0

    def explode(module, args, kwargs):
        raise RuntimeError("boom in layer")

    bomb = loaded.decoder.attention(2).register_forward_pre_hook(explode, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom in layer"):
            clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    finally:
        bomb.remove()
    assert _hook_count(loaded) == 0


def test_flash_attention_is_refused(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa", "sdpa")
    config = loaded.decoder.attention(0).config
    original = config._attn_implementation
    config._attn_implementation = "flash_attention_2"
    try:
        knockout = Knockout.for_flows(prepared.groups, [Flow(Group.IMAGE, Group.LAST)], [0])
        with pytest.raises(ConfigError, match="flash_attention_2"):
            reference_logits(loaded.decoder, prepared.encoded, [knockout])
    finally:
        config._attn_implementation = original


def test_reference_hook_refuses_a_partial_sequence(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa", "sdpa")
    knockout = Knockout.for_flows(prepared.groups, [Flow(Group.IMAGE, Group.LAST)], [0])
    with attention_knockout(loaded.decoder, prepared.encoded, knockout), pytest.raises(Exception, match="query positions"):
        loaded.model.generate(**prepared.encoded.inputs, max_new_tokens=2, do_sample=False)
