"""The model organisms: small LLaVAs trained on synthetic shape scenes, shipped with the package.

Each is a real ``LlavaForConditionalGeneration`` (CLIP vision tower, projector, Llama decoder) with
its own word-level tokenizer and processor, saved with ``save_pretrained`` under
``vlmflow/resources/<alias>``; :func:`vlmflow.loading.load_model` loads it like any checkpoint, and
the alias is a model name wherever a model is named (``--model organism``):

* ``"organism"``: trained for accuracy only (its routes are what training found);
* ``"organism-planted"``: trained so that its routes follow the paper's story by construction, with
  the planted bands in ``planted_routes.json`` (see :mod:`vlmflow.organism.routes`).

>>> organism_path().name, organism_path(PLANTED_ALIAS).name
('organism', 'organism-planted')
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vlmflow.errors import ConfigError

#: The model name that stands for the packaged organism.
ALIAS = "organism"
#: The model name that stands for the packaged planted-route organism.
PLANTED_ALIAS = "organism-planted"
#: Every alias, with the command that trains its checkpoint.
ALIASES = {ALIAS: "vlmflow organism train", PLANTED_ALIAS: "vlmflow organism train --planted"}


def organism_path(alias: str = ALIAS) -> Path:
    """The folder of a packaged organism checkpoint (it may be absent in a source tree)."""
    if alias not in ALIASES:
        raise ConfigError(f"unknown organism {alias!r}; valid: {', '.join(ALIASES)}")
    return Path(str(resources.files("vlmflow").joinpath("resources", alias)))


def resolve_model_name(name: str | Path) -> str:
    """An organism alias (when no such local folder exists) becomes the packaged checkpoint's folder.

    Any other name is returned unchanged.

    Raises:
        ConfigError: an alias is used but the package holds no such organism.

    >>> resolve_model_name("llava-hf/llava-1.5-7b-hf")
    'llava-hf/llava-1.5-7b-hf'
    """
    text = str(name)
    if text not in ALIASES or Path(text).is_dir():
        return text
    path = organism_path(text)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {text!r} names a packaged organism, but {path} holds no checkpoint; train one with '{ALIASES[text]}'"
        )
    return str(path)
