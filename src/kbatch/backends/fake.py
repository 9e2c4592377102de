"""An in-memory backend for fast tests of the server and of the backend contract.

Nothing runs: a job's "script" is read for a few marker lines that say what
its run looks like, and time passes on the event loop::

    #!/bin/sh
    # fake: run=0.2 exit=3
    echo hello          (each ``echo`` line is a line of its output)

``run`` is how long it runs in seconds (``forever`` until cancelled; default
0.05), ``exit`` its exit code (default 0), ``oom`` that it goes over its
memory.  It follows the same lifecycle as the real backends: desired state
apart from observed state, one reconciler per job from a work queue, hooks at
start and on every terminal path, events for every change.  It passes the
conformance suite (``tests/conformance``), which is what keeps it honest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from kbatch.backends.base import Backend, decode_section, not_pending, paginate
from kbatch.backends.derive import output_paths, pending_job
from kbatch.backends.workqueue import WorkQueue, stop_workers
from kbatch.dependencies import DependencyStatus, describe, evaluate, parse_dependency
from kbatch.errors import Conflict, KbatchError, NotFound, ServiceUnavailable, TransportError
from kbatch.lifecycle import Desired, check_transition, parse_job_ref
from kbatch.models import Job, JobList, JobSpec, JobState

__all__ = ["FakeBackend", "FakeConfig"]

log = logging.getLogger("kbatch.fake")
_MARKER = re.compile(r"^#\s*fake:(.*)$", re.MULTILINE)
_ECHO = re.compile(r"^echo (.*)$", re.MULTILINE)


@dataclass
class FakeConfig:
    slots: int = 4  # jobs running at once
    default_run: float = 0.05  # seconds a job runs without a run= marker


@dataclass
class _Run:
    seconds: float | None  # None: until cancelled
    exit_code: int = 0
    oom: bool = False
    output: bytes = b""


def _plan(script: str, default_run: float) -> _Run:
    run = _Run(seconds=default_run)
    for marker in _MARKER.findall(script):
        for word in marker.split():
            key, _, value = word.partition("=")
            if key == "run":
                run.seconds = None if value == "forever" else float(value)
            elif key == "exit":
                run.exit_code = int(value)
            elif key == "oom":
                run.oom = True
    run.output = b"".join(line.encode() + b"\n" for line in _ECHO.findall(script))
    return run


@dataclass
class _Entry:
    job: Job
    spec: JobSpec
    desired: Desired
    plan: _Run
    key: str | None
    ends_at: float | None = None  # when its run ends by itself
    deadline: float | None = None  # when its time limit is reached
    finalized: bool = False
    output: bytearray = field(default_factory=bytearray)


class FakeBackend(Backend):
    name = "fake"
    config_class = FakeConfig

    def __init__(self, config: FakeConfig | None = None) -> None:
        super().__init__()
        self.config = config or FakeConfig()
        self._jobs: dict[str, _Entry] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._ids = itertools.count(1)
        self._queue: WorkQueue[str] = WorkQueue(base_delay=0.02, max_delay=1.0)
        self._workers: list[asyncio.Task[None]] = []

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, state_dir: Path) -> FakeBackend:
        return cls(decode_section(section, FakeConfig, "fake"))

    async def start(self) -> None:
        self._workers = [asyncio.create_task(self._worker()) for _ in range(4)]

    async def stop(self) -> None:
        await stop_workers(self._queue, self._workers)

    # -- the contract ------------------------------------------------------------

    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        await self.validate(user, spec)
        if idempotency_key is not None and (user, idempotency_key) in self._keys:
            entry = self._jobs[self._keys[(user, idempotency_key)]]
            if msgspec.json.encode(entry.spec) != msgspec.json.encode(spec):
                raise Conflict(
                    f"Idempotency-Key {idempotency_key!r} was used for job {entry.job.id} "
                    "with another spec; use a new key for a new job",
                    status=409,
                    code="idempotency_key_reused",
                )
            return entry.job
        job_id = str(next(self._ids))
        job = pending_job(
            spec,
            job_id=job_id,
            user=user,
            backend=self.name,
            reason="JobHeldUser" if spec.hold else "None",
            paths=output_paths(spec, job_id=job_id, user=user),
        )
        desired = Desired.HOLD if spec.hold else Desired.RUN
        self._jobs[job_id] = _Entry(
            job, spec, desired, _plan(spec.script, self.config.default_run), idempotency_key
        )
        if idempotency_key is not None:
            self._keys[(user, idempotency_key)] = job_id
        self.events.publish(job)
        self._kick()
        return job

    async def get(self, job_id: str) -> Job:
        job = self._entry(job_id).job
        if job.dependency is None or job.state is not JobState.PENDING:
            return job
        states = {i: e.job.state for i, e in self._jobs.items()}
        shown = describe(parse_dependency(job.dependency), states, singleton_clear=True)
        return msgspec.structs.replace(job, dependency=shown)

    async def spec(self, job_id: str) -> JobSpec | None:
        return self._entry(job_id).spec

    async def list(
        self,
        *,
        user: str | None,
        states: Collection[JobState] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> JobList:
        jobs = [
            e.job
            for e in self._jobs.values()
            if (user is None or e.job.user == user) and (states is None or e.job.state in states)
        ]
        return paginate(jobs, limit=limit, after=after, key=lambda j: j.id.zfill(12))

    async def cancel(self, job_id: str, *, by: str) -> Job:
        entry = self._entry(job_id)
        if entry.job.state.is_terminal:
            return entry.job
        if entry.desired is not Desired.CANCEL:
            entry.desired = Desired.CANCEL
            entry.job = msgspec.structs.replace(entry.job, cancelled_by=by)
        await self._queue.sync(job_id)
        return entry.job

    async def hold(self, job_id: str) -> Job:
        entry = self._entry(job_id)
        if entry.job.state is not JobState.PENDING:
            raise not_pending(entry.job, "held")
        if entry.desired is Desired.RUN:
            entry.desired = Desired.HOLD
        await self._queue.sync(job_id)
        return entry.job

    async def release(self, job_id: str) -> Job:
        entry = self._entry(job_id)
        if entry.desired is Desired.HOLD and entry.job.state is JobState.PENDING:
            entry.desired = Desired.RUN
            self._change(entry, reason="None")
            self._kick()
            await self._queue.sync(job_id)
        return entry.job

    async def logs(
        self, job_id: str, *, follow: bool, stream: str = "output"
    ) -> AsyncIterator[bytes]:
        entry = self._entry(job_id)
        offset = 0
        while True:
            if offset < len(entry.output):
                chunk = bytes(entry.output[offset:])
                offset += len(chunk)
                yield chunk
                continue
            if not follow or entry.job.state.is_terminal:
                return
            await asyncio.sleep(0.02)

    # -- the reconciler -------------------------------------------------------------

    def _entry(self, job_id: str) -> _Entry:
        ref = parse_job_ref(job_id)
        entry = self._jobs.get(str(ref)) if ref.index is None else None
        if entry is None:
            raise NotFound(f"no job {job_id!r}", status=404, code="not_found")
        return entry

    def _kick(self) -> None:
        """Queue every job that may have something to do (the fake's whole 'scheduler')."""
        for job_id, entry in self._jobs.items():
            if not entry.job.state.is_terminal or not entry.finalized:
                self._queue.put(job_id)

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await self._reconcile(self._jobs[job_id])
                self._queue.forget(job_id)
            except (ServiceUnavailable, TransportError) as exc:
                log.warning("job %s: will retry: %s", job_id, exc)
                self._queue.put_backoff(job_id)
            finally:
                self._queue.done(job_id)

    def _change(self, entry: _Entry, **fields: Any) -> None:
        old = entry.job.state
        new = fields.get("state", old)
        if new is not old:
            check_transition(old, new, fields.get("reason"))
        entry.job = msgspec.structs.replace(entry.job, **fields)
        self.events.publish(entry.job)

    def _running(self) -> int:
        return sum(1 for e in self._jobs.values() if e.job.state is JobState.RUNNING)

    async def _end(
        self, entry: _Entry, state: JobState, reason: str | None, code: int | None
    ) -> None:
        self._change(entry, state=state, reason=reason, exit_code=code, finished=datetime.now(UTC))
        entry.finalized = True
        await self.run_finished_hook(entry.job)
        self._kick()

    async def _reconcile(self, entry: _Entry) -> None:
        job = entry.job
        if job.state.is_terminal:
            if not entry.finalized:
                entry.finalized = True
                await self.run_finished_hook(job)
            return
        if job.state is JobState.PENDING:
            if entry.desired is Desired.CANCEL:
                await self._end(entry, JobState.CANCELLED, "CancelledByUser", None)
            elif entry.desired is Desired.HOLD:
                if job.reason != "JobHeldUser":
                    self._change(entry, reason="JobHeldUser")
            elif (wait := await self._waits(entry)) is not None:
                if not entry.job.state.is_terminal and job.reason != wait:
                    self._change(entry, reason=wait)
            elif self._running() < self.config.slots:
                await self._start(entry)
            elif job.reason != "Resources":
                self._change(entry, reason="Resources")
            return
        now = time.monotonic()
        if entry.desired is Desired.CANCEL:
            await self._end(entry, JobState.CANCELLED, "CancelledByUser", 143)
        elif (
            entry.deadline is not None
            and now >= entry.deadline
            and (entry.ends_at is None or entry.ends_at > entry.deadline)
        ):
            await self._end(entry, JobState.TIMEOUT, "TimeLimit", 143)
        elif entry.ends_at is not None and now >= entry.ends_at:
            plan = entry.plan
            if plan.oom:
                await self._end(
                    entry, JobState.OUT_OF_MEMORY, "OutOfMemory: over its --mem limit", 137
                )
            elif plan.exit_code:
                await self._end(entry, JobState.FAILED, "NonZeroExitCode", plan.exit_code)
            else:
                await self._end(entry, JobState.COMPLETED, None, 0)
        else:
            wake = [t for t in (entry.ends_at, entry.deadline) if t is not None]
            if wake:
                self._queue.put_after(entry.job.id, max(min(wake) - now, 0.0))

    async def _waits(self, entry: _Entry) -> str | None:
        """Why a job that may run must wait yet (its --begin, its dependency), or None."""
        spec = entry.spec
        if spec.begin is not None:
            delay = (spec.begin - datetime.now(UTC)).total_seconds()
            if delay > 0:
                self._queue.put_after(entry.job.id, delay)
                return "BeginTime"
        if spec.dependency is None:
            return None
        states = {i: e.job.state for i, e in self._jobs.items()}
        earlier_active = any(
            e.job.user == entry.job.user
            and e.job.name == entry.job.name
            and int(i) < int(entry.job.id)
            and not e.job.state.is_terminal
            for i, e in self._jobs.items()
        )
        status, _, _ = evaluate(
            parse_dependency(spec.dependency), states, singleton_clear=not earlier_active
        )
        if status is DependencyStatus.MET:
            return None
        if status is DependencyStatus.NEVER and spec.kill_on_invalid_dep:
            entry.desired = Desired.CANCEL
            await self._end(entry, JobState.CANCELLED, "DependencyNeverSatisfied", None)
            return "DependencyNeverSatisfied"
        return str(status.value)

    async def _start(self, entry: _Entry) -> None:
        try:
            await self.hooks.environment(entry.job)
        except (ServiceUnavailable, TransportError):
            if entry.job.reason != "JobSetupPending":
                self._change(entry, reason="JobSetupPending")
            raise
        except KbatchError as exc:
            await self._end(entry, JobState.FAILED, f"JobSetupFailed: {exc}", None)
            return
        if entry.desired is Desired.CANCEL:  # cancelled while the hook ran
            await self._end(entry, JobState.CANCELLED, "CancelledByUser", None)
            return
        self._change(entry, state=JobState.RUNNING, reason=None, started=datetime.now(UTC))
        entry.output += entry.plan.output
        now = time.monotonic()
        if entry.plan.seconds is not None:
            entry.ends_at = now + entry.plan.seconds
        if entry.spec.time_limit is not None:
            entry.deadline = now + entry.spec.time_limit
        self._queue.put(entry.job.id)  # dirty: reconciled again at once, and wakes itself
