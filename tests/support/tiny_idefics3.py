"""Tiny random-weight Idefics3 / SmolVLM checkpoints, built offline, for tests.

Laid out like ``HuggingFaceM4/Idefics3-8B-Llama3`` and ``HuggingFaceTB/SmolVLM2-*``: a tokenizer
with the image wrapper, global-image and ``<row_r_col_c>`` tokens, the Idefics3 / SmolVLM PIL image
processor (longest-edge resize, tiles plus a global view), a SigLIP-style tower whose patches the
connector's pixel shuffle folds ``scale x scale`` into one token, and a Llama decoder. The Idefics3
checkpoint saves the real ``Idefics3Processor``; SmolVLM's processor needs torchvision, so its
checkpoint saves the image processor and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from support.tiny_common import build_seeded, chat_tokenizer, save_tiny
from vlmflow.adapters.expansion import ImageTextProcessor

IDEFICS3_SPECIALS = (
    "<|begin_of_text|>",
    "<|im_start|>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)


@dataclass(frozen=True)
class TinyIdefics3Config:
    """Shape of a tiny Idefics3 / SmolVLM. Defaults: 16-px tiles of 4-px patches shuffled 2 x 2 (4 tokens
    per frame); a 40 x 30 image becomes 2 x 2 tiles and the global view (20 image tokens).

    Attributes:
        kind: ``"idefics3"`` or ``"smolvlm"``.
        layers / hidden / heads / kv_heads / intermediate: the Llama decoder.
        tile_size / patch_size / scale_factor / longest_edge: processor and vision tower.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        seed: weight initialisation seed.
    """

    kind: str = "idefics3"
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    tile_size: int = 16
    patch_size: int = 4
    scale_factor: int = 2
    longest_edge: int = 32
    attn_implementation: str = "sdpa"
    seed: int = 0


def build_tiny_idefics3(
    config: TinyIdefics3Config = TinyIdefics3Config(), path: str | Path | None = None
) -> tuple[nn.Module, Any]:
    """Build a tiny random Idefics3 (or SmolVLM) and its processor; save both to ``path`` when given.

    >>> model, processor = build_tiny_idefics3(TinyIdefics3Config())
    >>> type(model).__name__, model.model.image_seq_len
    ('Idefics3ForConditionalGeneration', 4)
    """
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}.get(config.kind)
    if prefix is None:
        raise ValueError(f"unknown kind {config.kind!r}; valid: idefics3, smolvlm")
    tokenizer = chat_tokenizer("bytelevel", IDEFICS3_SPECIALS, bos=False, named={"image_token": "<image>"})
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil")(
        size={"longest_edge": config.longest_edge}, max_image_size={"longest_edge": config.tile_size}
    )
    model_config = getattr(transformers, f"{prefix}Config")(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=config.tile_size,
            patch_size=config.patch_size,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=config.hidden,
            intermediate_size=config.intermediate,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.kv_heads,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_utterance>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        scale_factor=config.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = getattr(transformers, f"{prefix}ForConditionalGeneration")
    model = build_seeded(lambda: model_class(model_config), config.seed, config.attn_implementation)
    if config.kind == "idefics3":
        processor: Any = transformers.Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=int(model.model.image_seq_len)
        )
    else:
        processor = ImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer)
    save_tiny(model, processor, path)
    return model, processor
