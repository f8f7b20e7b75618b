"""Tiny random-weight Qwen2-VL / Qwen2.5-VL checkpoints, built offline, for tests.

Laid out like ``Qwen/Qwen2-VL-7B-Instruct``: a byte-level tokenizer without BOS and with the
ChatML and vision control tokens, ``Qwen2VLImageProcessorPil`` (dynamic resolution), a vision tower
with 2 x 2 merging and temporal patches of 2, and a decoder with M-RoPE (``mrope_section`` summing
to half the head dimension). The processor is saved as its parts (image processor, tokenizer, the
video settings in ``video_preprocessor_config.json``), as the full ``Qwen2VLProcessor`` needs torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from support.tiny_common import build_seeded, chat_tokenizer, save_tiny
from vlmflow.adapters.expansion import ImageTextProcessor
from vlmflow.adapters.qwen_video import QWEN2_VIDEO_DEFAULTS
from vlmflow.adapters.video_frames import VideoSettings

QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class TinyQwen2VLConfig:
    """Shape of a tiny Qwen2-VL. Defaults: 4-px patches merged 2 x 2 (8-px tokens), ~20 image tokens
    for a 40 x 30 image.

    Attributes:
        version: ``"2"`` (Qwen2-VL) or ``"2.5"`` (Qwen2.5-VL).
        layers / hidden / heads / kv_heads / intermediate: the decoder (head dim 16 -> mrope 2+3+3).
        patch_size / merge_size / min_pixels / max_pixels: the image processor and vision tower.
        temporal_patch_size: frames per temporal patch (2 as released; 1 makes every frame its own model frame).
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        seed: weight initialisation seed.
    """

    version: str = "2"
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    patch_size: int = 4
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 8 * 8 * 4
    max_pixels: int = 64 * 64
    attn_implementation: str = "sdpa"
    seed: int = 0


def build_tiny_qwen2_vl(
    config: TinyQwen2VLConfig = TinyQwen2VLConfig(), path: str | Path | None = None
) -> tuple[nn.Module, ImageTextProcessor]:
    """Build a tiny random Qwen2-VL (or Qwen2.5-VL) and its processor; save both to ``path`` when given.

    >>> model, processor = build_tiny_qwen2_vl(TinyQwen2VLConfig(layers=2))
    >>> type(model).__name__, model.config.text_config.num_hidden_layers
    ('Qwen2VLForConditionalGeneration', 2)
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    tokenizer = qwen_tokenizer()
    image_processor = qwen_image_processor(config)
    text = qwen_text_config(config, tokenizer)
    text["bos_token_id"] = None
    token_ids = qwen_token_ids(tokenizer)
    vision = dict(
        depth=2,
        num_heads=2,
        patch_size=config.patch_size,
        spatial_merge_size=config.merge_size,
        temporal_patch_size=config.temporal_patch_size,
    )
    if config.version == "2":
        vision.update(embed_dim=32, hidden_size=config.hidden)
        model_config = Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
        factory = lambda: Qwen2VLForConditionalGeneration(model_config)  # noqa: E731
    elif config.version == "2.5":
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=config.hidden, window_size=16,
                      fullatt_block_indexes=[1])
        model_config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
        factory = lambda: Qwen2_5_VLForConditionalGeneration(model_config)  # noqa: E731
    else:
        raise ValueError(f"unknown Qwen-VL version {config.version!r}; valid: 2, 2.5")
    model = build_seeded(factory, config.seed, config.attn_implementation)
    processor = ImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video=qwen_video_settings(config, QWEN2_VIDEO_DEFAULTS)
    )
    save_tiny(model, processor, path)
    return model, processor


# ---- what the tiny Qwen-VL builders share (Qwen3-VL's: support.tiny_qwen3_vl) ----------------------
def qwen_tokenizer() -> Any:
    """The Qwen-style byte-level tokenizer without BOS, with the ChatML and vision control tokens."""
    return chat_tokenizer("bytelevel", QWEN_SPECIALS, bos=False, named={"image_token": "<|image_pad|>"})


def qwen_image_processor(config: Any, **kwargs: Any) -> Any:
    """``Qwen2VLImageProcessorPil`` with the config's pixel bounds and patching."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
        patch_size=config.patch_size,
        merge_size=config.merge_size,
        temporal_patch_size=config.temporal_patch_size,
        **kwargs,
    )


def qwen_text_config(config: Any, tokenizer: Any) -> dict[str, Any]:
    """The decoder config of a tiny Qwen-VL: M-RoPE sections in the released proportions (1 : 1.5 : 1.5)."""
    half = config.hidden // config.heads // 2  # rotary frequencies per head
    spatial = half * 3 // 8  # the released split: 16 + 24 + 24 of 64
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * spatial, spatial, spatial]},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def qwen_token_ids(tokenizer: Any) -> dict[str, int]:
    """The model config's image, video and vision-marker token ids."""
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }


def qwen_video_settings(config: Any, defaults: dict[str, Any], *, max_pixels: int | None = None) -> VideoSettings:
    """The video settings saved with a tiny Qwen-VL: the image's pixel bounds (or ``max_pixels``) and patching."""
    return VideoSettings.from_dict(
        defaults,
        {
            "size": {"shortest_edge": config.min_pixels, "longest_edge": max_pixels or config.max_pixels},
            "patch_size": config.patch_size,
            "temporal_patch_size": config.temporal_patch_size,
            "merge_size": config.merge_size,
        },
    )
