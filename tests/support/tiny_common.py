"""What the tiny builders of the other families share: chat tokenizers, seeding, widening, saving.

The family builders (:mod:`support.tiny_qwen2_vl`, :mod:`support.tiny_gemma3`,
:mod:`support.tiny_idefics3`) make real transformers models with random weights from
configs, and processors laid out like the released checkpoints', and save them with
``save_pretrained`` so that they load back through :func:`vlmflow.loading.load_model`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import processors
from torch import nn

from vlmflow.tiny.llava import _widen_init
from vlmflow.tiny.tokenizers import DEFAULT_CORPUS, TokenizerKind, build_tokenizer

#: Extra training text: the chat formats' role words, so prompts tokenize into whole words.
CHAT_CORPUS: tuple[str, ...] = (
    *DEFAULT_CORPUS,
    "system user assistant model User Assistant You are a helpful assistant.",
)


def chat_tokenizer(
    kind: TokenizerKind, specials: Sequence[str], *, bos: bool, named: Mapping[str, str] | None = None
) -> Any:
    """A tiny trained tokenizer with the family's control tokens as special tokens.

    ``bos=False`` drops the BOS the tokenizer would otherwise prepend (Qwen's tokenizers add none;
    templates that write their own BOS need none either). ``named`` are named special tokens
    (``{"image_token": "<|image_pad|>"}`` becomes ``tokenizer.image_token``).

    >>> tok = chat_tokenizer("bytelevel", ["<|im_start|>"], bos=False)
    >>> tok.convert_ids_to_tokens(tok("<|im_start|>user")["input_ids"])[0]
    '<|im_start|>'
    """
    tokenizer = build_tokenizer(kind, CHAT_CORPUS, extra_special=specials, named_special=named)
    if not bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return tokenizer


def build_seeded(factory: Callable[[], nn.Module], seed: int, attn_implementation: str) -> nn.Module:
    """Instantiate ``factory()`` under ``seed``, widen its weights, eval mode, pick the attention kernel."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory()
    _widen_init(model)
    model.eval()
    model.config._attn_implementation = attn_implementation  # noqa: SLF001
    return model


def save_tiny(model: nn.Module, processor: Any, path: str | Path | None, *, template: str | None = None) -> None:
    """``save_pretrained`` model and processor to ``path`` (if given), with a ``vlmflow.json`` naming
    the prompt template when ``template`` is given."""
    if path is None:
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if template is not None:
        (path / "vlmflow.json").write_text(json.dumps({"prompt_template": template}))
