"""A small in-memory backend for tests of the server's routes, loaded by import path.

``kbatch server --backend tests.support.memory_backend:MemoryBackend`` runs the
real server, auth and routes over it; it follows the backend contract closely
enough for the API (hold/release/cancel/list pages/events/health) but runs
nothing.  Its ``[memory]`` section:

- ``autostart``: jobs that are not held go RUNNING at once (default false:
  they stay PENDING, reason ``Priority``);
- ``healthy``, ``detail``, ``stale_seconds``: what :meth:`health` reports
  (``detail = "subscribers"`` reports how many event streams are open, so a
  test can see a stream end when its client leaves).

The shared fake backend (``kbatch.backends.fake``, written with the conformance
suite) may replace it; this one exists so the routes can be tested before that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from kbatch.backends.base import Backend, BackendHealth, decode_section, not_pending, paginate
from kbatch.errors import Conflict, NotFound
from kbatch.models import Job, JobList, JobSpec, JobState

__all__ = ["MemoryBackend", "MemoryConfig"]


class MemoryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    autostart: bool = False
    healthy: bool = True
    detail: str = ""
    stale_seconds: float | None = None


def _key(job: Job) -> str:
    return f"{int(job.id):012d}"


class MemoryBackend(Backend):
    name = "memory"
    config_class = MemoryConfig

    def __init__(self, config: MemoryConfig | None = None) -> None:
        super().__init__()
        self.config = config or MemoryConfig()
        self.jobs: dict[str, Job] = {}
        self.held: set[str] = set()
        self.keys: dict[tuple[str, str], tuple[JobSpec, str]] = {}

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, state_dir: Path) -> MemoryBackend:
        return cls(decode_section(section, MemoryConfig, cls.name))

    def health(self) -> BackendHealth:
        c = self.config
        detail = f"{self.events.subscribers} subscribers" if c.detail == "subscribers" else c.detail
        return BackendHealth(ok=c.healthy, detail=detail, stale_seconds=c.stale_seconds)

    def _set(self, job: Job) -> Job:
        self.jobs[job.id] = job
        self.events.publish(job)
        return job

    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        if idempotency_key is not None and (user, idempotency_key) in self.keys:
            old_spec, job_id = self.keys[(user, idempotency_key)]
            if old_spec != spec:
                raise Conflict("another job has this key", status=409, code="key_reused")
            return self.jobs[job_id]
        job_id = str(len(self.jobs) + 1)
        job = Job(
            id=job_id,
            user=user,
            name=spec.name or "job",
            state=JobState.PENDING,
            reason="JobHeldUser" if spec.hold else "Priority",
            submitted=datetime.now(UTC),
            backend=self.name,
        )
        if idempotency_key is not None:
            self.keys[(user, idempotency_key)] = (spec, job_id)
        if spec.hold:
            self.held.add(job_id)
        self._set(job)
        return self._maybe_start(job)

    def _maybe_start(self, job: Job) -> Job:
        if self.config.autostart and job.state is JobState.PENDING and job.id not in self.held:
            job = self._set(
                msgspec.structs.replace(
                    job, state=JobState.RUNNING, reason=None, started=datetime.now(UTC)
                )
            )
        return job

    async def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"no job {job_id}", status=404, code="not_found") from None

    async def list(
        self,
        *,
        user: str | None,
        states: Collection[JobState] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> JobList:
        jobs = [
            j
            for j in self.jobs.values()
            if (user is None or j.user == user) and (states is None or j.state in states)
        ]
        jobs.sort(key=_key)
        return paginate(jobs, limit=limit, after=after, key=_key)

    async def cancel(self, job_id: str, *, by: str) -> Job:
        job = await self.get(job_id)
        if job.state.is_terminal:
            return job
        self.held.discard(job_id)
        return self._set(
            msgspec.structs.replace(
                job,
                state=JobState.CANCELLED,
                reason=None,
                cancelled_by=by,
                finished=datetime.now(UTC),
            )
        )

    async def hold(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.state is not JobState.PENDING:
            raise not_pending(job, "held")
        self.held.add(job_id)
        return self._set(msgspec.structs.replace(job, reason="JobHeldUser"))

    async def release(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job_id not in self.held:
            return job
        self.held.discard(job_id)
        job = self._set(msgspec.structs.replace(job, reason="Priority"))
        return self._maybe_start(job)

    async def logs(
        self, job_id: str, *, follow: bool, stream: str = "output"
    ) -> AsyncIterator[bytes]:
        job = await self.get(job_id)
        yield f"{stream} of job {job.id}\n".encode()
