"""One process at a time per run directory: ``RUN_DIR/.lock``.

Two processes computing the same run directory would both compute every sample (each sees the
other's samples only after committing its own), so the process that runs a spec into a run
directory takes its lock first, and a second one refuses with a message naming the holder::

    run directory 'runs/flows-x' is in use by pid 4242 on host gpu-3 since 2025-06-01T10:00:00+00:00
    (vlmflow flows ...); wait for it to finish or stop it

The lock is an exclusive ``flock`` on the file, so it goes away with its process however that
process ends: after ``kill -9`` the next run takes it over (and says whose it was). Where the
filesystem has no file locks, the file itself is the lock and a holder counts as gone when it ran on
this host and its pid no longer runs (or runs a process started after the lock); a holder on
another host is then trusted until its lock file is deleted.

The lock belongs to the coordinator of a run, not to each writer: the Ray executor's driver holds
it while its replicas commit into the directory (:class:`~vlmflow.results.store.RunStore` itself
takes no lock, so several writers of one run remain possible by design).

>>> with RunLock("runs/flows-x"):      # doctest: +SKIP
...     ...                             # compute and commit
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlmflow.errors import ConfigError
from vlmflow.notices import notice

try:  # POSIX; without it the pid in the file is the lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLockedError(ConfigError):
    """Another process holds the run directory's lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock: host, pid, when it started, its process start time and command."""

    host: str
    pid: int
    started: str
    process_start: float | None
    command: str

    @classmethod
    def me(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            process_start=_process_start(os.getpid()),
            command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
        )

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder recorded in ``path`` (None when it is missing, empty or unreadable)."""
        try:
            raw: Any = json.loads(path.read_text(encoding="utf-8"))
            return cls(str(raw["host"]), int(raw["pid"]), str(raw["started"]), raw.get("process_start"), str(raw.get("command", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        command = f" ({self.command})" if self.command else ""
        return f"pid {self.pid} on host {self.host} since {self.started}{command}"

    def gone(self) -> bool:
        """True when this holder ran on this host and its process no longer runs."""
        if self.host != socket.gethostname():
            return False
        if not _pid_runs(self.pid):
            return True
        now = _process_start(self.pid)
        # The pid was reused by a process started after the holder: the holder is gone.
        return self.process_start is not None and now is not None and abs(now - self.process_start) > 1.0

    def as_json(self) -> bytes:
        fields = {
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
            "process_start": self.process_start,
            "command": self.command,
        }
        return json.dumps(fields).encode()


class RunLock:
    """The lock of one run directory (created if needed); a context manager, or :meth:`acquire` /
    :meth:`release`.

    Raises:
        RunLockedError: from :meth:`acquire`, when another live process holds it.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._by_file = False  # no flock on this filesystem: the file is the lock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None or self._by_file

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the process that holds it."""
        if self.held:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a holder releasing just now may unlink the file between our open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if locked is None:  # no file locks here
                os.close(fd)
                self._acquire_by_file()
                return
            if not locked:
                os.close(fd)
                raise self._refusal(Holder.read(self.path))
            if _same_file(fd, self.path):
                previous = Holder.read(self.path)
                if previous is not None and previous.pid != os.getpid():
                    notice("%s: the lock of %s is stale (that process is gone); taking it over", self.directory, previous.describe())
                os.ftruncate(fd, 0)
                os.pwrite(fd, Holder.me().as_json(), 0)
                self._fd = fd
                return
            os.close(fd)  # we locked a file that was unlinked meanwhile: try the new one
        raise RunLockedError(f"could not take the lock {str(self.path)!r}: it keeps being replaced")

    def release(self) -> None:
        """Give the lock back (the file is removed); nothing when not held."""
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)  # closing releases the flock
                self._fd = None
        elif self._by_file:
            holder = Holder.read(self.path)
            if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self._by_file = False

    def _acquire_by_file(self) -> None:
        holder = Holder.read(self.path)
        if holder is not None and holder.pid != os.getpid():
            if not holder.gone():
                raise self._refusal(holder, by_file=True)
            notice("%s: the lock of %s is stale (that process is gone); taking it over", self.directory, holder.describe())
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}")
        tmp.write_bytes(Holder.me().as_json())
        os.replace(tmp, self.path)
        self._by_file = True

    def _refusal(self, holder: Holder | None, *, by_file: bool = False) -> RunLockedError:
        who = holder.describe() if holder is not None else "another process (it is starting)"
        advice = "wait for it to finish or stop it"
        if by_file:
            advice += f"; if it is no longer running, delete {str(self.path)!r}"
        return RunLockedError(f"run directory {str(self.directory)!r} is in use by {who}; {advice}")


def check_unlocked(directory: Path | str) -> None:
    """Raise :class:`RunLockedError` when ``directory`` exists and another process holds its lock.

    A cheap early check (e.g. before loading a model); :meth:`RunLock.acquire` is the one that counts.
    """
    path = Path(directory) / LOCK_FILE
    if not path.is_file():
        return
    lock = RunLock(directory)
    lock.acquire()
    lock.release()


def _flock(fd: int) -> bool | None:
    """Try an exclusive non-blocking flock: True taken, False held by another, None not supported."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        log.info("no file locks on this filesystem (%s); the lock file's pid is the lock", exc)
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), None when unknown."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # no such process, no access, no psutil
        return None
