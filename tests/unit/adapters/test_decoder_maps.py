"""Every family's decoder map on a weightless model (parameters on the meta device): layers,
attention modules, norm, unembedding, rotary embeddings and the clean attention pattern resolve on
the installed transformers, without loading a weight or running a forward."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.pattern import BlockPattern, CausalPattern, PrefixLMPattern
from vlmflow.adapters.registry import family_for_model
from vlmflow.inputs import Encoded


def _configs() -> dict[str, Callable[[], object]]:
    from support.tiny_gemma3 import TinyGemma3Config, build_tiny_gemma3
    from support.tiny_idefics3 import TinyIdefics3Config, build_tiny_idefics3
    from support.tiny_internvl import TinyInternVLConfig, build_tiny_internvl
    from support.tiny_next import TinyAnyresConfig, build_tiny_llava_next, build_tiny_llava_onevision
    from support.tiny_paligemma import TinyPaliGemmaConfig, build_tiny_paligemma
    from support.tiny_qwen2_vl import TinyQwen2VLConfig, build_tiny_qwen2_vl
    from support.tiny_qwen3_vl import TinyQwen3VLConfig, build_tiny_qwen3_vl
    from vlmflow.tiny.llava import TinyLlavaConfig, build_tiny_llava

    return {
        "llava": lambda: build_tiny_llava(TinyLlavaConfig(layers=3))[0].config,
        "llava_next": lambda: build_tiny_llava_next(TinyAnyresConfig(layers=3))[0].config,
        "llava_onevision": lambda: build_tiny_llava_onevision(TinyAnyresConfig(layers=3, image_size=36))[0].config,
        "qwen2_vl": lambda: build_tiny_qwen2_vl(TinyQwen2VLConfig(layers=3))[0].config,
        "qwen2_5_vl": lambda: build_tiny_qwen2_vl(TinyQwen2VLConfig(layers=3, version="2.5"))[0].config,
        "qwen3_vl": lambda: build_tiny_qwen3_vl(TinyQwen3VLConfig(layers=3))[0].config,
        "qwen3_vl_moe": lambda: build_tiny_qwen3_vl(TinyQwen3VLConfig(layers=3, moe=True))[0].config,
        "gemma3": lambda: build_tiny_gemma3(TinyGemma3Config())[0].config,
        "paligemma": lambda: build_tiny_paligemma(TinyPaliGemmaConfig(layers=3))[0].config,
        "idefics3": lambda: build_tiny_idefics3(TinyIdefics3Config(layers=3))[0].config,
        "smolvlm": lambda: build_tiny_idefics3(TinyIdefics3Config(layers=3, kind="smolvlm"))[0].config,
        "internvl": lambda: build_tiny_internvl(TinyInternVLConfig(layers=3))[0].config,
        "internvl-qwen3": lambda: build_tiny_internvl(TinyInternVLConfig(layers=3, text="qwen3"))[0].config,
    }


PATTERNS = {"gemma3": BlockPattern, "paligemma": PrefixLMPattern}


def _weightless(config: object) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()


def _encoded(n: int, image: slice) -> Encoded:
    ids = torch.zeros(n, dtype=torch.long)
    types = torch.zeros(1, n, dtype=torch.long)
    types[0, image] = 1
    inputs = {"input_ids": ids[None], "token_type_ids": types, "mm_token_type_ids": types}
    return Encoded(inputs, ids, np.zeros((n, 2), dtype=int), "", (0, 0), (8, 8))


@pytest.mark.parametrize("name", sorted(_configs()))
def test_decoder_map_resolves_on_a_weightless_model(name):
    config = _configs()[name]()
    model = _weightless(config)
    family = family_for_model(model)
    assert family.family == name.split("-")[0]
    decoder = family.decoder_class(model)
    assert isinstance(decoder, DecoderMap)
    text = config.get_text_config()
    assert decoder.n_layers == text.num_hidden_layers >= 3
    assert decoder.n_heads == text.num_attention_heads
    assert decoder.hidden_size == text.hidden_size
    for layer in range(decoder.n_layers):
        assert decoder.attention(layer).layer_idx == layer
        assert decoder.attention(layer) is decoder.layers[layer].self_attn
        assert isinstance(decoder.mlp(layer), torch.nn.Module)
    assert decoder.final_norm is decoder.language_model.norm
    assert decoder.unembed is model.get_output_embeddings()
    assert decoder.unembed.weight.shape[-1] == text.hidden_size
    assert decoder.attention_implementation == "sdpa"
    decoder.check_attention_backend()
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing was materialised

    n = 10
    pattern = decoder.attention_pattern(_encoded(n, slice(2, 6)))
    assert type(pattern) is PATTERNS.get(name, CausalPattern)
    allowed = pattern.allowed(0, torch.arange(n), n)
    assert allowed.shape == (n, n) and bool(allowed.diagonal().all())
    assert bool(allowed[-1].all())  # the last row reads every position
    if name == "gemma3":
        assert bool(allowed[2, 5])  # an image token reads a later token of its image
    if name == "paligemma":
        assert bool(allowed[0, n - 1])  # the prefix reads ahead
    if type(pattern) is CausalPattern:
        assert torch.equal(allowed, torch.ones(n, n, dtype=torch.bool).tril())
