"""Registry of model families, keyed by family name and by transformers architecture."""

from __future__ import annotations

import importlib

from vlmflow.adapters.family import ModelFamily
from vlmflow.errors import UnsupportedModelError

_BY_FAMILY: dict[str, type[ModelFamily]] = {}
_BY_ARCH: dict[str, type[ModelFamily]] = {}

# Modules that define families; imported on first lookup so importing vlmflow stays cheap.
_FAMILY_MODULES = (
    "vlmflow.adapters.llava",
    "vlmflow.adapters.llava_next",
    "vlmflow.adapters.llava_onevision",
    "vlmflow.adapters.qwen2_vl",
    "vlmflow.adapters.qwen3_vl",
    "vlmflow.adapters.gemma3",
    "vlmflow.adapters.idefics3",
    "vlmflow.adapters.paligemma",
    "vlmflow.adapters.internvl",
    "vlmflow.adapters.refused",
)
_loaded = False


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make ``cls`` the family of its name and architectures."""
    _BY_FAMILY[cls.family] = cls
    for arch in cls.architectures:
        _BY_ARCH[arch] = cls
    return cls


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        for name in _FAMILY_MODULES:
            importlib.import_module(name)
        _loaded = True


def family_for_architecture(architecture: str) -> ModelFamily:
    """The family of a transformers architecture name (``config.architectures[0]``).

    >>> family_for_architecture("LlavaForConditionalGeneration").family
    'llava'
    """
    _ensure_loaded()
    try:
        return _BY_ARCH[architecture]()
    except KeyError:
        supported = ", ".join(sorted(_BY_ARCH))
        raise UnsupportedModelError(
            f"no vlmflow adapter for architecture {architecture!r}; supported: {supported}"
        ) from None


def family_for_model(model: object) -> ModelFamily:
    """The family of a loaded model instance (looked up by its class name)."""
    return family_for_architecture(type(model).__name__)


def family_named(family: str) -> ModelFamily:
    """The family registered under ``family`` (``"llava"``, ...)."""
    _ensure_loaded()
    try:
        return _BY_FAMILY[family]()
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {family!r}; supported: {', '.join(sorted(_BY_FAMILY))}"
        ) from None


def families() -> dict[str, type[ModelFamily]]:
    """All registered families by name."""
    _ensure_loaded()
    return dict(_BY_FAMILY)
