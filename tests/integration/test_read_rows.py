"""The fast engine reads the last R rows of every knockout exactly (the sequence metric needs them).

For a teacher-forced answer of R tokens appended to the prompt the metric reads the logits of the
last R positions under each knockout. Checked against the reference engine (one hooked full forward
per knockout, ``logits_to_keep=R``) on LLaVA (both fold strategies) and Gemma-3 (a bidirectional
image block, so the fold can start inside the image), with windows of every layer, targets that
end before the rows read (those rows keep their clean logits) and targets inside them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support.tiny_gemma3 import TinyGemma3Config, build_tiny_gemma3
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.windows import sweep
from vlmflow.knockout.fast import affected_starts, clean_run, fast_logits
from vlmflow.knockout.plan import plan_fold
from vlmflow.knockout.reference import clean_logits, reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.knockout.strategy import DenseFold
from vlmflow.loading import load_model
from vlmflow.positions.groups import Group


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory):
    from conftest import make_scene_sample

    path: Path = tmp_path_factory.mktemp("tiny-gemma3-rows")
    build_tiny_gemma3(TinyGemma3Config(), path)
    loaded = load_model(path, device="cpu", dtype="float32", attn_implementation="sdpa")
    sample, image = make_scene_sample()
    return loaded, prepare_sample(loaded, sample, image)


def _knockouts(loaded, prepared) -> list[Knockout]:
    g = prepared.groups
    n = prepared.encoded.seq_len
    tail = tuple(range(n - 3, n))  # targets among the rows read
    edges = [
        ((g[Group.LAST], g[Group.IMAGE]),),  # only the last row is a target: the rows before it stay clean
        ((g[Group.QUESTION], g[Group.IMAGE]),),  # targets before the rows read
        ((tail, g[Group.QUESTION] + g[Group.IMAGE]),),
        ((g[Group.IMAGE], g[Group.IMAGE][:3]),),  # inside the image block
    ]
    return [Knockout(e, layers) for e in edges for _, layers in sweep(2, loaded.n_layers)]


def _check_rows(loaded, prepared, rows: int, **fast_options) -> None:
    knockouts = _knockouts(loaded, prepared)
    encoded = prepared.encoded
    starts = affected_starts(loaded.decoder.attention_pattern(encoded), loaded.n_layers, encoded.seq_len, knockouts)
    clean = clean_run(loaded.decoder, encoded, capture_from=min(s for s in starts if s >= 0), read_rows=rows)
    torch.testing.assert_close(clean.row_logits, clean_logits(loaded.decoder, encoded, rows=rows), atol=1e-5, rtol=0)
    fast = torch.log_softmax(fast_logits(loaded.decoder, encoded, clean, knockouts, rows=rows, **fast_options), -1)
    ref = torch.log_softmax(reference_logits(loaded.decoder, encoded, knockouts, rows=rows), -1)
    assert fast.shape == ref.shape == (len(knockouts), rows, clean.logits.shape[-1])
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    # Every row read changes under some knockout (the rows are really recomputed) ...
    base = torch.log_softmax(clean.row_logits, -1)
    assert bool(((ref - base).abs().amax(dim=-1) > 1e-4).any(dim=0).all())
    # ... and the last row equals the one-row engine's answer.
    one = torch.log_softmax(fast_logits(loaded.decoder, encoded, clean, knockouts, **fast_options), -1)
    torch.testing.assert_close(fast[:, -1], one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["shared-prefix", "dense"])
def test_llava_last_rows_equal_the_reference(tiny_prepared, strategy):
    loaded, prepared = tiny_prepared("sp-gqa")
    _check_rows(loaded, prepared, 3, **({"strategy": DenseFold()} if strategy == "dense" else {}))


def test_gemma3_last_rows_equal_the_reference_with_a_bidirectional_image(gemma3):
    loaded, prepared = gemma3
    _check_rows(loaded, prepared, 4)


def test_a_plan_reads_at_most_the_rows_it_computes():
    from vlmflow.adapters.pattern import CausalPattern

    edges = (((4, 5), (1, 2)),)
    plan = plan_fold([Knockout(edges, (0,))], CausalPattern(), t0=4, n=6, n_layers=2, read_rows=2)
    assert plan.read_rows == 2 and not plan.last_rows_only  # both computed rows are read
    assert plan_fold([Knockout(edges, (0,))], CausalPattern(), t0=3, n=6, n_layers=2, read_rows=2).last_rows_only
    with pytest.raises(ValueError, match="can read 1..2 trailing rows, not 3"):
        plan_fold([Knockout(edges, (0,))], CausalPattern(), t0=4, n=6, n_layers=2, read_rows=3)


@pytest.mark.parametrize("strategy", ["shared-prefix", "accelerator"])
def test_several_samples_read_their_own_last_rows_in_one_batch(tiny_loaded, tmp_path, strategy):
    """Batched folds and clean passes (samples of different lengths, some reading R rows, one reading
    the last row only) give each sample the rows it gets alone, which equal the reference's."""
    from test_batched_samples import mixed_samples  # samples of different lengths and answers

    from vlmflow.knockout.fast import FoldRequest, clean_runs, fast_logits_batch
    from vlmflow.knockout.strategy import AcceleratorFold, SharedPrefixFold

    loaded = tiny_loaded("sp-gqa", "sdpa")
    decoder = loaded.decoder
    chosen = AcceleratorFold() if strategy == "accelerator" else SharedPrefixFold()
    _, samples = mixed_samples(tmp_path / "data", n=3)
    prepared = [prepare_sample(loaded, s, image) for s, image in samples]
    rows = [3, 1, 2]
    knockouts = [_knockouts(loaded, p) for p in prepared]
    starts = [
        min(s for s in affected_starts(decoder.attention_pattern(p.encoded), loaded.n_layers, p.encoded.seq_len, k) if s >= 0)
        for p, k in zip(prepared, knockouts, strict=True)
    ]
    assert len({p.encoded.seq_len for p in prepared}) == 3
    cleans = clean_runs(decoder, [p.encoded for p in prepared], capture_from=starts, read_rows=3)
    requests = [
        FoldRequest(p.encoded, c, k, None if r == 1 else r) for p, c, k, r in zip(prepared, cleans, knockouts, rows, strict=True)
    ]
    together = fast_logits_batch(decoder, requests[::-1], strategy=chosen)[::-1]  # reversed: a row in the wrong sample shows
    for p, k, start, r, got in zip(prepared, knockouts, starts, rows, together, strict=True):
        alone = clean_run(decoder, p.encoded, capture_from=start, read_rows=3)
        torch.testing.assert_close(alone.row_logits, cleans[prepared.index(p)].row_logits, atol=1e-5, rtol=0)
        one = fast_logits(decoder, p.encoded, alone, k, rows=None if r == 1 else r, strategy=chosen)
        assert got.shape == one.shape == ((len(k), r, one.shape[-1]) if r > 1 else (len(k), one.shape[-1]))
        torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(one, -1), atol=1e-5, rtol=0)
        ref = reference_logits(decoder, p.encoded, k, rows=None if r == 1 else r)
        torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(ref, -1), atol=1e-5, rtol=0)
