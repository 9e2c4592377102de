"""``kbatch fetch ID [DEST]``: what a job left in its code directory, new or changed."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

__all__ = ["fetch"]


def fetch(args: argparse.Namespace) -> int:
    from kbatch.cli.progress import ProgressBar
    from kbatch.client import Client

    bar = ProgressBar("fetching", enabled=not args.quiet)
    with Client.from_config() as client:
        try:
            paths = client.fetch(
                args.job_id,
                args.dest,
                results=args.results or (),
                ignore=args.ignore or (),
                progress=bar,
                on_plan=bar.plan,
            )
        finally:
            bar.close()
    if args.quiet:
        return 0
    for path in paths:
        print(path)
    if not paths:
        print(f"kbatch: job {args.job_id} left no new or changed files", file=sys.stderr)
    return 0
