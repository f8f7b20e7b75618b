"""The model organism: a small LLaVA trained on synthetic shape scenes, shipped with the package.

It is a real ``LlavaForConditionalGeneration`` (CLIP vision tower, projector, Llama decoder) with its
own word-level tokenizer and processor, saved with ``save_pretrained`` under
``vlmflow/resources/organism``; :func:`vlmflow.loading.load_model` loads it like any checkpoint, and
the name ``"organism"`` is an alias for that folder wherever a model is named (``--model organism``).

>>> organism_path().name
'organism'
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vlmflow.errors import ConfigError

#: The model name that stands for the packaged organism.
ALIAS = "organism"


def organism_path() -> Path:
    """The folder of the packaged organism checkpoint (it may be absent in a source tree)."""
    return Path(str(resources.files("vlmflow").joinpath("resources", ALIAS)))


def resolve_model_name(name: str | Path) -> str:
    """``"organism"`` (when no such local folder exists) becomes the packaged checkpoint's folder.

    Any other name is returned unchanged.

    Raises:
        ConfigError: the alias is used but the package holds no organism.

    >>> resolve_model_name("llava-hf/llava-1.5-7b-hf")
    'llava-hf/llava-1.5-7b-hf'
    """
    text = str(name)
    if text != ALIAS or Path(text).is_dir():
        return text
    path = organism_path()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {ALIAS!r} names the packaged organism, but {path} holds no checkpoint; "
            "train one with 'vlmflow organism train'"
        )
    return str(path)
