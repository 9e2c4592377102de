"""What every section is given: the counts to use, the command timer, a scratch directory."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.timing import CommandTimer

__all__ = ["FULL", "QUICK", "Context", "Counts", "log", "wait_until"]

T = TypeVar("T")


@dataclass(frozen=True)
class Counts:
    cli_runs: int  # fresh processes per CLI command (the issue asks for at least 10)
    latency_jobs: int  # jobs whose submit-to-start latency is measured
    rate_jobs: int  # submissions for the sequential and concurrent submit rates
    rate_cli_jobs: int  # `kbatch submit` / `sbatch` processes for the CLI submit rate
    concurrency: int  # clients at once for the concurrent submit rate
    e2e_jobs: int  # trivial jobs for the end-to-end time
    list_sizes: tuple[int, ...]  # jobs in the queue for the listing figures
    slurm_list_sizes: tuple[int, ...]  # the same for Slurm (filled with sbatch: slower)
    list_runs: int  # fresh `kqueue` / `squeue` processes per queue size
    visibility_runs: int  # cancels and OOM kills whose visibility is timed (bench.visibility)
    timeout_runs: int  # time limits likewise (Slurm enforces at least a minute: few)
    dependency_pairs: int  # (job, job waiting on it with afterok) pairs for the dependency latency


FULL = Counts(
    cli_runs=20,
    latency_jobs=50,
    rate_jobs=200,
    rate_cli_jobs=50,
    concurrency=4,
    e2e_jobs=500,
    list_sizes=(1000, 10000),
    slurm_list_sizes=(1000, 10000),
    list_runs=15,
    visibility_runs=10,
    timeout_runs=3,
    dependency_pairs=15,
)
QUICK = Counts(
    cli_runs=10,
    latency_jobs=10,
    rate_jobs=40,
    rate_cli_jobs=10,
    concurrency=4,
    e2e_jobs=50,
    list_sizes=(1000, 10000),
    slurm_list_sizes=(1000,),
    list_runs=5,
    visibility_runs=3,
    timeout_runs=1,
    dependency_pairs=5,
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Context:
    counts: Counts
    quick: bool
    install: bool  # may the benchmark apt-get / pip install what it needs
    timer: CommandTimer
    scratch: Path  # removed at the end of the run
    cache: Path  # kept between runs (the PyPI kbatch virtual environment)
    tools: dict[str, str] = field(default_factory=dict)  # name -> version, for the report
    # Only the steps that measure one of these figures (``--metrics``); None: every step.
    metrics: frozenset[str] | None = None
    log: Callable[[str], None] = log


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.02,
    what: str = "a condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; ``TimeoutError`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
