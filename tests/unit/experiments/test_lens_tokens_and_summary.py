"""Lens experiment pieces that need no model: tracked tokens, settings, summaries."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from vlmflow.data.sample import Sample, TaskType
from vlmflow.errors import ConfigError
from vlmflow.experiments.attention import AttentionSettings
from vlmflow.experiments.lens import (
    Form,
    LensSettings,
    Readout,
    first_subtoken,
    first_top1_layers,
    readout_stats,
    summarise_lens,
    tracked_tokens,
)
from vlmflow.positions.groups import Group
from vlmflow.results.tables import TABLES
from vlmflow.tiny.tokenizers import build_tokenizer

KINDS = ["sentencepiece", "bytelevel", "word"]


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: build_tokenizer(kind) for kind in KINDS}


@pytest.mark.parametrize("kind, word, expected", [
    ("sentencepiece", "red", "▁red"),
    ("sentencepiece", "Red", "▁Red"),
    ("bytelevel", "red", "red"),  # byte-level: no leading space, as the paper notes for Llama-3
    ("word", "Red", "Red"),
], ids=["sp-lower", "sp-capital", "bytelevel", "word"])
def test_first_subtoken_is_the_first_piece_of_encode(tokenizers, kind, word, expected):
    tok = tokenizers[kind]
    token_id = first_subtoken(tok, word)
    assert token_id == tok.encode(word, add_special_tokens=False)[0]
    assert tok.convert_ids_to_tokens(token_id) == expected


@pytest.mark.parametrize("kind, word, blank, kept", [
    ("sentencepiece", "pear", "▁", "pe"),
    ("bytelevel", " pear", "Ġ", "pe"),
], ids=["sentencepiece", "bytelevel"])
def test_first_subtoken_skips_a_lone_word_boundary_piece(tokenizers, kind, word, blank, kept):
    tok = tokenizers[kind]
    pieces = tok.convert_ids_to_tokens(tok.encode(word, add_special_tokens=False))
    assert pieces[0] == blank, f"precondition: {word!r} should start with a lone {blank!r}, got {pieces}"
    assert tok.convert_ids_to_tokens(first_subtoken(tok, word)) == kept
    # The paper's literal encode(word)[0] stays available.
    assert tok.convert_ids_to_tokens(first_subtoken(tok, word, skip_blank=False)) == blank


@pytest.mark.parametrize("kind, word", [("word", "xylophone"), ("sentencepiece", "Pear")], ids=["word", "sentencepiece"])
def test_first_subtoken_refuses_an_unknown_first_piece(tokenizers, kind, word):
    assert first_subtoken(tokenizers[kind], word) is None


def _choose(answer="red", false="blue", task=TaskType.CHOOSE_ATTR):
    return Sample("q1", "i1", f"Is it {answer} or {false}?", answer, task, answer, false)


def test_choose_tasks_track_both_options_in_both_forms(tokenizers):
    tok = tokenizers["sentencepiece"]
    tracked = tracked_tokens(tok, _choose(), generated_id=tok.convert_tokens_to_ids("▁Red"))
    assert [(t.form, t.word, t.token) for t in tracked] == [
        (Form.ANSWER, "red", "▁red"),
        (Form.ANSWER_CAPITALIZED, "Red", "▁Red"),
        (Form.FALSE_OPTION, "blue", "▁blue"),
        (Form.FALSE_OPTION_CAPITALIZED, "Blue", "▁Blue"),
        (Form.GENERATED, "Red", "▁Red"),
    ]


def test_other_tasks_track_only_the_answer(tokenizers):
    sample = Sample("q1", "i1", "What color is the circle?", "red", TaskType.QUERY_ATTR)
    forms = [t.form for t in tracked_tokens(tokenizers["word"], sample, generated_id=None)]
    assert forms == [Form.ANSWER, Form.ANSWER_CAPITALIZED]


def test_capitalised_form_uses_str_capitalize(tokenizers):
    # str.capitalize lower-cases the rest, as the paper's code does: "TV" -> "Tv".
    tracked = tracked_tokens(tokenizers["bytelevel"], _choose(answer="TV", false="radio"), generated_id=None)
    assert tracked[1].word == "Tv"


def test_untrackable_word_is_left_out(tokenizers):
    tracked = tracked_tokens(tokenizers["word"], _choose(answer="red", false="xylophone"), generated_id=None)
    assert [t.form for t in tracked] == [Form.ANSWER, Form.ANSWER_CAPITALIZED]


def test_settings_identity_is_json(tmp_path):
    settings = LensSettings(groups=(Group.QUESTION,), attention=AttentionSettings(targets=(Group.LAST,)))
    identity = json.loads(json.dumps(settings.identity()))
    assert identity["readouts"] == ["raw", "normed"]
    assert identity["groups"] == ["question"]
    assert identity["attention"]["targets"] == ["last"]


@pytest.mark.parametrize("kwargs, match", [
    ({"readouts": ()}, "no readout"),
    ({"readouts": ("logit",)}, r"readouts\[0\]: unknown readout 'logit'; valid: raw, normed"),
    ({"readouts": (Readout.RAW, Readout.RAW)}, "duplicate readouts"),
    ({"top_k": 0}, "top_k"),
    ({"groups": (Group.QUESTION, Group.QUESTION)}, "duplicate groups"),
], ids=["none", "string", "duplicate", "top-k", "groups"])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LensSettings(**kwargs)


def test_lens_tables_are_registered():
    assert TABLES["lens"].key == ("sample_id", "readout", "group", "position", "layer", "form")
    assert TABLES["lens_top"].key == ("sample_id", "readout", "group", "position", "layer")


def _rows(sample_id, readout, form, ranks):
    return [
        {"sample_id": sample_id, "readout": readout, "group": "last", "position": 9, "layer": j,
         "form": form, "rank": r, "prob": 1.0 / r}
        for j, r in enumerate(ranks)
    ]


def test_first_top1_layer_per_form_and_for_either_answer_form():
    lens = pd.DataFrame(
        _rows("a", "raw", "answer", [9, 1, 3, 2])
        + _rows("a", "raw", "answer_capitalized", [7, 5, 4, 1])
        + _rows("b", "raw", "answer", [9, 9, 9, 9])
        + _rows("b", "raw", "answer_capitalized", [9, 9, 1, 1])
    )
    firsts = first_top1_layers(lens).set_index(["sample_id", "form"])["first_top1"].to_dict()
    assert firsts == {
        ("a", "answer"): 1, ("a", "answer_capitalized"): 3, ("a", "answer_any"): 1,
        ("b", "answer"): -1, ("b", "answer_capitalized"): 2, ("b", "answer_any"): 2,
    }
    summary = summarise_lens(lens)
    assert summary["n_layers"] == 3
    assert summary["raw"]["answer"] == {
        "samples": 2, "reach_top1": 1, "median_first_top1": 1.0, "min_first_top1": 1, "mean_final_prob": 0.5 * (0.5 + 1 / 9)
    }
    assert summary["raw"]["answer_any"]["median_first_top1"] == 1.5


def test_readout_stats_ranks_ties_together_and_measures_entropy():
    logits = torch.tensor([[[1.0, 3.0, 3.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])  # [P=2, L+1=1, vocab=4]
    stats = readout_stats(logits, [1, 2, 3], top_k=2)
    assert stats.rank[0, 0].tolist() == [1, 1, 4]  # tied tokens share the best rank
    assert stats.rank[1, 0].tolist() == [1, 1, 1]
    assert stats.top_ids.shape == (2, 1, 2)
    assert float(stats.entropy[1, 0]) == pytest.approx(math.log(4))
    assert float(stats.log_prob[1, 0, 0]) == pytest.approx(-math.log(4))
