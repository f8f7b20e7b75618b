"""Model aliases: short names that stand for a checkpoint folder wherever a model is named.

``--model organism`` (CLI), ``model="organism"`` (Python API, study config) name the organism shipped
with the package, but the core does not know the organism: the organism's package declares the
alias, and :func:`resolve_model_name` finds it when a model name is neither a local folder nor an
alias registered in this process.

Two ways to declare an alias:

* in code, :func:`register_model_alias` (for this process);
* as a Python entry point in the group ``vlmflow.model_aliases`` of any installed distribution
  (``pyproject.toml``: ``[project.entry-points."vlmflow.model_aliases"]`` with
  ``my-model = "my_package.module:resolver"``); the entry point is loaded only when its name is asked
  for, so an alias costs nothing until it is used.

A resolver takes no argument and returns the checkpoint's folder; it raises
:class:`vlmflow.errors.ConfigError` with the reason when the checkpoint is missing.

>>> register_model_alias("doc-example", lambda: "/models/doc-example")
>>> resolve_model_name("doc-example")
'/models/doc-example'
>>> resolve_model_name("llava-hf/llava-1.5-7b-hf")
'llava-hf/llava-1.5-7b-hf'
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vlmflow.errors import ConfigError

#: The entry-point group that installed distributions declare model aliases in.
ENTRY_POINT_GROUP = "vlmflow.model_aliases"

#: A resolver: no argument, returns the checkpoint folder (raises ConfigError when it is missing).
Resolver = Callable[[], "str | Path"]

_registered: dict[str, Resolver] = {}


def register_model_alias(name: str, resolver: Resolver) -> None:
    """Let ``name`` stand for the checkpoint folder that ``resolver()`` returns (in this process).

    A registration replaces an earlier one of the same name, including an entry point's.

    >>> register_model_alias("my-finetune", lambda: "/checkpoints/my-finetune")
    >>> resolve_model_name("my-finetune")
    '/checkpoints/my-finetune'
    """
    if not name or "/" in name:
        raise ConfigError(f"a model alias is a plain name without '/'; got {name!r}")
    _registered[name] = resolver


def resolve_model_name(name: str | Path) -> str:
    """The checkpoint a model name stands for: an alias becomes its folder, anything else is unchanged.

    A local folder of that name wins over an alias. Aliases registered with
    :func:`register_model_alias` come before entry points of the group :data:`ENTRY_POINT_GROUP`.

    Raises:
        ConfigError: the alias exists but its checkpoint does not (the resolver says why).

    >>> resolve_model_name("checkpoints/llava")
    'checkpoints/llava'
    """
    text = str(name)
    if "/" in text or Path(text).is_dir():
        return text
    resolver = _registered.get(text) or _entry_point_resolver(text)
    return text if resolver is None else str(resolver())


def _entry_point_resolver(name: str) -> Resolver | None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        resolver = entry.load()
        if not callable(resolver):
            raise ConfigError(f"model alias {name!r} ({entry.value}) is not a callable resolver")
        return resolver
    return None


def alias_names() -> list[str]:
    """Every model alias known here: registered in this process or declared by an entry point.

    >>> "organism" in alias_names()
    True
    """
    from importlib.metadata import entry_points

    return sorted({*_registered, *(entry.name for entry in entry_points(group=ENTRY_POINT_GROUP))})
