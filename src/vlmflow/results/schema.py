"""Schemas of the result tables, and a registry of them.

Every table a run writes is registered here as a :class:`TableSpec`: its name, its pyarrow schema
(each field carries a one-line ``doc`` in its metadata), and its key (the columns that identify a
row; a run never holds two rows with the same key). The store accepts any registered table, so a
new experiment adds its table with :func:`register_table` and nothing else changes.

Rows are plain dicts; :func:`build_table` turns a list of them into a pyarrow Table and rejects a
missing, unknown or wrongly typed value with a message naming the table, row and column.

>>> table = build_table("errors", [{"sample_id": "q1", "stage": "image", "reason": "no file"}])
>>> table.num_rows, table.column_names
(1, ['sample_id', 'stage', 'reason'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import pyarrow as pa

from vlmflow.errors import ConfigError, VlmflowError


class RowError(VlmflowError, ValueError):
    """A row does not fit its table's schema (missing, unknown or wrongly typed column)."""


def _field(name: str, type_: pa.DataType, doc: str) -> pa.Field:
    # Non-nullable: every column is always known for a row; a None is a bug upstream.
    return pa.field(name, type_, nullable=False, metadata={"doc": doc})


def column_doc(field: pa.Field) -> str:
    """The one-line description stored with a schema field.

    >>> column_doc(FLOWS_SCHEMA.field("rel_change"))[:30]
    'Relative change of the answer '
    """
    return (field.metadata or {}).get(b"doc", b"").decode()


FLOWS_SCHEMA = pa.schema(
    [
        _field("sample_id", pa.string(), "Sample identifier (the dataset's question id)."),
        _field("task", pa.string(), "Task name of the sample (e.g. 'ChooseAttr'); '' when unknown."),
        _field("flow", pa.string(), "Knocked-out flow 'source->target' (targets may not attend to sources)."),
        _field("layer", pa.int32(), "Centre layer of the window, 0-based; the figure's x axis."),
        _field(
            "layers_blocked",
            pa.list_(pa.int32()),
            "Layers actually knocked out (0-based, ascending); the window is clipped at both ends.",
        ),
        _field("window", pa.int32(), "Requested window size k (layers); edge windows block fewer layers."),
        _field(
            "p_base",
            pa.float64(),
            "Probability of the baseline's first answer token at the last position, softmax over the "
            "full vocabulary, no knockout (0..1).",
        ),
        _field("p_blocked", pa.float64(), "Probability of the same token with the knockout applied (0..1)."),
        _field(
            "rel_change",
            pa.float64(),
            "Relative change of the answer probability in percent: 100 * (p_blocked - p_base) / p_base "
            "(the paper's metric; >= -100, unbounded above).",
        ),
        _field("logprob_diff", pa.float64(), "log(p_blocked) - log(p_base), natural log (nats)."),
        _field("answer_changed", pa.bool_(), "True when the greedy token under knockout differs from the baseline token."),
        _field("answer_token_id", pa.int64(), "Vocabulary id of the baseline's first answer token."),
        _field("blocked_token_id", pa.int64(), "Vocabulary id of the greedy (argmax) token under knockout."),
        _field("n_source", pa.int32(), "Number of positions in the flow's source group for this sample."),
        _field("n_target", pa.int32(), "Number of positions in the flow's target group for this sample."),
        _field("engine", pa.string(), "Knockout engine that computed the row: 'fast' or 'reference'."),
    ]
)

