"""Tiny random-weight LLaVA-NeXT and LLaVA-OneVision checkpoints, built offline (tests, docs).

Same idea as :mod:`vlmflow.tiny.llava`: real transformers classes from small configs, a processor
laid out like the released checkpoints', ``save_pretrained`` so they load back through
:func:`vlmflow.loading.load_model`.

* :func:`build_tiny_llava_next`: CLIP tower (32 px views, 8 px patches), anyres pinpoints
  ``[[32, 64], [64, 32], [64, 64]]``, Llama decoder; tokenizer ``"sentencepiece"`` (like
  llava-v1.6-vicuna) or ``"llama3"`` (byte-level with Llama-3's pre-tokenizer, special tokens,
  chat template and a generation config stopping on two ids, like llama3-llava-next).
* :func:`build_tiny_llava_onevision`: SigLIP tower with 36 px views and 8 px patches (4 px of
  each view unseen, like 384/14), 1..3 x 1..3 view pinpoints, ``anyres_max_1`` so the grid is
  downscaled as soon as it holds more than one view, Qwen2 decoder, Qwen-style tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from vlmflow.prompts import LLAMA3_SYSTEM, VICUNA_SYSTEM
from vlmflow.tiny.llava import TinyLlavaConfig, _decoder_kwargs, _random_model, _save, _vision_kwargs
from vlmflow.tiny.tokenizers import DEFAULT_CORPUS, build_tokenizer

#: Meta-Llama-3-8B-Instruct's chat template (its ``tokenizer_config.json``), which LLaVA-NeXT's
#: ``llava_llama_3`` conversation renders through ``apply_chat_template``.
LLAMA3_INSTRUCT_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

#: Llama-3's pre-tokenizer split (``tokenizer.json``); Qwen2's differs only in single digits.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>")
#: The end-of-sequence tokens of Llama-3-Instruct's generation config.
LLAMA3_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

_CORPUS = (*DEFAULT_CORPUS, VICUNA_SYSTEM, LLAMA3_SYSTEM, "You are a helpful assistant. system user assistant")


def build_bytelevel_tokenizer(
    style: Literal["llama3", "qwen2"], corpus: Sequence[str] = _CORPUS, *, vocab_size: int = 500
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with Llama-3's or Qwen2's pre-tokenizer and special tokens.

    ``"llama3"`` prepends ``<|begin_of_text|>`` (like Llama-3) and carries Meta's chat template;
    ``"qwen2"`` adds no BOS (like Qwen2). Both expose ``<image>`` as ``tokenizer.image_token``.

    >>> tok = build_bytelevel_tokenizer("llama3")
    >>> tok.convert_ids_to_tokens(tok("Is it red?")["input_ids"])[0]
    '<|begin_of_text|>'
    """
    specials = LLAMA3_SPECIAL if style == "llama3" else QWEN_SPECIAL
    split = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            extra_special_tokens={"image_token": "<image>"},
            chat_template=LLAMA3_INSTRUCT_CHAT_TEMPLATE,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


@dataclass(frozen=True)
class TinyAnyresConfig(TinyLlavaConfig):
    """Shape of a tiny anyres model (LLaVA-NeXT or OneVision): a :class:`TinyLlavaConfig` plus the grid.

    Attributes:
        tokenizer: ``"sentencepiece"`` (Vicuna-like) or ``"llama3"`` for LLaVA-NeXT; OneVision always
            uses a Qwen2-style tokenizer.
        image_size: one vision view (32 for LLaVA-NeXT; use 36 for OneVision, like 384 px at 14).
        pinpoints: anyres grids ``(height, width)``; ``None``: the family's tiny default.
        anyres_max: OneVision's ``anyres_max_N`` (1: any grid of more than one view is downscaled).
    """

    pinpoints: tuple[tuple[int, int], ...] | None = None
    anyres_max: int = 1


def build_tiny_llava_next(
    config: TinyAnyresConfig = TinyAnyresConfig(), path: str | Path | None = None
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """Build a tiny random LLaVA-NeXT and its processor; save both to ``path`` when given.

    >>> model, processor = build_tiny_llava_next(TinyAnyresConfig(layers=2))
    >>> model.config.image_grid_pinpoints
    [[32, 64], [64, 32], [64, 64]]
    """
    v = config.image_size
    pins = [list(p) for p in (config.pinpoints or ((v, 2 * v), (2 * v, v), (2 * v, 2 * v)))]
    if config.tokenizer == "llama3":
        tokenizer = build_bytelevel_tokenizer("llama3")
    else:
        tokenizer = build_tokenizer("sentencepiece", corpus=_CORPUS)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": v}, crop_size={"height": v, "width": v}, image_grid_pinpoints=pins
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model_config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs(config)),
        text_config=LlamaConfig(**_decoder_kwargs(config, tokenizer)),
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=pins,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = _random_model(LlavaNextForConditionalGeneration, model_config, config)
    if config.tokenizer == "llama3":
        # Like llama3-llava-next-8b: the generation config stops on <|eot_id|> and <|end_of_text|>,
        # the tokenizer names one eos token only.
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(list(LLAMA3_STOP_TOKENS))
    if path is not None:
        _save(model, processor, Path(path))
    return model, processor


def build_tiny_llava_onevision(
    config: TinyAnyresConfig = TinyAnyresConfig(image_size=36), path: str | Path | None = None
) -> tuple[LlavaOnevisionForConditionalGeneration, object]:
    """Build a tiny random LLaVA-OneVision and its processor; save both to ``path`` when given.

    The processor is :class:`vlmflow.adapters.llava_onevision.OnevisionImageProcessor` (no
    torchvision needed); the saved files name ``LlavaOnevisionProcessor``, as a real checkpoint's do.

    >>> model, processor = build_tiny_llava_onevision()
    >>> model.config.vision_aspect_ratio, processor.num_image_tokens
    ('anyres_max_1', 16)
    """
    from vlmflow.adapters.llava_onevision import OnevisionImageProcessor

    v = config.image_size
    pins = [list(p) for p in (config.pinpoints or tuple((i * v, j * v) for i in (1, 2, 3) for j in (1, 2, 3)))]
    side = v // config.patch_size
    ratio = f"anyres_max_{config.anyres_max}"
    tokenizer = build_bytelevel_tokenizer("qwen2")
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": v, "width": v}, image_grid_pinpoints=pins, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = OnevisionImageProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=side * side,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=ratio,
    )
    model_config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_vision_kwargs(config), vision_use_head=False),
        text_config=Qwen2Config(**_decoder_kwargs(config, tokenizer)),
        image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pins,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=ratio,
    )
    model = _random_model(LlavaOnevisionForConditionalGeneration, model_config, config)
    if path is not None:
        path = Path(path)
        _save(model, processor, path)
        # Name the real processor class, as released checkpoints do.
        config_file = path / "processor_config.json"
        saved = json.loads(config_file.read_text())
        saved["processor_class"] = "LlavaOnevisionProcessor"
        config_file.write_text(json.dumps(saved, indent=2))
    return model, processor
