"""Job arrays (issue 12), measured the same way on the local backend and on Slurm.

* submitting a 10,000-task array (held, so nothing runs meanwhile): the HTTP API,
  ``kbatch submit --array=0-9999`` and ``sbatch --array=0-9999``;
* ``kqueue`` / ``squeue`` in a fresh process with that array pending (one row each);
* a 1,000-task array of ``true``, first submit to last task end (tasks/s).

Each part is a function the local and Slurm sections call with what they have running.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.context import Context, wait_until
from bench.report import Metric, SectionResult
from bench.timing import Command
from kbatch.client import Client
from kbatch.models import JobSpec

__all__ = ["ARRAY_TASKS", "E2E_TASKS", "measure_local", "measure_slurm"]

ARRAY_TASKS = 10_000  # the array submitted and listed
E2E_TASKS = 1_000  # the array run to its end
SUBMIT_RUNS = 5


def _timed(action: Callable[[], object], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return samples


def measure_local(
    ctx: Context,
    result: SectionResult,
    client: Client,
    env: dict[str, str],
    work: Path,
    scripts: dict[str, Path],
    kbatch: str,
    kqueue: str,
) -> None:
    trivial = scripts["trivial.sh"]
    held = JobSpec(
        script=trivial.read_text(),
        workdir=str(work),
        array=f"0-{ARRAY_TASKS - 1}",
        hold=True,
        output="/dev/null",
    )
    submitted: list[str] = []

    def submit_api() -> None:
        submitted.append(client.submit(held).id)

    result.add(
        Metric.from_samples(
            "array_submit_api",
            f"submit a {ARRAY_TASKS:,}-task array, HTTP API",
            "s",
            _timed(submit_api, SUBMIT_RUNS),
            note="`Client.submit` of a held array until the reply",
        )
    )
    argv = [kbatch, "submit", "--parsable", "-H", f"--array=0-{ARRAY_TASKS - 1}", str(trivial)]

    def submit_cli() -> None:
        out = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True, check=True)
        submitted.append(out.stdout.strip())

    result.add(
        Metric.from_samples(
            "array_submit_cli",
            f"`kbatch submit --array=0-{ARRAY_TASKS - 1}`",
            "s",
            _timed(submit_cli, SUBMIT_RUNS),
            note="one fresh `kbatch submit` process until it prints the id",
        )
    )
    for job_id in submitted[1:]:
        client.cancel(job_id)
    command = Command("kqueue_array", [kqueue], env, work)
    times = ctx.timer.time([command], runs=ctx.counts.list_runs)
    result.add(
        Metric.from_samples(
            "kqueue_array_10000",
            f"`kqueue`, one {ARRAY_TASKS:,}-task array pending",
            "s",
            times[command.name],
            note=f"end to end, fresh process ({ctx.timer.method}); one row, as squeue shows it",
        )
    )
    client.cancel(submitted[0])
    spec = JobSpec(
        script=trivial.read_text(),
        workdir=str(work),
        array=f"0-{E2E_TASKS - 1}",
        output="/dev/null",
    )
    start = time.perf_counter()
    array = client.submit(spec)
    wait_until(
        lambda: client.get(array.id).state.is_terminal,
        timeout=600,
        interval=0.05,
        what=f"array {array.id} to end",
    )
    seconds = time.perf_counter() - start
    final = client.get(array.id)
    result.add(
        Metric(
            "array_e2e_1000",
            f"{E2E_TASKS:,}-task array of `true`, submit → last task end",
            "s",
            seconds,
            note=f"{E2E_TASKS / seconds:.0f} tasks/s; tasks per state {final.array_counts}",
        )
    )


def measure_slurm(
    ctx: Context,
    result: SectionResult,
    submit: Callable[..., str],
    wait_done: Callable[[str], None],
    cancel: Callable[[str], None],
    env: dict[str, str],
    work: Path,
    scripts: dict[str, Path],
    squeue: str,
) -> None:
    trivial = str(scripts["trivial.sh"])
    submitted: list[str] = []
    result.add(
        Metric.from_samples(
            "array_submit",
            f"`sbatch --array=0-{ARRAY_TASKS - 1}`",
            "s",
            _timed(
                lambda: submitted.append(
                    submit("-H", f"--array=0-{ARRAY_TASKS - 1}", "-o", "/dev/null", trivial)
                ),
                SUBMIT_RUNS,
            ),
            note="one fresh `sbatch` process until it prints the id (held)",
        )
    )
    for job_id in submitted[1:]:
        cancel(job_id)
    command = Command("squeue_array", [squeue], env, work)
    times = ctx.timer.time([command], runs=ctx.counts.list_runs)
    result.add(
        Metric.from_samples(
            "squeue_array_10000",
            f"`squeue`, one {ARRAY_TASKS:,}-task array pending",
            "s",
            times[command.name],
            note=f"end to end, fresh process ({ctx.timer.method})",
        )
    )
    cancel(submitted[0])
    start = time.perf_counter()
    array_id = submit(f"--array=0-{E2E_TASKS - 1}", "-o", "/dev/null", trivial)
    wait_done(array_id)
    seconds = time.perf_counter() - start
    result.add(
        Metric(
            "array_e2e_1000",
            f"{E2E_TASKS:,}-task array of `true`, submit → last task end",
            "s",
            seconds,
            note=f"{E2E_TASKS / seconds:.0f} tasks/s",
        )
    )
