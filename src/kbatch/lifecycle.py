"""One job lifecycle for every backend: what a user wants, what is, and the allowed steps.

A job has a *desired* state, set only by what users ask (run it, hold it,
cancel it), and an *observed* state (:class:`~kbatch.models.JobState`), set only
by the backend's reconciler from what really happened.  Keeping them apart is
what makes a cancel that arrives in the middle of a launch safe: the cancel
writes the desired state and wakes the job's reconciler; the reconciler, the
one place that changes the observed state, sees it before or after the launch,
never in the middle.

The transitions a reconciler may take are listed in :data:`TRANSITIONS`; every
terminal state is final, and the one step backwards (RUNNING to PENDING) is
allowed only with a reason saying the job was put back in the queue.  Pure:
no I/O, tested without backends.
"""

from __future__ import annotations

import enum
import re

from kbatch.arrays import IndexSet, parse_array
from kbatch.errors import NotFound, SpecError
from kbatch.models import TERMINAL_STATES, JobState

__all__ = [
    "REQUEUE_REASONS",
    "TRANSITIONS",
    "Desired",
    "IllegalTransition",
    "JobRef",
    "check_transition",
    "parse_job_ref",
]


class Desired(enum.StrEnum):
    """What the user wants of a job."""

    RUN = "run"  # start it when it may
    HOLD = "hold"  # keep it pending (sbatch --hold, kbatch hold)
    CANCEL = "cancel"  # stop it, or never start it


_ACTIVE_TO_END = {(a, t) for a in (JobState.PENDING, JobState.RUNNING) for t in TERMINAL_STATES}
TRANSITIONS: frozenset[tuple[JobState, JobState]] = frozenset(
    {(JobState.PENDING, JobState.RUNNING), (JobState.RUNNING, JobState.PENDING), *_ACTIVE_TO_END}
)
# Why a RUNNING job may go back to PENDING: its launch was interrupted before the
# script started, or (Kubernetes) its pod was lost and is being replaced.
REQUEUE_REASONS = frozenset({"LaunchInterrupted", "PodReplaced"})


class IllegalTransition(Exception):
    """A reconciler tried a step the lifecycle does not allow (a bug, never user input)."""


def check_transition(old: JobState, new: JobState, reason: str | None = None) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is a step a job may take."""
    if (old, new) not in TRANSITIONS:
        raise IllegalTransition(f"a job may not go from {old} to {new}")
    if (old, new) == (JobState.RUNNING, JobState.PENDING) and reason not in REQUEUE_REASONS:
        raise IllegalTransition(f"RUNNING to PENDING needs a requeue reason, not {reason!r}")


_REF = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]{0,62})(?:_(?:([0-9]{1,9})|\[([0-9,:-]{1,4096})\]))?")


class JobRef:
    """A job id as users write it: ``ID`` (a job, or a whole array), ``ID_INDEX`` (a task)
    or ``ID_[1-5,9]`` (some tasks of an array, in ``--array``'s grammar)."""

    __slots__ = ("index", "indexes", "job_id")

    def __init__(
        self, job_id: str, index: int | None = None, indexes: IndexSet | None = None
    ) -> None:
        self.job_id = job_id
        self.index = index
        self.indexes = indexes

    def __str__(self) -> str:
        if self.indexes is not None:
            return f"{self.job_id}_[{self.indexes}]"
        return self.job_id if self.index is None else f"{self.job_id}_{self.index}"

    @property
    def tasks(self) -> IndexSet | None:
        """The task indexes named (one for ``ID_INDEX``), or None for a whole job or array."""
        if self.indexes is not None:
            return self.indexes
        return None if self.index is None else IndexSet.of([self.index])

    def __repr__(self) -> str:
        return f"JobRef({str(self)!r})"


def parse_job_ref(text: str) -> JobRef:
    """``123``, ``a1b2c3d4`` or ``123_7``; anything else is :class:`NotFound` (404).

    Ids are opaque to everything but the backend that made them; this only
    refuses what no backend could have made (ASCII letters, digits and ``-``,
    at most 63, then an optional ``_INDEX``), so odd input never reaches one.
    """
    match = _REF.fullmatch(text)  # fullmatch: "$" would let a trailing newline in
    if match is None:
        raise NotFound(f"no job {text!r}", status=404, code="not_found")
    index, bracket = match.group(2), match.group(3)
    if bracket is not None:
        try:
            indexes = parse_array(bracket).indexes
        except SpecError:
            raise NotFound(f"no job {text!r}", status=404, code="not_found") from None
        return JobRef(match.group(1), indexes=indexes)
    return JobRef(match.group(1), None if index is None else int(index))
