"""The interface every backend implements.

The server authenticates and authorizes; a backend only runs jobs.  Methods
take the owning user explicitly and never check permissions themselves.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import AsyncIterator, Collection

from kbatch.errors import SpecError
from kbatch.models import Job, JobSpec, JobState
from kbatch.patterns import check_pattern

__all__ = ["Backend", "JobHooks", "check_spec"]

log = logging.getLogger("kbatch.backends")


def check_spec(spec: JobSpec) -> None:
    """What every backend needs of a spec: an interpreter line, an absolute
    working directory, known ``%`` tokens in file patterns."""
    if not spec.script.startswith("#!"):
        raise SpecError(
            "the script has no interpreter line; make its first line one such as #!/bin/bash",
            field="script",
        )
    if spec.workdir is not None and not spec.workdir.startswith("/"):
        raise SpecError("the working directory must be an absolute path", field="workdir")
    for pattern in (spec.output, spec.error):
        if pattern is not None:
            check_pattern(pattern)


class JobHooks:
    """What the server adds around every job's life, whatever the backend.

    A backend calls :meth:`environment` right before a job starts (its result is
    added to the job's environment, e.g. a JupyterHub token made for this job)
    and :meth:`finished` once after the job has ended, even when the end was
    noticed only after a server restart.  The defaults do nothing.
    """

    async def environment(self, job: Job) -> dict[str, str]:
        return {}

    async def finished(self, job: Job) -> None:
        return None


class Backend(abc.ABC):
    """Runs jobs.  Chosen by the server's configuration (``backend = "local"``)."""

    name: str = "base"
    hooks: JobHooks = JobHooks()

    async def notify_finished(self, job: Job) -> None:
        """Run the ``finished`` hook; its failure is logged, never raised into the backend."""
        try:
            await self.hooks.finished(job)
        except Exception:
            log.exception("the end-of-job hook failed for job %s", job.id)

    async def start(self) -> None:
        """Open resources and recover state after a restart."""

    async def stop(self) -> None:
        """Release resources.  Running jobs keep running."""

    @abc.abstractmethod
    async def validate(self, user: str, spec: JobSpec) -> None:
        """Raise :class:`kbatch.errors.SpecError` if this backend cannot run ``spec``."""

    @abc.abstractmethod
    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        """Create the job; the same ``(user, idempotency_key)`` returns the same job."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job:
        """The job, or :class:`kbatch.errors.NotFound`."""

    @abc.abstractmethod
    async def list(
        self, *, user: str | None, states: Collection[JobState] | None = None
    ) -> list[Job]:
        """Jobs of ``user`` (everyone's with ``None``), oldest first."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> Job:
        """Stop the job (SIGTERM, then SIGKILL after a grace period); it stays visible."""

    @abc.abstractmethod
    def logs(self, job_id: str, *, follow: bool, stream: str = "output") -> AsyncIterator[bytes]:
        """The job's output; with ``follow``, until the job has ended."""
