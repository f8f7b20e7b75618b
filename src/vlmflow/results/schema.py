"""How a result table is declared: a typed row class whose fields are the table's columns.

Every row of a table is an instance of one frozen dataclass (the tables themselves are declared in
:mod:`vlmflow.results.tables`). A :class:`TableSpec` derives the table's pyarrow schema from that
class once: one non-nullable field per dataclass field, in declaration order, its type read from the
annotation and its one-line description (the :func:`column` ``doc``) stored in the field metadata.

===================  =====================  ===============================================
annotation           Arrow type             values accepted
===================  =====================  ===============================================
``str``              ``string``             ``str``
``bool``             ``bool``               ``bool``, ``numpy.bool_``
``float``            ``double``             real numbers but bools (NaN and inf allowed)
``Int32``, ``Int64`` ``int32``, ``int64``   integers but bools, within range
``Sequence[X]``      ``list<X>``            lists, tuples or 1-d arrays of ``X`` values
any other class C    ``string``             instances of C, stored as ``str(value)``
===================  =====================  ===============================================

:func:`arrow_table` turns rows into a pyarrow Table and rejects a row of another class or a
wrongly typed value with a message naming the table, row and column (a missing or unknown column
cannot happen: the dataclass constructor refuses it).

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True, kw_only=True)
... class NoteRow:
...     sample_id: str = column("Sample identifier.")
...     words: Int32 = column("Number of words.")
>>> spec = TableSpec("notes", NoteRow, key=("sample_id",))
>>> spec.schema.field("words").type, column_doc(spec.schema.field("words"))
(DataType(int32), 'Number of words.')
>>> arrow_table(spec, [NoteRow(sample_id="q1", words=3)]).to_pylist()
[{'sample_id': 'q1', 'words': 3}]
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlmflow.errors import ConfigError, VlmflowError

#: Annotations of integer columns: the Arrow width is part of the declaration.
Int32 = Annotated[int, pa.int32()]
Int64 = Annotated[int, pa.int64()]

_SCALARS: dict[Any, pa.DataType] = {str: pa.string(), bool: pa.bool_(), float: pa.float64()}
_SEQUENCES = (Sequence, list, tuple)


class _Original:
    def __repr__(self) -> str:
        return "ORIGINAL"


#: The ``added`` of a column that tables had from the start (no value to fill in for older files).
ORIGINAL: Any = _Original()


class RowError(VlmflowError, ValueError):
    """A row does not fit its table (a row of another table, or a wrongly typed value)."""


def column(doc: str, *, added: Any = dataclasses.MISSING) -> Any:
    """Declare a column of a row class: the field's annotation gives its type, ``doc`` its description.

    The field has no default: every column of every row is always given (columns are not nullable).
    A column added to a table that runs already hold declares ``added``: the value rows written
    before it existed read back with (files without the column are filled with it when read), also
    the field's default.

    >>> column("Decoder layer, 0-based.").metadata["doc"]
    'Decoder layer, 0-based.'
    >>> column("Metric of the row.", added="first-token").default
    'first-token'
    """
    return dataclasses.field(default=added, metadata={"doc": doc})


def column_doc(field: pa.Field) -> str:
    """The one-line description stored with a schema field.

    >>> from vlmflow.results.tables import TABLES
    >>> column_doc(TABLES["flows"].schema.field("rel_change"))[:30]
    'Relative change of that probab'
    """
    return (field.metadata or {}).get(b"doc", b"").decode()


@dataclass(frozen=True)
class Column:
    """One column of a table, derived from a field of its row class.

    Attributes:
        name: the field's (and column's) name.
        type: its Arrow type.
        doc: one-line description.
        text_of: for a column of objects stored as text (``Flow``), their class; else ``None``.
        added: the value of rows written before the column was added (:data:`ORIGINAL`: an original column).
    """

    name: str
    type: pa.DataType
    doc: str
    text_of: type | None = None
    added: Any = None  # set from the row class: ORIGINAL or the declared value

    @property
    def field(self) -> pa.Field:
        # Non-nullable: every column is always known for a row; a None is a bug upstream.
        return pa.field(self.name, self.type, nullable=False, metadata={"doc": self.doc})


def _arrow_type(hint: Any, where: str) -> tuple[pa.DataType, type | None]:
    """The Arrow type of an annotation, and the class of values stored as text (or None)."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        types_ = [x for x in extras if isinstance(x, pa.DataType)]
        if base is not int or len(types_) != 1:
            raise ConfigError(f"{where}: annotate integers as Int32 or Int64, got {hint!r}")
        return types_[0], None
    if hint in _SCALARS:
        return _SCALARS[hint], None
    if hint is int:
        raise ConfigError(f"{where}: annotate integers as Int32 or Int64 (the Arrow width is part of the table)")
    if origin in _SEQUENCES:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) != 1:
            raise ConfigError(f"{where}: a list column needs one item type, got {hint!r}")
        item, text_of = _arrow_type(args[0], where)
        if text_of is not None or pa.types.is_list(item):
            raise ConfigError(f"{where}: list items must be str, bool, float, Int32 or Int64, got {args[0]!r}")
        return pa.list_(item), None
    if isinstance(hint, type) and origin is None and not isinstance(hint, types.GenericAlias):
        return pa.string(), hint
    raise ConfigError(f"{where}: cannot store a column annotated {hint!r}")


