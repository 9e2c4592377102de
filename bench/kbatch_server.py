"""A real ``kbatch server`` process in a scratch state directory, and seeding its job table."""

from __future__ import annotations

import getpass
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.servers import KbatchServer as TestServer

from bench.context import wait_until
from bench.machine import peak_rss_mib
from bench.workload import job_spec
from kbatch.backends.local.store import Insert, JobStore
from kbatch.models import JobSpec

__all__ = ["KbatchServer", "QueuedServer", "cli_path", "seed_finished_jobs", "seed_jobs"]


def cli_path(program: str = "kbatch") -> str:
    """The ``kbatch``/``kqueue`` installed beside the Python running the benchmark."""
    return str(Path(sys.executable).with_name(program))


@dataclass
class KbatchServer(TestServer):
    """``kbatch server`` in its own process, as a user starts it (default log level).

    The tests' server process (tests/support/servers.py) with what the
    benchmarks read besides: its pid, peak memory and the tail of its log.
    """

    log_level: str | None = None
    start_timeout: float = 120.0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    def log_tail(self, lines: int = 5) -> str:
        return " / ".join(self.log().strip().splitlines()[-lines:]) or "(no log)"

    def peak_rss_mib(self) -> float | None:
        return peak_rss_mib(self.pid)


def seed_jobs(state_dir: Path, spec: JobSpec, count: int, *, workdir: Path) -> float:
    """Insert ``count`` PENDING jobs straight into the local backend's SQLite store.

    Only while the server is stopped: this is the same ``JobStore.insert`` the
    server calls on ``POST /jobs`` (same rows, same spec JSON), minus HTTP and
    the launch attempt, so ten thousand jobs take seconds rather than minutes.
    Returns the seconds it took.
    """
    user = getpass.getuser()
    start = time.perf_counter()
    store = JobStore(state_dir / "jobs.sqlite")
    try:
        for _ in range(count):
            store.insert(
                user=user,
                spec=spec,
                paths=lambda job_id: (str(workdir / f"kbatch-{job_id}.out"), None),
                idempotency_key=None,
                now=time.time(),
            )
    finally:
        store.close()
    return time.perf_counter() - start


def seed_finished_jobs(state_dir: Path, spec: JobSpec, count: int, *, workdir: Path) -> float:
    """Insert ``count`` jobs that have ended (COMPLETED, exit code 0, their end hook run)
    into the local store, as :func:`seed_jobs` does, a thousand per transaction.

    Only while the server is stopped.  Rows are inserted as the server inserts them,
    then marked ended with one UPDATE (what the reconciler writes at a job's end).
    Returns the seconds it took.
    """
    user = getpass.getuser()
    start = time.perf_counter()
    store = JobStore(state_dir / "jobs.sqlite")
    try:
        first: int | None = None
        done = 0
        while done < count:
            batch = min(1000, count - done)
            now = time.time()
            results = store.insert_many(
                [
                    Insert(
                        user=user,
                        spec=spec,
                        paths=lambda job_id: (str(workdir / f"kbatch-{job_id}.out"), None),
                        idempotency_key=None,
                        now=now,
                    )
                    for _ in range(batch)
                ]
            )
            if first is None:
                record = results[0]
                assert isinstance(record, tuple)
                first = record[0].id
            done += batch
        with store.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'COMPLETED', reason = NULL, exit_code = 0, "
                "started = submitted + 0.5, finished = submitted + 1, finalized = 1 "
                "WHERE id >= ? AND state = 'PENDING'",
                (first,),
            )
    finally:
        store.close()
    return time.perf_counter() - start


@dataclass
class QueuedServer:
    """A server whose queue holds ``size`` jobs: one running, the rest waiting behind it.

    The server gets one CPU; the first job (``hold.sh``, submitted through the
    API) takes it, and the others are seeded with :func:`seed_jobs`, so they
    wait (reasons ``Resources`` and ``Priority``) and every one of them is in
    ``kqueue``'s default listing, as ``squeue`` shows pending jobs.
    """

    server: KbatchServer
    workdir: Path
    size: int = 0
    head_id: str | None = None
    seconds_seeding: float = 0.0

    @classmethod
    def create(cls, state_dir: Path, workdir: Path) -> QueuedServer:
        workdir.mkdir(parents=True, exist_ok=True)
        server = KbatchServer(state_dir, args=["--cpus", "1"])
        server.start()
        queued = cls(server, workdir)
        try:
            with server.client() as client:
                head = client.submit(job_spec("hold.sh", workdir=workdir))
                queued.head_id = head.id

                def running() -> bool:
                    return client.get(head.id).state.value == "RUNNING"

                wait_until(running, timeout=60, what="the head job to run")
        except BaseException:
            queued.close()
            raise
        queued.size = 1
        return queued

    def grow(self, size: int) -> None:
        """Restart the server with ``size`` jobs in its queue."""
        if size <= self.size:
            return
        self.server.stop()
        spec = job_spec("trivial.sh", workdir=self.workdir)
        self.seconds_seeding += seed_jobs(
            self.server.state_dir, spec, size - self.size, workdir=self.workdir
        )
        self.size = size
        self.server.start()

    def close(self) -> None:
        """Stop the server first (so nothing queued starts), then end the head job."""
        self.server.stop()
        if self.head_id is None:
            return
        started = self.server.state_dir / "jobs" / self.head_id / "started.json"
        try:
            pgid = int(json.loads(started.read_text())["pgid"])
        except (OSError, ValueError, KeyError):
            return
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        result = self.server.state_dir / "jobs" / self.head_id / "result.json"
        wait_until(result.exists, timeout=30, what="the head job's supervisor to finish")
