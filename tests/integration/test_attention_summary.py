"""Group-to-group attention mass, recomputed in query chunks, equals the full attention matrix's."""

from __future__ import annotations

import pytest
import torch

from vlmflow.experiments.attention import AttentionSettings, group_attention_mass
from vlmflow.knockout.fast import clean_run
from vlmflow.positions.groups import Group

SOURCES = (Group.SYSTEM, Group.IMAGE, Group.RELATED, Group.OTHER, Group.QUESTION, Group.SUFFIX, Group.LAST)
TARGETS = (Group.IMAGE, Group.QUESTION, Group.LAST)


def _full_attention(loaded, prepared):
    """Per layer, ``[head, seq, seq]`` probabilities of one plain eager forward (the direct way)."""
    weights = {}
    handles = []
    for layer in range(loaded.n_layers):
        module = loaded.decoder.attention(layer)

        def keep(mod, args, out, layer=layer):
            weights[layer] = out[1][0].detach().float()

        handles.append(module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            loaded.model(**prepared.encoded.inputs)
    finally:
        for h in handles:
            h.remove()
    return weights


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", ["sp-gqa", "bpe-mha", "word-mqa"])
def test_mass_equals_the_full_attention_matrix(tiny_prepared, shape, impl):
    loaded, prepared = tiny_prepared(shape, impl)
    groups = prepared.groups
    settings = AttentionSettings(targets=TARGETS, sources=SOURCES, max_chunk_queries=5)
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=groups[Group.IMAGE][0])
    mass = group_attention_mass(loaded.decoder, prepared.encoded, groups, clean, settings)
    assert loaded.decoder.attention_implementation == impl  # restored
    full = _full_attention(*tiny_prepared(shape, "eager"))
    assert len(mass) == loaded.n_layers * len(TARGETS) * len(SOURCES)
    for (layer, target, source), per_head in mass.items():
        w = full[layer]  # [head, seq, seq]
        rows = list(groups[target])
        cols = list(groups[source])
        expected = w[:, rows][:, :, cols].sum(-1).mean(-1)  # [head]
        torch.testing.assert_close(per_head, expected, atol=1e-5, rtol=0)
    # Causality: image tokens never see the question or the last position.
    assert float(mass[(0, Group.IMAGE, Group.QUESTION)].abs().max()) == 0.0


def test_chunk_size_does_not_change_the_mass(tiny_prepared):
    loaded, prepared = tiny_prepared("bpe-mha")
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    small = group_attention_mass(loaded.decoder, prepared.encoded, prepared.groups, clean,
                                 AttentionSettings(max_chunk_queries=1))
    large = group_attention_mass(loaded.decoder, prepared.encoded, prepared.groups, clean,
                                 AttentionSettings(max_chunk_queries=4096))
    assert small.keys() == large.keys()
    for key in small:
        torch.testing.assert_close(small[key], large[key], atol=1e-6, rtol=0)


def test_attention_implementation_is_restored_after_an_error(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa", "sdpa")
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    # transformers may keep its own output-recording hooks installed; count ours on top of them.
    hooks_before = [len(loaded.decoder.attention(i)._forward_hooks) for i in range(loaded.n_layers)]

    def explode(module, args, kwargs):
        raise RuntimeError("boom in layer 1")

    bomb = loaded.decoder.attention(1).register_forward_pre_hook(explode, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom in layer 1"):
            group_attention_mass(loaded.decoder, prepared.encoded, prepared.groups, clean, AttentionSettings())
    finally:
        bomb.remove()
    assert loaded.decoder.attention_implementation == "sdpa"
    hooks_after = [len(loaded.decoder.attention(i)._forward_hooks) for i in range(loaded.n_layers)]
    assert hooks_after == hooks_before


def test_clean_run_must_keep_the_target_rows(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa")
    n = prepared.encoded.seq_len
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=n - 1)
    with pytest.raises(ValueError, match="attention needs"):
        group_attention_mass(loaded.decoder, prepared.encoded, prepared.groups, clean, AttentionSettings())
