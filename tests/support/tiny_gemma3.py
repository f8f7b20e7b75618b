"""Tiny random-weight Gemma-3 checkpoints, built offline, for tests.

Laid out like ``google/gemma-3-4b-it``: a SentencePiece-style tokenizer with Gemma's turn and image
control tokens, ``Gemma3ImageProcessorPil`` (square resize), a ``Gemma3Processor`` that expands
``<start_of_image>`` into the soft tokens, a SigLIP tower whose patch grid the projector pools into
``mm_tokens_per_image`` tokens, and a decoder with sliding-window and full layers (two RoPE bases)
and bidirectional attention among the image tokens. The window is small, so the tiny prompt
really has keys outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from support.tiny_common import build_seeded, chat_tokenizer, save_tiny

GEMMA3_NAMED = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
GEMMA3_SPECIALS = ("<bos>", "<start_of_turn>", "<end_of_turn>")


@dataclass(frozen=True)
class TinyGemma3Config:
    """Shape of a tiny Gemma-3. Defaults: a 32-px view of 4-px patches pooled into 4 x 4 tokens.

    Attributes:
        layers / hidden / heads / kv_heads / head_dim / intermediate: the decoder.
        layer_types: per layer ``"sliding_attention"`` or ``"full_attention"``.
        sliding_window: keys a sliding layer sees (the query and the ``window - 1`` before it).
        image_size / patch_size / tokens_per_image: the SigLIP view and the pooled token count.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        seed: weight initialisation seed.
    """

    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 128
    layer_types: tuple[str, ...] = field(
        default=("sliding_attention", "full_attention", "sliding_attention", "full_attention")
    )
    sliding_window: int = 24
    image_size: int = 32
    patch_size: int = 4
    tokens_per_image: int = 16
    attn_implementation: str = "sdpa"
    seed: int = 0


def build_tiny_gemma3(config: TinyGemma3Config = TinyGemma3Config(), path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """Build a tiny random Gemma-3 and its processor; save both to ``path`` when given.

    >>> model, processor = build_tiny_gemma3(TinyGemma3Config())
    >>> type(model).__name__, processor.image_seq_length
    ('Gemma3ForConditionalGeneration', 16)
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    tokenizer = chat_tokenizer("sentencepiece", GEMMA3_SPECIALS, bos=False, named=GEMMA3_NAMED)
    image_processor = Gemma3ImageProcessorPil(size={"height": config.image_size, "width": config.image_size})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=config.tokens_per_image
    )
    model_config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden,
            intermediate_size=config.intermediate,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.kv_heads,
            head_dim=config.head_dim,
            query_pre_attn_scalar=config.head_dim,
            layer_types=list(config.layer_types),
            sliding_window=config.sliding_window,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.convert_tokens_to_ids("<bos>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_turn>"),
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=config.image_size,
            patch_size=config.patch_size,
        ),
        mm_tokens_per_image=config.tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids(GEMMA3_NAMED["boi_token"]),
        eoi_token_index=tokenizer.convert_tokens_to_ids(GEMMA3_NAMED["eoi_token"]),
        image_token_index=tokenizer.convert_tokens_to_ids(GEMMA3_NAMED["image_token"]),
    )
    model = build_seeded(lambda: Gemma3ForConditionalGeneration(model_config), config.seed, config.attn_implementation)
    save_tiny(model, processor, path)
    return model, processor
