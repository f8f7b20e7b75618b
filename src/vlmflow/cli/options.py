"""CLI options generated from settings declarations (:mod:`vlmflow.settings`).

A command names the settings objects it takes as keyword-only parameters and says which type each
is built from::

    @settings_options(load=LoadSpec, settings=FlowSettings)
    def flows(*, load: LoadSpec, data: str = typer.Option(...), settings: FlowSettings, ...) -> None:

In the signature typer sees, each such parameter is replaced, where it stands, by one option per
declared field (its flags, help and default from the declaration); when the command runs, the
options' values are built into the settings object, checked there, and passed as that parameter.
A bad value is reported under its flag (``--attn: attention implementation 'x' cannot take ...``).
A field holding nested settings (``LensSettings.attention``) becomes an on/off switch plus the
nested type's own options; giving any of those turns it on.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING
from enum import Enum
from typing import Any, TypeVar

import typer

from vlmflow.settings import Declared, build, declared

F = TypeVar("F", bound=Callable[..., Any])
#: Collects one settings object from the command's keyword arguments (removing its options).
Collector = Callable[[dict[str, Any]], Any]


def settings_options(**groups: type) -> Callable[[F], F]:
    """Generate the options of settings types into a command (see the module docstring).

    Raises:
        TypeError: a generated option's parameter name is already a parameter of the command.
    """

    def decorate(command: F) -> F:
        hints = typing.get_type_hints(command)
        parameters: list[inspect.Parameter] = []
        collectors: dict[str, Collector] = {}
        for parameter in inspect.signature(command).parameters.values():
            if parameter.name in groups:
                generated, collectors[parameter.name] = _options(groups[parameter.name])
                parameters.extend(generated)
            else:
                parameters.append(parameter.replace(annotation=hints.get(parameter.name, parameter.annotation)))
        names = [p.name for p in parameters]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise TypeError(f"{command.__name__}: generated options clash with its parameters: {', '.join(clashes)}")

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for name, collect in collectors.items():
                values[name] = collect(values)
            return command(**values)

        keyword_only = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters]
        run.__signature__ = inspect.Signature(keyword_only)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in keyword_only}
        return run  # type: ignore[return-value]

    return decorate


def _options(cls: type, prefix: str = "") -> tuple[list[inspect.Parameter], Collector]:
    """The options of ``cls``'s declared fields (parameter names ``prefix + key``) and their collector."""
    parameters: list[inspect.Parameter] = []
    parts: list[tuple[Declared, str, Collector | None]] = []
    for d in declared(cls):
        if not d.flags:
            continue
        name = prefix + d.key
        parameters.append(_parameter(d, name))
        nested: Collector | None = None
        if d.nested is not None:
            inner, nested = _options(d.nested, prefix=f"{name}_")
            parameters.extend(inner)
        parts.append((d, name, nested))

    def collect(values: dict[str, Any]) -> Any:
        given: dict[str, Any] = {}
        changed = False  # any option given other than at its default
        for d, name, nested in parts:
            value = values.pop(name)
            if nested is not None:
                inner = nested(values)
                value = inner if inner is not None else (True if value else None)
                changed = changed or value is not None
            elif d.many:
                if not value:
                    continue  # not given: the field's default
                changed = True
            else:
                changed = changed or value != _parameter(d, name).default.default
            given[d.key] = value
        if prefix and not changed:
            return None  # nested settings none of whose options was given
        return build(cls, given, where=lambda d: d.flag, index=False)

    return parameters, collect


def _parameter(d: Declared, name: str) -> inspect.Parameter:
    """One typer option for field ``d``: the type typer parses, the default it shows."""
    if d.nested is not None or d.item is bool:
        annotation: Any = bool
        default: Any = bool(d.user_default) if d.nested is None else False
    elif d.many:
        annotation, default = list[str] | None, None
    else:
        scalar = int if d.item is int else float if d.item is float else str
        annotation = scalar | None if d.optional else scalar
        default = d.default.value if isinstance(d.default, Enum) else d.default
    option = typer.Option(... if d.default is MISSING else default, *d.flags, help=d.help)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
