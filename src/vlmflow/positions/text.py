"""Map character spans of the prompt to token positions, using the tokenizer's own offsets.

Nothing here searches detokenised text: the question's character span is known from the prompt
template, and each token's character span comes from the tokenizer (``offset_mapping``), so the
same code works for SentencePiece (``▁``), byte-level BPE (``Ġ``) and word-level tokenizers.
"""

from __future__ import annotations

import re

import numpy as np


def tokens_in_span(offsets: np.ndarray, span: tuple[int, int]) -> tuple[int, ...]:
    """Positions of tokens whose character range overlaps ``span`` (half-open).

    Tokens with an empty range (special tokens, expanded image placeholders) never match.

    Args:
        offsets: ``[seq, 2]`` (start, end) character offsets per token.
        span: ``(start, end)`` characters.

    >>> tokens_in_span(np.array([[0, 0], [0, 3], [3, 7], [8, 10]]), (2, 8))
    (1, 2)
    """
    start, end = span
    tok_start, tok_end = offsets[:, 0], offsets[:, 1]
    hit = (tok_end > tok_start) & (tok_start < end) & (tok_end > start)
    return tuple(int(i) for i in np.flatnonzero(hit))


def find_word(text: str, word: str, span: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """Character span of the first whole-word, case-insensitive occurrence of ``word`` in ``text``.

    ``span`` restricts the search to ``text[span[0]:span[1]]`` (offsets stay relative to ``text``).
    Multi-word phrases match with any run of whitespace between words.

    >>> find_word("Is the jar full or empty?", "EMPTY")
    (19, 24)
    >>> find_word("Is the jar full?", "ja") is None
    True
    """
    if not word.strip():
        return None
    lo, hi = span if span is not None else (0, len(text))
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in word.split()) + r"(?!\w)"
    match = re.search(pattern, text[lo:hi], flags=re.IGNORECASE)
    if match is None:
        return None
    return lo + match.start(), lo + match.end()
