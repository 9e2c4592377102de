"""``kqueue`` / ``kbatch queue`` and ``kbatch show``."""

from __future__ import annotations

import argparse
import sys

from kbatch.cli.jobs import check_job_ids
from kbatch.cli.output import print_job, print_json, print_table
from kbatch.client import Client
from kbatch.errors import SpecError
from kbatch.models import JobState

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
    if args.json:
        print_json(jobs)
    else:
        print_table(jobs, show_user=args.all_users)
    return 0


def show(args: argparse.Namespace) -> int:
    (job_id,) = check_job_ids([args.job_id])
    with Client.from_config() as client:
        job = client.get(job_id)
    if args.json:
        print_json(job)
    else:
        print_job(job)
    return 0
