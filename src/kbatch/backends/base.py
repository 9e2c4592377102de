"""The contract every backend implements, and what they share.

The server authenticates and authorizes; a backend only runs jobs.  Methods
take the owning user explicitly and never check permissions themselves.

A backend keeps each job's *desired* state (what users asked: run, hold,
cancel) apart from its *observed* state, and changes the observed state in one
place only: its reconciler, which handles one job at a time from a
:class:`~kbatch.backends.workqueue.WorkQueue` (see :mod:`kbatch.lifecycle`).
API calls such as :meth:`Backend.cancel` write the desired state and wait for
the reconciler; they never move a job themselves.  Every change a reconciler
makes is published on :attr:`Backend.events`.

A backend is chosen by the server's ``backend`` key: a name from
:data:`BACKENDS` or an import path ``package.module:Class``.  It declares its
own configuration (:attr:`Backend.config_class`, decoded from its own
``[section]`` of ``kbatch.toml`` by :meth:`Backend.from_config`); the server
never knows its keys.  The conformance suite (``tests/conformance``) is the
contract's executable form: a backend is done when it passes.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec

from kbatch.backends.derive import check_spec
from kbatch.backends.events import EventBroker, Subscription
from kbatch.backends.userlimits import UserLimits
from kbatch.errors import ConfigError, Conflict
from kbatch.models import Job, JobList, JobSpec, JobState

if TYPE_CHECKING:
    from kbatch.server.blobs import BlobStore

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendHealth",
    "JobHooks",
    "backend_class",
    "check_spec",
    "decode_section",
    "not_pending",
    "paginate",
]

log = logging.getLogger("kbatch.backends")
C = TypeVar("C")

BACKENDS: dict[str, str] = {
    "local": "kbatch.backends.local.backend:LocalBackend",
    "kubernetes": "kbatch.backends.kubernetes.backend:KubernetesBackend",
    "fake": "kbatch.backends.fake:FakeBackend",
}


class JobHooks:
    """What the server adds around every job's life, whatever the backend.

    A backend calls :meth:`environment` right before a job starts (its result is
    added to the job's environment, e.g. a JupyterHub token made for this job)
    and :meth:`finished` exactly once after the job has ended, whichever way it
    ended (also when it never started, and when the end was noticed only after
    a server restart).  The defaults do nothing.
    """

    async def environment(self, job: Job) -> dict[str, str]:
        return {}

    async def finished(self, job: Job) -> None:
        return None


@dataclass(frozen=True)
class BackendHealth:
    """What ``/api/v1/health`` reports of the backend: ``ok`` False answers 503."""

    ok: bool = True
    detail: str = ""
    stale_seconds: float | None = None  # how old the data jobs are listed from may be


def decode_section(section: Mapping[str, Any], cls: type[C], name: str, **extra: Any) -> C:
    """A backend's ``[name]`` config section decoded into its typed config ``cls``.

    Unknown keys and wrong types are a :class:`ConfigError` naming the key.
    """
    known = (
        {f.name for f in dataclasses.fields(cls)}
        if dataclasses.is_dataclass(cls)
        else set(getattr(cls, "__struct_fields__", ()))
    )
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            f"config [{name}]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        return msgspec.convert({**section, **extra}, type=cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config [{name}]: {exc}") from exc


def backend_class(name: str) -> type[Backend]:
    """The backend class for ``backend = NAME`` (or ``package.module:Class``), imported now."""
    path = BACKENDS.get(name, name)
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ConfigError(
            f"config: backend {name!r} is not known; use {', '.join(BACKENDS)} "
            "or an import path such as mypackage.backend:MyBackend"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = ""
        if name == "kubernetes":
            extra = " (install the kubernetes extra: pip install '/path/to/kbatch-checkout[kubernetes]')"
        raise ConfigError(f"config: cannot load backend {name!r}: {exc}{extra}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"config: {path} is not a kbatch backend class")
    return cls


def paginate(
    jobs: Sequence[Job], *, limit: int | None, after: str | None, key: Callable[[Job], str]
) -> JobList:
    """A page of ``jobs`` (sorted by ``key``) after the cursor ``after``; the cursor is a key."""
    start = 0
    if after is not None:
        lo, hi = 0, len(jobs)
        while lo < hi:  # the first job whose key is past the cursor
            mid = (lo + hi) // 2
            if key(jobs[mid]) <= after:
                lo = mid + 1
            else:
                hi = mid
        start = lo
    if limit is None:
        return JobList(jobs=list(jobs[start:]))
    page = list(jobs[start : start + limit])
    more = start + limit < len(jobs)
    return JobList(jobs=page, next=key(page[-1]) if more and page else None)


class Backend(abc.ABC):
    """Runs jobs.  Subclasses set :attr:`name` and :attr:`config_class`."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[Any]]

    def __init__(self) -> None:
        self.hooks: JobHooks = JobHooks()
        # The admin's per-user limits, set by the server from its policy like the hooks
        # (kbatch.server.app.create_app).  Enforced by the local backend; others ignore them.
        self.limits: UserLimits = UserLimits()
        self.events = EventBroker()
        # The server's store of uploaded files (kbatch.server.blobs), set like the limits.
        self.uploads: BlobStore | None = None

    @classmethod
    @abc.abstractmethod
    def from_config(cls, section: Mapping[str, Any], *, state_dir: Path) -> Backend:
        """The backend configured by its ``[name]`` section of ``kbatch.toml``."""

    async def start(self) -> None:
        """Open resources and recover state after a restart."""

    async def stop(self) -> None:
        """Release resources.  Running jobs keep running."""

    @property
    def supports_code(self) -> bool:
        """Whether jobs may name uploaded files (``JobSpec.code``): the backend then starts
        them in a copy of :attr:`uploads`' files and keeps their results when they end."""
        return False

    def health(self) -> BackendHealth:
        """Whether the backend can answer with current data."""
        return BackendHealth()

    async def run_finished_hook(self, job: Job) -> None:
        """Run the ``finished`` hook; its failure is logged, never raised into the backend."""
        try:
            await self.hooks.finished(job)
        except Exception:
            log.exception("the end-of-job hook failed for job %s", job.id)

    async def validate(self, user: str, spec: JobSpec) -> None:
        """Raise :class:`kbatch.errors.SpecError` if this backend cannot run ``spec``."""
        check_spec(spec)

    @abc.abstractmethod
    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        """Create the job, PENDING (held if ``spec.hold``).

        The same ``(user, idempotency_key)`` returns the same job; with a
        different spec it is a :class:`kbatch.errors.Conflict`.
        """

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job:
        """The job, or :class:`kbatch.errors.NotFound`."""

    @abc.abstractmethod
    async def list(
        self,
        *,
        user: str | None,
        states: Collection[JobState] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> JobList:
        """Jobs of ``user`` (everyone's with ``None``), oldest first, a page at a time.

        ``after`` is the ``next`` cursor of the previous page; cursors are opaque.
        """

    @abc.abstractmethod
    async def cancel(self, job_id: str, *, by: str) -> Job:
        """Stop the job (SIGTERM, then SIGKILL after a grace period), or never start it.

        It stays visible as CANCELLED, with ``cancelled_by``.  Cancelling a job
        that has ended changes nothing.
        """

    @abc.abstractmethod
    async def hold(self, job_id: str) -> Job:
        """Keep a PENDING job from starting (reason ``JobHeldUser``); Conflict if it started."""

    @abc.abstractmethod
    async def release(self, job_id: str) -> Job:
        """Let a held job start when it may; releasing a job not held changes nothing."""

    @abc.abstractmethod
    def logs(self, job_id: str, *, follow: bool, stream: str = "output") -> AsyncIterator[bytes]:
        """The job's output; with ``follow``, until the job has ended."""

    async def set_throttle(self, job_id: str, throttle: int | None) -> Job:
        """Change how many tasks of array ``job_id`` may run at once (None: no limit).

        Tasks already running beyond a lowered throttle run to their end.  A job
        that is not an array is a :class:`Conflict` (409)."""
        raise Conflict(
            f"the {self.name} backend cannot change the throttle of {job_id}",
            status=409,
            code="not_supported",
        )

    async def spec(self, job_id: str) -> JobSpec | None:
        """The spec the job was submitted with (the dashboard's script and resubmit),
        or None when this backend does not keep it.  The caller checks ownership."""
        return None

    def watch(self, user: str | None) -> Subscription:
        """Changes of ``user``'s jobs (everyone's with None) from the moment of the call;
        the caller ``aclose()``s it when done."""
        return self.events.subscribe(user)


def not_pending(job: Job, action: str) -> Conflict:
    """The error for holding a job that is no longer pending (Slurm says the same)."""
    return Conflict(
        f"job {job.id} is {job.state.value}: only pending jobs can be {action}",
        status=409,
        code="not_pending",
    )
