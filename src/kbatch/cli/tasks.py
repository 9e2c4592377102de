"""Arrays in the CLI: how their rows are shown and expanded, ``kbatch update`` and
``kbatch resubmit``.

The server lists an array's tasks that have started one row each (``123_7``) and
the tasks that have not as one row per group (``id`` the array's, ``array_tasks``
their indexes), as squeue does; expanding a group into one row per task
(``kqueue -r``, ``--json``) is done here, client-side.  Everything but the two
commands is pure and tested without a server.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING

import msgspec

from kbatch.cli.output import is_group, label
from kbatch.errors import SpecError
from kbatch.models import Job, JobState

if TYPE_CHECKING:
    import argparse

    from kbatch.client import Client
    from kbatch.models import JobSpec

__all__ = [
    "FAILED_STATES",
    "array_rows",
    "choose_tasks",
    "expand",
    "is_group",
    "label",
    "parse_throttle",
    "print_tasks",
    "resubmit",
    "resubmit_spec",
    "state_counts",
    "update",
]

# What ``kbatch resubmit --failed`` picks: every end but COMPLETED and CANCELLED.
FAILED_STATES = (
    JobState.FAILED,
    JobState.OUT_OF_MEMORY,
    JobState.TIMEOUT,
    JobState.NODE_FAIL,
)


def expand(jobs: Iterable[Job]) -> list[Job]:
    """Every group row as one row per task (``id`` ``ID_INDEX``), the others as they are."""
    rows: list[Job] = []
    for job in jobs:
        if not is_group(job):
            rows.append(job)
            continue
        from kbatch.arrays import IndexSet

        array_id = job.array_job_id or job.id
        rows.extend(
            msgspec.structs.replace(
                job,
                id=f"{array_id}_{index}",
                array_job_id=array_id,
                array_task_id=index,
                array_tasks=None,
                array_throttle=None,
                array_counts=None,
            )
            for index in IndexSet.parse(job.array_tasks or "")
        )
    return rows


def array_rows(jobs: Iterable[Job], array_id: str) -> list[Job]:
    """The rows (tasks and groups) of array ``array_id`` among ``jobs``, one per task."""
    mine = [
        j
        for j in jobs
        if (j.array_job_id or j.id) == array_id
        and (j.array_task_id is not None or j.array_tasks is not None)
    ]
    return sorted(expand(mine), key=lambda j: j.array_task_id or 0)


def state_counts(counts: dict[str, int]) -> str:
    """``COMPLETED=7,FAILED=2`` in Slurm's order of states."""
    order = {state.value: n for n, state in enumerate(JobState)}
    return ",".join(
        f"{state}={counts[state]}" for state in sorted(counts, key=lambda s: order.get(s, 99))
    )


def choose_tasks(tasks: Iterable[Job], states: Collection[JobState]) -> list[int]:
    """The indexes of the tasks that ended in one of ``states``."""
    return sorted(
        t.array_task_id for t in tasks if t.array_task_id is not None and t.state in states
    )


def print_tasks(tasks: Sequence[Job]) -> None:
    """One line per task: its id, state, exit code and reason."""
    from kbatch.cli.output import shown

    rows = [
        [t.id, t.state.value, "" if t.exit_code is None else str(t.exit_code), t.reason or ""]
        for t in tasks
    ]
    headers = ["TASK", "STATE", "EXITCODE", "REASON"]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths).format
    sys.stdout.write("".join(shown(line(*row).rstrip()) + "\n" for row in [headers, *rows]))


def parse_throttle(text: str) -> int | None:
    """``--throttle N``: at most N tasks at once; ``0`` or ``none``: no limit."""
    if text.lower() == "none":
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 8):
        raise SpecError(
            f"--throttle {text!r}: give a whole number of tasks to run at once, such as 8, "
            "or 0 (or none) for no limit"
        )
    return int(text) or None