SAMPLES_SCHEMA = pa.schema(
    [
        _field("sample_id", pa.string(), "Sample identifier (the dataset's question id)."),
        _field("task", pa.string(), "Task name of the sample; '' when unknown."),
        _field("image_id", pa.string(), "Image identifier (the image file's stem)."),
        _field("question", pa.string(), "Question text as given to the model."),
        _field("answer", pa.string(), "Gold answer from the dataset."),
        _field("prediction", pa.string(), "The model's greedy answer, decoded and stripped."),
        _field("correct", pa.bool_(), "prediction.lower() == answer.lower() (the paper's exact-match filter)."),
        _field("kept", pa.bool_(), "The sample enters the analyses: correct, or every sample with keep-all."),
        _field("answer_token_id", pa.int64(), "Vocabulary id of the first generated answer token."),
        _field("answer_token", pa.string(), "That token as the tokenizer spells it (e.g. '▁red')."),
        _field("p_base", pa.float64(), "Probability of the first answer token without knockout (0..1)."),
        _field("seq_len", pa.int32(), "Length of the language-model input sequence (tokens, image tokens expanded)."),
        _field("n_image_tokens", pa.int32(), "Number of image-token positions in the sequence."),
        _field("group_sizes", pa.string(), "JSON object: position group name -> number of positions."),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        _field("sample_id", pa.string(), "Sample identifier ('line:N' for a malformed line of the data file)."),
        _field("stage", pa.string(), "Where it failed: read, image, prepare, groups, forward, knockout, ..."),
        _field("reason", pa.string(), "Human-readable reason."),
    ]
)


@dataclass(frozen=True)
class TableSpec:
    """A result table: its name, schema and key columns.

    Attributes:
        name: file stem of the table (``flows`` -> ``flows.parquet``).
        schema: pyarrow schema; every field non-nullable with a ``doc`` in its metadata.
        key: columns identifying a row; the first is always ``sample_id``.
        core: written by :meth:`RunStore.finalize` even when empty (``samples`` and ``errors``).

    >>> TABLES["flows"].key
    ('sample_id', 'flow', 'layer')
    """

    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    core: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ConfigError(f"table name must be a Python identifier, got {self.name!r}")
        if not self.key or self.key[0] != "sample_id":
            raise ConfigError(f"table {self.name!r}: the key must start with 'sample_id', got {self.key}")
        missing = [c for c in self.key if c not in self.schema.names]
        if missing:
            raise ConfigError(f"table {self.name!r}: key columns {missing} are not in its schema")


#: Registered tables by name. Add one with :func:`register_table`.
TABLES: dict[str, TableSpec] = {}


def register_table(spec: TableSpec) -> TableSpec:
    """Register a result table so the store accepts it; re-registering the same spec is a no-op.

    >>> import pyarrow as pa
    >>> demo = TableSpec("demo_doc", pa.schema([pa.field("sample_id", pa.string())]), ("sample_id",))
    >>> register_table(demo).name
    'demo_doc'
    >>> _ = TABLES.pop("demo_doc")
    """
    existing = TABLES.get(spec.name)
    if existing is not None and existing != spec:
        raise ConfigError(f"table {spec.name!r} is already registered with a different schema")
    TABLES[spec.name] = spec
    return spec


register_table(TableSpec("flows", FLOWS_SCHEMA, ("sample_id", "flow", "layer")))
register_table(TableSpec("samples", SAMPLES_SCHEMA, ("sample_id",), core=True))
register_table(TableSpec("errors", ERRORS_SCHEMA, ("sample_id",), core=True))


def table_spec(name: str) -> TableSpec:
    """The registered :class:`TableSpec` called ``name``; :class:`ConfigError` listing the valid ones.

    >>> table_spec("samples").key
    ('sample_id',)
    """
    try:
        return TABLES[name]
    except KeyError:
        raise ConfigError(f"unknown result table {name!r}; registered: {', '.join(sorted(TABLES))}") from None


# --- building tables from rows ---------------------------------------------------------------------


