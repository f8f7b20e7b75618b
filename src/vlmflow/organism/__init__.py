"""The model organism: a small LLaVA trained on synthetic shape scenes, shipped with the package.

It is a real ``LlavaForConditionalGeneration`` (CLIP vision tower, projector, Llama decoder) with its
own word-level tokenizer and processor, saved with ``save_pretrained`` under
``vlmflow/resources/organism``; :func:`vlmflow.loading.load_model` loads it like any checkpoint, and
the name ``"organism"`` is an alias for that folder wherever a model is named (``--model organism``;
the alias is declared as an entry point, see :mod:`vlmflow.aliases`).

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


def packaged_checkpoint() -> str:
    """The folder of the packaged organism, which the model alias ``"organism"`` stands for.

    The alias is declared as an entry point of the group ``vlmflow.model_aliases`` (see
    :mod:`vlmflow.aliases`), so the core finds it without importing this package.

    Raises:
        ConfigError: the package holds no organism.

    >>> from vlmflow.aliases import resolve_model_name
    >>> resolve_model_name(ALIAS) == packaged_checkpoint()   # doctest: +SKIP
    True
    """
    path = organism_path()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {ALIAS!r} names the packaged organism, but {path} holds no checkpoint; "
            "train one with 'vlmflow organism train'"
        )
    return str(path)