def _states(text: str) -> list[JobState]:
    known = {s.value: s for s in JobState}
    chosen = [s.strip().upper() for s in text.split(",") if s.strip()]
    if not chosen:
        raise SpecError("--state is empty; give states such as TIMEOUT,OUT_OF_MEMORY")
    for state in chosen:
        if state not in known:
            raise SpecError(
                f"--state {text}: {state} is not a state; use {', '.join(known)} (comma-separated)"
            )
        if known[state] in (JobState.PENDING, JobState.RUNNING):
            raise SpecError(
                f"--state {text}: {state} tasks have not ended; resubmit picks tasks that "
                "ended, such as FAILED,TIMEOUT"
            )
    return [known[s] for s in chosen]


def resubmit_spec(spec: JobSpec, indexes: Sequence[int], throttle: int | None) -> JobSpec:
    """The array's spec for just ``indexes`` (same indexes, so the same CSV rows), with
    its throttle; what was met for the first run (held, dependency, begin) is dropped."""
    from kbatch.arrays import IndexSet

    chosen = str(IndexSet.of(indexes)) + (f"%{throttle}" if throttle else "")
    return msgspec.structs.replace(
        spec, array=chosen, hold=False, dependency=None, kill_on_invalid_dep=None, begin=None
    )


def _array(client: Client, array_id: str) -> Job:
    from kbatch.cli.jobs import check_job_ids
    from kbatch.lifecycle import parse_job_ref

    (array_id,) = check_job_ids([array_id])
    ref = parse_job_ref(array_id)
    if ref.index is not None or ref.indexes is not None:
        raise SpecError(
            f"{array_id} is a task; give the array's id ({ref.job_id}), and --failed or "
            "--state to choose its tasks"
        )
    job = client.get(array_id)
    if job.array_counts is None:
        raise SpecError(f"job {array_id} is not an array; this works on arrays only")
    return job


def update(args: argparse.Namespace) -> int:
    """``kbatch update ID --throttle N``."""
    from kbatch.client import Client

    if args.throttle is None:
        raise SpecError(
            "nothing to update; give --throttle N (e.g. kbatch update 123 --throttle 8)"
        )
    throttle = parse_throttle(args.throttle)
    with Client.from_config() as client:
        array = _array(client, args.job_id)
        job = client.update(array.id, throttle=throttle)
    limit = f"at most {job.array_throttle} tasks at once" if job.array_throttle else "no throttle"
    print(f"array {job.id}: {limit}")
    return 0


def resubmit(args: argparse.Namespace) -> int:
    """``kbatch resubmit ID --failed`` / ``--state TIMEOUT,OUT_OF_MEMORY``: a new array of
    just those tasks, with their indexes and the array's spec."""
    from kbatch.arrays import IndexSet
    from kbatch.cli.submit import submit_spec
    from kbatch.client import Client

    if args.failed == (args.state is not None):
        raise SpecError(
            "say which tasks to resubmit: --failed (FAILED, OUT_OF_MEMORY, TIMEOUT, NODE_FAIL) "
            "or --state STATE[,STATE] (e.g. --state TIMEOUT,OUT_OF_MEMORY)"
        )
    states = list(FAILED_STATES) if args.failed else _states(args.state)
    with Client.from_config() as client:
        array = _array(client, args.job_id)
        tasks = array_rows(client.list(include_finished=True), array.id)
        chosen = choose_tasks(tasks, states)
        if not chosen:
            names = ", ".join(s.value for s in states)
            counts = state_counts(array.array_counts or {})
            raise SpecError(
                f"array {array.id} has no tasks that ended {names}; nothing to resubmit "
                f"(its tasks: {counts})"
            )
        spec = resubmit_spec(client.spec(array.id), chosen, array.array_throttle)
        job = submit_spec(client, spec)
    if args.parsable:
        print(job.id)
    else:
        which = f"task{'s' if len(chosen) > 1 else ''} {IndexSet.of(chosen)}"
        print(f"Submitted batch job {job.id} ({which} of array {array.id})")
    return 0
