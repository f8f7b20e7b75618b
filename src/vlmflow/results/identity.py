"""A run's spec as stored in ``spec.json``, and how two specs are compared for a resume.

The spec is a JSON object. Its key ``"provenance"`` (package versions, host, start time) is recorded
but not compared; everything else is the run's *identity*: a run directory may only be resumed
with the same identity.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from vlmflow.errors import ConfigError

PROVENANCE_KEY = "provenance"


def canonical_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` as it reads back from JSON: tuples become lists, paths and enums strings.

    >>> canonical_spec({"b": (1, 2), "a": Path("x")})
    {'a': 'x', 'b': [1, 2]}
    """
    return json.loads(json.dumps(spec, sort_keys=True, default=_json_default))


def identity_of(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a spec that must match for a resume: everything but ``"provenance"``.

    >>> identity_of({"model": "m", "provenance": {"host": "a"}})
    {'model': 'm'}
    """
    return {k: v for k, v in spec.items() if k != PROVENANCE_KEY}


def without_keys(identity: Mapping[str, Any], keys: Sequence[Sequence[str]]) -> dict[str, Any]:
    """A deep copy of ``identity`` without the values at the key paths ``keys``.

    >>> without_keys({"settings": {"flows": ["a"], "window": 3}}, [("settings", "flows")])
    {'settings': {'window': 3}}
    """
    out = json.loads(json.dumps(identity, default=_json_default))
    for path in keys:
        node = out
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def grown_spec(stored: Mapping[str, Any], new: Mapping[str, Any], keys: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``stored`` with the items of ``new``'s lists at the key paths ``keys`` it lacks appended.

    >>> grown_spec({"s": {"flows": ["a", "b"]}}, {"s": {"flows": ["b", "c"]}}, [("s", "flows")])
    {'s': {'flows': ['a', 'b', 'c']}}
    """
    out = json.loads(json.dumps(stored, default=_json_default))
    for path in keys:
        old_node: Any = out
        new_node: Any = new
        for key in path[:-1]:
            old_node = old_node.get(key) if isinstance(old_node, dict) else None
            new_node = new_node.get(key) if isinstance(new_node, Mapping) else None
        if not isinstance(old_node, dict) or not isinstance(new_node, Mapping):
            continue
        old, added = old_node.get(path[-1]), new_node.get(path[-1])
        if isinstance(old, list) and isinstance(added, list):
            old_node[path[-1]] = old + [v for v in added if v not in old]
    return out


def spec_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Differences between two JSON-like values, one line per differing key path (dotted).

    >>> spec_differences({"a": 1, "s": {"k": 7}}, {"a": 1, "s": {"k": 9}, "x": True})
    ['s.k: stored 7, now 9', 'x: stored <absent>, now True']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{path}: stored <absent>, now {new[key]!r}")
            elif key not in new:
                out.append(f"{path}: stored {old[key]!r}, now <absent>")
            else:
                out.extend(spec_differences(old[key], new[key], path))
        return out
    # type check too: JSON keeps 1 and 1.0 and True apart, and so do we
    if old != new or type(old) is not type(new):
        return [f"{prefix or '<spec>'}: stored {old!r}, now {new!r}"]
    return []


def json_bytes(value: Any) -> bytes:
    """Pretty, stable JSON (sorted keys, UTF-8) for files people read.

    >>> json_bytes({"b": 1, "a": [1]})
    b'{\\n  "a": [\\n    1\\n  ],\\n  "b": 1\\n}\\n'
    """
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default) + "\n").encode()


def read_spec(path: Path) -> dict[str, Any]:
    """Read a stored ``spec.json``; :class:`ConfigError` naming the file if it is not a JSON object."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(spec, dict):
        raise ConfigError(f"{str(path)!r} does not hold a JSON object")
    return spec


def _json_default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return str(value)
