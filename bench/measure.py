"""Measurement procedures shared by the kbatch and Slurm sections.

Each system supplies callables (submit a job, wait for one to end, wait for
the queue to drain); the procedure, and so the figure, is the same for both.
"""

from __future__ import annotations

import functools
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.context import Context, wait_until
from bench.report import Metric, SectionResult
from bench.workload import read_stamp

__all__ = [
    "Rate",
    "add_rate",
    "concurrent_rate",
    "dependency_latencies",
    "dispatch_latencies",
    "end_to_end",
    "run_step",
    "sequential_rate",
]

Submit = Callable[[], str]  # submits one trivial job, returns its id


@dataclass(frozen=True)
class Rate:
    jobs: int
    seconds: float
    calls: list[float]  # seconds per submission
    last_id: str

    @property
    def per_second(self) -> float:
        return self.jobs / self.seconds


def dispatch_latencies(
    count: int,
    submit: Callable[[Path], str],
    wait_done: Callable[[str], None],
    stamps: Path,
    *,
    timeout: float = 120,
) -> list[float]:
    """Seconds from just before each submission to the moment its script starts.

    One job at a time on an idle system: each ``stamp.sh`` job writes the
    time it starts (``date +%s.%N``) to its own file; the next job is
    submitted once the previous one has ended.
    """
    stamps.mkdir(parents=True, exist_ok=True)
    latencies = []
    for i in range(count):
        stamp = stamps / f"start-{i}"
        submitted = time.time()
        job_id = submit(stamp)
        started = wait_until(
            functools.partial(read_stamp, stamp),
            timeout=timeout,
            interval=0.002,
            what=f"job {job_id} to start",
        )
        latencies.append(started - submitted)
        wait_done(job_id)
    return latencies


def dependency_latencies(
    count: int,
    submit_first: Callable[[Path], str],
    submit_after: Callable[[str, Path], str],
    wait_done: Callable[[str], None],
    stamps: Path,
    *,
    timeout: float = 120,
) -> list[float]:
    """Seconds from the end of a job to the start of the job that waits on it.

    One pair at a time on an idle system: the first job (``ends.sh``) runs a
    second and writes the moment it ends (``date +%s.%N``, its last command)
    to its stamp file; the second, submitted at once with ``afterok`` on the
    first, writes the moment it starts (``stamp.sh``).  ``submit_first(stamp)``
    returns the first job's id, ``submit_after(first_id, stamp)`` the second's.
    """
    stamps.mkdir(parents=True, exist_ok=True)
    latencies = []
    for i in range(count):
        end, start = stamps / f"end-{i}", stamps / f"start-{i}"
        first = submit_first(end)
        after = submit_after(first, start)
        ended = wait_until(
            functools.partial(read_stamp, end),
            timeout=timeout,
            interval=0.005,
            what=f"job {first} to end",
        )
        started = wait_until(
            functools.partial(read_stamp, start),
            timeout=timeout,
            interval=0.002,
            what=f"job {after} (afterok:{first}) to start",
        )
        latencies.append(started - ended)
        wait_done(after)
    return latencies


def sequential_rate(count: int, submit: Submit) -> Rate:
    calls = []
    job_id = ""
    start = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        job_id = submit()
        calls.append(time.perf_counter() - t)
    return Rate(count, time.perf_counter() - start, calls, job_id)


def _burst(count: int, submit: Submit) -> tuple[list[float], str]:
    calls = []
    last = ""
    for _ in range(count):
        t = time.perf_counter()
        last = submit()
        calls.append(time.perf_counter() - t)
    return calls, last


