"""Settings declared once: each field says its default, type, help, CLI flags, config key and identity.

A settings type is a frozen dataclass deriving from :class:`Settings` whose fields are made with
:func:`setting`. Every consumer reads the declarations instead of repeating them:

* values are checked and parsed once, when the object is built (``Settings.__post_init__``): a
  string such as ``"image->last"`` becomes the field's type (here a ``Flow``) through the type's
  ``parse`` (a mapping from a config file through its ``from_config``); bad values raise
  :class:`SettingError` naming the field, the value and what is valid;
* a run's identity is the fields declared ``identity=True`` (:meth:`Settings.identity`; ``"if-set"``
  and ``"grows"``: see :func:`setting`);
* the command line generates its options from them (:mod:`vlmflow.cli.options`);
* the Python API routes keywords to them by name and shows them in its signatures
  (:mod:`vlmflow.settings_keywords`);
* the study config reads its keys through them (:func:`read_config`, :func:`read_value`).

Adding an option is one :func:`setting` line (plus its docs and tests). This module imports no
torch, so the CLI builds its options without it.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo(Settings):
...     size: int = setting(3, help="How many.", minimum=1)
...     seed: int = setting(0, help="Seed.", identity=False)
>>> Demo(size=4).identity()
{'size': 4}
>>> Demo(size=0)
Traceback (most recent call last):
...
vlmflow.settings.SettingError: size must be >= 1, got 0
>>> [d.flags for d in declared(Demo)]
[('--size',), ('--seed',)]
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from enum import Enum
from functools import cache
from typing import Any, Literal, TypeVar, Union

from vlmflow.errors import ConfigError

__all__ = [
    "Declared",
    "SettingError",
    "Settings",
    "build",
    "declared",
    "growing",
    "identity",
    "read_config",
    "read_value",
    "setting",
]

T = TypeVar("T")
_KEY = "vlmflow.setting"
#: The identity kinds besides ``True``/``False`` (see :func:`setting`).
Identity = Literal["inline", "if-set", "grows"]


class SettingError(ConfigError):
    """A bad value of one declared field.

    The message is ``field``, the list ``index`` if any, then ``detail`` (``"window must be >= 1,
    got 0"``, ``"flows[1]: unknown position group 'x'; ..."``). A consumer that knows the field by
    another name (a CLI flag, a config key) re-raises it there with :meth:`at`.

    >>> SettingError("window", " must be >= 1, got 0").at("models[0].window")
    SettingError('models[0].window must be >= 1, got 0')
    """

    def __init__(self, field: str, detail: str, index: int | None = None) -> None:
        self.field, self.detail, self.index = field, detail, index
        super().__init__(f"{field}{'' if index is None else f'[{index}]'}{detail}")

    def at(self, where: str, *, index: bool = True) -> SettingError:
        """The same error, naming ``where`` instead of the field (and its list index unless ``index=False``)."""
        return SettingError(where, self.detail, self.index if index else None)


@dataclass(frozen=True)
class _Declaration:
    """What :func:`setting` records in a field's metadata (resolved by :func:`declared`)."""

    help: str
    key: str | None
    flags: tuple[str, ...] | None
    config: str | bool
    keyword: bool
    identity: bool | Identity
    choices: tuple[str, ...]
    minimum: int | None
    invert: bool
    invalid: str | None
    encode: Callable[[Any], Any] | None


def setting(
    default: Any = MISSING,
    *,
    help: str,  # noqa: A002 - the word every CLI library uses
    key: str | None = None,
    flags: Sequence[str] | None = (),
    config: str | bool = True,
    keyword: bool = True,
    identity: bool | Identity = True,
    choices: Sequence[str] = (),
    minimum: int | None = None,
    invert: bool = False,
    invalid: str | None = None,
    encode: Callable[[Any], Any] | None = None,
) -> Any:
    """A declared dataclass field of a :class:`Settings` type.

    Args:
        default: the value when not given (none: the field is required).
        help: one line, shown by ``--help``, in the API docstrings and the docs.
        key: the name users give it (CLI parameter, API keyword, config key); default: the field's.
        flags: CLI spellings (default ``--key`` with ``-`` for ``_``); ``None``: not on the CLI.
        config: ``True``: a study-config key named ``key``; a string: that key; ``False``: none.
        keyword: accepted as a keyword by the API functions (``run_flows(dtype=...)``).
        identity: part of the run's identity (a run directory resumes only with equal identity);
            ``"inline"`` for a nested settings field whose identity fields are merged into this one's;
            ``"if-set"``: only when not the default (runs from before the field keep their identity);
            ``"grows"``: a list a rerun may add items to (:func:`growing`).
        choices: the valid strings (a value outside them is refused, the message lists them).
        minimum: the least valid number (each item's, for a list).
        invert: the user-facing value is the negation of the field (a bool), e.g. the flag
            ``--literal-first-piece`` of the field ``skip_blank``.
        invalid: message for a value outside ``choices``, ``{value!r}`` formatted in (default
            ``"unknown value {value!r}"``); ``"; valid: ..."`` is appended.
        encode: how the value is written into the identity (default: enums by value, nested
            settings by their identity, tuples as lists, other objects as ``str``).
    """
    record = _Declaration(
        help=help,
        key=key,
        flags=None if flags is None else tuple(flags),
        config=config,
        keyword=keyword,
        identity=identity,
        choices=tuple(choices),
        minimum=minimum,
        invert=invert,
        invalid=invalid,
        encode=encode,
    )
    return dataclasses.field(default=default, metadata={_KEY: record})


@dataclass(frozen=True)
class Declared(_Declaration):
    """One declared field, resolved for its consumers: what :func:`setting` recorded, plus

    Attributes:
        key: the name users give it (CLI parameter, API keyword).
        flags: CLI spellings (empty: not on the CLI).
        config: study-config key (``None``: not read from configs).
        attr: the attribute name (also the identity key).
        default: the field's default (``MISSING``: required).
        hint: the field's resolved type; ``optional``/``many``/``item`` its shape
            (``tuple[Flow, ...] | None``: optional, many, item ``Flow``).
        nested: the settings type of a field holding one (e.g. ``LensSettings.attention``).
    """

    key: str
    flags: tuple[str, ...]
    config: str | None
    attr: str
    default: Any
    hint: Any
    optional: bool
    many: bool
    item: Any
    nested: type | None

    @property
    def user_default(self) -> Any:
        """The default as users see it (negated for an inverted field)."""
        return (not self.default) if self.invert and self.default is not MISSING else self.default

    @property
    def flag(self) -> str:
        """The first CLI spelling, as errors name it (``--attention`` for ``--attention/--no-attention``)."""
        return self.flags[0].split("/")[0] if self.flags else self.key


class Settings:
    """Base of the settings types: checks the declared fields when built; identity from the declarations.

    Subclasses are frozen dataclasses; one that checks more (across fields) calls
    ``super().__post_init__()`` first, then sees parsed values.
    """

    def __post_init__(self) -> None:
        for d in declared(type(self)):
            value = getattr(self, d.attr)
            parsed = _parse(d, value)
            if parsed is not value:
                object.__setattr__(self, d.attr, parsed)

    def identity(self) -> dict[str, Any]:
        """JSON-able values of the fields declared part of the identity (see :func:`identity`)."""
        return identity(self)


@cache
def declared(cls: type) -> tuple[Declared, ...]:
    """The declared fields of settings type ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        record = f.metadata.get(_KEY)
        if record is None:
            continue
        key = record.key or f.name
        optional, many, item = _shape(hints[f.name])
        nested = item if _is_settings(item) else None
        if record.flags is None:
            flags: tuple[str, ...] = ()
        else:
            flags = record.flags or (f"--{key.replace('_', '-')}",)
        config = (key if record.config is True else record.config) or None
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING
        )
        recorded = {r.name: getattr(record, r.name) for r in dataclasses.fields(record)}
        out.append(
            Declared(
                **{**recorded, "key": key, "flags": flags, "config": config},
                attr=f.name, default=default, hint=hints[f.name], optional=optional, many=many, item=item, nested=nested,
            )
        )
    return tuple(out)


def identity(settings: Any) -> dict[str, Any]:
    """The identity of a settings object: its fields declared ``identity=True``, JSON-able.

    What is not declared part of the identity (device, permissions, memory knobs) can differ
    between two sessions of one run directory.
    """
    out: dict[str, Any] = {}
    for d in declared(type(settings)):
        value = getattr(settings, d.attr)
        if d.identity == "inline":
            out.update(identity(value))
        elif d.identity == "if-set" and value == d.default:
            continue
        elif d.identity:
            out[d.attr] = d.encode(value) if d.encode is not None else _encode(value)
    return out


def growing(settings: Any) -> tuple[str, ...]:
    """Identity keys of ``settings`` that may grow between sessions of one run (``identity="grows"``).

    >>> from vlmflow.experiments.settings import FlowSettings
    >>> growing(FlowSettings())
    ('flows',)
    """
    ds = declared(type(settings))
    inline = [k for d in ds if d.identity == "inline" for k in growing(getattr(settings, d.attr))]
    return (*inline, *(d.attr for d in ds if d.identity == "grows"))


def build(
    cls: type[T],
    values: Mapping[str, Any],
    *,
    where: Callable[[Declared], str] | None = None,
    base: T | None = None,
    index: bool = True,
) -> T:
    """A ``cls`` from ``values`` keyed by the names users give (``Declared.key``); inverted fields negated.

    ``base``: start from this object instead of the defaults. ``where`` names a field in errors
    (e.g. by its CLI flag; default: by its key); ``index=False`` leaves out the position of a bad
    list item (a repeated CLI option has none the user wrote).

    >>> from vlmflow.experiments.settings import LensSettings
    >>> build(LensSettings, {"literal_first_piece": True, "readouts": ["raw"]}).skip_blank
    False
    """
    fields = {d.key: d for d in declared(cls)}
    name = where or (lambda d: d.key)
    attrs: dict[str, Any] = {}
    for key, value in values.items():
        d = fields[key]
        if d.invert:
            if not isinstance(value, bool):
                raise SettingError(name(d), f" must be true or false, got {value!r}")
            value = not value
        attrs[d.attr] = value
    try:
        return dataclasses.replace(base, **attrs) if base is not None else cls(**attrs)  # type: ignore[type-var]
    except SettingError as exc:
        by_attr = {d.attr: d for d in fields.values()}
        if exc.field not in by_attr:
            raise
        raise exc.at(name(by_attr[exc.field]), index=index) from None


# --- config files -----------------------------------------------------------------------------------


def read_config(cls: type[T], raw: Mapping[str, Any], where: str) -> T:
    """A ``cls`` from a config mapping keyed by the declared config keys.

    Errors name the key below ``where`` (``models[0].dtype: unknown value 'fp8'; valid: ...``).
    Keys that are not config keys of ``cls`` are refused, naming the valid ones.
    """
    fields = {d.config: d for d in declared(cls) if d.config is not None}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(map(repr, unknown))}; valid: {', '.join(fields)}")
    values = {fields[k].key: v for k, v in raw.items()}
    return build(cls, values, where=lambda d: f"{where}.{d.config}" if where else str(d.config))


def read_value(cls: type, attr: str, value: Any, where: str) -> Any:
    """``value`` parsed and checked as field ``attr`` of ``cls`` would be; errors name ``where``.

    For config entries that hold one field's value (a model's ``window``, the study's ``engine``).

    >>> from vlmflow.experiments.settings import FlowSettings
    >>> read_value(FlowSettings, "engine", "reference", "engine")
    <Engine.REFERENCE: 'reference'>
    """
    d = next(d for d in declared(cls) if d.attr == attr)
    try:
        return _parse(d, value)
    except SettingError as exc:
        raise exc.at(where) from None


# --- parsing one field ------------------------------------------------------------------------------


def _shape(hint: Any) -> tuple[bool, bool, Any]:
    """``(optional, many, item)`` of a field type: ``tuple[Flow, ...] | None`` -> ``(True, True, Flow)``."""
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        hint = rest[0] if len(rest) == 1 else Any
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return optional, True, args[0]
    return optional, False, hint


def _is_settings(item: Any) -> bool:
    return isinstance(item, type) and issubclass(item, Settings)


def _parse(d: Declared, value: Any) -> Any:
    if value is None:
        if d.optional:
            return None
        raise SettingError(d.attr, " must be given, got None")
    if d.nested is not None:
        return _parse_nested(d, value)
    if d.many:
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            raise SettingError(d.attr, f" must be a list, got {value!r}")
        items = tuple(value)
        parsed = tuple(_parse_item(d, v, i) for i, v in enumerate(items))
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(parsed, items, strict=True)) else parsed
    return _parse_item(d, value, None)


_NUMBERS: dict[type, tuple[type | tuple[type, ...], str]] = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
}


def _parse_item(d: Declared, value: Any, index: int | None) -> Any:
    item = d.item
    if not isinstance(item, type):  # e.g. the (key, value) pairs of family options: the type checks them
        return value
    if item in _NUMBERS:
        # JSON and YAML keep true apart from 1: so do we (bool is an int subclass in Python).
        accepted, kind = _NUMBERS[item]
        if isinstance(value, bool) is not (item is bool) or not isinstance(value, accepted):
            raise SettingError(d.attr, f" must be {kind}, got {value!r}", index)
        parsed: Any = float(value) if item is float else value
    elif isinstance(value, item):
        parsed = value
    elif (isinstance(value, str) and hasattr(item, "parse")) or (isinstance(value, Mapping) and hasattr(item, "from_config")):
        try:  # text, or a mapping from a config file (a flow written as {route: ..., mode: ...})
            parsed = item.parse(value) if isinstance(value, str) else item.from_config(value)
        except ConfigError as exc:
            raise SettingError(d.attr, f": {exc}", index) from None
    elif isinstance(value, str) and issubclass(item, Enum):
        try:
            parsed = item(value)
        except ValueError:
            raise SettingError(d.attr, f": unknown value {value!r}; valid: {', '.join(str(m.value) for m in item)}", index) from None
    else:
        raise SettingError(d.attr, f" must be {_describe(item)}, got {value!r}", index)
    if item is str:
        parsed = parsed.strip()
        if not parsed:
            raise SettingError(d.attr, f" must be a non-empty string, got {value!r}", index)
    if d.choices and parsed not in d.choices:
        reason = (d.invalid or "unknown value {value!r}").format(value=parsed)
        raise SettingError(d.attr, f": {reason}; valid: {', '.join(d.choices)}", index)
    if d.minimum is not None and parsed < d.minimum:
        raise SettingError(d.attr, f" must be >= {d.minimum}, got {parsed}", index)
    return parsed


def _parse_nested(d: Declared, value: Any) -> Any:
    """A nested settings field takes its type, ``True`` (its defaults), ``False`` (none) or a config mapping."""
    cls = d.nested
    assert cls is not None
    if isinstance(value, cls):
        return value
    if value is True:
        return cls()
    if value is False and d.optional:
        return None
    if isinstance(value, Mapping):
        return read_config(cls, value, d.attr)
    raise SettingError(d.attr, f" must be true, false or {cls.__name__}(...), got {value!r}")


def _describe(item: type) -> str:
    if item is str:
        return "a string"
    if issubclass(item, Enum):
        return f"one of {', '.join(str(m.value) for m in item)}"
    return f"a {item.__name__}"


def _encode(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Settings):
        return value.identity()
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return str(value)  # e.g. a Flow as "source->target"
