"""Registry of model-family adapters, keyed by family name and by transformers architecture."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from vlmflow.adapters.base import VLMAdapter
from vlmflow.errors import UnsupportedModelError

_BY_FAMILY: dict[str, type[VLMAdapter]] = {}
_BY_ARCH: dict[str, type[VLMAdapter]] = {}

# Modules that define adapters; imported on first lookup so importing vlmflow stays cheap.
_ADAPTER_MODULES = (
    "vlmflow.adapters.llava",
    "vlmflow.adapters.llava_next",
    "vlmflow.adapters.llava_onevision",
    "vlmflow.adapters.qwen2_vl",
    "vlmflow.adapters.gemma3",
    "vlmflow.adapters.idefics3",
    "vlmflow.adapters.paligemma",
    "vlmflow.adapters.refused",
)
_loaded = False


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Class decorator: make ``cls`` the adapter for its family and architectures."""
    _BY_FAMILY[cls.family] = cls
    for arch in cls.architectures:
        _BY_ARCH[arch] = cls
    return cls


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        for name in _ADAPTER_MODULES:
            importlib.import_module(name)
        _loaded = True


def adapter_for_architecture(architecture: str) -> VLMAdapter:
    """The adapter for a transformers architecture name (``config.architectures[0]``).

    >>> adapter_for_architecture("LlavaForConditionalGeneration").family
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


def adapter_for_model(model: object) -> VLMAdapter:
    """The adapter for a loaded model instance (looked up by its class name)."""
    return adapter_for_architecture(type(model).__name__)


def adapter_for_family(family: str) -> VLMAdapter:
    """The adapter registered under ``family`` (``"llava"``, ...)."""
    _ensure_loaded()
    try:
        return _BY_FAMILY[family]()
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {family!r}; supported: {', '.join(sorted(_BY_FAMILY))}"
        ) from None


def families() -> dict[str, type[VLMAdapter]]:
    """All registered adapters by family name."""
    _ensure_loaded()
    return dict(_BY_FAMILY)


AdapterFactory = Callable[[], VLMAdapter]
