"""Tiny random checkpoints of every family but LLaVA's own shapes, by name: what the family tests build.

``BUILDERS[name](path)`` builds and saves one (``save_pretrained``) for :func:`vlmflow.loading.load_model`;
``FAMILY_OF`` names the family of the builders whose name is not the family's (a second shape of one
family). :func:`loaded_family` caches a loaded one per (name, attention kernel) within a test session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.tiny_gemma3 import TinyGemma3Config, build_tiny_gemma3
from support.tiny_idefics3 import TinyIdefics3Config, build_tiny_idefics3
from support.tiny_internvl import TinyInternVLConfig, build_tiny_internvl
from support.tiny_next import TinyAnyresConfig, build_tiny_llava_next, build_tiny_llava_onevision
from support.tiny_paligemma import build_tiny_paligemma
from support.tiny_qwen2_vl import TinyQwen2VLConfig, build_tiny_qwen2_vl
from support.tiny_qwen3_vl import TinyQwen3VLConfig, build_tiny_qwen3_vl
from vlmflow.tiny.llava import TinyLlavaConfig, build_tiny_llava

BUILDERS: dict[str, Callable[[Path], object]] = {
    "qwen2_vl": lambda p: build_tiny_qwen2_vl(TinyQwen2VLConfig(), p),
    "qwen2_5_vl": lambda p: build_tiny_qwen2_vl(TinyQwen2VLConfig(version="2.5", seed=1), p),
    "qwen3_vl": lambda p: build_tiny_qwen3_vl(TinyQwen3VLConfig(), p),
    "qwen3_vl_moe": lambda p: build_tiny_qwen3_vl(TinyQwen3VLConfig(moe=True, seed=1), p),
    "gemma3": lambda p: build_tiny_gemma3(TinyGemma3Config(), p),
    "paligemma": lambda p: build_tiny_paligemma(path=p),
    "idefics3": lambda p: build_tiny_idefics3(TinyIdefics3Config(), p),
    "smolvlm": lambda p: build_tiny_idefics3(TinyIdefics3Config(kind="smolvlm", seed=1), p),
    "internvl": lambda p: build_tiny_internvl(TinyInternVLConfig(), p),
    "internvl_qwen3": lambda p: build_tiny_internvl(TinyInternVLConfig(text="qwen3", seed=1), p),
}
#: Builders beyond the families' own tests: LLaVA shapes and every-frame-its-own-model-frame Qwen2-VL.
MORE_BUILDERS: dict[str, Callable[[Path], object]] = {
    "llava": lambda p: build_tiny_llava(TinyLlavaConfig(layers=3), p),
    "llava_next": lambda p: build_tiny_llava_next(TinyAnyresConfig(layers=3), p),
    "llava_onevision": lambda p: build_tiny_llava_onevision(TinyAnyresConfig(layers=3, image_size=36), p),
    "qwen2_vl_t1": lambda p: build_tiny_qwen2_vl(TinyQwen2VLConfig(temporal_patch_size=1, seed=2), p),
}
#: Builders whose key is not the family's name.
FAMILY_OF = {"internvl_qwen3": "internvl", "qwen2_vl_t1": "qwen2_vl"}


def loaded_family(tmp_path_factory: Any) -> Callable[[str, str], Any]:
    """``get(name, impl)`` -> a loaded tiny checkpoint of ``name`` (built once, loaded once per kernel)."""
    from vlmflow.loading import load_model

    paths: dict[str, Path] = {}
    cache: dict[tuple[str, str], Any] = {}
    builders = {**BUILDERS, **MORE_BUILDERS}

    def get(name: str, impl: str = "sdpa") -> Any:
        if name not in paths:
            paths[name] = tmp_path_factory.mktemp(f"tiny-{name}")
            builders[name](paths[name])
        if (name, impl) not in cache:
            cache[(name, impl)] = load_model(paths[name], device="cpu", dtype="float32", attn_implementation=impl)
        return cache[(name, impl)]

    return get
