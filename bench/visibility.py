"""How soon the end of a job is visible: a cancel, an OOM kill, a time limit (issue 17).

The same procedure for kbatch and Slurm: each system supplies how to submit
the three jobs, cancel one, and read a job's state as its users see it
(kbatch's API, ``squeue -t all``); the figure is the time from the event to the
first look that shows the job's end state.

- **cancel**: a job that writes its start time then sleeps; once it runs, the
  clock starts just before the cancel call (``Client.cancel``, ``scancel``)
  and stops when the state reads ``CANCELLED``.
- **OOM**: a job with a 32 MiB memory limit writes the time, then maps memory
  (filled by the kernel) 8 MiB at a time until it is killed; the clock runs
  from that time, so filling memory up to the limit is in the figure, on both
  (about 20 ms here; 100 MiB took 60-180 ms, too much of a 0.3 s budget).
- **time limit**: a job with a 1 s time limit (``--time=0:01``) writes its start
  time then sleeps; the clock runs from start + the limit the system enforces
  (Slurm's is at least a minute, read back with ``squeue -o %l``).

The looks poll as fast as the system answers (an API call; an ``squeue``
process), so a figure also holds up to one look's time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.context import wait_until
from bench.report import Metric, SectionResult
from bench.workload import read_stamp

__all__ = ["MEMORY_LIMIT", "TIME_LIMIT", "System", "measure"]

MEMORY_LIMIT = "32M"  # small: filling memory up to the limit is in the figure
TIME_LIMIT = "0:01"  # MM:SS, as sbatch reads it: one second


@dataclass(frozen=True)
class System:
    """One system's side of the procedure."""

    name: str  # "kbatch" or "Slurm", for messages
    submit_sleeper: Callable[[Path], str]  # sleepy.sh (bench.workload) with the stamp's path
    submit_time_limited: Callable[[Path], str]  # the same with --time=TIME_LIMIT
    submit_oom: Callable[[Path], str]  # oom.sh with --mem=MEMORY_LIMIT
    cancel: Callable[[str], None]
    state: Callable[[str], str]  # e.g. "RUNNING", "CANCELLED"
    time_limit: Callable[[str], float]  # the limit the system enforces for the job, seconds
    look: str  # how the state is read, for the notes


def _seen(system: System, job_id: str, wanted: str, timeout: float) -> float:
    """When a look first shows ``wanted`` (another end state is an error)."""
    ends = {"CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "COMPLETED", "FAILED", "NODE_FAIL"}

    def check() -> float | None:
        state = system.state(job_id)
        if state == wanted:
            return time.time()
        if state.split()[0:1] and state.split()[0] in ends:
            raise RuntimeError(f"{system.name} job {job_id} ended {state}, not {wanted}")
        return None

    return wait_until(
        check, timeout=timeout, interval=0.001, what=f"{system.name} job {job_id} {wanted}"
    )


def _started(stamp: Path, job_id: str, timeout: float = 120) -> float:
    return wait_until(
        lambda: read_stamp(stamp), timeout=timeout, interval=0.002, what=f"job {job_id} to start"
    )


def cancel_latencies(system: System, count: int, stamps: Path) -> list[float]:
    samples = []
    for i in range(count):
        stamp = stamps / f"cancel-{i}"
        job_id = system.submit_sleeper(stamp)
        _started(stamp, job_id)
        begin = time.time()
        system.cancel(job_id)
        samples.append(_seen(system, job_id, "CANCELLED", 120) - begin)
    return samples


def oom_latencies(system: System, count: int, stamps: Path) -> list[float]:
    samples = []
    for i in range(count):
        stamp = stamps / f"oom-{i}"
        job_id = system.submit_oom(stamp)
        seen = _seen(system, job_id, "OUT_OF_MEMORY", 120)
        allocating = read_stamp(stamp)
        if allocating is None:
            raise RuntimeError(f"{system.name} job {job_id} ended without writing its stamp")
        samples.append(seen - allocating)
    return samples


def timeout_latencies(system: System, count: int, stamps: Path) -> list[float]:
    samples = []
    for i in range(count):
        stamp = stamps / f"timeout-{i}"
        job_id = system.submit_time_limited(stamp)
        start = _started(stamp, job_id)
        limit = system.time_limit(job_id)
        samples.append(_seen(system, job_id, "TIMEOUT", limit + 300) - (start + limit))
    return samples


def measure(
    result: SectionResult,
    system: System,
    stamps: Path,
    *,
    count: int,
    timeout_count: int,
    prefix: str = "",
    note: str = "",
) -> None:
    """The three figures, as ``visible_cancel``, ``visible_oom``, ``visible_timeout``."""
    stamps.mkdir(parents=True, exist_ok=True)
    extra = f"; {note}" if note else ""
    for key, label, procedure, runs, how in (
        ("cancel", "cancel → CANCELLED visible", cancel_latencies, count, "cancel called"),
        (
            "oom",
            f"over --mem={MEMORY_LIMIT} → OUT_OF_MEMORY visible",
            oom_latencies,
            count,
            "the job starts allocating",
        ),
        (
            "timeout",
            f"--time={TIME_LIMIT} → TIMEOUT visible",
            timeout_latencies,
            timeout_count,
            "start + the enforced limit",
        ),
    ):
        samples = procedure(system, runs, stamps)
        variant = f" ({prefix.rstrip('_')})" if prefix else ""
        result.add(
            Metric.from_samples(
                f"{prefix}visible_{key}",
                f"{label}{variant}",
                "s",
                samples,
                note=f"{how} → first look ({system.look}) showing it{extra}",
            )
        )