def row_columns(row: type) -> tuple[Column, ...]:
    """The columns of row class ``row`` (a dataclass), in field order.

    >>> from vlmflow.results.tables import ErrorRow
    >>> [c.name for c in row_columns(ErrorRow)]
    ['sample_id', 'stage', 'reason', 'flow']
    """
    if not dataclasses.is_dataclass(row):
        raise ConfigError(f"a row class must be a dataclass, got {row!r}")
    hints = typing.get_type_hints(row, include_extras=True)
    columns = []
    for f in dataclasses.fields(row):
        doc = f.metadata.get("doc")
        if not doc:
            raise ConfigError(f"{row.__name__}.{f.name}: declare it with column('one-line description')")
        type_, text_of = _arrow_type(hints[f.name], f"{row.__name__}.{f.name}")
        added = ORIGINAL if f.default is dataclasses.MISSING else f.default
        columns.append(Column(f.name, type_, doc, text_of, added))
    return tuple(columns)


def fill_added_columns(spec: TableSpec, table: pa.Table) -> pa.Table:
    """``table`` read with ``spec.schema`` from files some of which predate columns ``spec`` added:
    the nulls those files leave in an added column become its ``added`` value.

    >>> from vlmflow.results.tables import TABLES
    >>> old = pa.table({"sample_id": ["q1"], "stage": ["image"], "reason": ["no file"], "flow": pa.nulls(1, pa.string())})
    >>> fill_added_columns(TABLES["errors"], old).column("flow").to_pylist()
    ['']
    """
    arrays = []
    for name in table.column_names:
        array = table.column(name)
        col = next((c for c in spec.columns if c.name == name), None)
        if col is not None and col.added is not ORIGINAL and array.null_count:
            array = pc.fill_null(array, pa.scalar(col.added, type=col.type))
        arrays.append(array)
    fields = [spec.schema.field(name) if name in spec.schema.names else table.schema.field(name) for name in table.column_names]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


@dataclass(frozen=True)
class TableSpec:
    """A result table: its name, row class and key; its columns and schema are derived from the row class.

    Attributes:
        name: file stem of the table (``flows`` -> ``flows.parquet``).
        row: the frozen dataclass every row of the table is an instance of.
        key: columns identifying a row (a run never holds two rows with the same key); the first is
            always ``sample_id``.
        core: written by :meth:`RunStore.finalize <vlmflow.results.store.RunStore.finalize>` even
            when empty (``samples`` and ``errors``).
        columns: derived from ``row``.
        schema: the pyarrow schema, derived from ``row``; every field non-nullable with a ``doc``.

    >>> from vlmflow.results.tables import TABLES
    >>> TABLES["flows"].key, TABLES["flows"].row.__name__
    (('sample_id', 'flow', 'layer'), 'FlowRow')
    """

    name: str
    row: type
    key: tuple[str, ...]
    core: bool = False
    columns: tuple[Column, ...] = dataclasses.field(init=False, repr=False, compare=False)
    schema: pa.Schema = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ConfigError(f"table name must be a Python identifier, got {self.name!r}")
        columns = row_columns(self.row)
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "schema", pa.schema([c.field for c in columns]))
        if not self.key or self.key[0] != "sample_id":
            raise ConfigError(f"table {self.name!r}: the key must start with 'sample_id', got {self.key}")
        missing = [c for c in self.key if c not in self.schema.names]
        if missing:
            raise ConfigError(f"table {self.name!r}: key columns {missing} are not in its schema")


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


def _column_array(table: str, column: Column, values: list[Any], rows: Sequence[Any]) -> pa.Array:
    """One column as a pyarrow array; a bad value is reported by row and column.

    The fast path checks the set of Python types present (a handful) instead of every value; the
    per-value scan runs only to name the culprit when something is wrong.
    """
    type_ = column.type
    if column.text_of is not None:
        cls = column.text_of
        if all(issubclass(t, cls) for t in {type(v) for v in values}):
            return pa.array([str(v) for v in values], type=type_)
        i, value = next((i, v) for i, v in enumerate(values) if not isinstance(v, cls))
        raise RowError(f"{_where(table, i, rows[i])}: column {column.name!r}: expected a {cls.__name__}, got {type(value).__name__}")
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
            raise RowError(f"{_where(table, i, rows[i])}: column {column.name!r} ({type_}): {problem}")
    try:  # pragma: no cover - every value passed the strict check
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:  # pragma: no cover
        raise RowError(f"table {table!r}: column {column.name!r} ({type_}): {exc}") from exc


def arrow_table(spec: TableSpec, rows: Sequence[Any]) -> pa.Table:
    """The pyarrow Table of ``rows``, each an instance of ``spec.row`` (exactly: not a subclass).

    Values must have the right Python type (ints for integer columns, no bools; numbers for
    floats; str; lists of the item type for list columns; the class for text-stored columns).

    >>> from vlmflow.results.tables import TABLES, ErrorRow, SampleRow
    >>> arrow_table(TABLES["samples"], [ErrorRow(sample_id="q1", stage="image", reason="no file")])
    Traceback (most recent call last):
    ...
    vlmflow.results.schema.RowError: table 'samples', row 0 (sample_id 'q1'): expected a SampleRow, got ErrorRow
    """
    if any(kind is not spec.row for kind in {type(r) for r in rows}):
        i = next(i for i, r in enumerate(rows) if type(r) is not spec.row)
        raise RowError(f"{_where(spec.name, i, rows[i])}: expected a {spec.row.__name__}, got {type(rows[i]).__name__}")
    arrays = [_column_array(spec.name, c, [getattr(r, c.name) for r in rows], rows) for c in spec.columns]
    return pa.Table.from_arrays(arrays, schema=spec.schema)


def _where(table: str, index: int, row: Any) -> str:
    sample = getattr(row, "sample_id", None)
    suffix = f" (sample_id {sample!r})" if isinstance(sample, str) else ""
    return f"table {table!r}, row {index}{suffix}"
