"""``kqueue`` / ``kbatch queue`` and ``kbatch show``."""

from __future__ import annotations

import argparse
import sys

from kbatch.cli.jobs import check_job_ids
from kbatch.cli.output import is_group, print_job, print_json, print_table
from kbatch.client import Client
from kbatch.errors import Conflict, SpecError
from kbatch.models import Job, JobState

__all__ = ["queue", "show"]


def _states(text: str | None) -> list[str]:
    if not text:
        return []
    states = [s.strip().upper() for s in text.split(",") if s.strip()]
    known = {s.value for s in JobState}
    # Slurm's short forms: PD, R, CD, F, CA, TO, OOM, NF
    short = {
        "PD": "PENDING",
        "R": "RUNNING",
        "CD": "COMPLETED",
        "F": "FAILED",
        "CA": "CANCELLED",
        "TO": "TIMEOUT",
        "OOM": "OUT_OF_MEMORY",
        "NF": "NODE_FAIL",
    }
    resolved = [short.get(s, s) for s in states]
    for state in resolved:
        if state not in known:
            raise SpecError(f"-t {text}: {state} is not a state; use {', '.join(sorted(known))}")
    return resolved


def queue(args: argparse.Namespace) -> int:
    states = _states(args.states)
    with Client.from_config() as client:
        page = client.list_page(states=states, include_finished=args.all, all_users=args.all_users)
    jobs = page.jobs
    if page.stale_seconds is not None:
        print(
            f"kqueue: warning: the server cannot reach its cluster; these jobs are as they "
            f"were {page.stale_seconds:.0f} s ago and may have changed since",
            file=sys.stderr,
        )
    if (args.json or args.array) and any(is_group(job) for job in jobs):
        from kbatch.cli.tasks import expand  # one row per task of an array

        jobs = expand(jobs)
    if args.json:
        print_json(jobs)
    else:
        print_table(jobs, show_user=args.all_users)
    return 0


def show(args: argparse.Namespace) -> int:
    (job_id,) = check_job_ids([args.job_id])
    with Client.from_config() as client:
        job = client.get(job_id)
        if job.array_counts is None:  # a job, or one task of an array
            if args.tasks:
                raise SpecError(f"job {job_id} is not an array; --tasks is for arrays")
            if args.json:
                print_json(job)
            else:
                print_job(job)
            return 0
        from kbatch.cli.tasks import array_rows

        tasks = array_rows(client.list(include_finished=True), job.array_job_id or job.id)
        if job.id != job.array_job_id:  # some tasks: ID_[1-5]
            from kbatch.arrays import IndexSet

            chosen = set(IndexSet.parse(job.array_tasks or ""))
            tasks = [t for t in tasks if t.array_task_id in chosen]
        if args.tasks:
            from kbatch.cli.tasks import print_tasks

            if args.json:
                print_json(tasks)
            else:
                print_tasks(tasks)
            return 0
        if args.json:
            print_json(job)
            return 0
        print_job(job, _array_fields(client, job, tasks))
    return 0


def _array_fields(client: Client, job: Job, tasks: list[Job]) -> dict[str, str]:
    """What ``show`` adds for an array: its failed tasks and its sweep, from its spec."""
    from kbatch.arrays import IndexSet
    from kbatch.cli.tasks import FAILED_STATES, choose_tasks

    fields = {"FailedTasks": str(IndexSet.of(choose_tasks(tasks, FAILED_STATES))) or "(none)"}
    try:
        spec = client.spec(job.array_job_id or job.id)
    except Conflict:  # a backend that keeps no spec
        return fields
    if spec.array is not None:
        fields["Array"] = spec.array
    if spec.params is not None:
        columns = ",".join(spec.params.columns)
        fields["Sweep"] = f"{len(spec.params.rows)} rows of {columns}"
    workdir = (spec.workdir or "").rstrip("/")
    output = spec.output or "kbatch-%A_%a.out"  # patterns: each task has its own file
    for name, pattern in (("StdOut", output), ("StdErr", spec.error or output)):
        fields[name] = pattern if pattern.startswith("/") else f"{workdir}/{pattern}"
    return fields
