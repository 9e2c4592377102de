"""The local backend: runs each job under a detached supervisor, records jobs in SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path

from kbatch.backends.base import Backend, check_spec
from kbatch.backends.local.jobdir import JobDir, LaunchSpec, Result
from kbatch.backends.local.limits import process_group_members
from kbatch.backends.local.scheduler import Capacity, Demand, schedule
from kbatch.backends.local.store import JobRecord, JobStore
from kbatch.errors import KbatchError, NotFound, ServiceUnavailable, SpecError, TransportError
from kbatch.hardening import supervisor_environment
from kbatch.models import Job, JobSpec, JobState
from kbatch.patterns import resolve_output
from kbatch.units import format_memory

__all__ = ["LocalBackend", "LocalConfig", "machine_capacity"]

log = logging.getLogger("kbatch.local")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


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
    python: str = field(default_factory=lambda: sys.executable)
    # Every job runs under the server's own Unix account: with hub users, the admin must
    # accept that they share it (see kbatch.server.config.check_shared_account).
    jobs_share_server_account: bool = False

    def capacity(self) -> Capacity:
        machine = machine_capacity()
        return Capacity(
            cpus=self.cpus or machine.cpus, memory=self.memory or machine.memory, gpus=self.gpus
        )


class _Wakeup(asyncio.DatagramProtocol):
    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.event.set()


class LocalBackend(Backend):
    name = "local"

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.capacity = config.capacity()
        self.jobs_dir = config.state_dir / "jobs"
        self.socket_path = config.state_dir / "notify.sock"
        self._store: JobStore | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._spawned: list[subprocess.Popen[bytes]] = []
        self._reconcile_lock = asyncio.Lock()

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise RuntimeError("the local backend has not been started")
        return self._store

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._store = JobStore(self.config.state_dir / "jobs.sqlite")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if len(str(self.socket_path)) < 100:
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Wakeup(self._wake), local_addr=str(self.socket_path), family=socket.AF_UNIX
            )
        await self.reconcile()
        self._task = asyncio.create_task(self._loop(), name="kbatch-local-reconcile")
        log.info(
            "local backend: %d CPUs, %s memory, %d GPUs, state in %s",
            self.capacity.cpus,
            format_memory(self.capacity.memory),
            self.capacity.gpus,
            self.config.state_dir,
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._transport is not None:
            self._transport.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.tick)
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconciling local jobs failed; retrying")

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
        if not os.path.isdir(workdir):
            raise SpecError(
                f"the working directory {workdir} does not exist; create it or change -D/--chdir",
                field="workdir",
            )
        for pattern, name in ((spec.output, "output"), (spec.error, "error")):
            if pattern is not None:
                parent = os.path.dirname(
                    resolve_output(pattern, workdir=workdir, job_id="1", name="x", user=user)
                )
                if not os.path.isdir(parent):
                    raise SpecError(
                        f"the directory of the {name} file, {parent}, does not exist; "
                        f"create it first or change --{name}",
                        field=name,
                    )

    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        await self.validate(user, spec)
        name = spec.name or "job"
        workdir = spec.workdir or "/"

        def paths(job_id: int) -> tuple[str, str | None]:
            out = resolve_output(
                spec.output, workdir=workdir, job_id=str(job_id), name=name, user=user
            )
            err = None
            if spec.error is not None:
                err = resolve_output(
                    spec.error, workdir=workdir, job_id=str(job_id), name=name, user=user
                )
            return out, err

        record = self.store.insert(
            user=user, spec=spec, paths=paths, idempotency_key=idempotency_key, now=time.time()
        )
        if record.state is JobState.PENDING and self.store.pending_before(record.id):
            # Earlier jobs wait: this one cannot start before them, so a full
            # reconcile per submission would only slow a burst of submissions.
            if record.reason != "Priority":
                self.store.update(record.id, reason="Priority")
        else:
            await self.reconcile()  # start it now if it fits: submit-to-start latency matters
        return self._record(record.id).to_job()

    async def get(self, job_id: str) -> Job:
        return self._record(self._parse_id(job_id)).to_job()

    async def list(
        self, *, user: str | None, states: Collection[JobState] | None = None
    ) -> list[Job]:
        return self.store.list_jobs(user=user, states=states)

    async def cancel(self, job_id: str) -> Job:
        record = self._record(self._parse_id(job_id))
        if record.state is JobState.PENDING:
            self.store.transition(
                record.id,
                JobState.PENDING,
                state=JobState.CANCELLED,
                reason="CancelledByUser",
                finished=time.time(),
            )
            await self.notify_finished(self._record(record.id).to_job())
        elif record.state is JobState.RUNNING:
            self._jobdir(record.id).request_cancel()
            self._wake.set()
        return self._record(record.id).to_job()

    async def logs(
        self, job_id: str, *, follow: bool, stream: str = "output"
    ) -> AsyncIterator[bytes]:
        record = self._record(self._parse_id(job_id))
        path = record.output if stream == "output" else (record.error or record.output)
        offset = 0
        while True:
            if record.state is not JobState.PENDING:  # before it starts the file is not its own yet
                chunk = _read_from(path, offset)
                if chunk:
                    offset += len(chunk)
                    yield chunk
                    continue
            if not follow or record.state.is_terminal:
                return
            await asyncio.sleep(0.2)
            record = self._record(record.id)

    # -- reconciling: the one place that moves jobs between states ---------------

    async def reconcile(self) -> None:
        async with self._reconcile_lock:
            self._reap_spawned()
            store = self.store
            running = store.list(states=[JobState.RUNNING])
            still_running: list[JobRecord] = []
            for record in running:
                if not await self._check_running(record):
                    still_running.append(record)
            pending = store.pending_demands()
            decision = schedule(
                self.capacity, [_demand(r) for r in still_running], [d for d, _ in pending]
            )
            reasons = {demand.job_id: reason for demand, reason in pending}
            for job_id in decision.start:
                if not await self._launch(self._record(job_id)):
                    break  # keep the order: nothing overtakes a job that could not start
            for job_id, reason in decision.waiting.items():
                if reasons[job_id] != reason:
                    store.update(job_id, reason=reason)

    async def _check_running(self, record: JobRecord) -> bool:
        """Finish the record if its job has ended; True if it did."""
        jobdir = self._jobdir(record.id)
        result = jobdir.read_result()
        if result is None and not jobdir.supervisor_alive():
            result = jobdir.read_result()  # it may have written the result just before exiting
            if result is None:
                result = self._supervisor_lost(record, jobdir)
                if result is None:
                    return True
        if result is None:
            started = jobdir.read_started()
            if started is not None and record.started != started.started:
                self.store.update(record.id, started=started.started)
            return False
        self.store.transition(
            record.id,
            JobState.RUNNING,
            state=result.state,
            exit_code=result.exit_code,
            reason=result.reason,
            started=result.started or record.started,
            finished=result.finished,
        )
        log.info("job %s %s (exit code %s)", record.id, result.state, result.exit_code)
        await self.notify_finished(self._record(record.id).to_job())
        return True

    def _supervisor_lost(self, record: JobRecord, jobdir: JobDir) -> Result | None:
        started = jobdir.read_started()
        if started is None:
            # The server stopped between marking the job RUNNING and spawning its
            # supervisor: the job never ran, so it may safely be queued again.
            log.warning("job %s: launch was interrupted; queueing it again", record.id)
            self.store.transition(
                record.id, JobState.RUNNING, state=JobState.PENDING, reason="None", started=None
            )
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

    async def _launch(self, record: JobRecord) -> bool:
        """Start the job's supervisor; False if it must wait (a hook could not run)."""
        spec = record.spec
        try:
            extra_env = await self.hooks.environment(record.to_job())
        except (ServiceUnavailable, TransportError) as exc:
            log.warning("job %s: cannot prepare its start, will retry: %s", record.id, exc)
            self.store.update(record.id, reason="JobSetupPending")
            return False
        except KbatchError as exc:  # refused for good (e.g. the hub will not make its token)
            log.error("job %s: cannot be started: %s", record.id, exc)
            self.store.transition(
                record.id,
                JobState.PENDING,
                state=JobState.FAILED,
                reason=f"JobSetupFailed: {exc}",
                finished=time.time(),
            )
            await self.notify_finished(self._record(record.id).to_job())
            return True
        jobdir = self._jobdir(record.id)
        if jobdir.path.exists():
            shutil.rmtree(jobdir.path)  # left by an interrupted launch
        jobdir.path.mkdir(mode=0o700, parents=True)
        jobdir.script.write_text(spec.script)
        jobdir.script.chmod(0o700)
        launch = LaunchSpec(
            job_id=str(record.id),
            argv=[str(jobdir.script), *spec.args],
            environment={**self._job_environment(record, spec), **extra_env},
            workdir=spec.workdir or "/",
            output=record.output,
            error=record.error,
            open_mode=spec.open_mode,
            memory=spec.memory,
            time_limit=spec.time_limit,
            kill_grace=self.config.kill_grace,
            memory_limiter=self.config.memory_limiter,
            notify_socket=str(self.socket_path) if self._transport else None,
        )
        jobdir.write(jobdir.launch, launch, durable=False)  # read at once; relaunched after a crash
        lock_fd = os.open(jobdir.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self.store.transition(
                record.id,
                JobState.PENDING,
                state=JobState.RUNNING,
                reason=None,
                started=time.time(),
            )
            self._spawned.append(await asyncio.to_thread(self._spawn_supervisor, jobdir, lock_fd))
        except OSError as exc:
            log.error("job %s: cannot start its supervisor: %s", record.id, exc)
            self.store.update(
                record.id,
                state=JobState.FAILED,
                reason=f"LaunchFailed: {exc}",
                finished=time.time(),
            )
        finally:
            os.close(lock_fd)
        return True

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
        job_id = str(record.id)
        extra = {
            "KBATCH_JOB_ID": job_id,
            "KBATCH_JOB_NAME": record.name,
            "KBATCH_SUBMIT_DIR": spec.workdir or "/",
            # So that scripts written for Slurm find what they look for.
            "SLURM_JOB_ID": job_id,
            "SLURM_JOBID": job_id,
            "SLURM_JOB_NAME": record.name,
            "SLURM_SUBMIT_DIR": spec.workdir or "/",
            "SLURM_CPUS_PER_TASK": str(spec.cpus),
            "SLURM_NTASKS": "1",
            "SLURM_JOB_NUM_NODES": "1",
        }
        if spec.memory:
            extra["SLURM_MEM_PER_NODE"] = str(spec.memory // (1024 * 1024))
        env.update(extra)
        return env

    def _reap_spawned(self) -> None:
        self._spawned = [p for p in self._spawned if p.poll() is None]

    # -- helpers ------------------------------------------------------------

    def _jobdir(self, job_id: int) -> JobDir:
        return JobDir(self.jobs_dir / str(job_id))

    @staticmethod
    def _parse_id(job_id: str) -> int:
        if not job_id.isdigit():
            raise NotFound(
                f"no job {job_id!r}: local job ids are numbers", status=404, code="not_found"
            )
        return int(job_id)

    def _record(self, job_id: int) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise NotFound(f"no job {job_id}", status=404, code="not_found")
        return record


def _demand(record: JobRecord) -> Demand:
    return Demand(record.id, record.cpus, record.memory or 0, record.gpus)


def _read_from(path: str, offset: int, size: int = 65536) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return b""
