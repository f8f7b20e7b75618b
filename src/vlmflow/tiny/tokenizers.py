"""Small tokenizers trained offline, in the three styles real VLM checkpoints use.

* ``"sentencepiece"`` — Llama-2 / Vicuna style: BPE over ``▁``-marked words (Metaspace), with a BOS
  token prepended. This is what LLaVA-1.5 and LLaVA-v1.6-vicuna use.
* ``"bytelevel"`` — GPT-2 / Llama-3 / Qwen style byte-level BPE (``Ġ`` for spaces).
* ``"word"`` — one token per word or punctuation mark; the model organism uses it.

They give the tiny checkpoints and the model organism the same kinds of tokenization real
checkpoints have (so position finding by character offsets is exercised), without downloading
anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TokenizerKind = Literal["sentencepiece", "bytelevel", "word"]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

#: Text the tiny tokenizers are trained on: the paper's prompt plus shape-world vocabulary.
DEFAULT_CORPUS: tuple[str, ...] = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "Answer the question using a single word or phrase.",
    "Is the square red or blue? Which shape is red, the circle or the star? Is the circle to the "
    "left or right of the square? Do the circle and the square have the same color? What do the "
    "circle and the triangle have in common? Is there a triangle or a star that is blue? On which "
    "side of the image is the star? What color is the circle? Is the jar full or empty?",
    "Red Blue Green Yellow Yes No Left Right Circle Square Star Triangle Empty Full Color Shape",
    "red blue green yellow yes no left right circle square star triangle empty full color shape",
)


def build_tokenizer(
    kind: TokenizerKind = "sentencepiece",
    corpus: Iterable[str] = DEFAULT_CORPUS,
    *,
    vocab_size: int = 400,
    extra_special: Sequence[str] = (),
    named_special: Mapping[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a small tokenizer of the given ``kind`` on ``corpus`` and wrap it for transformers.

    The result has ``<s>`` (BOS, prepended to every encoding), ``</s>``, ``<unk>``, ``<pad>`` and an
    ``<image>`` special token exposed as ``tokenizer.image_token`` / ``tokenizer.image_token_id``.
    ``named_special`` adds or replaces such named tokens (e.g. ``{"boi_token": "<start_of_image>"}``).

    >>> tok = build_tokenizer("sentencepiece")
    >>> tok.convert_ids_to_tokens(tok("Is the square red?")["input_ids"])[0]
    '<s>'
    """
    corpus = list(corpus)
    named = {"image_token": "<image>", **dict(named_special or {})}
    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *extra_special, *named.values()]))
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
        )
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        trainer = trainers.WordLevelTrainer(special_tokens=specials)
    elif kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.normalizer = normalizers.Sequence([])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=list("\n ▁"),
            show_progress=False,
        )
    elif kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=max(vocab_size, 300),
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid: sentencepiece, bytelevel, word")
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=named,
    )
