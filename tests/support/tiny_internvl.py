"""Tiny random-weight InternVL checkpoints (InternVL3-style Qwen2, InternVL3.5-style Qwen3), built offline.

Laid out like ``OpenGVLab/InternVL3-1B-hf``: a byte-level tokenizer without BOS, with the ChatML
tokens and InternVL's named image tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``),
``GotOcr2ImageProcessorPil`` with dynamic tiling (``crop_to_patches``, up to ``max_tiles`` tiles plus a
thumbnail), an InternViT-style vision tower with a CLS token, the pixel-shuffle projector and a
Qwen2 (or Qwen3) decoder. The processor is saved as ``InternVLProcessor`` without its video part
(:class:`vlmflow.adapters.internvl.InternVLImageProcessor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from support.tiny_common import build_seeded, chat_tokenizer, save_tiny
from vlmflow.adapters.internvl import InternVLImageProcessor

INTERNVL_SPECIALS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
INTERNVL_NAMED = {
    "context_image_token": "<IMG_CONTEXT>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "video_token": "<video>",
}


@dataclass(frozen=True)
class TinyInternVLConfig:
    """Shape of a tiny InternVL. Defaults: 32-px tiles of 4-px patches, pixel-shuffled to 4 x 4 = 16
    tokens per tile; a 40 x 30 image gets 1 x 1 ... tiles by aspect ratio, up to 6, plus a thumbnail.

    Attributes:
        text: ``"qwen2"`` (InternVL3) or ``"qwen3"`` (InternVL3.5) language model.
        layers / hidden / heads / kv_heads / intermediate: the decoder.
        tile / patch_size / max_tiles: the tiling and the vision tower.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        seed: weight initialisation seed.
    """

    text: str = "qwen2"
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    tile: int = 32
    patch_size: int = 4
    max_tiles: int = 6
    attn_implementation: str = "sdpa"
    seed: int = 0


def build_tiny_internvl(
    config: TinyInternVLConfig = TinyInternVLConfig(), path: str | Path | None = None
) -> tuple[nn.Module, InternVLImageProcessor]:
    """Build a tiny random InternVL and its processor; save both to ``path`` when given.

    >>> model, processor = build_tiny_internvl(TinyInternVLConfig(layers=2))
    >>> type(model).__name__, processor.image_seq_length
    ('InternVLForConditionalGeneration', 16)
    """
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    if config.text not in ("qwen2", "qwen3"):
        raise ValueError(f"unknown InternVL language model {config.text!r}; valid: qwen2, qwen3")
    tokenizer = chat_tokenizer("bytelevel", INTERNVL_SPECIALS, bos=False, named=INTERNVL_NAMED)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": config.tile, "width": config.tile},
        crop_to_patches=True,
        min_patches=1,
        max_patches=config.max_tiles,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    per_tile = (config.tile // config.patch_size // 2) ** 2
    text = dict(
        model_type=config.text,
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    if config.text == "qwen3":
        text["head_dim"] = config.hidden // config.heads
    model_config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=config.tile,
            patch_size=config.patch_size,
        ),
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=per_tile,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = build_seeded(lambda: InternVLForConditionalGeneration(model_config), config.seed, config.attn_implementation)
    processor = InternVLImageProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=per_tile)
    save_tiny(model, processor, path)
    return model, processor
