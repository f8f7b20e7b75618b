"""The Python API's view of declared settings: keyword arguments routed to settings types.

A function such as :func:`vlmflow.run_flows` takes every declared field of the settings it builds
as a keyword (:func:`settings_keywords` shows them in its signature and docstring) and splits them
by type (:func:`route_keywords`); the declarations themselves live in :mod:`vlmflow.settings`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from vlmflow.settings import declared

__all__ = ["route_keywords", "settings_keywords"]

F = TypeVar("F", bound=Callable[..., Any])


def route_keywords(function: str, keywords: Mapping[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Split ``keywords`` by settings type: per class in ``classes``, the keywords naming one of its fields.

    Raises:
        TypeError: a keyword names no field (the message lists the valid ones).

    >>> from vlmflow.load_spec import LoadSpec
    >>> from vlmflow.experiments.settings import FlowSettings
    >>> route_keywords("run_flows", {"dtype": "float16", "window": 9}, LoadSpec, FlowSettings)
    [{'dtype': 'float16'}, {'window': 9}]
    """
    table = {d.key: i for i, cls in enumerate(classes) for d in declared(cls) if d.keyword}
    out: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in keywords.items():
        if key not in table:
            raise TypeError(f"{function}() got an unexpected keyword argument {key!r}; valid: {', '.join(table)}")
        out[table[key]][key] = value
    return out


def settings_keywords(*classes: type) -> Callable[[F], F]:
    """Show the keywords a function routes to ``classes`` in its signature and docstring.

    The function takes them as ``**keywords`` (see :func:`route_keywords`); its ``__signature__``
    lists each declared field instead, with its type and default, so ``help()``, notebooks and
    IDEs see them, and its docstring gets one line per field (its declared help).
    """

    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own}
        added = []
        lines = []
        for cls in classes:
            for d in declared(cls):
                if not d.keyword:
                    continue
                if d.key in taken:
                    raise TypeError(f"{function.__name__}: keyword {d.key!r} of {cls.__name__} is taken")
                taken.add(d.key)
                hint = bool if d.invert else d.hint
                added.append(inspect.Parameter(d.key, inspect.Parameter.KEYWORD_ONLY, default=d.user_default, annotation=hint))
                lines.append(f"        {d.key}: {d.help}")
        function.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
        names = ", ".join(f":class:`~{c.__module__}.{c.__name__}`" for c in classes)
        function.__doc__ = (function.__doc__ or "").rstrip() + (
            f"\n\n    Settings keywords (fields of {names}):\n" + "\n".join(lines) + "\n"
        )
        return function

    return decorate
