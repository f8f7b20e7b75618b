"""The model organisms: small LLaVAs trained on synthetic shape scenes, shipped with the package.

Each is a real ``LlavaForConditionalGeneration`` (CLIP vision tower, projector, Llama decoder) with
its own word-level tokenizer and processor, saved with ``save_pretrained`` under
``vlmflow/resources/<alias>``; :func:`vlmflow.loading.load_model` loads it like any checkpoint, and
the alias is a model name wherever a model is named (``--model organism``):

* ``"organism"``: trained for accuracy only (its routes are what training found);
* ``"organism-planted"``: trained so that its routes follow the paper's story by construction, with
  the planted bands in ``planted_routes.json`` (see :mod:`vlmflow.validation.routes`).

The aliases are declared as entry points of the group ``vlmflow.model_aliases`` (see
:mod:`vlmflow.aliases`), so the core finds them without importing this package.

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


def packaged_checkpoint(alias: str = ALIAS) -> str:
    """The folder of the packaged organism that ``alias`` stands for.

    Raises:
        ConfigError: the package holds no such organism.

    >>> from vlmflow.aliases import resolve_model_name
    >>> resolve_model_name(ALIAS) == packaged_checkpoint()   # doctest: +SKIP
    True
    """
    path = organism_path(alias)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {alias!r} names the packaged organism, but {path} holds no checkpoint; train one with '{ALIASES[alias]}'"
        )
    return str(path)


def packaged_planted_checkpoint() -> str:
    """The folder of the packaged planted-route organism (the alias ``"organism-planted"``)."""
    return packaged_checkpoint(PLANTED_ALIAS)
