"""The clean pass without ``generate``: vlmflow's own layer loop and greedy decoding over the cache.

Per family (causal LLaVA, anyres LLaVA-NeXT, M-RoPE Qwen2-VL, Gemma-3's bidirectional image
blocks and sliding layers, PaliGemma's prefix-LM): the greedy answer is the one transformers'
``generate`` gives, token for token, it stops at a stop token, the first-step logits are the
model's own, and several samples of different lengths computed together give each sample what it
gets alone (logits, answer, kept hidden states and keys/values).
"""

from __future__ import annotations

import pytest
import torch
from test_batched_samples import mixed_samples
from test_families_more import BUILDERS

from vlmflow.experiments.prepare import prepare_sample
from vlmflow.knockout.clean import clean_run, clean_runs
from vlmflow.loading import load_model

FAMILIES = ["llava", "next", "qwen2_vl", "gemma3", "paligemma"]


@pytest.fixture(scope="module")
def family_loaded(tmp_path_factory, tiny_checkpoint):
    from support.tiny_next import TinyAnyresConfig, build_tiny_llava_next

    cache = {}

    def get(family: str):
        if family not in cache:
            if family == "llava":
                path = tiny_checkpoint("sp-gqa")
            else:
                path = tmp_path_factory.mktemp(f"clean-{family}")
                if family == "next":
                    build_tiny_llava_next(TinyAnyresConfig(tokenizer="sentencepiece"), path)
                else:
                    BUILDERS[family](path)
            cache[family] = load_model(path, device="cpu", dtype="float32", attn_implementation="sdpa")
        return cache[family]

    return get


def _prepared(loaded, tmp_path, n=3):
    _, samples = mixed_samples(tmp_path / "data", n=n)
    return [prepare_sample(loaded, s, image, check_answer=False) for s, image in samples]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_answer_and_first_logits_are_generates(family_loaded, family, tmp_path):
    loaded = family_loaded(family)
    encoded = _prepared(loaded, tmp_path, 1)[0].encoded
    expected = loaded.model.generate(
        **encoded.inputs, max_new_tokens=5, do_sample=False, num_beams=1, min_new_tokens=5,
        return_dict_in_generate=True, output_logits=True,
    )
    tokens = expected.sequences[0, encoded.seq_len :].tolist()
    ours = clean_run(loaded.decoder, encoded, capture_from=encoded.seq_len - 1, max_new_tokens=5, eos_token_id=[])
    assert ours.generated.tolist() == tokens
    torch.testing.assert_close(ours.logits, expected.logits[0][0].float(), atol=1e-4, rtol=0)
    # A stop token ends the answer (included, as generate includes it).
    stopped = clean_run(loaded.decoder, encoded, capture_from=encoded.seq_len - 1, max_new_tokens=5, eos_token_id=tokens[2])
    assert stopped.generated.tolist() == tokens[: tokens.index(tokens[2]) + 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_of_different_lengths_together_get_what_each_gets_alone(family_loaded, family, tmp_path):
    loaded = family_loaded(family)
    encodeds = [p.encoded for p in _prepared(loaded, tmp_path)]
    assert len({e.seq_len for e in encodeds}) == 3
    starts = [e.seq_len - 4 - i for i, e in enumerate(encodeds)]
    together = clean_runs(loaded.decoder, encodeds, capture_from=starts, max_new_tokens=4, stop_ids=())
    for encoded, start, run in zip(encodeds, starts, together, strict=True):
        alone = clean_run(loaded.decoder, encoded, capture_from=start, max_new_tokens=4)
        torch.testing.assert_close(run.logits, alone.logits, atol=1e-5, rtol=0)
        assert run.generated.tolist() == alone.generated.tolist()
        assert len(run.hidden) == loaded.n_layers + 1 and run.hidden[0].shape[0] == encoded.seq_len - start
        for got, want in zip([*run.hidden, *run.keys, *run.values], [*alone.hidden, *alone.keys, *alone.values], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Samples really differ (a swapped result could not pass).
    assert (together[0].logits - together[1].logits).abs().max() > 1e-2
