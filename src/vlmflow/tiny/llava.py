"""Tiny random-weight LLaVA checkpoints, built offline: to try vlmflow without a real checkpoint,
and as the base of the model organism.

:func:`build_tiny_llava` makes a real ``LlavaForConditionalGeneration`` (CLIP vision tower,
projector, Llama decoder) with a processor laid out like ``llava-hf/llava-1.5-7b-hf`` (CLIP image
processor with shortest-edge resize and centre crop, ``LlavaProcessor`` with ``patch_size`` and
``num_additional_image_tokens=1``), and can save it with ``save_pretrained`` so it loads back
through exactly the path a user's checkpoint takes (:func:`vlmflow.load_model`).

The CLI exposes it as ``vlmflow tiny-model PATH``; the tests and benchmarks build their models with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from vlmflow.tiny.tokenizers import TokenizerKind, build_tokenizer

if TYPE_CHECKING:
    from vlmflow.loading import LoadedModel


@dataclass(frozen=True)
class TinyLlavaConfig:
    """Shape of a tiny LLaVA. Defaults give ~16 image tokens and a ~60-token prompt.

    Attributes:
        tokenizer: tokenizer style, see :mod:`vlmflow.tiny.tokenizers`.
        layers / hidden / heads / kv_heads / intermediate: the Llama decoder.
        image_size / patch_size: the CLIP view (``(image_size // patch_size) ** 2`` image tokens).
        vision_layers / vision_hidden: the CLIP tower.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        seed: weight initialisation seed.
        widen_init: rescale the initial weights so a random model has peaked outputs (for tests of
            random models); ``False`` keeps transformers' initialisation (for training).
    """

    tokenizer: TokenizerKind = "sentencepiece"
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    image_size: int = 32
    patch_size: int = 8
    vision_layers: int = 2
    vision_hidden: int = 32
    attn_implementation: str = "sdpa"
    seed: int = 0
    widen_init: bool = True


def build_tiny_llava(
    config: TinyLlavaConfig = TinyLlavaConfig(),
    path: str | Path | None = None,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a tiny random LLaVA and its processor; save both to ``path`` when given.

    ``tokenizer`` replaces the one ``config.tokenizer`` names (it must have an ``<image>`` token).

    >>> model, processor = build_tiny_llava(TinyLlavaConfig(layers=2))
    >>> model.config.text_config.num_hidden_layers
    2
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config.tokenizer)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    llava_config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs(config)),
        text_config=LlamaConfig(**_decoder_kwargs(config, tokenizer)),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(config.image_size // config.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = _random_model(LlavaForConditionalGeneration, llava_config, config)
    if path is not None:
        _save(model, processor, Path(path))
    return model, processor


def _vision_kwargs(config: TinyLlavaConfig) -> dict:
    """Vision-tower config arguments (CLIP or SigLIP) of a tiny model."""
    return {
        "hidden_size": config.vision_hidden,
        "intermediate_size": config.vision_hidden * 2,
        "num_hidden_layers": config.vision_layers,
        "num_attention_heads": 4,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
    }


def _decoder_kwargs(config: TinyLlavaConfig, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Decoder config arguments (Llama-like: Llama, Qwen2, ...) of a tiny model."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": config.hidden,
        "intermediate_size": config.intermediate,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _random_model(model_class: type, model_config: object, config: TinyLlavaConfig) -> torch.nn.Module:
    """``model_class(model_config)`` with seeded, widened random weights, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = model_class(model_config)
    if config.widen_init:
        _widen_init(model)
    model.eval()
    model.config._attn_implementation = config.attn_implementation  # noqa: SLF001
    return model


def _save(model: torch.nn.Module, processor: object, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _widen_init(model: torch.nn.Module) -> None:
    """Scale up initial weights so a random tiny model has peaked, input-dependent outputs.

    HF initialises with std 0.02, which makes tiny models nearly input-independent; knockout
    effects would then be ~1e-7 and an equivalence test could not tell a real knockout from none.
    """
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed_positions" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * (1.0 / param.shape[1] ** 0.5))


def loaded_from_objects(
    model: torch.nn.Module, processor: LlavaProcessor, *, template: str = "vicuna_v1", options: dict | None = None
) -> LoadedModel:
    """Wrap an in-memory model and processor as a :class:`~vlmflow.loading.LoadedModel`.

    For benchmarks and tests that build a model without saving it; user code loads checkpoints
    with :func:`vlmflow.loading.load_model`, which goes through ``from_pretrained``.
    """
    from vlmflow.adapters.registry import family_for_model
    from vlmflow.loading import bind_model
    from vlmflow.prompts import get_template

    family = family_for_model(model)
    info = {
        "model": "in-memory",
        "family": family.family,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "prompt_template": template,
        "fingerprint": None,
    }
    return bind_model(model, processor, family, get_template(template), dict(options or {}), info)
