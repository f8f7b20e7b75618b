from __future__ import annotations

import numpy as np
import pytest

from vlmflow.positions.text import find_word, tokens_in_span
from vlmflow.tiny.tokenizers import build_tokenizer

QUESTION = "Is the circle to the left or right of the square?"


@pytest.mark.parametrize("kind", ["sentencepiece", "bytelevel", "word"])
def test_question_tokens_cover_exactly_the_question(kind):
    tok = build_tokenizer(kind)
    prefix, suffix = "USER: <image>\n", " \nAnswer the question using a single word or phrase. ASSISTANT:"
    text = prefix + QUESTION + suffix
    enc = tok(text, return_offsets_mapping=True)
    offsets = np.array(enc["offset_mapping"])
    span = (len(prefix), len(prefix) + len(QUESTION))
    positions = tokens_in_span(offsets, span)
    pieces = tok.convert_ids_to_tokens([enc["input_ids"][i] for i in positions])
    decoded = tok.convert_tokens_to_string(pieces).strip()
    assert decoded.replace(" ?", "?") == QUESTION
    # Nothing of the instruction suffix or the role tag is inside the span.
    for i in positions:
        assert offsets[i][0] < span[1] and offsets[i][1] > span[0]
    before, after = positions[0] - 1, positions[-1] + 1
    assert offsets[before][1] <= span[0] + 1 and offsets[after][0] >= span[1] - 1


def test_tokens_in_span_ignores_empty_offsets():
    offsets = np.array([[0, 0], [0, 2], [2, 2], [2, 5]])
    assert tokens_in_span(offsets, (0, 5)) == (1, 3)


def test_find_word_whole_words_case_insensitive_and_phrases():
    text = "Is the short sleeved shirt red or blue?"
    assert find_word(text, "Short  sleeved") == (7, 20)
    assert find_word(text, "red") == (27, 30)
    assert find_word(text, "re") is None
    assert find_word(text, "shirt", span=(0, 10)) is None
    assert find_word(text, "  ") is None
