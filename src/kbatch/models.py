"""The wire schema shared by the server, the client library and the CLI.

These msgspec structs are the only description of a job on the wire: the
server validates requests against them, the client decodes responses with
them, and the OpenAPI document is generated from them.  Adding a field with a
default is a compatible change; that is how arrays, dependencies, uploads and
schedules will arrive (see DESIGN.md, roadmap items 5 and 6).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated

import msgspec

__all__ = [
    "ACTIVE_STATES",
    "API_PREFIX",
    "TERMINAL_STATES",
    "ErrorBody",
    "ErrorDetail",
    "Identity",
    "Job",
    "JobEvent",
    "JobList",
    "JobSpec",
    "JobState",
    "SubmitRequest",
    "SweepParams",
    "UpdateRequest",
]

API_PREFIX = "/api/v1"


class JobState(enum.StrEnum):
    """Slurm's vocabulary for where a job stands."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


ACTIVE_STATES = frozenset({JobState.PENDING, JobState.RUNNING})
TERMINAL_STATES = frozenset(set(JobState) - ACTIVE_STATES)

# Limits that are part of the schema itself; admins tighten them with policy.
MAX_SCRIPT_BYTES = 1024 * 1024
MAX_TIME_LIMIT = 2**31 - 1  # seconds (68 years): fits every store and Kubernetes' int64 fields
MAX_MEMORY = 2**60  # bytes (an exbibyte)
# Text that terminals show (names, comments, paths) may hold no control characters:
# no newline to forge a row of kqueue, no escape sequence to rewrite a user's screen,
# no bidi override to disguise it.  Arguments and values may, but never NUL.
_SHOWN = r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$"
_NO_NUL = r"^[^\x00]*$"
# What to change, in words, when a value does not match one of these patterns
# (the server's 422 says this instead of the regular expression).
PATTERN_HINTS = {
    _SHOWN: "must not contain control characters such as newlines or escape sequences",
    _NO_NUL: "must not contain NUL bytes",
}
NameStr = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=_SHOWN)]
PatternStr = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=_SHOWN)]
PathStr = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=_SHOWN)]
ValueStr = Annotated[str, msgspec.Meta(pattern=_NO_NUL)]


class SweepParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A sweep's table (``--params FILE.csv``): task ``i`` gets ``rows[i]``, each column
    an environment variable of the task (see :mod:`kbatch.arrays`)."""

    columns: list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]]
    rows: list[list[ValueStr]]


class JobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a user asks for: everything needed to run one batch job.

    Sizes are bytes, durations seconds.  ``script`` is the whole batch script
    (directives included); ``args`` are passed to it as ``$1 $2 ...``.
    """

    script: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SCRIPT_BYTES)]
    args: list[ValueStr] = []
    name: NameStr | None = None
    workdir: PathStr | None = None
    output: PatternStr | None = None
    error: PatternStr | None = None
    open_mode: Annotated[str, msgspec.Meta(pattern="^(truncate|append)$")] = "truncate"
    cpus: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    # 0 means no limit, as --mem=0 does: it is stored as None.
    memory: Annotated[int, msgspec.Meta(ge=0, le=MAX_MEMORY)] | None = None
    gpus: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    time_limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_TIME_LIMIT)] | None = None
    environment: dict[str, ValueStr] = {}
    comment: Annotated[str, msgspec.Meta(max_length=4096, pattern=_SHOWN)] | None = None
    image: Annotated[str, msgspec.Meta(min_length=1, max_length=1024, pattern=_SHOWN)] | None = None
    # Submitted held (sbatch --hold): the job exists but waits for ``kbatch release``.
    hold: bool = False
    # Start only once other jobs have got so far (Slurm's --dependency grammar).
    dependency: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=_SHOWN)] | None
    ) = None
    # What to do when the dependency can never be met: None is the server's default.
    kill_on_invalid_dep: bool | None = None
    # Start no earlier than this (sbatch --begin), a time with its zone.
    begin: datetime | None = None
    # Uploaded files (kbatch submit --code): the id of a complete upload of this user
    # (POST /api/v1/uploads).  The job starts in a fresh copy of them ($KBATCH_CODE_DIR);
    # any number of jobs may name the same upload.
    code: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")] | None = None
    # An array (sbatch --array): Slurm's index grammar with an optional %N throttle,
    # e.g. "0-9999%50"; one task per index.  The server stores it normalised.
    array: Annotated[str, msgspec.Meta(min_length=1, max_length=65536, pattern=_SHOWN)] | None = (
        None
    )
    # A sweep: one row per task index (kbatch submit --params FILE.csv).
    params: SweepParams | None = None


class SubmitRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    spec: JobSpec


class UpdateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What ``POST /jobs/{id}/update`` changes: an array's throttle (0: no throttle)."""

    throttle: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)]


class Job(msgspec.Struct, kw_only=True, omit_defaults=False):
    """A job as the server reports it."""

    id: str
    user: str
    name: str
    state: JobState
    reason: str | None = None
    exit_code: int | None = None
    submitted: datetime
    started: datetime | None = None
    finished: datetime | None = None
    workdir: str | None = None
    output: str | None = None
    error: str | None = None
    cpus: int = 1
    memory: int | None = None
    gpus: int = 0
    time_limit: int | None = None
    comment: str | None = None
    backend: str = ""
    # Who cancelled the job, when someone did (the owner or an admin).
    cancelled_by: str | None = None
    # Members of a task group (an array) share ``array_job_id`` and differ in
    # ``array_task_id``; their ``id`` is ``<array_job_id>_<array_task_id>``.
    array_job_id: str | None = None
    array_task_id: int | None = None
    # A row that stands for several tasks of an array (those not started yet, as
    # squeue shows ``123_[8-9999%50]``; or, from ``GET /jobs/123``, the whole array):
    # their indexes in Slurm's form, the array's throttle, and (whole array) the
    # number of tasks in each state.  ``id`` is then the array's id.
    array_tasks: str | None = None
    array_throttle: int | None = None
    array_counts: dict[str, int] | None = None
    dependency: str | None = None
    begin: datetime | None = None


class JobList(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A page of jobs, oldest first; ``next`` is the cursor of the following page."""

    jobs: list[Job]
    next: str | None = None
    # Set when the backend answers from data it could not refresh for this long (its
    # API server is unreachable): the jobs are as they were then, and may have moved on.
    stale_seconds: float | None = None


class JobEvent(msgspec.Struct, kw_only=True):
    """A change of a job as the event stream (``GET /api/v1/events``) reports it."""

    type: str = "job"  # "job": ``job`` changed; "resync": events were lost, list again
    job: Job | None = None


class Identity(msgspec.Struct, kw_only=True, frozen=True):
    """Who is calling: returned by ``GET /api/v1/whoami``."""

    name: str
    admin: bool = False
    groups: tuple[str, ...] = ()


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: str
    message: str
    field: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    """The one shape of every error response."""

    error: ErrorDetail
