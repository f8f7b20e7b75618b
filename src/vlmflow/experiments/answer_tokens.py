"""Which tokens the lens tracks: the answer and the false option, each by its first sub-token.

The paper tracks the first sub-token of ``tokenizer.encode(word, add_special_tokens=False)`` for the
gold answer, the answer capitalised with ``str.capitalize()``, and for choose tasks the false option
in both forms. :func:`first_subtoken` documents how a lone word-boundary piece (SentencePiece ``"▁"``,
byte-level ``"Ġ"``) is handled; vlmflow also tracks the token the model actually generated first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmflow.data.sample import Sample

log = logging.getLogger(__name__)


class Form(StrEnum):
    """Which word's first sub-token a lens row tracks."""

    ANSWER = "answer"  # the gold answer as written (lower case in GQA)
    ANSWER_CAPITALIZED = "answer_capitalized"  # answer.capitalize()
    FALSE_OPTION = "false_option"  # choose tasks: the option that is not the answer
    FALSE_OPTION_CAPITALIZED = "false_option_capitalized"
    GENERATED = "generated"  # the model's own first generated token (greedy)


#: Legend labels of the paper's figure (and ours for the extra form).
FORM_LABELS: dict[Form, str] = {
    Form.ANSWER: "Noncapitalized Answer",
    Form.ANSWER_CAPITALIZED: "Capitalized Answer",
    Form.FALSE_OPTION: "Noncapitalized False Option",
    Form.FALSE_OPTION_CAPITALIZED: "Capitalized False Option",
    Form.GENERATED: "Generated first token",
}


@dataclass(frozen=True)
class TrackedToken:
    """One tracked form: the word, and the vocabulary id and spelling of its first sub-token."""

    form: Form
    word: str
    token_id: int
    token: str


def first_subtoken(tokenizer: Any, word: str, *, skip_blank: bool = True) -> int | None:
    """Id of the first sub-token of ``word`` (``tokenizer.encode(word, add_special_tokens=False)``).

    SentencePiece tokenizers split a word whose ``"▁word"`` piece is not in the vocabulary into a
    lone ``"▁"`` piece followed by the word's pieces; byte-level ones can do the same with ``"Ġ"``.
    That piece carries no part of the word (it is the word boundary, probable before almost any
    word), so with ``skip_blank`` leading pieces that decode to whitespace only are skipped and the
    first piece that spells part of the word is returned. ``skip_blank=False`` reproduces the
    paper's literal ``encode(word)[0]``. Returns ``None`` when the word has no usable piece: it
    encodes to nothing, to blanks only, or its first usable piece is the unknown token.

    >>> from vlmflow.tiny.tokenizers import build_tokenizer
    >>> tok = build_tokenizer("sentencepiece")
    >>> tok.convert_ids_to_tokens(first_subtoken(tok, "red"))
    '▁red'
    """
    ids = list(tokenizer.encode(word, add_special_tokens=False))
    if skip_blank:
        while ids and not tokenizer.decode([ids[0]]).strip():
            ids.pop(0)
    if not ids:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        return None
    return int(ids[0])


def tracked_tokens(tokenizer: Any, sample: Sample, generated_id: int | None, *, skip_blank: bool = True) -> list[TrackedToken]:
    """The forms tracked for ``sample``: answer (two forms), false option (two forms, choose tasks
    only) and the generated first token. A word without a usable first sub-token (see
    :func:`first_subtoken`) is left out and logged.

    >>> from vlmflow.data.sample import Sample, TaskType
    >>> from vlmflow.tiny.tokenizers import build_tokenizer
    >>> s = Sample("q", "i", "Is it red or blue?", "red", TaskType.CHOOSE_ATTR, "red", "blue")
    >>> [t.word for t in tracked_tokens(build_tokenizer("word"), s, None)]
    ['red', 'Red', 'blue', 'Blue']
    """
    words: list[tuple[Form, str]] = [(Form.ANSWER, sample.answer), (Form.ANSWER_CAPITALIZED, sample.answer.capitalize())]
    choose = sample.task is None or sample.task.is_choose
    if choose and sample.false_option:
        words += [
            (Form.FALSE_OPTION, sample.false_option),
            (Form.FALSE_OPTION_CAPITALIZED, sample.false_option.capitalize()),
        ]
    out: list[TrackedToken] = []
    for form, word in words:
        token_id = first_subtoken(tokenizer, word, skip_blank=skip_blank)
        if token_id is None:
            log.warning("sample %s: %s %r has no usable first sub-token; not tracked", sample.sample_id, form.value, word)
            continue
        out.append(TrackedToken(form, word, token_id, str(tokenizer.convert_ids_to_tokens(token_id))))
    if generated_id is not None:
        token = str(tokenizer.convert_ids_to_tokens(int(generated_id)))
        word = tokenizer.decode([int(generated_id)]).strip()
        out.append(TrackedToken(Form.GENERATED, word, int(generated_id), token))
    return out
