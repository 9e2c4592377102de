"""The files a job's supervisor and the server share, in ``<state>/jobs/<id>/``.

The server writes ``launch.json`` and the script, and holds ``lock`` open
across the spawn; the supervisor keeps the lock for its whole life, writes
``started.json`` once the job runs and ``result.json`` when it ends.  The
server asks for cancellation by creating ``cancel``.  Because the result is a
file written by the supervisor, a job's true end is known even when the server
was down at the time; because the lock is an ``flock``, the server can tell a
live supervisor from a dead one without trusting process ids.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path
from typing import TypeVar

import msgspec

from kbatch.models import JobState

__all__ = ["Account", "JobDir", "LaunchSpec", "Result", "Started"]

T = TypeVar("T")


class Account(msgspec.Struct, kw_only=True, frozen=True):
    """The Unix account a job runs as (``run_as_user``): what the launcher needs to become it."""

    name: str
    uid: int
    gid: int
    groups: list[int]  # supplementary groups, as initgroups(3) sets them
    home: str


class LaunchSpec(msgspec.Struct, kw_only=True):
    job_id: str
    argv: list[str]
    environment: dict[str, str]
    workdir: str
    output: str
    error: str | None
    open_mode: str = "truncate"
    memory: int | None = None
    time_limit: int | None = None
    kill_grace: float = 10.0
    memory_limiter: str = "auto"
    notify_socket: str | None = None
    # The account to become right before exec (None: stay the supervisor's account).
    run_as: Account | None = None


class Started(msgspec.Struct, kw_only=True):
    pid: int
    pgid: int
    started: float
    limiter: str


class Result(msgspec.Struct, kw_only=True):
    state: JobState
    exit_code: int | None
    reason: str | None
    started: float | None
    finished: float


class JobDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    launch = property(lambda self: self.path / "launch.json")
    script = property(lambda self: self.path / "script")
    lock = property(lambda self: self.path / "lock")
    started = property(lambda self: self.path / "started.json")
    result = property(lambda self: self.path / "result.json")
    cancel = property(lambda self: self.path / "cancel")
    log = property(lambda self: self.path / "supervisor.log")
    # A FIFO the supervisor reads: a byte in it wakes it at once (a cancel), not a tick later.
    wake = property(lambda self: self.path / "wake")

    def write(self, path: Path, value: msgspec.Struct, *, durable: bool = True) -> None:
        """Atomically: a reader sees the whole file or none of it.

        ``durable`` also makes it survive a power loss (fsync, milliseconds on
        some disks); a file read at once by a process that a power loss would
        kill as well does not need that.
        """
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(msgspec.json.encode(value))
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)

    def sync(self, path: Path) -> None:
        """Make a file :meth:`write` wrote without ``durable`` survive a power loss too
        (best effort: it stays written, as it was, if this fails)."""
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read_started(self) -> Started | None:
        return self._read(self.started, Started)

    def read_result(self) -> Result | None:
        return self._read(self.result, Result)

    def read_launch(self) -> LaunchSpec:
        return msgspec.json.decode(self.launch.read_bytes(), type=LaunchSpec)

    @staticmethod
    def _read(path: Path, type: type[T]) -> T | None:
        try:
            return msgspec.json.decode(path.read_bytes(), type=type)
        except FileNotFoundError:
            return None
        except msgspec.DecodeError:
            return None  # a torn write cannot happen (rename), but never crash the server

    def supervisor_alive(self) -> bool:
        """True while a supervisor holds the lock (or the server holds it across a spawn)."""
        try:
            fd = os.open(self.lock, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing also drops a lock we took
        return False

    def request_cancel(self) -> None:
        with contextlib.suppress(FileExistsError):
            self.cancel.touch(exist_ok=False)
        self.poke()

    def poke(self) -> None:
        """Wake the supervisor now (best effort: it looks at least once a tick anyway).

        Never blocks: with no supervisor reading the FIFO the open fails (ENXIO), and
        a full FIFO has wake-ups enough in it already."""
        try:
            fd = os.open(self.wake, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, b"!")
        except OSError:
            pass
        finally:
            os.close(fd)
