"""The fast engine equals the reference path (a plain full forward with the mask applied by hooks).

Checked for all six paper flows, every window centre, on several tiny LLaVA shapes (SentencePiece,
byte-level and word tokenizers; GQA, MHA and MQA attention) under both attention implementations,
plus multi-flow and head-level knockouts.
"""

from __future__ import annotations

import pytest
import torch

from vlmflow.experiments.windows import sweep
from vlmflow.knockout.fast import clean_run, fast_logits
from vlmflow.knockout.reference import clean_logits, reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.positions.groups import PAPER_FLOWS, Flow, Group

SHAPES = ["sp-gqa", "bpe-mha", "word-mqa"]
IMPLS = ["sdpa", "eager"]


def _all_knockouts(loaded, groups, window):
    n_layers = loaded.n_layers
    return [
        (flow, Knockout.for_flows(groups, [flow], layers))
        for flow in PAPER_FLOWS
        for _, layers in sweep(window, n_layers)
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [1, 3])
def test_fast_equals_reference_for_the_six_flows(tiny_prepared, shape, impl, window):
    loaded, prepared = tiny_prepared(shape, impl)
    pairs = _all_knockouts(loaded, prepared.groups, window)
    knockouts = [k for _, k in pairs]
    start = min(k.first_target for k in knockouts)
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=start)
    fast = torch.log_softmax(fast_logits(loaded.decoder, prepared.encoded, clean, knockouts), -1)
    ref = torch.log_softmax(reference_logits(loaded.decoder, prepared.encoded, knockouts), -1)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    # Every flow must actually move the output somewhere in depth (no silent no-op).
    base = torch.log_softmax(clean.logits, -1)
    for flow in PAPER_FLOWS:
        rows = [i for i, (f, _) in enumerate(pairs) if f == flow]
        assert (ref[rows] - base).abs().max() > 1e-3, f"{flow} changed nothing"


@pytest.mark.parametrize("impl", IMPLS)
def test_clean_run_logits_equal_plain_forward(tiny_prepared, impl):
    loaded, prepared = tiny_prepared("sp-gqa", impl)
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0, max_new_tokens=3,
                      eos_token_id=loaded.tokenizer.eos_token_id)
    torch.testing.assert_close(clean.logits, clean_logits(loaded.decoder, prepared.encoded), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fold", [1, 7, 4096])
def test_fold_chunking_does_not_change_results(tiny_prepared, fold):
    loaded, prepared = tiny_prepared("bpe-mha", "sdpa")
    knockouts = [k for _, k in _all_knockouts(loaded, prepared.groups, 3)]
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    ref = reference_logits(loaded.decoder, prepared.encoded, knockouts)
    fast = fast_logits(loaded.decoder, prepared.encoded, clean, knockouts, max_fold_queries=fold)
    torch.testing.assert_close(torch.log_softmax(fast, -1), torch.log_softmax(ref, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_flow_and_head_level_knockouts_match(tiny_prepared, impl):
    loaded, prepared = tiny_prepared("sp-gqa", impl)
    g = prepared.groups
    knockouts = [
        Knockout.for_flows(g, [Flow(Group.IMAGE, Group.QUESTION), Flow(Group.IMAGE, Group.LAST)], range(0, 2)),
        Knockout.for_flows(g, [Flow(Group.QUESTION, Group.LAST)], range(1, 4), heads=[0, 2]),
        Knockout.for_flows(g, [Flow(Group.RELATED, Group.QUESTION)], [2], heads=[3]),
        Knockout.for_flows(g, [Flow(Group.TRUE_OPTION, Group.LAST)], range(4)),
    ]
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    fast = fast_logits(loaded.decoder, prepared.encoded, clean, knockouts)
    ref = reference_logits(loaded.decoder, prepared.encoded, knockouts)
    torch.testing.assert_close(torch.log_softmax(fast, -1), torch.log_softmax(ref, -1), atol=1e-5, rtol=0)
    # Blocking in a subset of heads is a weaker intervention than in all heads.
    all_heads = Knockout.for_flows(g, [Flow(Group.QUESTION, Group.LAST)], range(1, 4))
    full = reference_logits(loaded.decoder, prepared.encoded, [all_heads])[0]
    assert not torch.allclose(full, ref[1], atol=1e-4)
