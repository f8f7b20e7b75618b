"""The run directory: a crash-safe, resumable store of result tables.

Layout of a run directory::

    RUN_DIR/
      spec.json                 the run's spec (identity + "provenance"), written once, atomically
      parts/
        00000001-<token>/       one committed batch: <table>.parquet for each table in the batch
        00000002-<token>/
        .tmp-<token>-<n>/       a batch being written (hidden; never read; stale ones are removed)
      flows.parquet             consolidated tables, written by finalize() (atomically)
      samples.parquet
      errors.parquet
      summary.json              written by finalize()

How it stays correct when the process is killed at any instant:

* A batch is written into a hidden temp directory, every file is fsynced, then the directory is
  renamed to its final name (``os.rename`` of a directory is atomic). A reader sees the whole batch
  or nothing; hidden and malformed names under ``parts/`` are never read.
* Part directories are never modified or deleted by the store: they are the source of truth. A
  consolidated ``<table>.parquet`` records in its metadata which parts it already contains;
  :meth:`RunStore.read` reads it plus the parts it does not list, and :meth:`RunStore.finalize`
  folds those parts in. Rerunning finalize, or resuming and committing after it, stays exact. Once
  a run is finalized and no worker is running, ``parts/`` may be deleted to save space.
* The store refuses a batch that would duplicate rows: a sample whose ``samples`` row (or, for a
  new error, any row) is already committed, a key twice in one batch or already committed, or rows
  of a sample that has neither its ``samples``/``errors`` row in the batch nor a committed ``samples``
  row (so a sample is either entirely committed or not at all). Two kinds of later batches are
  allowed: a **retry** (a ``samples`` row, or a new ``errors`` row, for a sample that has only errors)
  and an **extension** (rows of more flows, and their errors, for a sample already computed).
* ``errors`` shows the current errors: of the rows of one key (sample, flow) the last committed
  one, and none of a sample later computed (it has a ``samples`` row) or a flow later computed (it
  has rows in ``flows``). The rows of errors that were retried stay in ``parts/``.

Several processes may commit into one run directory (also on a shared filesystem): each store
instance has a unique token (host, pid, random) that is part of every name it creates, so names
never collide; the number orders one worker's batches. Workers must process disjoint samples:
the duplicate check only sees what was on disk when the store was opened plus its own commits.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vlmflow.errors import ConfigError, VlmflowError
from vlmflow.results.atomic import (
    TMP_MARK,
    atomic_write_bytes,
    atomic_write_parquet,
    create_exclusive,
    fsync_dir,
    is_stale_temp,
    new_token,
    write_parquet,
)
from vlmflow.results.batches import CommitError as CommitError  # raised by RunStore.commit
from vlmflow.results.batches import check_batch, current_errors, drop_duplicate_keys, keys
from vlmflow.results.identity import (
    canonical_spec,
    grown_spec,
    identity_of,
    json_bytes,
    read_spec,
    spec_differences,
    without_keys,
)
from vlmflow.results.schema import fill_added_columns
from vlmflow.results.tables import TABLES, Row, build_table, empty_table, table_spec

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
SUMMARY_FILE = "summary.json"
PARTS_DIR = "parts"
#: Parquet schema-metadata key of a consolidated table: JSON list of the part names it contains.
PARTS_METADATA_KEY = b"vlmflow.parts"
#: A committed part: ``<number, 8+ digits>-<writer token>``; anything else under parts/ is ignored.
_PART_RE = re.compile(r"^(\d{8,})-([A-Za-z0-9]+-p\d+-[0-9a-f]+)$")


class StoreReadOnlyError(VlmflowError):
    """Raised by :meth:`RunStore.commit` on a store opened with :meth:`RunStore.load`."""


@dataclass(frozen=True)
class _Part:
    name: str
    tables: frozenset[str]


class RunStore:
    """A run directory holding result tables; see the module docstring for the layout.

    >>> store = RunStore.open(tmp / "run", {"model": "tiny", "provenance": {"host": "a"}})  # doctest: +SKIP
    >>> store.commit({"samples": [sample_row], "flows": flow_rows})                         # doctest: +SKIP
    >>> store.done_sample_ids()                                                            # doctest: +SKIP
    {'q1'}
    >>> store.finalize({"samples": 1})                                                     # doctest: +SKIP
    """

    def __init__(self, path: Path, spec: dict[str, Any], *, fsync: bool = True, writable: bool = True) -> None:
        # Use RunStore.open / RunStore.load.
        self.path = path
        self.spec = spec
        self._fsync = fsync
        self._writable = writable
        self._token = new_token()
        self._next_number = 1
        self._tmp_counter = 0
        self._parts: dict[str, _Part] = {}  # cache of committed parts (immutable once visible)
        self._consolidated: dict[str, tuple[tuple[int, int, int], frozenset[str]]] = {}
        self._done: set[str] | None = None  # sample ids known to be committed (lazy)
        self._computed: set[str] = set()  # of those, the ones with a `samples` row

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: Path | str, spec: Mapping[str, Any], *, fsync: bool = True, growing: Sequence[Sequence[str]] = ()
    ) -> RunStore:
        """Create the run directory for ``spec``, or reopen it to resume the same spec.

        ``spec`` must be JSON-serialisable (paths and enums are stored as strings). Its key
        ``"provenance"`` (versions, times, host) is recorded but not compared; everything else is
        the run's identity and must equal the stored one, otherwise :class:`ConfigError` names the
        differing keys. ``growing`` are key paths of the identity holding lists that may grow (a
        run's flows): they are not compared, and items the new spec adds are appended to the stored
        list (``spec.json`` is rewritten). ``fsync=False`` skips the fsyncs (faster; a commit is
        still atomic with respect to the process being killed, but not to a power cut) -- meant for
        tests.

        >>> store = RunStore.open("runs/demo", {"model": "tiny", "window": 7})  # doctest: +SKIP
        >>> RunStore.open("runs/demo", {"model": "tiny", "window": 9})          # doctest: +SKIP
        Traceback (most recent call last):
        ...
        vlmflow.errors.ConfigError: run directory 'runs/demo' holds a different run: window: stored 7, now 9; ...
        """
        path = Path(path)
        canonical = canonical_spec(spec)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run directory {str(path)!r} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        spec_path = path / SPEC_FILE
        if not spec_path.exists():
            unexpected = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
            if unexpected:
                raise ConfigError(
                    f"{str(path)!r} is not empty and has no {SPEC_FILE} (found {', '.join(unexpected[:5])}); "
                    "it is not a run directory: choose another output directory"
                )
            if not create_exclusive(spec_path, json_bytes(canonical), fsync=fsync):
                log.info("%s was created by another process meanwhile; comparing", spec_path)
        stored = read_spec(spec_path)
        diffs = spec_differences(without_keys(identity_of(stored), growing), without_keys(identity_of(canonical), growing))
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise ConfigError(
                f"run directory {str(path)!r} holds a different run: {shown}. "
                "Use another output directory or run name, or delete that directory to start over"
            )
        if stored != canonical:
            log.info("resuming %s (provenance differs from the stored one; identity matches)", path)
        grown = grown_spec(stored, canonical, growing)
        if grown != stored:
            log.info("%s: the run's %s grow", path, ", ".join(".".join(k) for k in growing))
            atomic_write_bytes(spec_path, json_bytes(grown), fsync=fsync)
            stored = grown
        store = cls(path, stored, fsync=fsync)
        (path / PARTS_DIR).mkdir(exist_ok=True)
        store._remove_stale_temp()
        store._scan_parts()
        return store

    @classmethod
    def load(cls, path: Path | str) -> RunStore:
        """Open an existing run directory for reading (its stored spec; no commits).

        Raises :class:`ConfigError` naming the path and what is missing if it is not a run directory.

        >>> RunStore.load("runs/demo").read("flows")  # doctest: +SKIP
        """
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{str(path)!r} is not a run directory: it does not exist or is not a directory")
        spec_path = path / SPEC_FILE
        if not spec_path.is_file():
            raise ConfigError(f"{str(path)!r} is not a run directory: {SPEC_FILE} is missing")
        store = cls(path, read_spec(spec_path), writable=False)
        store._scan_parts()
        return store

    # --- reading ---------------------------------------------------------------------------------

    def tables(self) -> list[str]:
        """Names of the tables with committed data (in parts or consolidated), sorted.

        A finalized run whose ``parts/`` was deleted lists its consolidated tables.

        >>> store.tables()  # doctest: +SKIP
        ['errors', 'flows', 'samples']
        """
        self._scan_parts()
        names: set[str] = set()
        for part in self._parts.values():
            names |= part.tables
        names |= {name for name in TABLES if (self.path / f"{name}.parquet").is_file()}
        return sorted(names)

    def read_arrow(self, table: str, columns: Sequence[str] | None = None) -> pa.Table:
        """All committed rows of ``table`` as a pyarrow Table, in commit order, without duplicates.

        >>> store.read_arrow("samples", columns=["sample_id"]).num_rows  # doctest: +SKIP
        12
        """
        files, _ = self._sources(table)
        if table != "errors":
            return self._read_files(table, files, columns)
        current = self._current_errors(self._read_files(table, files))
        return current.select(list(columns)) if columns is not None else current

    def _current_errors(self, errors: pa.Table) -> pa.Table:
        """The errors not resolved by a later computation (see the module docstring)."""
        if errors.num_rows == 0:
            return errors
        samples = set(self._read_files("samples", self._sources("samples")[0], ["sample_id"]).column("sample_id").to_pylist())
        computed: set[tuple[str, str]] = set()
        for name in ("flows", "controls"):
            files = self._sources(name)[0]
            if files:
                computed.update(keys(self._read_files(name, files, ["sample_id", "flow"]), ("sample_id", "flow")))
        return current_errors(errors, samples, computed)

    def _read_files(self, table: str, files: Sequence[Path], columns: Sequence[str] | None = None) -> pa.Table:
        spec = table_spec(table)
        schema = spec.schema
        if columns is not None:
            unknown = [c for c in columns if c not in schema.names]
            if unknown:
                raise ConfigError(f"table {table!r} has no column {unknown[0]!r}; columns: {', '.join(schema.names)}")
        if not files:
            result = empty_table(table)
        else:
            # One dataset over many small files: pyarrow reads them in parallel.
            dataset = pads.dataset([str(f) for f in files], schema=schema, format="parquet")
            read_columns = list(columns) if columns is not None else None
            if read_columns is not None:
                read_columns = list(dict.fromkeys([*spec.key, *read_columns]))
            # Files written before a column was added read back with its declared value.
            result = fill_added_columns(spec, dataset.to_table(columns=read_columns))
        result = drop_duplicate_keys(result, spec.key, table, keep_last=table == "errors")
        if columns is not None:
            result = result.select(list(columns))
        return result

    def read(self, table: str, columns: Sequence[str] | None = None) -> Any:
        """All committed rows of ``table`` as a pandas DataFrame (commit order, deduplicated by key).

        Sort by the table's key (``table_spec(table).key``) for a canonical order.

        >>> store.read("flows").groupby(["flow", "layer"]).rel_change.mean()  # doctest: +SKIP
        """
        return self.read_arrow(table, columns).to_pandas()

    def done_sample_ids(self) -> set[str]:
        """Ids of samples with a committed ``samples`` row or a whole-sample ``errors`` row (re-read from disk).

        >>> "q1" in store.done_sample_ids()  # doctest: +SKIP
        True
        """
        computed = self._committed_samples()
        done = computed | self.error_sample_ids()
        self._done, self._computed = set(done), computed
        return done

    def error_sample_ids(self) -> set[str]:
        """Ids of samples whose current record is a whole-sample error (they have no ``samples`` row).

        >>> store.error_sample_ids()  # doctest: +SKIP
        {'q7'}
        """
        errors = self.read_arrow("errors", columns=["sample_id", "flow"])
        return {sid for sid, flow in zip(errors.column("sample_id").to_pylist(), errors.column("flow").to_pylist(), strict=True) if flow == ""}

    def flow_keys(self, table: str = "flows") -> dict[str, set[str]]:
        """Per sample, the flows with committed rows in ``table`` and, separately, those recorded as errors.

        Returns ``{sample_id: {flow, ...}}`` of ``table``; see :meth:`flow_errors` for the errors.
        """
        out: dict[str, set[str]] = {}
        if table in self.tables():
            keys = self.read_arrow(table, columns=["sample_id", "flow"])
            for sid, flow in zip(keys.column("sample_id").to_pylist(), keys.column("flow").to_pylist(), strict=True):
                out.setdefault(sid, set()).add(flow)
        return out

    def flow_errors(self) -> dict[str, set[str]]:
        """Per sample, the flows whose current record is an error (the sample's other flows were computed)."""
        out: dict[str, set[str]] = {}
        errors = self.read_arrow("errors", columns=["sample_id", "flow"])
        for sid, flow in zip(errors.column("sample_id").to_pylist(), errors.column("flow").to_pylist(), strict=True):
            if flow:
                out.setdefault(sid, set()).add(flow)
        return out

    def _committed_samples(self) -> set[str]:
        return set(self.read_arrow("samples", columns=["sample_id"]).column("sample_id").to_pylist())

    # --- writing ---------------------------------------------------------------------------------

    def commit(self, tables: Mapping[str, Sequence[Row]]) -> None:
        """Atomically commit one batch of typed rows (any subset of the tables of
        :mod:`vlmflow.results.tables`; each table's rows are instances of its row class).

        Either the whole batch becomes visible or none of it. Refused with :class:`CommitError`
        (before anything is written) if a sample id in the batch is already committed, a key
        repeats within the batch, or a sample has rows but no ``samples``/``errors`` row in the
        batch; with :class:`~vlmflow.results.schema.RowError` if a row is not of the table's row
        class or a value has the wrong type.

        >>> store.commit({"samples": [row], "flows": rows})  # doctest: +SKIP
        """
        if not self._writable:
            raise StoreReadOnlyError(f"run directory {str(self.path)!r} was opened read-only (RunStore.load)")
        built = {name: build_table(name, rows) for name, rows in tables.items() if len(rows)}
        if not built:
            return
        batch_ids = self._check_batch(built)
        self._write_part(built)
        assert self._done is not None
        self._done |= batch_ids
        self._computed |= set(built["samples"].column("sample_id").to_pylist()) if "samples" in built else set()

    def finalize(self, summary: Mapping[str, Any] | None = None, *, tables: Sequence[str] = ()) -> None:
        """Write consolidated ``<table>.parquet`` files and ``summary.json`` (each atomically).

        Idempotent; after a later resume and commit, finalize again folds the new parts in.
        ``samples``, ``errors`` and ``tables`` (the experiment's) are always written (possibly empty).

        >>> store.finalize({"samples": 12})  # doctest: +SKIP
        """
        if not self._writable:
            raise StoreReadOnlyError(f"run directory {str(self.path)!r} was opened read-only (RunStore.load)")
        self._scan_parts()
        names = set(self.tables()) | {name for name, spec in TABLES.items() if spec.core} | {table_spec(t).name for t in tables}
        for name in sorted(names):
            target = self.path / f"{name}.parquet"
            covered = self._covered(name)
            fresh = [p for p in self._parts_with(name) if p not in covered]
            if target.is_file() and not fresh and name != "errors":  # errors: resolved by other tables' rows too
                continue
            files, sources = self._sources(name)
            # errors: the current ones (retried and resolved errors stay only in parts/)
            table = self.read_arrow(name) if name == "errors" else self._read_files(name, files)
            all_covered = sorted(sources, key=_part_order)
            metadata = dict(table.schema.metadata or {})
            metadata[PARTS_METADATA_KEY] = json.dumps(all_covered).encode()
            table = table.replace_schema_metadata(metadata)
            atomic_write_parquet(target, table, fsync=self._fsync, compression="zstd")
            log.info("consolidated %s: %d rows from %d parts", target, table.num_rows, len(all_covered))
        if summary is not None:
            atomic_write_bytes(self.path / SUMMARY_FILE, json_bytes(canonical_spec(summary)), fsync=self._fsync)

    # --- internals -------------------------------------------------------------------------------

    def _check_batch(self, built: Mapping[str, pa.Table]) -> set[str]:
        """Sample ids the batch commits; raise CommitError for duplicates or half-committed samples."""
        if self._done is None:
            self.done_sample_ids()

        def committed_keys(name: str) -> pa.Table | None:
            files = self._sources(name)[0]
            return self._read_files(name, files, list(table_spec(name).key)) if files else None

        return check_batch(built, self._computed, committed_keys, where=str(self.path))

    def _write_part(self, built: Mapping[str, pa.Table]) -> None:
        parts_dir = self.path / PARTS_DIR
        self._tmp_counter += 1
        tmp = parts_dir / f"{TMP_MARK}{self._token}-{self._tmp_counter}"
        tmp.mkdir()
        try:
            for name, table in built.items():
                write_parquet(tmp / f"{name}.parquet", table, fsync=self._fsync)
            if self._fsync:
                fsync_dir(tmp)
            while True:
                final = parts_dir / f"{self._next_number:08d}-{self._token}"
                self._next_number += 1
                try:
                    os.rename(tmp, final)
                    break
                except OSError as exc:
                    # Cannot happen with a unique token; if it ever does, take the next number.
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    log.warning("part name %s exists; trying the next number", final.name)
            if self._fsync:
                fsync_dir(parts_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._parts[final.name] = _Part(final.name, frozenset(built))

    def _scan_parts(self) -> None:
        """Refresh the cache of committed parts (new directories only; parts never change)."""
        parts_dir = self.path / PARTS_DIR
        if not parts_dir.is_dir():
            return
        with os.scandir(parts_dir) as entries:
            for entry in entries:
                match = _PART_RE.match(entry.name)
                if not match:
                    continue
                number = int(match.group(1))
                self._next_number = max(self._next_number, number + 1)
                if entry.name in self._parts:
                    continue
                names = frozenset(
                    f[: -len(".parquet")]
                    for f in os.listdir(entry.path)
                    if f.endswith(".parquet") and f[: -len(".parquet")] in TABLES
                )
                self._parts[entry.name] = _Part(entry.name, names)

    def _parts_with(self, table: str) -> list[str]:
        """Names of committed parts holding ``table``, in commit order (number, then token)."""
        names = [p.name for p in self._parts.values() if table in p.tables]
        return sorted(names, key=_part_order)

    def _covered(self, table: str) -> frozenset[str]:
        """Part names already folded into the consolidated file of ``table`` (empty if none)."""
        target = self.path / f"{table}.parquet"
        try:
            stat = target.stat()
        except FileNotFoundError:
            self._consolidated.pop(table, None)
            return frozenset()
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._consolidated.get(table)
        if cached is not None and cached[0] == signature:
            return cached[1]
        metadata = pq.read_schema(target).metadata or {}
        covered = frozenset(json.loads(metadata.get(PARTS_METADATA_KEY, b"[]")))
        self._consolidated[table] = (signature, covered)
        return covered

    def _sources(self, table: str) -> tuple[list[Path], set[str]]:
        """Files holding all committed rows of ``table``, and the names of the parts they cover."""
        self._scan_parts()
        covered = self._covered(table)
        consolidated = self.path / f"{table}.parquet"
        files = [consolidated] if consolidated.is_file() else []
        fresh = [name for name in self._parts_with(table) if name not in covered]
        files += [self.path / PARTS_DIR / name / f"{table}.parquet" for name in fresh]
        return files, set(covered) | set(fresh)

    def _remove_stale_temp(self) -> None:
        """Delete temps of dead writers (see :func:`~vlmflow.results.atomic.is_stale_temp`)."""
        now = time.time()
        for directory in (self.path / PARTS_DIR, self.path):
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not (entry.name.startswith(".") and TMP_MARK in entry.name):
                        continue
                    if not is_stale_temp(Path(entry.path), now=now):
                        continue
                    log.info("removing leftover temp %s", entry.path)
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path)
                        else:
                            os.unlink(entry.path)
                    except OSError as exc:  # read-only, or another process removed it first
                        log.warning("could not remove %s: %s", entry.path, exc)


# --- helpers --------------------------------------------------------------------------------------


def _part_order(name: str) -> tuple[int, str]:
    number, _, token = name.partition("-")
    return int(number), token
