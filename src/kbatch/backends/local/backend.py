"""The local backend: runs each job under a detached supervisor, records jobs in SQLite."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from kbatch.arrays import (
    IndexSet,
    aggregate_state,
    params_environment,
    parse_array,
    task_environment,
)
from kbatch.backends.base import Backend, decode_section, not_pending
from kbatch.backends.derive import check_spec, job_environment, output_paths
from kbatch.backends.local.accounts import AccountPolicy, check_paths, lookup
from kbatch.backends.local.jobdir import Account, JobDir, LaunchSpec, Result
from kbatch.backends.local.launcher import Launcher, LauncherUnavailable, reclaim_lock
from kbatch.backends.local.limits import process_group_members
from kbatch.backends.local.scheduler import Capacity, Demand, schedule
from kbatch.backends.local.store import Insert, JobRecord, JobStore, PendingRow
from kbatch.backends.workqueue import WorkQueue, stop_workers
from kbatch.dependencies import DependencyStatus, describe, evaluate, parse_dependency
from kbatch.errors import (
    ConfigError,
    Conflict,
    InvalidRequest,
    KbatchError,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
    SpecError,
    TransportError,
)
from kbatch.hardening import supervisor_environment
from kbatch.lifecycle import Desired, JobRef, check_transition, parse_job_ref
from kbatch.models import Job, JobList, JobSpec, JobState
from kbatch.units import format_memory, parse_memory

__all__ = ["LocalBackend", "LocalConfig", "machine_capacity"]

log = logging.getLogger("kbatch.local")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
WORKERS = 8  # reconcilers at once: hooks wait on I/O (the hub), spawns on a thread
SYNC_TIMEOUT = 10.0  # how long an API call waits for the reconciler to act on it
DIR_CHECK_SECONDS = 1.0  # how long a submission's directory check is taken as still true
LAUNCHER_BACKOFF = 1.0  # seconds before a launcher that failed is started again (doubling)
LAUNCHER_MAX_BACKOFF = 60.0


def machine_capacity() -> Capacity:
    """This machine's CPUs (those we may run on) and physical memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Capacity(cpus=len(os.sched_getaffinity(0)), memory=memory, gpus=0)


@dataclass
class LocalConfig:
    state_dir: Path
    cpus: int | None = None  # default: this machine's
    memory: int | None = None  # bytes; default: this machine's
    gpus: int = 0
    kill_grace: float = 10.0  # seconds between SIGTERM and SIGKILL
    memory_limiter: str = "auto"  # auto, cgroup-v2, cgroup-v1, polling
    tick: float = 2.0  # reconcile at least this often (supervisors also wake us)
    # What a 201 (any recorded change) survives: "normal", the server's crash or SIGKILL;
    # "full", a power loss too (an fsync per commit, shared by concurrent submissions).
    # See JobStore.
    synchronous: str = "normal"
    python: str = field(default_factory=lambda: sys.executable)
    # Supervisors are forked by a pre-started launcher (kbatch.backends.local.launcher);
    # false: each one is a new interpreter (``python -m kbatch.backends.local.supervisor``).
    launcher: bool = True
    # Every job runs under the server's own Unix account: with hub users, the admin must
    # accept that they share it (see kbatch.server.config.check_shared_account) ...
    jobs_share_server_account: bool = False
    # ... unless the server runs as root with run_as_user: then each job runs as the Unix
    # account user_template names for its user (see kbatch.backends.local.accounts).
    run_as_user: bool = False
    user_template: str = "jupyter-{username}"  # TLJH's accounts; "{username}" for the same name
    min_uid: int = 1000  # accounts below (and root) never run jobs
    # Where jobs with uploaded files (--code) get their copy, one folder per job.  Default:
    # <state_dir>/code, or with run_as_user <state_dir>-code beside it (the state directory
    # is root's alone; this one every account may pass through, but not list).
    code_dir: str | None = None

    def code_root(self) -> Path:
        if self.code_dir is not None:
            return Path(self.code_dir)
        if self.runs_as_users:
            return self.state_dir.parent / f"{self.state_dir.name}-code"
        return self.state_dir / "code"

    @property
    def runs_as_users(self) -> bool:
        """Whether jobs really run as their users: asked for, and the server is root."""
        return self.run_as_user and os.geteuid() == 0

    def account_policy(self) -> AccountPolicy:
        return AccountPolicy(user_template=self.user_template, min_uid=self.min_uid)

    def capacity(self) -> Capacity:
        machine = machine_capacity()
        return Capacity(
            cpus=self.cpus or machine.cpus, memory=self.memory or machine.memory, gpus=self.gpus
        )


class _Wakeup(asyncio.DatagramProtocol):
    def __init__(self, callback: Callable[[bytes], None]) -> None:
        self.callback = callback

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.callback(data)


class _Retry(Exception):
    """The job's reconcile could not finish for a passing reason: try it again later."""


