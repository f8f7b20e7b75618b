"""Which batches a run directory accepts, and which of its errors are current.

The rules (:class:`~vlmflow.results.store.RunStore` applies them; its module docstring tells why):

* a batch is refused (:class:`CommitError`) if a key repeats within it, if it closes a sample (its
  ``samples`` row or a whole-sample ``errors`` row) that already has a ``samples`` row, or if it holds
  rows of a sample that has neither its ``samples``/``errors`` row in the batch nor a committed
  ``samples`` row; rows added to a computed sample (more flows) must not repeat committed keys;
* a sample that has only errors may be retried: its new ``samples`` or ``errors`` row supersedes them;
* the current errors are, of the rows of one key (sample, flow), the last committed one, and none of
  a sample later computed or a flow later computed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from vlmflow.errors import VlmflowError
from vlmflow.results.tables import table_spec

__all__ = ["CommitError", "check_batch", "current_errors", "drop_duplicate_keys", "keys"]

log = logging.getLogger(__name__)


class CommitError(VlmflowError, ValueError):
    """The store refuses a batch: it would duplicate rows or leave a sample half committed."""


def keys(table: pa.Table, key: Sequence[str]) -> list[Any]:
    """The key of every row: the value for a one-column key, else a tuple.

    >>> keys(pa.table({"sample_id": ["a", "b"], "flow": ["x", "y"]}), ("sample_id", "flow"))
    [('a', 'x'), ('b', 'y')]
    """
    if len(key) == 1:
        return table.column(key[0]).to_pylist()
    return list(zip(*(table.column(c).to_pylist() for c in key), strict=True))


def _shown(spec_key: Sequence[str], key: Any) -> dict[str, Any]:
    return dict(zip(spec_key, key if isinstance(key, tuple) else (key,), strict=True))


def check_batch(
    built: Mapping[str, pa.Table],
    computed: Collection[str],
    committed_keys: Callable[[str], pa.Table | None],
    *,
    where: str,
) -> set[str]:
    """The sample ids ``built`` (table name -> rows) closes; raise :class:`CommitError` when the rules refuse it.

    ``computed``: the sample ids with a committed ``samples`` row; ``committed_keys(name)``: the
    committed key columns of table ``name`` (``None`` when it has none); ``where`` names the run
    directory in messages.
    """
    closing: set[str] = set()  # samples with their `samples` row or a whole-sample error here
    with_samples: set[str] = set()
    with_rows: set[str] = set()  # samples with rows in other tables (flows, lens, ...)
    for name, table in built.items():
        spec = table_spec(name)
        ids = table.column("sample_id").to_pylist()
        seen: set[Any] = set()
        for key in keys(table, spec.key):
            if key in seen:
                raise CommitError(f"table {name!r}: key {_shown(spec.key, key)} appears twice in one batch")
            seen.add(key)
        if name == "samples":
            closing.update(ids)
            with_samples.update(ids)
        elif name == "errors":
            flows = table.column("flow").to_pylist()
            closing.update(sid for sid, flow in zip(ids, flows, strict=True) if flow == "")
        else:
            with_rows.update(ids)
    # A computed sample gets no second `samples` row and no whole-sample error; a sample that
    # has only errors may be retried (its new `samples` row or error row replaces the error).
    # Errors of single flows may come alone (a flow of a computed sample, a route of a task).
    again = sorted(closing & set(computed))
    if again:
        raise CommitError(
            f"sample(s) {again[:5]} already committed in {where!r}; a sample is committed once "
            "(skip the ids in done_sample_ids())"
        )
    orphans = sorted(with_rows - with_samples - set(computed))
    if orphans:
        raise CommitError(
            f"sample(s) {orphans[:5]} have rows but no 'samples' or 'errors' row in this batch (nor a committed "
            "'samples' row); commit all of a sample's rows in one batch, together with its samples/errors row"
        )
    extended = with_rows - with_samples
    if extended:
        _check_extension(built, extended, committed_keys, where)
    return closing


def _check_extension(
    built: Mapping[str, pa.Table], extended: set[str], committed_keys: Callable[[str], pa.Table | None], where: str
) -> None:
    """Rows added to computed samples must not repeat committed keys (errors may: they supersede)."""
    for name, table in built.items():
        committed = committed_keys(name) if name != "errors" else None
        if committed is None:
            continue
        spec = table_spec(name)
        mask = pa.array([sid in extended for sid in committed.column("sample_id").to_pylist()], pa.bool_())
        old = set(keys(committed.filter(mask), spec.key))
        for key in keys(table, spec.key):
            if key in old:
                raise CommitError(f"table {name!r}: key {_shown(spec.key, key)} is already committed in {where!r}")


def current_errors(errors: pa.Table, samples: Collection[str], computed: Collection[tuple[str, str]]) -> pa.Table:
    """The rows of ``errors`` not resolved later: whole-sample errors of samples without a ``samples`` row
    (``samples``), flow errors whose (sample, flow) has no rows (``computed``).

    >>> errors = pa.table({"sample_id": ["a", "b", "c"], "flow": ["", "", "x"]})
    >>> current_errors(errors, samples={"a"}, computed={("c", "x")}).column("sample_id").to_pylist()
    ['b']
    """
    ids, flows = errors.column("sample_id").to_pylist(), errors.column("flow").to_pylist()
    keep = [
        (flow == "" and sid not in samples) or (flow != "" and (sid, flow) not in computed)
        for sid, flow in zip(ids, flows, strict=True)
    ]
    return errors.filter(pa.array(keep, pa.bool_()))


def drop_duplicate_keys(table: pa.Table, key: tuple[str, ...], name: str, *, keep_last: bool = False) -> pa.Table:
    """Keep one row of each key: the first (defensive: commits never produce duplicates), or the last
    (``errors``: a retried error's new row supersedes the old one)."""
    if table.num_rows == 0:
        return table
    how = "max" if keep_last else "min"
    grouped = table.select(list(key)).append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    picked = grouped.group_by(list(key), use_threads=False).aggregate([("_row", how)])
    if picked.num_rows == table.num_rows:
        return table
    if not keep_last:
        log.warning("table %s: dropped %d duplicate rows", name, table.num_rows - picked.num_rows)
    rows = np.sort(picked.column(f"_row_{how}").to_numpy())
    return table.take(pa.array(rows))
