"""Part 2: the local backend through a real ``kbatch server``."""

from __future__ import annotations

import http.client
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from bench import arrays, visibility
from bench.context import Context, wait_until
from bench.kbatch_server import KbatchServer, QueuedServer, cli_path, seed_finished_jobs
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
from bench.timing import Command
from bench.workload import job_spec, write_scripts
from kbatch.client import Client
from kbatch.client.sync import PAGE_SIZE
from kbatch.models import JobList

__all__ = ["TITLE", "run"]

TITLE = "2. Local backend"
FINISHED = 100_000  # finished jobs in the store for the memory and `kqueue --all` figures


def _wait_done(client: Client, job_id: str, timeout: float = 300) -> None:
    wait_until(
        lambda: client.get(job_id).state.is_terminal,
        timeout=timeout,
        interval=0.01,
        what=f"job {job_id} to end",
    )


def _drain(client: Client, last_id: str, timeout: float = 600) -> None:
    """Wait until the last job submitted has ended and nothing else is queued or running."""
    _wait_done(client, last_id, timeout)
    wait_until(lambda: not client.list(), timeout=timeout, interval=0.05, what="the queue to drain")


def _not_completed(client: Client, first_id: str) -> int:
    first = int(first_id)
    jobs = [j for j in client.list(include_finished=True) if int(j.id) >= first]
    return sum(1 for j in jobs if j.state.value != "COMPLETED")


