"""Part 1: CLI cold start against PyPI's kbatch and bare Python, in fresh processes."""

from __future__ import annotations

import sys

from bench.context import Context
from bench.kbatch_server import QueuedServer, cli_path
from bench.pypi import PypiUnavailable, pypi_kbatch
from bench.report import Metric, SectionResult
from bench.timing import Command

__all__ = ["TITLE", "run"]

TITLE = "1. CLI cold start"
QUEUE_SIZE = 1000


def run(ctx: Context, result: SectionResult) -> None:
    scratch = ctx.scratch / "cli"
    kbatch, kqueue = cli_path("kbatch"), cli_path("kqueue")
    labels = {
        "python_pass": ("`python -c pass` (the floor)", "the same interpreter as kbatch's"),
        "kbatch_help": ("`kbatch --help`", ""),
        "kbatch_submit_help": ("`kbatch submit --help`", ""),
        "kqueue": (
            f"`kqueue`, {QUEUE_SIZE:,} jobs queued",
            f"against a running local server; prints {QUEUE_SIZE:,} rows",
        ),
        "pypi_help": ("PyPI `kbatch --help`", "its own virtual environment"),
        "pypi_submit_help": ("PyPI `kbatch job submit --help`", "its submit command"),
    }
    queued = QueuedServer.create(scratch / "state", scratch / "work")
    try:
        queued.grow(QUEUE_SIZE)
        env, cwd = queued.server.env(), queued.workdir
        commands = [
            Command("python_pass", [sys.executable, "-c", "pass"], env, cwd),
            Command("kbatch_help", [kbatch, "--help"], env, cwd),
            Command("kbatch_submit_help", [kbatch, "submit", "--help"], env, cwd),
            Command("kqueue", [kqueue], env, cwd),
        ]
        try:
            pypi = pypi_kbatch(ctx.cache, install=ctx.install, log=ctx.log)
        except PypiUnavailable as exc:
            result.failed_step("the PyPI kbatch CLI", exc, "pypi_help", "pypi_submit_help")
        else:
            ctx.tools["PyPI kbatch"] = pypi.version
            result.details["PyPI kbatch"] = f"{pypi.version} in {pypi.venv}"
            commands += [
                Command("pypi_help", [pypi.kbatch, "--help"], env, cwd),
                Command("pypi_submit_help", [pypi.kbatch, "job", "submit", "--help"], env, cwd),
            ]
        ctx.log(f"timing {len(commands)} commands, {ctx.counts.cli_runs} runs each")
        times = ctx.timer.time(commands, runs=ctx.counts.cli_runs)
    finally:
        queued.close()
    result.details["timing"] = (
        f"{ctx.timer.method}, {ctx.counts.cli_runs} fresh processes per command in 3 "
        "alternating rounds, 2 warm-up runs per round, output discarded"
    )
    for key, samples in times.items():
        label, note = labels[key]
        result.add(Metric.from_samples(key, label, "s", samples, note=note))
