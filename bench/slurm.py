"""Part 3: Slurm on the same machine, measured exactly as the local backend is."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench import arrays, visibility
from bench.context import Context, wait_until
from bench.machine import peak_rss_mib
from bench.measure import (
    add_rate,
    concurrent_rate,
    dependency_latencies,
    dispatch_latencies,
    end_to_end,
    run_step,
    sequential_rate,
)
from bench.report import Metric, SectionResult
from bench.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_slurm
from bench.timing import Command
from bench.workload import write_scripts
from kbatch.units import parse_time_limit

__all__ = ["TITLE", "run"]

TITLE = "3. Slurm on the same machine"
ACTIVE = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
)


class Slurm:
    """Client commands against our cluster."""

    def __init__(self, cluster: SlurmCluster, work: Path) -> None:
        self.cluster = cluster
        self.work = work
        self.env = cluster.env()
        self.sbatch = shutil.which("sbatch") or "/usr/bin/sbatch"
        self.squeue = shutil.which("squeue") or "/usr/bin/squeue"

    def submit(self, *args: str) -> str:
        out = subprocess.run(
            [self.sbatch, "--parsable", *args],
            env=self.env,
            cwd=self.work,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch exited {out.returncode}: {out.stderr.strip()[-300:]}")
        return out.stdout.strip().split(";")[0]

    def state(self, job_id: str) -> str:
        out = subprocess.run(
            [self.squeue, "-h", "-j", job_id, "-o", "%T"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return out.stdout.strip()

    def cancel(self, job_id: str) -> None:
        scancel = shutil.which("scancel") or "/usr/bin/scancel"
        subprocess.run([scancel, job_id], env=self.env, check=True, timeout=60)
        wait_until(
            lambda: not self.state(job_id).strip(),
            timeout=120,
            interval=0.05,
            what=f"Slurm job {job_id} to go from the queue",
        )

    def queued(self) -> int:
        out = subprocess.run(
            [self.squeue, "-h", "-o", "%i"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return len(out.stdout.split())

    def wait_done(self, job_id: str, timeout: float = 300) -> None:
        wait_until(
            lambda: self.state(job_id) not in ACTIVE,
            timeout=timeout,
            interval=0.01,
            what=f"Slurm job {job_id} to end",
        )

    def drain(self, last_id: str, timeout: float = 600) -> None:
        self.wait_done(last_id, timeout)
        wait_until(
            lambda: self.queued() == 0,
            timeout=timeout,
            interval=0.05,
            what="Slurm's queue to drain",
        )

    def not_completed(self, first_id: int) -> int:
        """Jobs from ``first_id`` on that the job completion log records as not COMPLETED."""
        try:
            text = self.cluster.layout.jobcomp.read_text()
        except OSError:
            return -1
        bad = 0
        for line in text.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            if int(fields.get("JobId", 0)) >= first_id and fields.get("JobState") != "COMPLETED":
                bad += 1
        return bad


def run(ctx: Context, result: SectionResult) -> None:
    try:
        version = ensure_slurm(ctx.install, ctx.log)
    except SlurmUnavailable as exc:
        result.not_measured(f"Slurm is not available: {exc}")
        return
    ctx.tools["Slurm"] = version
    result.details["Slurm"] = f"{version} (Debian slurm-wlm), single node, started by the benchmark"
    cluster = SlurmCluster(ctx.scratch / "slurm", ctx.log)
    try:
        try:
            cluster.configure()
            cluster.start()
        except (SlurmUnavailable, TimeoutError, OSError) as exc:
            tails = "; ".join(
                f"{name}: {cluster.log_tail(name, 2)}" for name in ("munged", "slurmctld", "slurmd")
            )
            result.not_measured(f"Slurm would not start: {exc} ({tails})")
            return
        result.details.update(cluster.details)
        _measure(ctx, result, cluster)
    finally:
        cluster.stop()


def _measure(ctx: Context, result: SectionResult, cluster: SlurmCluster) -> None:
    counts = ctx.counts
    work = ctx.scratch / "slurm-work"
    scripts = write_scripts(work)
    slurm = Slurm(cluster, work)
    trivial = str(scripts["trivial.sh"])

    def submit_trivial() -> str:
        return slurm.submit(trivial)

    slurm.drain(sequential_rate(3, submit_trivial).last_id)  # warm up

    def latency() -> None:
        samples = dispatch_latencies(
            counts.latency_jobs,
            lambda stamp: slurm.submit(str(scripts["stamp.sh"]), str(stamp)),
            slurm.wait_done,
            work / "stamps",
        )
        result.add(
            Metric.from_samples(
                "dispatch",
                "submit-to-start, `sbatch`",
                "s",
                samples,
                note="`sbatch` started → `date +%s.%N` in the job; one job at a time",
            )
        )

    def dependency() -> None:
        samples = dependency_latencies(
            counts.dependency_pairs,
            lambda stamp: slurm.submit(str(scripts["ends.sh"]), str(stamp)),
            lambda first, stamp: slurm.submit(
                f"--dependency=afterok:{first}", str(scripts["stamp.sh"]), str(stamp)
            ),
            slurm.wait_done,
            work / "stamps-dependency",
        )
        result.add(
            Metric.from_samples(
                "dependency",
                "end of a job → start of the job waiting on it (`sbatch -d afterok:`)",
                "s",
                samples,
                note="`date +%s.%N` as the first job's last command → the same as the "
                "second's first; one pair at a time",
            )
        )

    def rate() -> None:
        measured = sequential_rate(counts.rate_jobs, submit_trivial)
        slurm.drain(measured.last_id)
        add_rate(
            result,
            "submit_rate",
            "submit rate, `sbatch`",
            measured,
            "one `sbatch` process after another; jobs run meanwhile",
        )

    def rate_concurrent() -> None:
        def one_client() -> tuple[Callable[[], str], Callable[[], None]]:
            return submit_trivial, lambda: None

        measured = concurrent_rate(counts.rate_jobs, counts.concurrency, one_client)
        slurm.drain(measured.last_id)
        add_rate(
            result,
            "submit_rate_concurrent",
            f"submit rate, `sbatch`, {counts.concurrency} at once",
            measured,
            f"{counts.concurrency} threads, each running `sbatch` after `sbatch`",
        )

    def e2e() -> None:
        first = submit_trivial()
        slurm.drain(first)
        seconds, measured = end_to_end(counts.e2e_jobs, submit_trivial, slurm.drain)
        failed = slurm.not_completed(int(first) + 1)
        result.add(
            Metric(
                "e2e",
                f"{counts.e2e_jobs} trivial jobs, first submit → last end",
                "s",
                seconds,
                note=f"`sbatch` one after another; {measured.per_second:.0f} submissions/s "
                f"meanwhile; {failed} not COMPLETED",
            )
        )

    def visible() -> None:
        visibility.measure(
            result,
            _slurm_system(slurm, work),
            work / "stamps-visibility",
            count=counts.visibility_runs,
            timeout_count=counts.timeout_runs,
            note="task/cgroup on cgroup v1 enforces --mem",
        )

    run_step(result, ctx, "submit-to-start latency", ("dispatch",), latency)
    run_step(result, ctx, "end of a job to start of its dependent", ("dependency",), dependency)
    run_step(result, ctx, "submit rate", ("submit_rate",), rate)
    run_step(result, ctx, "concurrent submit rate", ("submit_rate_concurrent",), rate_concurrent)
    run_step(result, ctx, "end-to-end time", ("e2e",), e2e)
    run_step(
        result,
        ctx,
        "visibility of a job's end",
        ("visible_cancel", "visible_oom", "visible_timeout"),
        visible,
    )
    run_step(
        result,
        ctx,
        "arrays",
        ("array_submit", "squeue_array_10000", "array_e2e_1000"),
        lambda: arrays.measure_slurm(
            ctx,
            result,
            slurm.submit,
            slurm.drain,
            slurm.cancel,
            slurm.env,
            work,
            scripts,
            slurm.squeue,
        ),
    )
    run_step(
        result,
        ctx,
        "queue listing",
        tuple(f"squeue_{n}" for n in counts.slurm_list_sizes),
        lambda: _listing(ctx, result, cluster, slurm, scripts),
    )


def _slurm_system(slurm: Slurm, work: Path) -> visibility.System:
    scripts = {name: str(work / name) for name in ("sleepy.sh", "oom.sh")}

    def state(job_id: str) -> str:
        out = subprocess.run(
            [slurm.squeue, "-h", "-t", "all", "-j", job_id, "-o", "%T"],
            env=slurm.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return out.stdout.strip()

    def cancel(job_id: str) -> None:
        scancel = shutil.which("scancel") or "/usr/bin/scancel"
        subprocess.run([scancel, job_id], env=slurm.env, check=True, timeout=60)

    def time_limit(job_id: str) -> float:
        out = subprocess.run(
            [slurm.squeue, "-h", "-t", "all", "-j", job_id, "-o", "%l"],
            env=slurm.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        seconds = parse_time_limit(out.stdout.strip())
        assert seconds is not None, f"Slurm job {job_id} has no time limit: {out.stdout!r}"
        return float(seconds)

    return visibility.System(
        name="Slurm",
        submit_sleeper=lambda stamp: slurm.submit(scripts["sleepy.sh"], str(stamp)),
        submit_time_limited=lambda stamp: slurm.submit(
            f"--time={visibility.TIME_LIMIT}", scripts["sleepy.sh"], str(stamp)
        ),
        submit_oom=lambda stamp: slurm.submit(
            f"--mem={visibility.MEMORY_LIMIT}", scripts["oom.sh"], str(stamp)
        ),
        cancel=cancel,
        state=state,
        time_limit=time_limit,
        look="`squeue -t all -j ID -o %T`, a process per look",
    )


def _listing(
    ctx: Context,
    result: SectionResult,
    cluster: SlurmCluster,
    slurm: Slurm,
    scripts: dict[str, Path],
) -> None:
    """``squeue`` with 1,000 and 10,000 jobs queued behind one that holds every CPU."""
    cpus = len(os.sched_getaffinity(0))
    head = slurm.submit("-c", str(cpus), str(scripts["hold.sh"]))
    wait_until(
        lambda: slurm.state(head) == "RUNNING", timeout=60, interval=0.05, what="the head job"
    )
    size = 1
    seeding = 0.0
    for target in ctx.counts.slurm_list_sizes:
        ctx.log(f"slurm: queueing {target - size} jobs with sbatch")
        filler = concurrent_rate(
            target - size,
            ctx.counts.concurrency,
            lambda: ((lambda: slurm.submit(str(scripts["trivial.sh"]))), lambda: None),
        )
        seeding += filler.seconds
        size = target
        queued = slurm.queued()
        if queued != size:
            raise RuntimeError(f"{queued} jobs in Slurm's queue, expected {size}")
        ctx.log(f"slurm: squeue with {size} jobs queued")
        command = Command(f"squeue_{size}", [slurm.squeue], slurm.env, slurm.work)
        times = ctx.timer.time([command], runs=ctx.counts.list_runs)
        result.add(
            Metric.from_samples(
                f"squeue_{size}",
                f"`squeue`, {size:,} jobs queued",
                "s",
                times[command.name],
                note=f"end to end, fresh process ({ctx.timer.method}); prints {size:,} rows",
            )
        )
        peak = peak_rss_mib(cluster.pid("slurmctld"))
        if peak is not None:
            result.add(
                Metric(
                    f"slurmctld_peak_rss_{size}",
                    f"slurmctld peak memory (VmHWM), {size:,} jobs queued",
                    "MiB",
                    peak,
                )
            )
    result.notes.append(
        f"The listing queues were filled with `sbatch` ({ctx.counts.concurrency} at once, "
        f"{seeding:.1f} s in all) behind one job holding all {cpus} CPUs; the earlier runs' "
        "finished jobs stay in slurmctld for MinJobAge (300 s) but are not listed."
    )
