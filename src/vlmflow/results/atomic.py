"""Crash-safe file writing: a file is either absent or complete, never half written.

Every write goes to a hidden temp sibling (``.NAME.tmp-<token>``), is flushed and fsynced, then
renamed over the target (``os.replace`` is atomic on POSIX filesystems). ``fsync=False`` keeps the
atomicity with respect to a killed process but not to a power cut or kernel crash.

Temp names carry a writer token (``host-p<pid>-<random>``) so that several processes on several
hosts never collide, and so a leftover temp can be recognised as stale (see :func:`is_stale_temp`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARK = ".tmp-"
#: A temp from another host (or whose pid cannot be checked) is stale after this many seconds.
STALE_TMP_SECONDS = 3600.0
_TOKEN_RE = re.compile(r"\.tmp-([A-Za-z0-9]+)-p(\d+)-")


def host_name() -> str:
    """This machine's host name reduced to ``[A-Za-z0-9]`` (so ``-`` can separate token fields).

    >>> host_name().isalnum()
    True
    """
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def new_token() -> str:
    """A name fragment unique to one writer: host, pid and random bits.

    >>> new_token().count("-")
    2
    """
    return f"{host_name()}-p{os.getpid()}-{secrets.token_hex(4)}"


def temp_sibling(path: Path) -> Path:
    """A hidden temp path next to ``path`` (same directory, so the rename stays on one filesystem).

    >>> temp_sibling(Path("run/flows.parquet")).name.startswith(".flows.parquet.tmp-")
    True
    """
    return path.with_name(f".{path.name}{TMP_MARK}{new_token()}")


def is_stale_temp(path: Path, *, now: float | None = None) -> bool:
    """Whether a temp left by some writer can be deleted: its writer is a dead process on this
    host, or (other host / unknown writer) it is older than :data:`STALE_TMP_SECONDS`.

    A temp of the current process is never stale by pid (another store of this process may be
    writing it).
    """
    match = _TOKEN_RE.search(path.name)
    if match and match.group(1) == host_name() and int(match.group(2)) != os.getpid():
        return not pid_alive(int(match.group(2)))
    try:
        age = (now if now is not None else time.time()) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_TMP_SECONDS


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host.

    >>> pid_alive(os.getpid())
    True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (PermissionError), or cannot tell: assume alive
        return True
    return True


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or create inside it) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_parquet(path: Path, table: pa.Table, *, fsync: bool, compression: str = "snappy") -> None:
    """Write ``table`` to ``path`` (not atomic by itself: used inside a temp directory)."""
    with open(path, "wb") as handle:
        pq.write_table(table, handle, compression=compression)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_parquet(path: Path, table: pa.Table, *, fsync: bool = True, compression: str = "zstd") -> None:
    """Write ``table`` as Parquet to ``path`` atomically (replacing an existing file).

    >>> atomic_write_parquet(Path("run/flows.parquet"), table)  # doctest: +SKIP
    """
    tmp = temp_sibling(path)
    try:
        write_parquet(tmp, table, fsync=fsync, compression=compression)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (replacing an existing file).

    >>> atomic_write_bytes(Path("run/summary.json"), b"{}")  # doctest: +SKIP
    """
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes, *, fsync: bool = True) -> bool:
    """Create ``path`` holding ``data``, atomically, unless it exists; False if it already existed.

    A hard link of a complete temp file is an atomic create-if-absent (also on NFS), so two
    processes creating the same file concurrently never see a partial file and exactly one wins.

    >>> create_exclusive(Path("run/spec.json"), b"{}")  # doctest: +SKIP
    True
    """
    tmp = temp_sibling(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    except OSError:  # a filesystem without hard links: fall back to rename (small race, last wins)
        created = not path.exists()
        if created:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if fsync:
        fsync_dir(path.parent)
    return created