def run(ctx: Context, result: SectionResult) -> None:
    scratch = ctx.scratch / "local"
    work = scratch / "work"
    scripts = write_scripts(work)
    counts = ctx.counts
    kbatch = cli_path("kbatch")
    server = KbatchServer(scratch / "state")
    server.start()
    result.details["server"] = "`kbatch server`, defaults (all CPUs and memory of the machine)"
    client = server.client()
    try:
        trivial = job_spec("trivial.sh", workdir=work)

        def submit_api() -> str:
            return client.submit(trivial).id

        def drain(last_id: str) -> None:
            _drain(client, last_id)

        # Warm up: the first supervisor start reads files from disk.
        drain(sequential_rate(3, submit_api).last_id)

        def latency_api() -> None:
            def submit(stamp: Path) -> str:
                return client.submit(job_spec("stamp.sh", workdir=work, args=[str(stamp)])).id

            samples = dispatch_latencies(
                counts.latency_jobs, submit, lambda j: _wait_done(client, j), work / "stamps-api"
            )
            result.add(
                Metric.from_samples(
                    "dispatch_api",
                    "submit-to-start, HTTP API",
                    "s",
                    samples,
                    note="Client.submit() called → `date +%s.%N` in the job; one job at a time",
                )
            )

        def latency_cli() -> None:
            env = server.env()

            def submit(stamp: Path) -> str:
                out = subprocess.run(
                    [kbatch, "submit", "--parsable", str(scripts["stamp.sh"]), str(stamp)],
                    env=env,
                    cwd=work,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                return out.stdout.strip()

            samples = dispatch_latencies(
                counts.latency_jobs, submit, lambda j: _wait_done(client, j), work / "stamps-cli"
            )
            result.add(
                Metric.from_samples(
                    "dispatch_cli",
                    "submit-to-start, `kbatch submit`",
                    "s",
                    samples,
                    note="`kbatch submit` started → `date +%s.%N` in the job; one job at a time",
                )
            )

        def dependency() -> None:
            def first(stamp: Path) -> str:
                return client.submit(job_spec("ends.sh", workdir=work, args=[str(stamp)])).id

            def after(first_id: str, stamp: Path) -> str:
                options = ["--dependency", f"afterok:{first_id}"]
                spec = job_spec("stamp.sh", workdir=work, args=[str(stamp)], options=options)
                return client.submit(spec).id

            samples = dependency_latencies(
                counts.dependency_pairs,
                first,
                after,
                lambda j: _wait_done(client, j),
                work / "stamps-dependency",
            )
            result.add(
                Metric.from_samples(
                    "dependency",
                    "end of a job → start of the job waiting on it (`afterok`)",
                    "s",
                    samples,
                    note="`date +%s.%N` as the first job's last command → the same as the "
                    "second's first; HTTP API; one pair at a time",
                )
            )

        def rate_api() -> None:
            rate = sequential_rate(counts.rate_jobs, submit_api)
            drain(rate.last_id)
            add_rate(
                result,
                "submit_rate_api",
                "submit rate, HTTP API, one client",
                rate,
                "one `Client` (keep-alive), one submission after another; jobs run meanwhile",
            )

        def rate_api_concurrent() -> None:
            def one_client() -> tuple[Callable[[], str], Callable[[], None]]:
                own = server.client()
                return (lambda: own.submit(trivial).id), own.close

            rate = concurrent_rate(counts.rate_jobs, counts.concurrency, one_client, processes=True)
            drain(rate.last_id)
            add_rate(
                result,
                "submit_rate_api_concurrent",
                f"submit rate, HTTP API, {counts.concurrency} clients",
                rate,
                f"{counts.concurrency} client processes, one `Client` each",
            )

        def rate_cli() -> None:
            env = server.env()

            def submit() -> str:
                argv = [kbatch, "submit", "--parsable", str(scripts["trivial.sh"])]
                out = subprocess.run(
                    argv, env=env, cwd=work, capture_output=True, text=True, check=True
                )
                return out.stdout.strip()

            rate = sequential_rate(counts.rate_cli_jobs, submit)
            drain(rate.last_id)
            add_rate(
                result,
                "submit_rate_cli",
                "submit rate, `kbatch submit`",
                rate,
                "one `kbatch submit` process after another",
            )

        def e2e() -> None:
            first = client.submit(trivial).id
            drain(first)
            seconds, rate = end_to_end(counts.e2e_jobs, submit_api, drain)
            failed = _not_completed(client, str(int(first) + 1))
            key = "e2e"
            result.add(
                Metric(
                    key,
                    f"{counts.e2e_jobs} trivial jobs, first submit → last end",
                    "s",
                    seconds,
                    note=f"HTTP API, one client; {rate.per_second:.0f} submissions/s meanwhile; "
                    f"{failed} not COMPLETED",
                )
            )
            result.add(
                Metric(
                    "e2e_rate",
                    "trivial jobs run, first submit → last end",
                    "jobs/s",
                    counts.e2e_jobs / seconds,
                    better="higher",
                    note=f"{counts.e2e_jobs} jobs in {seconds:.2f} s, the figure above",
                )
            )

        def visible() -> None:
            _visibility(ctx, result, client, work, scratch)

        run_step(result, ctx, "submit-to-start latency (HTTP API)", ("dispatch_api",), latency_api)
        run_step(
            result, ctx, "submit-to-start latency (kbatch submit)", ("dispatch_cli",), latency_cli
        )
        run_step(result, ctx, "end of a job to start of its dependent", ("dependency",), dependency)
        run_step(result, ctx, "submit rate (HTTP API)", ("submit_rate_api",), rate_api)
        run_step(
            result,
            ctx,
            "concurrent submit rate (HTTP API)",
            ("submit_rate_api_concurrent",),
            rate_api_concurrent,
        )
        run_step(result, ctx, "submit rate (kbatch submit)", ("submit_rate_cli",), rate_cli)
        run_step(result, ctx, "end-to-end time", ("e2e", "e2e_rate"), e2e)
        run_step(
            result,
            ctx,
            "visibility of a job's end",
            ("visible_cancel", "visible_oom", "visible_timeout", "polling_visible_oom"),
            visible,
        )
        run_step(
            result,
            ctx,
            "arrays",
            ("array_submit_api", "array_submit_cli", "kqueue_array_10000", "array_e2e_1000"),
            lambda: arrays.measure_local(
                ctx, result, client, server.env(), work, scripts, kbatch, cli_path("kqueue")
            ),
        )
        peak = server.peak_rss_mib()
        if peak is not None:
            result.add(
                Metric(
                    "server_peak_rss_runs",
                    "server peak memory (VmHWM) after the runs above",
                    "MiB",
                    peak,
                )
            )
    finally:
        client.close()
        server.stop()
    run_step(
        result,
        ctx,
        "end-to-end time without the launcher",
        ("e2e_rate_no_launcher",),
        lambda: _e2e_without_launcher(ctx, result, scratch, work),
    )
    run_step(
        result,
        ctx,
        "queue listing",
        tuple(f"kqueue_{n}" for n in counts.list_sizes),
        lambda: _listing(ctx, result, scratch),
    )
    run_step(
        result,
        ctx,
        "finished jobs in the store",
        (
            f"server_peak_rss_finished_{FINISHED}",
            f"kqueue_all_first_page_{FINISHED}",
            f"kqueue_all_{FINISHED}",
        ),
        lambda: _finished(ctx, result, scratch),
    )


def _e2e_without_launcher(ctx: Context, result: SectionResult, scratch: Path, work: Path) -> None:
    """The same trivial jobs with ``[local] launcher = false``: a new interpreter per
    supervisor, as before the launcher; the baseline of ``e2e_rate`` in the same run."""
    config = scratch / "no-launcher.toml"
    config.write_text("[local]\nlauncher = false\n")
    count = max(ctx.counts.e2e_jobs // 5, 20)  # about 20 jobs/s: a fifth keeps it short
    server = KbatchServer(scratch / "state-no-launcher", args=["--config", str(config)])
    server.start()
    client = server.client()
    try:
        trivial = job_spec("trivial.sh", workdir=work)

        def submit() -> str:
            return client.submit(trivial).id

        def drain(last_id: str) -> None:
            _drain(client, last_id)

        drain(sequential_rate(3, submit).last_id)  # warm up, as above
        seconds, _ = end_to_end(count, submit, drain)
        result.add(
            Metric(
                "e2e_rate_no_launcher",
                "trivial jobs run, first submit → last end, without the launcher",
                "jobs/s",
                count / seconds,
                better="higher",
                note=f"{count} jobs in {seconds:.2f} s; `[local] launcher = false`: "
                "`python -m kbatch.backends.local.supervisor` per job",
            )
        )
    finally:
        client.close()
        server.stop()


def _listing(ctx: Context, result: SectionResult, scratch: Path) -> None:
    """``kqueue`` with 1,000 and 10,000 jobs queued, and the server's memory then."""
    queued = QueuedServer.create(scratch / "queue-state", scratch / "queue-work")
    kqueue = cli_path("kqueue")
    try:
        for size in ctx.counts.list_sizes:
            queued.grow(size)
            ctx.log(f"local: kqueue with {size} jobs queued")
            command = Command(f"kqueue_{size}", [kqueue], queued.server.env(), queued.workdir)
            times = ctx.timer.time([command], runs=ctx.counts.list_runs)
            result.add(
                Metric.from_samples(
                    f"kqueue_{size}",
                    f"`kqueue`, {size:,} jobs queued",
                    "s",
                    times[command.name],
                    note=f"end to end, fresh process ({ctx.timer.method}); prints {size:,} rows",
                )
            )
            with queued.server.client() as client:
                samples = []
                for _ in range(ctx.counts.list_runs):
                    t = time.perf_counter()
                    jobs = client.list()
                    samples.append(time.perf_counter() - t)
                assert len(jobs) == size, f"listed {len(jobs)} jobs, expected {size}"
            result.add(
                Metric.from_samples(
                    f"api_list_{size}",
                    f"`Client.list()`, {size:,} jobs queued",
                    "s",
                    samples,
                    note="in-process client, warm connection: server + transfer + decoding",
                )
            )
            peak = queued.server.peak_rss_mib()
            if peak is not None:
                result.add(
                    Metric(
                        f"server_peak_rss_{size}",
                        f"server peak memory (VmHWM), {size:,} jobs queued",
                        "MiB",
                        peak,
                        note="after the listings above",
                    )
                )
        result.notes.append(
            f"The listing queues were seeded through `JobStore.insert` while the server was "
            f"stopped ({queued.seconds_seeding:.1f} s in all): one real job holds the server's "
            "only CPU (`--cpus 1`), the rest wait behind it (reasons Resources and Priority), "
            "as `squeue` shows jobs pending."
        )
    finally:
        queued.close()


def _kbatch_system(client: Client, work: Path) -> visibility.System:
    def submit(script: str, options: list[str]) -> Callable[[Path], str]:
        def run(stamp: Path) -> str:
            spec = job_spec(script, workdir=work, args=[str(stamp)], options=options)
            return client.submit(spec).id

        return run

    def cancel(job_id: str) -> None:
        client.cancel(job_id)

    def time_limit(job_id: str) -> float:
        limit = client.get(job_id).time_limit
        assert limit is not None, f"job {job_id} has no time limit"
        return float(limit)

    return visibility.System(
        name="kbatch",
        submit_sleeper=submit("sleepy.sh", []),
        submit_time_limited=submit("sleepy.sh", [f"--time={visibility.TIME_LIMIT}"]),
        submit_oom=submit("oom.sh", [f"--mem={visibility.MEMORY_LIMIT}"]),
        cancel=cancel,
        state=lambda job_id: client.get(job_id).state.value,
        time_limit=time_limit,
        look="`Client.get`, the API `kqueue` reads",
    )


def _visibility(
    ctx: Context, result: SectionResult, client: Client, work: Path, scratch: Path
) -> None:
    """Cancel, OOM kill and time limit to the end state in the API; the OOM kill again
    with the polling memory limiter (for machines without cgroups)."""
    counts = ctx.counts
    visibility.measure(
        result,
        _kbatch_system(client, work),
        work / "stamps-visibility",
        count=counts.visibility_runs,
        timeout_count=counts.visibility_runs,
        note="`kbatch server` defaults (memory_limiter auto: cgroups where it can)",
    )
    config = scratch / "polling.toml"
    config.write_text('[local]\nmemory_limiter = "polling"\n')
    polling = KbatchServer(scratch / "state-polling", args=["--config", str(config)])
    polling.start()
    try:
        (work / "stamps-polling").mkdir(parents=True, exist_ok=True)
        with polling.client() as own:
            system = _kbatch_system(own, work)
            samples = visibility.oom_latencies(
                system, counts.visibility_runs, work / "stamps-polling"
            )
    finally:
        polling.stop()
    result.add(
        Metric.from_samples(
            "polling_visible_oom",
            f"over --mem={visibility.MEMORY_LIMIT} → OUT_OF_MEMORY visible (polling limiter)",
            "s",
            samples,
            note='`memory_limiter = "polling"`: the supervisor reads the job\'s memory '
            "every tick, as where no cgroup can be made",
        )
    )


def _first_page(url: str, token: str) -> float:
    """Seconds for the first page of ``kqueue --all`` (its first request, on a new
    connection, as a fresh ``kqueue`` makes it): server, transfer and decoding."""
    parts = urlsplit(url)
    start = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    try:
        conn.request(
            "GET",
            f"{parts.path.rstrip('/')}/api/v1/jobs?all=true&limit={PAGE_SIZE}",
            headers={"Authorization": f"Bearer {token}"},
        )
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    page = msgspec.json.decode(body, type=JobList)
    seconds = time.perf_counter() - start
    assert response.status == 200 and len(page.jobs) == PAGE_SIZE and page.next, response.status
    return seconds


def _finished(ctx: Context, result: SectionResult, scratch: Path) -> None:
    """A store with 100,000 finished jobs: the server's memory, `kqueue --all`'s first page
    and the whole of it."""
    state = scratch / "finished-state"
    work = scratch / "finished-work"
    work.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    ctx.log(f"local: seeding {FINISHED:,} finished jobs")
    seconds = seed_finished_jobs(
        state, job_spec("trivial.sh", workdir=work), FINISHED, workdir=work
    )
    server = KbatchServer(state)
    server.start()
    try:
        runs = ctx.counts.list_runs
        samples = [_first_page(server.url, server.token) for _ in range(runs)]
        result.add(
            Metric.from_samples(
                f"kqueue_all_first_page_{FINISHED}",
                f"`kqueue --all`, {FINISHED:,} finished jobs: its first page ({PAGE_SIZE:,} jobs)",
                "s",
                samples,
                note="the first request `kqueue --all` makes, on a new connection: server, "
                "transfer, decoding",
            )
        )
        command = Command(
            f"kqueue_all_{FINISHED}", [cli_path("kqueue"), "--all"], server.env(), work
        )
        times = ctx.timer.time([command], runs=max(3, runs // 3))
        result.add(
            Metric.from_samples(
                f"kqueue_all_{FINISHED}",
                f"`kqueue --all`, {FINISHED:,} finished jobs, all pages",
                "s",
                times[command.name],
                note=f"end to end, fresh process ({ctx.timer.method}); prints {FINISHED:,} rows",
            )
        )
        peak = server.peak_rss_mib()
        if peak is not None:
            result.add(
                Metric(
                    f"server_peak_rss_finished_{FINISHED}",
                    f"server peak memory (VmHWM), {FINISHED:,} finished jobs in the store",
                    "MiB",
                    peak,
                    note="after the listings above",
                )
            )
        result.notes.append(
            f"The {FINISHED:,} finished jobs were seeded through `JobStore.insert_many` while "
            f"the server was stopped ({seconds:.1f} s), then marked COMPLETED."
        )
    finally:
        server.stop()
