"""Timing whole commands in fresh processes: hyperfine when there is one, else perf_counter.

Each command is timed in ``rounds`` rounds that alternate between the
commands, so a change of machine load during the run hits every command
alike rather than only the last one measured.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.apt import AptError, apt_install

__all__ = ["Command", "CommandFailed", "CommandTimer", "find_hyperfine"]


class CommandFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Command:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: Path | None = None


def find_hyperfine(install: bool, log: Callable[[str], None]) -> tuple[str | None, str]:
    """The path of ``hyperfine`` (installing it from Debian if allowed) and a note on it."""
    path = shutil.which("hyperfine")
    if path is None and install:
        try:
            apt_install(["hyperfine"], log)
        except AptError as exc:
            return None, f"hyperfine unavailable ({exc}); timing with time.perf_counter"
        path = shutil.which("hyperfine")
    if path is None:
        return None, "hyperfine not installed; timing with time.perf_counter"
    version = subprocess.run(
        [path, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return path, version or "hyperfine"


class CommandTimer:
    def __init__(self, hyperfine: str | None) -> None:
        self.hyperfine = hyperfine

    @property
    def method(self) -> str:
        return "hyperfine" if self.hyperfine else "time.perf_counter"

    def time(
        self, commands: Sequence[Command], *, runs: int, warmup: int = 2, rounds: int = 3
    ) -> dict[str, list[float]]:
        """Wall-clock seconds of ``runs`` fresh runs of each command (output discarded)."""
        for command in commands:
            self.check(command)
        rounds = max(1, min(rounds, runs))
        per_round = [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]
        times: dict[str, list[float]] = {c.name: [] for c in commands}
        for count in per_round:
            for command in commands:
                times[command.name] += self._time_one(command, count, warmup)
        return times

    def check(self, command: Command) -> None:
        """Run it once: it must succeed, or the timings would be of an error message."""
        result = subprocess.run(
            list(command.argv),
            env=None if command.env is None else dict(command.env),
            cwd=command.cwd,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if result.returncode != 0:
            tail = " / ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise CommandFailed(f"{shlex.join(command.argv)} exited {result.returncode}: {tail}")

    def _time_one(self, command: Command, runs: int, warmup: int) -> list[float]:
        if self.hyperfine is None:
            return _perf_counter(command, runs, warmup)
        with tempfile.TemporaryDirectory(prefix="kbatch-bench-hf-") as tmp:
            export = Path(tmp) / "result.json"
            argv = [
                self.hyperfine,
                "--shell=none",
                "--style=none",
                "--output=null",
                f"--warmup={warmup}",
                f"--runs={runs}",
                f"--export-json={export}",
                "--command-name",
                command.name,
                shlex.join(command.argv),
            ]
            result = subprocess.run(
                argv,
                env=None if command.env is None else dict(command.env),
                cwd=command.cwd,
                capture_output=True,
                text=True,
                check=False,
                timeout=1800,
            )
            if result.returncode != 0:
                raise CommandFailed(f"hyperfine {command.name}: {result.stderr.strip()[-500:]}")
            data = json.loads(export.read_text())
        return [float(t) for t in data["results"][0]["times"]]


def _perf_counter(command: Command, runs: int, warmup: int) -> list[float]:
    env = None if command.env is None else dict(command.env)
    times: list[float] = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        code = subprocess.call(
            list(command.argv),
            env=env,
            cwd=command.cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        elapsed = time.perf_counter() - start
        if code != 0:
            raise CommandFailed(f"{shlex.join(command.argv)} exited {code}")
        if i >= warmup:
            times.append(elapsed)
    return times