class LocalBackend(Backend):
    """Jobs as processes of this machine, each under a detached supervisor.

    The reconciler (:meth:`_reconcile`, run by :data:`WORKERS` workers from a
    :class:`WorkQueue` of job ids) is the only code that changes a job's state;
    the scheduler (:meth:`_schedule`) only grants pending jobs the right to
    start and queues them.  API calls write the desired state and wait for the
    reconciler.
    """

    name = "local"
    config_class = LocalConfig

    def __init__(self, config: LocalConfig) -> None:
        super().__init__()
        self.config = config
        self.capacity = config.capacity()
        self.jobs_dir = config.state_dir / "jobs"
        self.socket_path = config.state_dir / "notify.sock"
        self._store: JobStore | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._transport: asyncio.BaseTransport | None = None
        self._spawned: list[subprocess.Popen[bytes]] = []
        self._queue: WorkQueue[int] = WorkQueue(base_delay=0.1, max_delay=5.0)
        self._granted: dict[int, Demand] = {}  # allowed to start, not yet RUNNING
        self._last_started: dict[str, float] = {}  # per user: the fair-share tie-break
        self._schedule_lock = asyncio.Lock()
        self._begin_timer: asyncio.TimerHandle | None = None
        self._begin_at = 0.0
        # Arrays' specs (their tasks run them), with their index sets: read once per array.
        self._array_specs: dict[int, tuple[JobSpec, IndexSet]] = {}
        # Submissions waiting for the next group commit (see _insert).
        self._inserts: builtins.list[tuple[Insert, asyncio.Future[tuple[JobRecord, bool]]]] = []
        # Directories submissions named, seen to exist: when, and where they really are.
        self._dirs_checked: dict[str, tuple[float, str]] = {}
        self._state_real = os.path.realpath(config.state_dir)
        self._launcher: Launcher | None = None
        self._launcher_retry_at = 0.0  # monotonic time before which a failed one is not restarted
        self._launcher_backoff = LAUNCHER_BACKOFF

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, state_dir: Path) -> LocalBackend:
        values = dict(section)
        if isinstance(values.get("memory"), str):
            try:
                values["memory"] = parse_memory(values["memory"], option="local.memory")
            except SpecError as exc:
                raise ConfigError(f"config: {exc}") from exc
        values.setdefault("state_dir", state_dir)
        return cls(decode_section(values, LocalConfig, "local"))

    @property
    def supports_code(self) -> bool:
        return True

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise RuntimeError("the local backend has not been started")
        return self._store

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._state_real = os.path.realpath(self.config.state_dir)
        if self.config.runs_as_users:
            self._secure_state_dir()
        try:
            self._store = JobStore(
                self.config.state_dir / "jobs.sqlite", synchronous=self.config.synchronous
            )
        except ValueError as exc:
            raise ConfigError(f"config [local]: {exc}") from exc
        self._last_started = self._store.last_started()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if len(str(self.socket_path)) < 100:
            loop = asyncio.get_running_loop()
            # A socket of our own: uvloop takes a Unix datagram socket only this way.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind(str(self.socket_path))
                sock.setblocking(False)
                self._transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Wakeup(self._woken), sock=sock
                )
            except BaseException:
                sock.close()
                raise
        self._start_launcher()
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"kbatch-local-reconciler-{i}")
            for i in range(WORKERS)
        ]
        self._resync()
        await self._schedule()
        self._tasks.append(asyncio.create_task(self._loop(), name="kbatch-local-tick"))
        log.info(
            "local backend: %d CPUs, %s memory, %d GPUs, state in %s",
            self.capacity.cpus,
            format_memory(self.capacity.memory),
            self.capacity.gpus,
            self.config.state_dir,
        )
        if self.config.runs_as_users:
            log.info(
                "local backend: each job runs as its user's Unix account (%s, uid >= %d)",
                self.config.user_template,
                self.config.min_uid,
            )
        elif self.config.run_as_user:
            log.warning(
                "run_as_user needs a server running as root; every job runs as this "
                "server's own account (uid %d)",
                os.geteuid(),
            )

    def _secure_state_dir(self) -> None:
        """With jobs of many accounts: the state directory is root's and root's alone."""
        for path in (self.config.state_dir, self.jobs_dir):
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
                raise ConfigError(
                    f"run_as_user: the state directory {path} must be a directory owned by root "
                    "(the account that owns it could change what root's supervisors write)"
                )
            path.chmod(0o700)

    async def stop(self) -> None:
        if self._begin_timer is not None:
            self._begin_timer.cancel()
        await stop_workers(self._queue, self._tasks)
        self._tasks = []
        if self._launcher is not None:
            await self._launcher.stop()  # the supervisors it started go on
            self._launcher = None
        if self._transport is not None:
            self._transport.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    def _woken(self, data: bytes) -> None:
        """A supervisor's datagram: its job started or ended."""
        text = data.decode(errors="replace")
        if text.isascii() and text.isdigit() and len(text) <= 18:
            # Its reconciler looks at it; an end frees resources, and _finish then wakes
            # the scheduler.  A start frees nothing: no pass over every pending job.
            self._queue.put(int(text))
        else:
            self._wake.set()

    async def _loop(self) -> None:
        """The periodic resync: every running job is looked at, and the scheduler runs."""
        while True:
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow the
            # cancellation that stop() sends when the event fires at the same moment.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tick):
                    await self._wake.wait()
            self._wake.clear()
            try:
                self._resync()
                await self._schedule()
            except Exception:
                log.exception("the local scheduler failed; retrying")

    def _resync(self) -> None:
        for job_id in self.store.needing_attention():
            self._queue.put(job_id)

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await self._reconcile(job_id)
                self._queue.forget(job_id)
            except _Retry:
                self._queue.put_backoff(job_id)
            except Exception:
                log.exception("reconciling job %s failed; retrying", job_id)
                self._queue.put_backoff(job_id)
            finally:
                self._queue.done(job_id)

    async def reconcile(self) -> None:
        """Look at every job that needs it now, and wait until that is done (for tests)."""
        self._reap_spawned()
        await asyncio.gather(*(self._queue.sync(i) for i in self.store.needing_attention()))
        await self._schedule()

    # -- the interface -------------------------------------------------------

    async def validate(self, user: str, spec: JobSpec) -> None:
        cap = self.capacity
        if spec.cpus > cap.cpus:
            raise SpecError(
                f"the job asks for {spec.cpus} CPUs but this server has {cap.cpus}; "
                f"use --cpus-per-task={cap.cpus} or fewer",
                field="cpus",
            )
        if spec.memory is not None and spec.memory > cap.memory:
            raise SpecError(
                f"the job asks for {format_memory(spec.memory)} of memory but this server has "
                f"{format_memory(cap.memory)}; lower --mem",
                field="memory",
            )
        if spec.gpus > cap.gpus:
            raise SpecError(
                f"the job asks for {spec.gpus} GPUs but this server has {cap.gpus}; remove --gpus",
                field="gpus",
            )
        if spec.image is not None:
            raise SpecError(
                "--image is for the Kubernetes backend; this server runs jobs on its own machine",
                field="image",
            )
        check_spec(spec)
        workdir = spec.workdir
        if not workdir:
            raise SpecError("the job needs a working directory", field="workdir")
        array = spec.array is not None
        paths = output_paths(
            spec, job_id="1", user=user, array_id="1" if array else None, task=0 if array else None
        )
        if self.config.runs_as_users:
            # Everything as the user's account would see it: the server (root) could
            # write anywhere, so its own view of the paths says nothing.
            account = lookup(user, self.config.account_policy())
            # A name with the job's id (%j) is a new file: only its directory counts.
            other = output_paths(
                spec,
                job_id="2",
                user=user,
                array_id="2" if array else None,
                task=1 if array else None,
            )
            files = {"output": (paths.output, paths.output == other.output)}
            if paths.error is not None:
                files["error"] = (paths.error, paths.error == other.error)
            await asyncio.to_thread(check_paths, account, workdir, files)
            return
        if not self._good_dir(workdir):
            raise SpecError(
                f"the working directory {workdir} does not exist; create it or change -D/--chdir",
                field="workdir",
            )
        self._outside_state_dir(workdir, "working directory", "-D/--chdir", "workdir")
        for path, name in ((paths.output, "output"), (paths.error, "error")):
            if path is None:
                continue
            if not self._good_dir(os.path.dirname(path)):
                raise SpecError(
                    f"the directory of the {name} file, {os.path.dirname(path)}, does not exist; "
                    f"create it first or change --{name}",
                    field=name,
                )
            self._outside_state_dir(path, f"{name} file", f"--{name}", name)

    def _good_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory; remembered (with where it really is) for
        :data:`DIR_CHECK_SECONDS`, so that a burst of submissions from one directory
        looks once.  A directory that changes meanwhile is no different from one that
        changes between a submission and the job's start: the start fails, saying why."""
        now = time.monotonic()
        checked = self._dirs_checked.get(path)
        if checked is not None and now - checked[0] < DIR_CHECK_SECONDS:
            return True
        if not os.path.isdir(path):
            return False
        if len(self._dirs_checked) >= 1024:
            self._dirs_checked.clear()
        self._dirs_checked[path] = (now, os.path.realpath(path))
        return True

    def _in_state_dir(self, real: str) -> bool:
        state = self._state_real
        return real == state or real.startswith(state + os.sep)

    def _real(self, path: str) -> str:
        """``os.path.realpath(path)``, from what :meth:`_good_dir` remembers when it can:
        a directory it saw, or a name in one that is not a symbolic link."""
        known = self._dirs_checked.get(path)
        if known is not None:
            return known[1]
        directory, leaf = os.path.split(path)
        known = self._dirs_checked.get(directory)
        if known is not None and leaf not in ("", ".", "..") and not os.path.islink(path):
            return os.path.join(known[1], leaf)
        return os.path.realpath(path)

    def _outside_state_dir(self, path: str, what: str, option: str, field: str) -> None:
        """Refuse a path in the server's own state (its tokens, database, job records)."""
        real = self._real(path)
        if self._in_state_dir(real):
            raise SpecError(
                f"the {what} {path} is inside the kbatch server's state directory; "
                f"choose another with {option}",
                field=field,
            )

    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        await self.validate(user, spec)

        def paths(job_id: int) -> tuple[str, str | None]:
            resolved = output_paths(spec, job_id=str(job_id), user=user)
            return resolved.output, resolved.error

        gated = spec.dependency is not None or spec.begin is not None
        record, new = await self._insert(
            Insert(
                user=user,
                spec=spec,
                paths=paths,
                idempotency_key=idempotency_key,
                now=time.time(),
                max_active=self.limits.max_submitted_jobs_per_user,
                # Earlier jobs of this user wait: this one cannot start before them (reason
                # Priority, written with the row), so no scheduling pass for it.
                priority=not gated,
            )
        )
        if not new:
            return await self.get(str(record.id))
        job = record.to_job()
        self.events.publish(job)
        if record.desired is not Desired.RUN or record.reason == "Priority":
            # As written: what get() would read back (an array or a dependency it adds to).
            plain = spec.array is None and spec.dependency is None
            return job if plain else await self.get(job.id)
        await self._schedule()
        if record.id in self._granted:  # submit-to-start latency matters: start it now
            await self._await_reconcile(record.id)
        return await self.get(str(record.id))

    async def _insert(self, item: Insert) -> tuple[JobRecord, bool]:
        """Store a submission, committed (on disk, see :class:`JobStore`) before this returns.

        Group commit: the submissions that arrive in one turn of the event loop are
        inserted in one transaction at the start of the next, and each waits for that
        commit.  A commit is most of an insert's cost; with several clients at once
        (what the batches are made of) they share it, and a lone client waits no longer
        than before: its batch is itself, committed at once.
        """
        future: asyncio.Future[tuple[JobRecord, bool]] = asyncio.get_running_loop().create_future()
        self._inserts.append((item, future))
        if len(self._inserts) == 1:
            asyncio.get_running_loop().call_soon(self._commit_inserts)
        return await future

    def _commit_inserts(self) -> None:
        batch, self._inserts = self._inserts, []
        try:
            results = self.store.insert_many([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each waiting request must get it: none is stored
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its request went away; the job is stored all the same
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def get(self, job_id: str) -> Job:
        ref = parse_job_ref(job_id)
        record = self._record(self._parse_id(ref.job_id))
        if ref.tasks is not None or record.is_head:
            return self._array_job(record, ref)
        job = record.to_job()
        if job.dependency is not None and job.state is JobState.PENDING:
            job = msgspec.structs.replace(job, dependency=self._describe_dependency(record))
        return job

    def _describe_dependency(self, record: JobRecord) -> str:
        """What a pending job still waits on and what is met, as scontrol shows it."""
        assert record.dependency is not None
        dependency = parse_dependency(record.dependency)
        ids = [int(i) for i in dependency.job_ids if i.isascii() and i.isdigit()]
        singleton = any(t.kind == "singleton" for t in dependency.terms)
        earlier = singleton and self.store.active_earlier(record.user, record.name, record.id)
        return describe(dependency, self._states(ids), singleton_clear=not earlier)

    def _states(self, job_ids: list[int]) -> dict[str, JobState]:
        """Jobs' states for dependencies: an array's is that of all its tasks together."""
        states = self.store.states(job_ids)
        for job_id in job_ids:
            record = self.store.get(job_id) if str(job_id) in states else None
            if record is not None and record.is_head:
                states[str(job_id)] = self._array_job(record, JobRef(str(job_id))).state
        return states

    async def spec(self, job_id: str) -> JobSpec | None:
        record = self._record(self._parse_id(parse_job_ref(job_id).job_id))
        return self._spec_of(record)

    # -- arrays --------------------------------------------------------------

    def _head(self, record: JobRecord) -> JobRecord:
        """The array a task belongs to (a job's head is itself)."""
        if record.array_job_id is None or record.array_job_id == record.id:
            return record
        return self._record(record.array_job_id)

    def _array_spec(self, head: JobRecord) -> tuple[JobSpec, IndexSet]:
        cached = self._array_specs.get(head.id)
        if cached is None:
            spec = head.spec
            cached = (spec, parse_array(spec.array or "0").indexes)
            if len(self._array_specs) > 256:
                self._array_specs.clear()
            self._array_specs[head.id] = cached
        return cached

    def _spec_of(self, record: JobRecord) -> JobSpec:
        if record.is_task:
            return self._array_spec(self._head(record))[0]
        return record.spec

    def _array_job(self, record: JobRecord, ref: JobRef) -> Job:
        """An array, or the tasks ``ref`` names of it, as one job (see docs/core.md)."""
        head = self._head(record)
        if not head.is_head:
            raise NotFound(
                f"no job {ref}: job {head.id} is not an array", status=404, code="not_found"
            )
        if record.is_task and ref.tasks is None:  # a task by its own row id
            return record.to_job()
        _, every = self._array_spec(head)
        wanted = ref.tasks
        waiting = IndexSet.parse(head.array_pending or "")
        rows = self.store.task_summary(head.id)
        if wanted is not None:
            chosen = set(wanted)
            rows = [row for row in rows if row.index in chosen]
            waiting = waiting.intersection(wanted)
        if ref.index is not None and len(rows) == 1:  # one task with its row
            task = self.store.task(head.id, ref.index)
            assert task is not None
            return task.to_job()
        if not rows and not waiting:
            raise NotFound(f"no job {ref}", status=404, code="not_found")
        counts: dict[JobState, int] = {}
        for row in rows:
            counts[row.state] = counts.get(row.state, 0) + 1
        group_state = JobState.CANCELLED if head.state is JobState.CANCELLED else JobState.PENDING
        if waiting:
            counts[group_state] = counts.get(group_state, 0) + len(waiting)
        state = aggregate_state(counts)
        base = head.to_job()
        if ref.index is not None:  # one task that has not started
            return msgspec.structs.replace(
                base,
                id=str(ref),
                state=group_state,
                array_task_id=ref.index,
                array_tasks=None,
                array_throttle=None,
            )
        codes = [row.exit_code for row in rows if row.exit_code is not None]
        starts = [row.started for row in rows if row.started is not None]
        ends = [row.finished for row in rows if row.finished is not None]
        if head.state is JobState.CANCELLED and head.finished is not None:
            ends.append(head.finished)
        shown = every if wanted is None else IndexSet.of([*waiting, *(r.index for r in rows)])
        return msgspec.structs.replace(
            base,
            id=str(head.id) if wanted is None else str(ref),
            state=state,
            reason=head.reason if waiting and state is JobState.PENDING else None,
            exit_code=max(codes) if codes and state.is_terminal else None,
            started=datetime.fromtimestamp(min(starts), UTC) if starts else None,
            finished=datetime.fromtimestamp(max(ends), UTC) if ends and state.is_terminal else None,
            array_tasks=str(shown),
            array_counts={str(k): v for k, v in sorted(counts.items())},
        )

    def _task_paths(self, head: JobRecord) -> Callable[[int, int], tuple[str, str | None]]:
        spec, _ = self._array_spec(head)

        def paths(task_id: int, index: int) -> tuple[str, str | None]:
            resolved = output_paths(
                spec, job_id=str(task_id), user=head.user, array_id=str(head.id), task=index
            )
            return resolved.output, resolved.error

        return paths

    def _split(
        self,
        head: JobRecord,
        *,
        count: int | None = None,
        indexes: IndexSet | None = None,
        desired: Desired = Desired.RUN,
        by: str | None = None,
    ) -> builtins.list[int]:
        """Rows of their own for some of an array's waiting tasks (see JobStore.split)."""
        ids = self.store.split(
            head,
            count=count,
            indexes=() if indexes is None else list(indexes),
            paths=self._task_paths(head),
            now=time.time(),
            desired=desired,
            cancelled_by=by,
        )
        if ids:
            # The head's row shrinks (or, with no task left waiting, goes: array_tasks "").
            self.events.publish(self._record(head.id).to_job())
            for task_id in ids:
                self.events.publish(self._record(task_id).to_job())
        return ids

    async def set_throttle(self, job_id: str, throttle: int | None) -> Job:
        ref = parse_job_ref(job_id)
        record = self._record(self._parse_id(ref.job_id))
        head = self._head(record)
        if not head.is_head or ref.tasks is not None:
            raise Conflict(
                f"job {ref} is not an array; only an array has a throttle",
                status=409,
                code="not_an_array",
            )
        self.store.update(head.id, array_throttle=throttle)
        await self._schedule()
        return self._array_job(self._record(head.id), JobRef(str(head.id)))

    async def list(
        self,
        *,
        user: str | None,
        states: Collection[JobState] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> JobList:
        start = None
        if after is not None:
            if not (after.isascii() and after.isdigit() and len(after) <= 18):
                raise InvalidRequest(
                    f"the cursor {after!r} is not one this server gave",
                    status=422,
                    code="bad_cursor",
                )
            start = int(after)
        jobs = self.store.list_jobs(
            user=user, states=states, limit=None if limit is None else limit + 1, after=start
        )
        if limit is not None and len(jobs) > limit:
            jobs = jobs[:limit]
            return JobList(jobs=jobs, next=jobs[-1].id)
        return JobList(jobs=jobs)

    async def cancel(self, job_id: str, *, by: str) -> Job:
        ref = parse_job_ref(job_id)
        record = self._record(self._parse_id(ref.job_id))
        if ref.tasks is None and not record.is_head:  # a job, or a task by its own id
            await self._cancel_one(record, by)
            return self._record(record.id).to_job()
        head = self._array_of(record, ref)
        targets = self._task_rows(head, ref, desired=Desired.CANCEL, by=by)
        if ref.tasks is None and head.state is JobState.PENDING and head.array_pending:
            targets.append(head)  # the tasks that have not started: never start them
        await asyncio.gather(*(self._cancel_one(t, by) for t in targets))
        return await self.get(str(ref))

    async def _cancel_one(self, record: JobRecord, by: str) -> None:
        if record.state.is_terminal:
            return
        if record.desired is not Desired.CANCEL:
            self.store.update(record.id, desired=Desired.CANCEL, cancelled_by=by)
        await self._await_reconcile(record.id)

    def _array_of(self, record: JobRecord, ref: JobRef) -> JobRecord:
        head = self._head(record)
        if not head.is_head:
            raise NotFound(f"no job {ref}", status=404, code="not_found")
        return head

    def _task_rows(
        self, head: JobRecord, ref: JobRef, *, desired: Desired, by: str | None = None
    ) -> builtins.list[JobRecord]:
        """The active rows of the tasks ``ref`` names (all the array's for a bare id);
        the named tasks that have not started are first given rows, ``desired`` already."""
        wanted = ref.tasks
        if wanted is not None:
            self._split(head, indexes=wanted, desired=desired, by=by)
        rows = self.store.tasks(head.id, active=True)
        if wanted is None:
            return rows
        chosen = set(wanted)
        return [row for row in rows if row.array_task_id in chosen]

    async def hold(self, job_id: str) -> Job:
        ref = parse_job_ref(job_id)
        record = self._record(self._parse_id(ref.job_id))
        if ref.tasks is None and not record.is_head:
            return await self._hold_one(record)
        head = self._array_of(record, ref)
        held = 0
        if ref.tasks is None and head.state is JobState.PENDING and head.array_pending:
            held += self._set_desired(head.id, Desired.HOLD, from_=(Desired.RUN,))
            await self._await_reconcile(head.id)
        for task in self._task_rows(head, ref, desired=Desired.HOLD):
            if task.state is JobState.PENDING:
                with contextlib.suppress(Conflict):
                    await self._hold_one(task)
                    held += 1
        job = await self.get(str(ref))
        if not held and not (job.array_counts or {}).get(str(JobState.PENDING)):
            raise not_pending(job, "held")
        return job

    async def _hold_one(self, record: JobRecord) -> Job:
        self._set_desired(record.id, Desired.HOLD, from_=(Desired.RUN,))
        await self._await_reconcile(record.id)
        current = self._record(record.id)
        if current.state is not JobState.PENDING or current.desired is not Desired.HOLD:
            if current.desired is Desired.HOLD:  # it started before the hold could take
                self.store.update(current.id, desired=Desired.RUN)
            raise not_pending(current.to_job(), "held")
        return current.to_job()

    async def release(self, job_id: str) -> Job:
        ref = parse_job_ref(job_id)
        record = self._record(self._parse_id(ref.job_id))
        if ref.tasks is None and not record.is_head:
            await self._release_one(record)
            return self._record(record.id).to_job()
        head = self._array_of(record, ref)
        if ref.tasks is None:
            await self._release_one(head)
        elif head.desired is Desired.HOLD:  # some tasks of a held array: they alone may run
            self._split(head, indexes=ref.tasks, desired=Desired.RUN)
            await self._schedule()
        rows = self.store.tasks(head.id, active=True)
        wanted = None if ref.tasks is None else set(ref.tasks)
        for task in rows:
            if wanted is None or task.array_task_id in wanted:
                await self._release_one(task)
        return await self.get(str(ref))

    async def _release_one(self, record: JobRecord) -> None:
        if self._set_desired(record.id, Desired.RUN, from_=(Desired.HOLD,)):
            self._set(record.id, reason="None")
            await self._schedule()
            if record.id in self._granted:
                await self._await_reconcile(record.id)

    async def logs(
        self, job_id: str, *, follow: bool, stream: str = "output"
    ) -> AsyncIterator[bytes]:
        ref = parse_job_ref(job_id)
        record = self._record(self._parse_id(ref.job_id))
        if ref.indexes is not None or (record.is_head and ref.index is None):
            raise InvalidRequest(
                f"job {ref} is an array: give one task, such as {record.id}_"
                f"{IndexSet.parse(record.array_pending or '0').first if record.array_pending else 0}",
                status=422,
                code="array_logs",
            )
        if ref.index is not None:
            task = self.store.task(self._head(record).id, ref.index)
            if task is None:
                self._array_job(record, ref)  # NotFound unless the task is still waiting
                return
            record = task
        path = record.output if stream == "output" else (record.error or record.output)
        owner: int | None = None
        if self.config.runs_as_users:
            # The server reads as root: only a file of the job's own account, so that a
            # symlink (or hard link) put in its place shows nothing the user may not read.
            try:
                owner = lookup(record.user, self.config.account_policy()).uid
            except PermissionDenied:
                return
        offset = 0
        while True:
            if record.state is not JobState.PENDING:  # before it starts the file is not its own yet
                chunk = _read_from(path, offset, owner=owner)
                if chunk:
                    offset += len(chunk)
                    yield chunk
                    continue
            if not follow or record.state.is_terminal:
                return
            await asyncio.sleep(0.2)
            record = self._record(record.id)

    # -- the scheduler: who may start ------------------------------------------

    async def _schedule(self) -> None:
        """Grant pending jobs the right to start, in order, while they fit, and queue them.

        An array waiting to start is one demand for as many starts as its throttle
        allows; each start it is granted turns its lowest waiting index into a task
        row of its own, granted and queued like a job.
        No await between reading the store and writing grants: one pass sees one state.
        """
        async with self._schedule_lock:
            self._reap_spawned()
            store = self.store
            running = store.running_demands()
            pending = store.pending_demands()
            gates = self._gates()
            waiting_ids = {row.demand.job_id for row in pending}
            for job_id in [j for j in self._granted if j not in waiting_ids]:
                del self._granted[job_id]  # started, ended, held or cancelled since
            throttled = self._array_demands(pending, gates)
            decision = schedule(
                self.capacity,
                [*running, *self._granted.values()],
                [
                    row.demand
                    for row in pending
                    if row.demand.job_id not in self._granted and row.demand.job_id not in gates
                ],
                limits=self.limits,
                last_started=self._last_started,
            )
            demands = {row.demand.job_id: row.demand for row in pending}
            heads = {row.demand.job_id for row in pending if row.array_pending}
            reasons = {row.demand.job_id: row.reason for row in pending}
            now = time.time()
            grants = Counter(decision.start)
            waiting = dict(decision.waiting)
            for job_id, count in grants.items():
                demand = demands[job_id]
                self._last_started[demand.user] = now
                if job_id not in heads:
                    self._granted[job_id] = demand
                    self._queue.put(job_id)
                    continue
                head = self._record(job_id)  # an array: its next tasks get rows and start
                for task_id in self._split(head, count=count):
                    self._granted[task_id] = replace(demand, job_id=task_id, count=1)
                    self._queue.put(task_id)
                if job_id not in waiting and job_id in throttled:
                    waiting[job_id] = "JobArrayTaskLimit"  # what is left waits for the throttle
            for job_id, reason in [*waiting.items(), *gates.items()]:
                if reasons.get(job_id) != reason:
                    self._set(job_id, reason=reason)

    def _array_demands(self, pending: builtins.list[PendingRow], gates: dict[int, str]) -> set[int]:
        """Turn each waiting array's demand into one for as many starts as it may have now
        (in place), and gate those its throttle holds entirely (``JobArrayTaskLimit``).
        Returns the arrays whose throttle limits their starts this pass."""
        heads = [row for row in pending if row.array_pending]
        if not heads:
            return set()
        active = self.store.active_tasks() if any(r.array_throttle for r in heads) else {}
        throttled: set[int] = set()
        for n, row in enumerate(pending):
            if not row.array_pending:
                continue
            count = len(IndexSet.parse(row.array_pending))
            if row.array_throttle:
                room = row.array_throttle - active.get(row.demand.job_id, 0)
                if room < count:
                    throttled.add(row.demand.job_id)
                    count = room
            if count <= 0:
                gates.setdefault(row.demand.job_id, "JobArrayTaskLimit")
                continue
            pending[n] = replace(row, demand=replace(row.demand, count=count))
        return throttled

    def _gates(self) -> dict[int, str]:
        """Why each pending job that may run waits for something besides resources:
        its --begin (``BeginTime``) or its dependency (``Dependency``,
        ``DependencyNeverSatisfied``).  A job whose dependency can never be met and
        that asked for it (--kill-on-invalid-dep) is handed to its reconciler to cancel."""
        store = self.store
        gates: dict[int, str] = {}
        now = time.time()
        next_begin: float | None = None
        for job_id, user, name, text, kill, begin, _ in store.gated():
            if begin is not None and begin > now:
                gates[job_id] = "BeginTime"
                next_begin = begin if next_begin is None else min(next_begin, begin)
                continue
            if text is None:
                continue
            dependency = parse_dependency(text)
            ids = [int(i) for i in dependency.job_ids if i.isascii() and i.isdigit()]
            singleton = any(t.kind == "singleton" for t in dependency.terms)
            status, _, _ = evaluate(
                dependency,
                self._states(ids),
                singleton_clear=not (singleton and store.active_earlier(user, name, job_id)),
            )
            if status is DependencyStatus.MET:
                continue
            gates[job_id] = str(status.value)
            if status is DependencyStatus.NEVER and kill:
                store.update(job_id, desired=Desired.CANCEL, reason=str(status.value))
                self._queue.put(job_id)
        if next_begin is not None:
            self._wake_at(next_begin)
        return gates

    def _wake_at(self, moment: float) -> None:
        """Run the scheduler again at ``moment`` (for a --begin), unless it runs sooner."""
        if self._begin_timer is not None and self._begin_at <= moment:
            return
        if self._begin_timer is not None:
            self._begin_timer.cancel()
        self._begin_at = moment
        delay = max(0.0, moment - time.time()) + 0.01
        self._begin_timer = asyncio.get_running_loop().call_later(delay, self._begin_due)

    def _begin_due(self) -> None:
        self._begin_timer = None
        self._wake.set()

    # -- the reconciler: the one place that moves a job between states ----------

    async def _reconcile(self, job_id: int) -> None:
        record = self.store.get(job_id)
        if record is None:
            return
        if record.state.is_terminal:
            if not record.finalized:
                await self._finalize(record)
            return
        if record.state is JobState.PENDING:
            if record.desired is Desired.CANCEL:
                await self._cancel_before_start(record)
            elif record.desired is Desired.HOLD:
                self._granted.pop(job_id, None)
                if record.reason != "JobHeldUser":
                    self._set(job_id, reason="JobHeldUser")
            elif job_id in self._granted:
                await self._launch(record)
            return
        await self._check_running(record)

    async def _await_reconcile(self, job_id: int) -> None:
        """Wait (a while) until the job's reconciler has acted on what was just asked of it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SYNC_TIMEOUT):
                await self._queue.sync(job_id)

    def _set(self, job_id: int, **fields: object) -> None:
        """Record a change that is not a state transition (a reason, a start time) and tell."""
        self.store.update(job_id, **fields)
        self.events.publish(self._record(job_id).to_job())

    def _set_desired(self, job_id: int, desired: Desired, *, from_: tuple[Desired, ...]) -> bool:
        return self.store.transition(job_id, JobState.PENDING, when_desired=from_, desired=desired)

    async def _finish(
        self,
        record: JobRecord,
        expected: JobState,
        *,
        state: JobState,
        reason: str | None,
        finished: float,
        exit_code: int | None = None,
        started: float | None = None,
    ) -> bool:
        """Move the job to its terminal state, tell, and run the end hook: once, whatever the path."""
        check_transition(expected, state)
        new = state
        fields: dict[str, object] = {"state": state, "reason": reason, "finished": finished}
        if exit_code is not None:
            fields["exit_code"] = exit_code
        if started is not None:
            fields["started"] = started
        if not self.store.transition_fields(record.id, expected, fields):
            log.warning("job %s is no longer %s; not moving it to %s", record.id, expected, new)
            return False
        done = self._record(record.id)
        log.info("job %s %s (exit code %s)", done.id, done.state, done.exit_code)
        self.events.publish(done.to_job())
        await self._finalize(done)
        self._wake.set()  # its resources are free: schedule soon
        return True

    async def _setup_failed(self, record: JobRecord, exc: Exception) -> None:
        """A start refused for good (the hub will not make a token, the account is gone)."""
        log.error("job %s: cannot be started: %s", record.id, exc)
        self._granted.pop(record.id, None)
        await self._finish(
            record,
            JobState.PENDING,
            state=JobState.FAILED,
            reason=f"JobSetupFailed: {exc}",
            finished=time.time(),
        )

    async def _cancel_before_start(self, record: JobRecord) -> None:
        self._granted.pop(record.id, None)
        await self._finish(
            record,
            JobState.PENDING,
            state=JobState.CANCELLED,
            # The scheduler cancels a job whose dependency can never be met (and says so).
            reason="DependencyNeverSatisfied"
            if record.cancelled_by is None and record.reason == "DependencyNeverSatisfied"
            else "CancelledByUser",
            finished=time.time(),
        )

    async def _finalize(self, record: JobRecord) -> None:
        if not record.is_head and self._spec_of(record).code is not None:
            await asyncio.to_thread(self._collect_results, record)
        await self.run_finished_hook(record.to_job())
        self.store.update(record.id, finalized=1)

    async def _check_running(self, record: JobRecord) -> None:
        jobdir = self._jobdir(record.id)
        result = jobdir.read_result()
        if result is None and not jobdir.supervisor_alive():
            result = jobdir.read_result()  # it may have written the result just before exiting
            if result is None:
                result = self._supervisor_lost(record, jobdir)
                if result is None:  # put back in the queue
                    return
        if result is None:
            if record.desired is Desired.CANCEL:
                jobdir.request_cancel()
                if record.reason != "Cancelling":
                    self._set(record.id, reason="Cancelling")
            started = jobdir.read_started()
            if started is not None and record.started != started.started:
                self._set(record.id, started=started.started)
            return
        await self._finish(
            record,
            JobState.RUNNING,
            state=result.state,
            exit_code=result.exit_code,
            reason=result.reason,
            started=result.started or record.started,
            finished=result.finished,
        )

    def _supervisor_lost(self, record: JobRecord, jobdir: JobDir) -> Result | None:
        started = jobdir.read_started()
        if started is None:
            # The server stopped between marking the job RUNNING and spawning its
            # supervisor: the job never ran, so it may safely be queued again.
            log.warning("job %s: launch was interrupted; queueing it again", record.id)
            check_transition(JobState.RUNNING, JobState.PENDING, "LaunchInterrupted")
            self.store.transition(
                record.id, JobState.RUNNING, state=JobState.PENDING, reason="None", started=None
            )
            self.events.publish(self._record(record.id).to_job())
            self._wake.set()
            return None
        log.error("job %s: its supervisor died; stopping what is left of the job", record.id)
        for pid in process_group_members(started.pgid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return Result(
            state=JobState.NODE_FAIL,
            exit_code=None,
            reason="SupervisorLost: the process watching the job died",
            started=started.started,
            finished=time.time(),
        )

    async def _launch(self, record: JobRecord) -> None:
        """Start a granted job: its start hook, then its supervisor.

        The hook may wait on I/O (a hub token); a cancel that arrives meanwhile
        is seen afterwards, before anything runs, and the hook's work is undone
        by the end hook that every terminal path runs.
        """
        spec = self._spec_of(record)
        job = record.to_job()
        try:
            extra_env = await self.hooks.environment(job)
        except (ServiceUnavailable, TransportError) as exc:
            log.warning("job %s: cannot prepare its start, will retry: %s", record.id, exc)
            if record.reason != "JobSetupPending":
                self._set(record.id, reason="JobSetupPending")
            raise _Retry from exc
        except KbatchError as exc:  # refused for good (e.g. the hub will not make its token)
            await self._setup_failed(record, exc)
            return
        current = self._record(record.id)
        if current.desired is Desired.CANCEL:  # cancelled while the hook ran: never start it
            await self._cancel_before_start(current)
            return
        account: Account | None = None
        if self.config.runs_as_users:
            try:  # again: the account may have gone, or changed, since the submission
                account = lookup(record.user, self.config.account_policy())
            except PermissionDenied as exc:
                await self._setup_failed(current, exc)
                return
        jobdir = self._jobdir(record.id)
        if jobdir.path.exists():
            shutil.rmtree(jobdir.path)  # left by an interrupted launch
        jobdir.path.mkdir(mode=0o700, parents=True)
        jobdir.script.write_text(spec.script)
        jobdir.script.chmod(0o700)
        if account is not None:
            # The job's own, to read and run through the descriptor its launcher opens; the
            # directory around it stays the server's alone.
            os.chown(jobdir.script, account.uid, account.gid)
        environment = {**self._job_environment(record, spec), **extra_env}
        workdir = spec.workdir or "/"
        if spec.code is not None:
            try:
                code = await asyncio.to_thread(self._materialize, record, account)
            except KbatchError as exc:
                await self._setup_failed(current, exc)
                return
            environment["KBATCH_CODE_DIR"] = workdir = str(code)
        launch = LaunchSpec(
            job_id=str(record.id),
            argv=[str(jobdir.script), *spec.args],
            environment=environment,
            workdir=workdir,
            output=record.output,
            error=record.error,
            open_mode=spec.open_mode,
            memory=spec.memory,
            time_limit=spec.time_limit,
            kill_grace=self.config.kill_grace,
            memory_limiter=self.config.memory_limiter,
            notify_socket=str(self.socket_path) if self._transport else None,
            run_as=account,
        )
        jobdir.write(jobdir.launch, launch, durable=False)  # read at once; relaunched after a crash
        lock_fd = os.open(jobdir.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            check_transition(JobState.PENDING, JobState.RUNNING)
            if not self.store.transition(
                record.id,
                JobState.PENDING,
                when_desired=[Desired.RUN, Desired.HOLD],  # a hold during the hook came too late
                state=JobState.RUNNING,
                reason=None,
                started=time.time(),
            ):
                raise AssertionError(f"job {record.id} changed while its reconciler held it")
            self._granted.pop(record.id, None)
            running = self._record(record.id)
            self.events.publish(running.to_job())
            try:
                await self._spawn(jobdir, lock_fd)
            except OSError as exc:
                log.error("job %s: cannot start its supervisor: %s", record.id, exc)
                await self._finish(
                    running,
                    JobState.RUNNING,
                    state=JobState.FAILED,
                    reason=f"LaunchFailed: {exc}",
                    finished=time.time(),
                )
        finally:
            os.close(lock_fd)

    # -- uploaded files (--code) ----------------------------------------------------

    def _code_dir(self, job_id: int) -> Path:
        return self.config.code_root() / str(job_id)

    def _materialize(self, record: JobRecord, account: Account | None) -> Path:
        """A fresh copy of the job's uploaded files in its own folder, which is the job's.

        Run as another account, the files are hard links to the store's read-only blobs,
        owned by root (the job can replace them, never change them); else copies.
        """
        code_id = self._spec_of(record).code
        assert code_id is not None
        manifest = None if self.uploads is None else self.uploads.manifest(record.user, code_id)
        if self.uploads is None or manifest is None:
            raise SpecError(f"its uploaded files ({code_id}) are gone; submit it again")
        # By the id users see (a task's is <array>_<index>): what fetch asks for.
        self.uploads.attach(record.to_job().id, record.user, code_id)
        root = self.config.code_root()
        root.mkdir(mode=0o711 if account else 0o700, parents=True, exist_ok=True)
        if account is not None:
            info = root.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
                raise ConfigError(f"run_as_user: {root} must be a directory owned by root")
            root.chmod(0o711)
            for above in root.resolve().parents:
                if not above.stat().st_mode & stat.S_IXOTH:
                    raise ConfigError(
                        f"run_as_user: jobs cannot reach their files in {root}: {above} is "
                        "closed to other accounts; set [local] code_dir to a folder they "
                        "can pass through (e.g. /var/lib/kbatch-code)"
                    )
        code = self._code_dir(record.id)
        if code.exists() or code.is_symlink():
            shutil.rmtree(code)  # left by an interrupted launch
        code.mkdir(mode=0o700)
        owner = None if account is None else (account.uid, account.gid)
        self.uploads.materialize(
            manifest, code, link=account is not None, owner=owner, user=record.user
        )
        if owner is not None:
            os.chown(code, *owner)  # last: until now the job's account could not look in
        return code

    def _collect_results(self, record: JobRecord) -> None:
        """Keep what the job left in its folder that is new or changed, then remove the folder."""
        code = self._code_dir(record.id)
        code_id = self._spec_of(record).code
        if self.uploads is None or code_id is None:
            return
        owners = None
        if self.config.runs_as_users:
            try:
                owners = frozenset({lookup(record.user, self.config.account_policy()).uid})
            except PermissionDenied:
                owners = frozenset()
        try:
            results = self.uploads.collect(
                record.to_job().id, record.user, code_id, code, owners=owners
            )
            log.info("job %s: kept %d result files", record.id, len(results.files))
        except (OSError, sqlite3.Error) as exc:
            log.error("job %s: its results could not be kept: %s", record.id, exc)
        shutil.rmtree(code, ignore_errors=True)

    async def _spawn(self, jobdir: JobDir, lock_fd: int) -> None:
        """Start the job's supervisor, holding ``lock_fd``; OSError if none could be started.

        Through the launcher, a fork of a small pre-started process (about a millisecond);
        without one (switched off, or failed), a new interpreter as before.  A launcher that
        fails mid-request may or may not have forked the supervisor: it is killed, and the
        supervisor started another way only if none holds the job's lock.
        """
        launcher = self._usable_launcher()
        if launcher is not None:
            try:
                await launcher.spawn(jobdir.path, lock_fd)
            except LauncherUnavailable as exc:
                log.warning("the supervisor launcher failed (%s); starting it again later", exc)
                self._launcher_failed(launcher)
                if not reclaim_lock(jobdir.lock, lock_fd):
                    return  # it did start the supervisor before it failed
            else:
                self._launcher_backoff = LAUNCHER_BACKOFF
                return
        self._spawned.append(await asyncio.to_thread(self._spawn_supervisor, jobdir, lock_fd))

    def _start_launcher(self) -> None:
        if not self.config.launcher:
            return
        launcher = Launcher(self.config.python, environment=supervisor_environment())
        try:
            launcher.start()
        except OSError as exc:
            log.warning(
                "cannot start the supervisor launcher (%s); starting supervisors one by one", exc
            )
            self._launcher_retry_at = time.monotonic() + self._launcher_backoff
            self._launcher_backoff = min(self._launcher_backoff * 2, LAUNCHER_MAX_BACKOFF)
            return
        self._launcher = launcher

    def _usable_launcher(self) -> Launcher | None:
        """The launcher if it runs; a dead one is replaced (no sooner than its backoff allows)."""
        launcher = self._launcher
        if launcher is not None and launcher.alive():
            return launcher
        if launcher is not None:
            log.warning("the supervisor launcher (pid %s) exited; starting a new one", launcher.pid)
            self._launcher_failed(launcher)
        if not self.config.launcher or time.monotonic() < self._launcher_retry_at:
            return None
        self._start_launcher()
        return self._launcher

    def _launcher_failed(self, launcher: Launcher) -> None:
        """Kill and reap it (then nothing it was asked can still happen); retry after a while."""
        launcher.kill()
        if self._launcher is not launcher:
            return  # another reconciler saw it fail first
        self._launcher = None
        self._launcher_retry_at = time.monotonic() + self._launcher_backoff
        self._launcher_backoff = min(self._launcher_backoff * 2, LAUNCHER_MAX_BACKOFF)

    def _spawn_supervisor(self, jobdir: JobDir, lock_fd: int) -> subprocess.Popen[bytes]:
        """fork and exec (in a worker thread: a fork of a large server takes milliseconds)."""
        return subprocess.Popen(
            [
                self.config.python,
                "-m",
                "kbatch.backends.local.supervisor",
                str(jobdir.path),
                str(lock_fd),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(lock_fd,),
            start_new_session=True,
            cwd="/",
            env=supervisor_environment(),  # never the server's own: it holds the hub's token
        )

    def _job_environment(self, record: JobRecord, spec: JobSpec) -> dict[str, str]:
        env = dict(spec.environment)
        env.setdefault("PATH", DEFAULT_PATH)
        if record.array_job_id is not None and record.array_task_id is not None:
            _, indexes = self._array_spec(self._head(record))
            env.update(params_environment(spec.params, record.array_task_id))
            env.update(task_environment(str(record.array_job_id), record.array_task_id, indexes))
        env.update(job_environment(spec, job_id=str(record.id), name=record.name))
        env.setdefault("KBATCH_SUBMIT_DIR", spec.workdir or "/")
        env.setdefault("SLURM_SUBMIT_DIR", spec.workdir or "/")
        return env

    def _reap_spawned(self) -> None:
        self._spawned = [p for p in self._spawned if p.poll() is None]

    # -- helpers ------------------------------------------------------------

    def _jobdir(self, job_id: int) -> JobDir:
        return JobDir(self.jobs_dir / str(job_id))

    @staticmethod
    def _parse_id(job_id: str) -> int:
        ref = parse_job_ref(job_id)
        if ref.index is not None or not ref.job_id.isdigit() or len(ref.job_id) > 18:
            raise NotFound(f"no job {job_id!r}", status=404, code="not_found")
        return int(ref.job_id)

    def _record(self, job_id: int) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise NotFound(f"no job {job_id}", status=404, code="not_found")
        return record


def _demand(record: JobRecord) -> Demand:
    return Demand(record.id, record.cpus, record.memory or 0, record.gpus, record.user)


def _read_from(path: str, offset: int, size: int = 65536, *, owner: int | None = None) -> bytes:
    """Up to ``size`` bytes of a regular file (of ``owner``, when given) from ``offset``.

    Never blocks: a FIFO in the file's place is opened without waiting and refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return b""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (owner is not None and info.st_uid != owner):
            return b""
        return os.pread(fd, size, offset)
    except OSError:
        return b""
    finally:
        os.close(fd)
