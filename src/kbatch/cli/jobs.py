"""``kbatch logs``, ``kbatch cancel``, ``kbatch hold`` and ``kbatch release``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kbatch.client import Client
from kbatch.errors import KbatchError, NotFound, SpecError
from kbatch.lifecycle import parse_job_ref
from kbatch.models import Job

__all__ = ["cancel", "check_job_ids", "hold", "logs", "release"]


def check_job_ids(job_ids: Sequence[str]) -> list[str]:
    """The ids as given, or a :class:`SpecError` naming one that cannot be a job id.

    Checked before any request, so ``kbatch cancel ''`` says what is wrong
    instead of asking the server about a job that cannot exist.
    """
    for job_id in job_ids:
        try:
            parse_job_ref(job_id)
        except NotFound:
            raise SpecError(
                f"{job_id!r} is not a job id; job ids are letters, digits and '-', "
                "such as 8, a task of an array 8_2, or some of its tasks 8_[1-5,9] (see kqueue)"
            ) from None
    return list(job_ids)


def logs(args: argparse.Namespace) -> int:
    (job_id,) = check_job_ids([args.job_id])
    out = sys.stdout.buffer
    with Client.from_config(retry_for=2.0) as client:
        for chunk in client.logs(
            job_id, follow=args.follow, stream="error" if args.error else "output"
        ):
            out.write(chunk)
            out.flush()
    return 0


def _each(
    job_ids: Sequence[str], act: Callable[[Client, str], Job], say: Callable[[Job], str]
) -> int:
    """Apply ``act`` to every job, print ``say(job)`` or the error; 1 if any failed."""
    failures = 0
    with Client.from_config() as client:
        for job_id in check_job_ids(job_ids):
            try:
                job = act(client, job_id)
            except KbatchError as exc:
                print(f"kbatch: error: job {job_id}: {exc}", file=sys.stderr)
                failures += 1
                continue
            print(say(job))
    return 1 if failures else 0


def _cancelled(job: Job) -> str:
    if job.state.value == "CANCELLED":
        return f"job {job.id} cancelled"
    if job.state.is_terminal:
        return f"job {job.id} had already ended ({job.state.value})"
    return f"job {job.id} is being cancelled"


def cancel(args: argparse.Namespace) -> int:
    return _each(args.job_ids, Client.cancel, _cancelled)


def hold(args: argparse.Namespace) -> int:
    return _each(args.job_ids, Client.hold, lambda job: f"job {job.id} held")


def release(args: argparse.Namespace) -> int:
    return _each(args.job_ids, Client.release, lambda job: f"job {job.id} released")