def _type_problem(value: Any, type_: pa.DataType) -> str | None:
    """Why ``value`` cannot be stored as ``type_`` (None if it can). Strict: no silent coercion."""
    if value is None:
        return "is None (columns are not nullable)"
    if pa.types.is_boolean(type_):
        return None if isinstance(value, bool | np.bool_) else f"expected a bool, got {type(value).__name__}"
    if pa.types.is_integer(type_):
        if isinstance(value, bool | np.bool_) or not isinstance(value, Integral):
            return f"expected an integer, got {type(value).__name__}"
        bits = type_.bit_width
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return None if lo <= int(value) <= hi else f"{value} does not fit {type_}"
    if pa.types.is_floating(type_):
        if isinstance(value, bool | np.bool_) or not isinstance(value, Real):
            return f"expected a number, got {type(value).__name__}"
        return None
    if pa.types.is_string(type_):
        return None if isinstance(value, str) else f"expected a str, got {type(value).__name__}"
    if pa.types.is_list(type_):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
            return f"expected a list, got {type(value).__name__}"
        for i, item in enumerate(value):
            problem = _type_problem(item, type_.value_type)
            if problem:
                return f"item {i}: {problem}"
        return None
    return None  # other types: let pyarrow decide


def _type_ok(kind: type, type_: pa.DataType) -> bool:
    """Whether every value of Python type ``kind`` can be stored as ``type_`` (checked once per type)."""
    if issubclass(kind, bool | np.bool_):
        return pa.types.is_boolean(type_)
    if pa.types.is_integer(type_):
        return issubclass(kind, Integral)
    if pa.types.is_floating(type_):
        return issubclass(kind, Real)
    if pa.types.is_string(type_):
        return issubclass(kind, str)
    return False


def _column_array(name: str, field: pa.Field, values: list[Any], rows: Sequence[Mapping[str, Any]]) -> pa.Array:
    """One column as a pyarrow array; a bad value is reported by row and column.

    The fast path checks the set of Python types present (a handful) instead of every value; the
    per-value scan runs only to name the culprit when something is wrong.
    """
    type_ = field.type
    if pa.types.is_list(type_):
        outer_ok = all(issubclass(t, list | tuple | np.ndarray) for t in {type(v) for v in values})
        inner = {type(x) for v in values for x in v} if outer_ok else set()
        ok = outer_ok and all(_type_ok(t, type_.value_type) for t in inner)
    else:
        ok = all(_type_ok(t, type_) for t in {type(v) for v in values})
    if ok:
        try:
            return pa.array(values, type=type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass  # e.g. an int out of range: find and name it below
    for i, value in enumerate(values):
        problem = _type_problem(value, type_)
        if problem:
            raise RowError(f"{_where(name, i, rows[i])}: column {field.name!r} ({type_}): {problem}")
    try:  # pragma: no cover - every value passed the strict check
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:  # pragma: no cover
        raise RowError(f"table {name!r}: column {field.name!r} ({type_}): {exc}") from exc


def build_table(name: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build the pyarrow Table of registered table ``name`` from dict rows.

    Every row must have exactly the schema's columns, with values of the right Python type
    (ints for integer columns, no bools; numbers for floats; str; lists of ints for list columns).
    Floats may be NaN or infinite.

    >>> build_table("errors", [{"sample_id": "q1", "stage": "image"}])
    Traceback (most recent call last):
    ...
    vlmflow.results.schema.RowError: table 'errors', row 0 (sample_id 'q1'): missing column 'reason'
    """
    spec = table_spec(name)
    schema = spec.schema
    names = schema.names
    wanted = set(names)
    for i, row in enumerate(rows):
        if row.keys() != wanted:
            where = _where(name, i, row)
            missing = [c for c in names if c not in row]
            if missing:
                raise RowError(f"{where}: missing column {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else ""))
            extra = sorted(set(row) - wanted)
            raise RowError(f"{where}: unknown column {extra[0]!r}; columns of {name!r}: {', '.join(names)}")
    arrays = []
    for field in schema:
        values = [row[field.name] for row in rows]
        arrays.append(_column_array(name, field, values, rows))
    return pa.Table.from_arrays(arrays, schema=schema)


def empty_table(name: str) -> pa.Table:
    """A zero-row table with the registered schema of ``name``.

    >>> empty_table("flows").num_rows
    0
    """
    return table_spec(name).schema.empty_table()


def _where(name: str, index: int, row: Mapping[str, Any]) -> str:
    sample = row.get("sample_id")
    suffix = f" (sample_id {sample!r})" if isinstance(sample, str) else ""
    return f"table {name!r}, row {index}{suffix}"

