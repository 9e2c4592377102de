"""What is compared with what, and the targets of issues 5, 13 and 17.  Pure data.

Metric references are ``section.metric[:stat]`` (see :mod:`bench.report`).
"""

from __future__ import annotations

from bench.report import Comparison, Target

__all__ = ["COMPARISONS", "TARGETS"]

COMPARISONS: list[Comparison] = [
    # 1. CLI cold start
    Comparison("`kbatch --help` vs bare `python -c pass`", "cli.kbatch_help", "cli.python_pass"),
    Comparison("`kbatch --help` vs PyPI `kbatch --help`", "cli.kbatch_help", "cli.pypi_help"),
    Comparison(
        "`kbatch submit --help` vs PyPI `kbatch job submit --help`",
        "cli.kbatch_submit_help",
        "cli.pypi_submit_help",
    ),
    Comparison("`kqueue` (1,000 jobs) vs bare `python -c pass`", "cli.kqueue", "cli.python_pass"),
    # 2./3. local backend against Slurm on the same machine
    Comparison(
        "submit rate: `kbatch submit` vs `sbatch`, one after another",
        "local.submit_rate_cli",
        "slurm.submit_rate",
    ),
    Comparison(
        "submit rate: HTTP API, one client vs `sbatch`, one after another",
        "local.submit_rate_api",
        "slurm.submit_rate",
    ),
    Comparison(
        "submit rate: HTTP API, 4 clients vs `sbatch`, 4 at once",
        "local.submit_rate_api_concurrent",
        "slurm.submit_rate_concurrent",
    ),
    Comparison(
        "submit-to-start, median: `kbatch submit` vs `sbatch`",
        "local.dispatch_cli",
        "slurm.dispatch",
    ),
    Comparison(
        "submit-to-start, p95: `kbatch submit` vs `sbatch`",
        "local.dispatch_cli:p95",
        "slurm.dispatch:p95",
    ),
    Comparison(
        "submit-to-start, median: HTTP API vs `sbatch`", "local.dispatch_api", "slurm.dispatch"
    ),
    Comparison("trivial jobs, first submit to last end", "local.e2e", "slurm.e2e"),
    Comparison(
        "trivial jobs per second: the launcher vs a new interpreter per supervisor",
        "local.e2e_rate",
        "local.e2e_rate_no_launcher",
    ),
    Comparison(
        "`kbatch submit` of a script vs bare `python -c pass`",
        "local.submit_call_cli",
        "cli.python_pass",
    ),
    Comparison("`kqueue` vs `squeue`, 1,000 jobs queued", "local.kqueue_1000", "slurm.squeue_1000"),
    Comparison(
        "`kqueue` vs `squeue`, 10,000 jobs queued", "local.kqueue_10000", "slurm.squeue_10000"
    ),
    Comparison(
        "peak memory at 10,000 jobs: kbatch server vs slurmctld",
        "local.server_peak_rss_10000",
        "slurm.slurmctld_peak_rss_10000",
    ),
    Comparison("cancel → CANCELLED visible", "local.visible_cancel", "slurm.visible_cancel"),
    Comparison("over --mem → OUT_OF_MEMORY visible", "local.visible_oom", "slurm.visible_oom"),
    Comparison("--time → TIMEOUT visible", "local.visible_timeout", "slurm.visible_timeout"),
    Comparison(
        "end of a job → start of its dependent (`afterok`), median: kbatch vs Slurm",
        "local.dependency",
        "slurm.dependency",
    ),
    # 4. Kubernetes backend against kubectl on the same control plane
    Comparison(
        "Kubernetes: submit until the Job exists vs `kubectl create`",
        "kubernetes.submit",
        "kubernetes.kubectl_create",
    ),
    # 5. code upload and fetch against tar | curl to the same server
    Comparison(
        "first upload of the tree vs `tar c | curl -T` (throughput)",
        "upload.first_upload_throughput",
        "upload.floor_throughput",
    ),
    Comparison(
        "re-upload, unchanged vs the first upload",
        "upload.reupload_unchanged",
        "upload.first_upload",
    ),
    Comparison(
        "re-upload, one file changed vs the first upload",
        "upload.reupload_one_changed",
        "upload.first_upload",
    ),
    Comparison(
        "fetch of a result vs `curl` of it (throughput)",
        "upload.fetch_throughput",
        "upload.fetch_floor_throughput",
    ),
]

