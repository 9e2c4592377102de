"""``kbatch logs`` and ``kbatch cancel``."""

from __future__ import annotations

import argparse
import sys

from kbatch.client import Client
from kbatch.errors import KbatchError

__all__ = ["cancel", "logs"]


def logs(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    with Client.from_config(retry_for=2.0) as client:
        for chunk in client.logs(
            args.job_id, follow=args.follow, stream="error" if args.error else "output"
        ):
            out.write(chunk)
            out.flush()
    return 0


def cancel(args: argparse.Namespace) -> int:
    failures = 0
    with Client.from_config() as client:
        for job_id in args.job_ids:
            try:
                job = client.cancel(job_id)
            except KbatchError as exc:
                print(f"kbatch: error: job {job_id}: {exc}", file=sys.stderr)
                failures += 1
                continue
            if job.state.value == "CANCELLED":
                print(f"job {job.id} cancelled")
            elif job.state.is_terminal:
                print(f"job {job.id} had already ended ({job.state.value})")
            else:
                print(f"job {job.id} is being cancelled")
    return 1 if failures else 0
