"""Tiny random-weight Qwen3-VL / Qwen3-VL-MoE checkpoints, built offline, for tests.

Laid out like ``Qwen/Qwen3-VL-8B-Instruct``: the Qwen byte-level tokenizer without BOS and with the
ChatML and vision control tokens, ``Qwen2VLImageProcessorPil`` (dynamic resolution, mean/std 0.5),
a vision tower with 2 x 2 merging, temporal patches of 2 and DeepStack mergers, and a decoder with
q/k norms and interleaved M-RoPE. DeepStack adds its features after the first
``len(deepstack_visual_indexes)`` decoder layers; the tiny default adds them after layers 0 and 1
of 4, so single-layer knockouts with image targets run through both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from support.tiny_common import build_seeded, save_tiny
from support.tiny_qwen2_vl import (
    qwen_image_processor,
    qwen_text_config,
    qwen_token_ids,
    qwen_tokenizer,
    qwen_video_settings,
)
from vlmflow.adapters.expansion import ImageTextProcessor
from vlmflow.adapters.qwen_video import QWEN3_VIDEO_DEFAULTS


@dataclass(frozen=True)
class TinyQwen3VLConfig:
    """Shape of a tiny Qwen3-VL. Defaults: 4-px patches merged 2 x 2 (8-px tokens), ~20 image tokens
    for a 40 x 30 image, DeepStack after decoder layers 0 and 1.

    Attributes:
        moe: build ``Qwen3VLMoeForConditionalGeneration`` (4 experts, 2 per token) instead of the dense model.
        layers / hidden / heads / kv_heads / intermediate: the decoder (head dim 16 -> mrope 2+3+3).
        deepstack: vision-tower layers whose features DeepStack adds (one decoder layer each, from layer 0).
        patch_size / merge_size / temporal_patch_size / min_pixels / max_pixels: image processor and tower.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        seed: weight initialisation seed.
    """

    moe: bool = False
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    deepstack: tuple[int, ...] = field(default=(0, 1))
    patch_size: int = 4
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 8 * 8 * 4
    max_pixels: int = 64 * 64
    attn_implementation: str = "sdpa"
    seed: int = 0


def build_tiny_qwen3_vl(
    config: TinyQwen3VLConfig = TinyQwen3VLConfig(), path: str | Path | None = None
) -> tuple[nn.Module, ImageTextProcessor]:
    """Build a tiny random Qwen3-VL (or Qwen3-VL-MoE) and its processor; save both to ``path`` when given.

    >>> model, processor = build_tiny_qwen3_vl(TinyQwen3VLConfig(layers=2))
    >>> type(model).__name__, len(model.model.visual.deepstack_merger_list)
    ('Qwen3VLForConditionalGeneration', 2)
    """
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    tokenizer = qwen_tokenizer()
    image_processor = qwen_image_processor(config, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    text = qwen_text_config(config, tokenizer)
    text["head_dim"] = config.hidden // config.heads
    text["rope_parameters"]["mrope_interleaved"] = True
    if config.moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=config.intermediate // 2, decoder_sparse_step=1)
    vision = dict(
        depth=max(2, max(config.deepstack, default=0) + 1),
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=config.patch_size,
        spatial_merge_size=config.merge_size,
        temporal_patch_size=config.temporal_patch_size,
        out_hidden_size=config.hidden,
        num_position_embeddings=64,
        deepstack_visual_indexes=list(config.deepstack),
    )
    token_ids = qwen_token_ids(tokenizer)
    if config.moe:
        model_config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **token_ids)
        factory = lambda: Qwen3VLMoeForConditionalGeneration(model_config)  # noqa: E731
    else:
        model_config = Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)
        factory = lambda: Qwen3VLForConditionalGeneration(model_config)  # noqa: E731
    model = build_seeded(factory, config.seed, config.attn_implementation)
    # Qwen3-VL's video bounds hold for the whole video: room for four frames of the image bound.
    video = qwen_video_settings(config, QWEN3_VIDEO_DEFAULTS, max_pixels=4 * config.max_pixels)
    processor = ImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer, video=video)
    save_tiny(model, processor, path)
    return model, processor
