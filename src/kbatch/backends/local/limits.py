"""Memory limits for local jobs: cgroup v2, cgroup v1, or watching the processes.

The supervisor asks :func:`memory_limiter` for the best mechanism this machine
allows.  Each limiter puts the job in place, says whether the job was killed
for memory, and cleans up.  Order of preference:

* cgroup v2: a child of the supervisor's own cgroup with ``memory.max``; OOM
  kills counted in ``memory.events``.
* cgroup v1: a child of the supervisor's own ``memory`` cgroup with
  ``memory.limit_in_bytes``; OOM kills counted in ``memory.oom_control``.
* neither (no cgroup we may write): the supervisor sums the resident memory of
  the job's processes every tick and kills the job when it goes over.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

__all__ = ["MemoryLimiter", "memory_limiter", "process_group_members"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class MemoryLimiter:
    """No limit at all (no ``--mem``), and the interface of the real ones."""

    kind = "none"

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit

    def setup(self) -> None:
        """Prepare, in the supervisor, before the job starts."""

    def enter(self, pid: int) -> None:
        """Move a process (the job, before it execs) under the limit."""

    def check(self, pgid: int) -> bool:
        """Called every tick; True if the job has gone over its limit and must be killed."""
        return False

    def oom_killed(self) -> bool:
        """True if the kernel (or this limiter) killed a job process for memory."""
        return False

    def kill_all(self) -> None:
        """Kill every process left under the limit (processes that left the group too)."""

    def cleanup(self) -> None:
        """Remove what :meth:`setup` made."""


def _own_cgroup(controller: str | None) -> str | None:
    """The supervisor's cgroup path in a hierarchy (``None`` for the v2 entry ``0::``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controller is None and _id == "0" and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return None


class _CgroupLimiter(MemoryLimiter):
    directory: Path

    def enter(self, pid: int) -> None:
        (self.directory / "cgroup.procs").write_text(str(pid))

    def _pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.directory / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill_all(self) -> None:
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        self.kill_all()
        with contextlib.suppress(OSError):
            self.directory.rmdir()


class CgroupV2Limiter(_CgroupLimiter):
    kind = "cgroup-v2"

    def __init__(self, limit: int, name: str, root: Path = CGROUP_ROOT) -> None:
        super().__init__(limit)
        own = _own_cgroup(None)
        mount = root if (root / "cgroup.controllers").exists() else root / "unified"
        if own is None or not (mount / "cgroup.controllers").exists():
            raise OSError("no cgroup v2 hierarchy")
        self.directory = mount / own.lstrip("/") / name

    def setup(self) -> None:
        parent = self.directory.parent
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            (parent / "cgroup.subtree_control").write_text("+memory")
        self.directory.mkdir()
        (self.directory / "memory.max").write_text(str(self.limit))
        with contextlib.suppress(OSError):
            (self.directory / "memory.swap.max").write_text("0")

    def oom_killed(self) -> bool:
        try:
            events = (self.directory / "memory.events").read_text().split()
        except OSError:
            return False
        counts = dict(zip(events[::2], events[1::2], strict=False))
        return int(counts.get("oom_kill", "0")) > 0


class CgroupV1Limiter(_CgroupLimiter):
    kind = "cgroup-v1"

    def __init__(self, limit: int, name: str, root: Path = CGROUP_ROOT) -> None:
        super().__init__(limit)
        own = _own_cgroup("memory")
        mount = root / "memory"
        if own is None or not (mount / "memory.limit_in_bytes").exists():
            raise OSError("no cgroup v1 memory hierarchy")
        self.directory = mount / own.lstrip("/") / name

    def setup(self) -> None:
        self.directory.mkdir()
        (self.directory / "memory.limit_in_bytes").write_text(str(self.limit))
        with contextlib.suppress(OSError):  # absent without swap accounting
            (self.directory / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
        with contextlib.suppress(OSError):
            (self.directory / "memory.swappiness").write_text("0")

    def oom_killed(self) -> bool:
        try:
            text = (self.directory / "memory.oom_control").read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        return False


def process_group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (read from /proc; zombies left out)."""
    members: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class PollingLimiter(MemoryLimiter):
    """Sums the resident memory of the job's process group every tick."""

    kind = "polling"

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._killed = False

    def check(self, pgid: int) -> bool:
        assert self.limit is not None
        if sum(_rss(pid) for pid in process_group_members(pgid)) > self.limit:
            self._killed = True
            return True
        return False

    def oom_killed(self) -> bool:
        return self._killed


def memory_limiter(limit: int | None, name: str, prefer: str = "auto") -> MemoryLimiter:
    """The best limiter this machine allows (``prefer`` forces one, for tests)."""
    if limit is None:
        return MemoryLimiter()
    candidates: list[type[MemoryLimiter]]
    order = {
        "auto": [CgroupV2Limiter, CgroupV1Limiter],
        "cgroup-v2": [CgroupV2Limiter],
        "cgroup-v1": [CgroupV1Limiter],
        "polling": [],
    }
    candidates = order.get(prefer, order["auto"])  # type: ignore[assignment]
    for cls in candidates:
        try:
            limiter = cls(limit, name)  # type: ignore[call-arg]
        except OSError:
            continue
        try:
            limiter.setup()
        except OSError:
            limiter.cleanup()
            continue
        return limiter
    return PollingLimiter(limit)