TARGETS: list[Target] = [
    Target(
        "`kbatch --help` at least 6x faster than the PyPI kbatch CLI",
        kind="ratio",
        a="cli.pypi_help",
        b="cli.kbatch_help",
        op=">=",
        threshold=6,
        figure="PyPI ÷ kbatch",
    ),
    Target(
        "`kbatch --help` within 0.1 s of bare Python",
        kind="difference",
        a="cli.kbatch_help",
        b="cli.python_pass",
        op="<=",
        threshold=0.1,
        figure="kbatch - python",
    ),
    Target(
        "local submit rate better than Slurm's (HTTP API vs `sbatch`, one after another)",
        kind="ratio",
        a="local.submit_rate_api",
        b="slurm.submit_rate",
        op=">",
        threshold=1,
        figure="kbatch ÷ Slurm",
    ),
    Target(
        "local submit rate better than Slurm's (HTTP API vs `sbatch`, 4 at once)",
        kind="ratio",
        a="local.submit_rate_api_concurrent",
        b="slurm.submit_rate_concurrent",
        op=">",
        threshold=1,
        figure="kbatch ÷ Slurm",
    ),
    Target(
        "local dispatch latency better than Slurm's (median, `kbatch submit` vs `sbatch`)",
        kind="ratio",
        a="slurm.dispatch",
        b="local.dispatch_cli",
        op=">",
        threshold=1,
        figure="Slurm ÷ kbatch",
    ),
    Target(
        "local dispatch latency better than Slurm's (p95, `kbatch submit` vs `sbatch`)",
        kind="ratio",
        a="slurm.dispatch:p95",
        b="local.dispatch_cli:p95",
        op=">",
        threshold=1,
        figure="Slurm ÷ kbatch",
    ),
    Target(
        "local: end of a job → start of its dependent faster than Slurm's (median)",
        kind="ratio",
        a="local.dependency",
        b="slurm.dependency",
        op="<",
        threshold=1,
        figure="kbatch ÷ Slurm",
    ),
    Target(
        "`kbatch submit` of a script, one process end to end, at most 60 ms (issue 17)",
        kind="value",
        a="local.submit_call_cli",
        op="<=",
        threshold=0.06,
        figure="kbatch submit",
    ),
    Target(
        "`kbatch submit` of a script at most 4x bare `python -c pass` (issue 17)",
        kind="ratio",
        a="local.submit_call_cli",
        b="cli.python_pass",
        op="<=",
        threshold=4,
        figure="kbatch ÷ python",
    ),
    Target(
        "submit-to-start through the HTTP API at most 15 ms, median (issue 17)",
        kind="value",
        a="local.dispatch_api",
        op="<=",
        threshold=0.015,
        figure="submit-to-start",
    ),
    Target(
        "`kqueue` no slower than `squeue`, 10,000 jobs queued (issue 17)",
        kind="ratio",
        a="local.kqueue_10000",
        b="slurm.squeue_10000",
        op="<=",
        threshold=1,
        figure="kqueue ÷ squeue",
    ),
    Target(
        "`kqueue` with 10,000 jobs under 0.3 s end to end",
        kind="value",
        a="local.kqueue_10000",
        op="<",
        threshold=0.3,
        figure="kqueue",
    ),
    Target(
        "Kubernetes submit overhead under 20% above `kubectl create` of the same Job",
        kind="ratio",
        a="kubernetes.submit",
        b="kubernetes.kubectl_create",
        op="<=",
        threshold=1.2,
        figure="kbatch ÷ kubectl",
    ),
    Target(
        "Kubernetes: listing 10,000 Jobs under 0.5 s from the watch cache",
        kind="value",
        a="kubernetes.list_10000",
        op="<",
        threshold=0.5,
        figure="list",
    ),
    Target(
        "code upload: an unchanged tree again in under 5% of the first upload's time",
        kind="ratio",
        a="upload.reupload_unchanged",
        b="upload.first_upload",
        op="<",
        threshold=0.05,
        figure="again ÷ first",
    ),
    Target(
        "code upload: first upload at least half the throughput of `tar c | curl -T`",
        kind="ratio",
        a="upload.first_upload_throughput",
        b="upload.floor_throughput",
        op=">=",
        threshold=0.5,
        figure="upload ÷ floor",
    ),
    Target(
        "submitting a 10,000-task array no slower than Slurm (`kbatch submit` vs `sbatch`)",
        kind="ratio",
        a="slurm.array_submit",
        b="local.array_submit_cli",
        op=">=",
        threshold=1,
        figure="Slurm ÷ kbatch",
    ),
    Target(
        "submitting a 10,000-task array no slower than Slurm (HTTP API vs `sbatch`)",
        kind="ratio",
        a="slurm.array_submit",
        b="local.array_submit_api",
        op=">=",
        threshold=1,
        figure="Slurm ÷ kbatch",
    ),
    Target(
        "`kqueue` with a 10,000-task array pending no slower than `squeue`",
        kind="ratio",
        a="slurm.squeue_array_10000",
        b="local.kqueue_array_10000",
        op=">=",
        threshold=1,
        figure="Slurm ÷ kbatch",
    ),
    # Issue 17: close to the floor.
    Target(
        "HTTP API submissions, durable before the reply: 1,000/s or more from one client",
        kind="value",
        a="local.submit_rate_api",
        op=">=",
        threshold=1000,
        figure="jobs/s",
    ),
    Target(
        "HTTP API submissions, durable before the reply: 1,500/s or more from 4 clients",
        kind="value",
        a="local.submit_rate_api_concurrent",
        op=">=",
        threshold=1500,
        figure="jobs/s",
    ),
    *[
        target
        for key, what in (
            ("cancel", "cancel → CANCELLED"),
            ("oom", "OOM kill → OUT_OF_MEMORY"),
            ("timeout", "time limit → TIMEOUT"),
        )
        for target in (
            Target(
                f"{what} visible: at most a quarter of Slurm's",
                kind="ratio",
                a=f"local.visible_{key}",
                b=f"slurm.visible_{key}",
                op="<=",
                threshold=0.25,
                figure="kbatch ÷ Slurm",
            ),
            Target(
                f"{what} visible: at most 0.3 s",
                kind="value",
                a=f"local.visible_{key}",
                op="<=",
                threshold=0.3,
                figure="seconds",
            ),
        )
    ],
    Target(
        "server memory with 100,000 finished jobs in the local store at most 100 MiB",
        kind="value",
        a="local.server_peak_rss_finished_100000",
        op="<=",
        threshold=100,
        figure="MiB",
    ),
    Target(
        "`kqueue --all` through 100,000 finished jobs: first page under 0.2 s",
        kind="value",
        a="local.kqueue_all_first_page_100000",
        op="<",
        threshold=0.2,
        figure="seconds",
    ),
    Target(
        "a 1,000-task array of `true` at 100 tasks/s or more (submit → last end under 10 s)",
        kind="value",
        a="local.array_e2e_1000",
        op="<=",
        threshold=10,
        figure="seconds",
    ),
    Target(
        "Kubernetes: end of a job → start of its dependent within 1 s (median, kwok nodes)",
        kind="value",
        a="kubernetes.dependency",
        op="<=",
        threshold=1,
        figure="dependency",
    ),
]