def concurrent_rate(
    count: int,
    workers: int,
    submitter: Callable[[], tuple[Submit, Callable[[], None]]],
    *,
    processes: bool = False,
) -> Rate:
    """``count`` submissions from ``workers`` clients at once, one client each.

    ``submitter`` makes one client: its submit function and its close function.
    With ``processes`` each client is a process of its own (forked), as separate
    users' clients are, rather than a thread sharing this one's interpreter lock;
    threads suit clients that run a command per submission (``sbatch``).
    """
    per_worker = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
    if processes:
        results, seconds = _in_processes(per_worker, submitter)
    else:
        results, seconds = _in_threads(per_worker, submitter)
    calls = [c for worker_calls, _ in results for c in worker_calls]
    last_id = max((last for _, last in results), key=lambda i: (len(i), i))
    return Rate(count, seconds, calls, last_id)


def _in_threads(
    per_worker: list[int], submitter: Callable[[], tuple[Submit, Callable[[], None]]]
) -> tuple[list[tuple[list[float], str]], float]:
    clients = [submitter() for _ in per_worker]
    ready = threading.Barrier(len(per_worker) + 1)

    def work(index: int) -> tuple[list[float], str]:
        ready.wait()
        return _burst(per_worker[index], clients[index][0])

    try:
        with ThreadPoolExecutor(len(per_worker)) as pool:
            futures = [pool.submit(work, i) for i in range(len(per_worker))]
            ready.wait()
            start = time.perf_counter()
            results = [future.result() for future in futures]
            return results, time.perf_counter() - start
    finally:
        for _, close in clients:
            close()


def _in_processes(
    per_worker: list[int], submitter: Callable[[], tuple[Submit, Callable[[], None]]]
) -> tuple[list[tuple[list[float], str]], float]:
    context = multiprocessing.get_context("fork")  # the children inherit `submitter` as is
    ready = context.Barrier(len(per_worker) + 1)
    queue: multiprocessing.SimpleQueue[tuple[list[float], str, str | None]] = context.SimpleQueue()

    def work(count: int) -> None:
        try:
            submit, close = submitter()
            try:
                ready.wait(timeout=60)
                calls, last = _burst(count, submit)
            finally:
                close()
        except BaseException as exc:
            queue.put(([], "", f"{type(exc).__name__}: {exc}"))
            return
        queue.put((calls, last, None))

    children = [context.Process(target=work, args=(n,), daemon=True) for n in per_worker]
    for child in children:
        child.start()
    try:
        ready.wait(timeout=60)
        start = time.perf_counter()
        raw = [queue.get() for _ in children]
        seconds = time.perf_counter() - start
    finally:
        for child in children:
            child.join(timeout=60)
    errors = [error for _, _, error in raw if error]
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]}")
    return [(calls, last) for calls, last, _ in raw], seconds


def end_to_end(count: int, submit: Submit, drain: Callable[[str], None]) -> tuple[float, Rate]:
    """Seconds from the first submission until the last of ``count`` trivial jobs has ended."""
    start = time.perf_counter()
    rate = sequential_rate(count, submit)
    drain(rate.last_id)
    return time.perf_counter() - start, rate


def add_rate(result: SectionResult, key: str, label: str, rate: Rate, note: str) -> None:
    """The rate (``key``) and the time of each submission (``key`` with ``submit_call``)."""
    result.add(
        Metric(
            key,
            label,
            "jobs/s",
            rate.per_second,
            better="higher",
            note=f"{rate.jobs} jobs in {rate.seconds:.2f} s; {note}",
        )
    )
    result.add(
        Metric.from_samples(
            key.replace("submit_rate", "submit_call"),
            label.replace("submit rate", "one submission"),
            "s",
            rate.calls,
        )
    )


def run_step(
    result: SectionResult, ctx: Context, name: str, keys: tuple[str, ...], body: Callable[[], None]
) -> None:
    """Run one measurement; if it fails, say so for its figures and carry on with the next.

    With ``ctx.metrics`` (``--metrics``), only the steps that make one of those figures run.
    """
    if ctx.metrics is not None and not ctx.metrics.intersection(keys):
        ctx.log(f"{result.name}: {name} skipped (--metrics)")
        return
    ctx.log(f"{result.name}: {name}")
    try:
        body()
    except Exception as exc:
        ctx.log(f"{result.name}: {name} failed: {exc}")
        result.failed_step(name, exc, *keys)
