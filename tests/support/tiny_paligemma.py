"""Tiny random-weight PaliGemma checkpoints, built offline, for tests.

Laid out like ``google/paligemma-3b-mix-224``: a SentencePiece-style tokenizer with ``<image>``,
``SiglipImageProcessorPil`` (square resize) carrying ``image_seq_length``, a ``PaliGemmaProcessor``,
a SigLIP tower with one token per patch and a Gemma decoder (one KV head) that the model runs as a
prefix-LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from support.tiny_common import build_seeded, chat_tokenizer, save_tiny


@dataclass(frozen=True)
class TinyPaliGemmaConfig:
    """Shape of a tiny PaliGemma. Defaults: a 32-px view of 8-px patches (16 image tokens).

    Attributes:
        layers / hidden / heads / head_dim / intermediate: the Gemma decoder (one KV head).
        image_size / patch_size: the SigLIP view.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        seed: weight initialisation seed.
    """

    layers: int = 4
    hidden: int = 64
    heads: int = 4
    head_dim: int = 16
    intermediate: int = 128
    image_size: int = 32
    patch_size: int = 8
    attn_implementation: str = "sdpa"
    seed: int = 0


def build_tiny_paligemma(
    config: TinyPaliGemmaConfig = TinyPaliGemmaConfig(), path: str | Path | None = None
) -> tuple[nn.Module, Any]:
    """Build a tiny random PaliGemma and its processor; save both to ``path`` when given.

    >>> model, processor = build_tiny_paligemma()
    >>> model.config.text_config.num_image_tokens
    16
    """
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tokenizer = chat_tokenizer("sentencepiece", (), bos=False)
    image_processor = SiglipImageProcessorPil(size={"height": config.image_size, "width": config.image_size})
    image_processor.image_seq_length = (config.image_size // config.patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model_config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=config.image_size,
            patch_size=config.patch_size,
        ),
        text_config=dict(
            model_type="gemma",
            vocab_size=len(tokenizer),
            hidden_size=config.hidden,
            intermediate_size=config.intermediate,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=1,
            head_dim=config.head_dim,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        projection_dim=config.hidden,
        hidden_size=config.hidden,
        vocab_size=len(tokenizer),
        image_token_index=tokenizer.image_token_id,
    )
    model = build_seeded(lambda: PaliGemmaForConditionalGeneration(model_config), config.seed, config.attn_implementation)
    save_tiny(model, processor, path)
    return model, processor
