"""The jobs every system runs: the same scripts for kbatch and for Slurm."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from kbatch.directives import parse_tokens
from kbatch.models import JobSpec
from kbatch.spec import build_spec

__all__ = ["SCRIPTS", "job_spec", "read_stamp", "write_scripts"]

SCRIPTS: dict[str, str] = {
    # Does nothing: submit rates and end-to-end times measure the system, not the job.
    "trivial.sh": "#!/bin/sh\ntrue\n",
    # Writes the moment it starts (seconds since the epoch, ns resolution) to $1.
    "stamp.sh": '#!/bin/sh\ndate +%s.%N > "$1"\n',
    # Runs a second, then writes the moment it ends to $1: the job others wait on.
    "ends.sh": '#!/bin/sh\nsleep 1\ndate +%s.%N > "$1"\n',
    # Holds the CPUs so that the jobs behind it stay queued for the listing figures.
    "hold.sh": "#!/bin/sh\nsleep 1800\n",
    # Writes the moment it starts to $1, then sleeps (exec: the sleep is the job's process):
    # cancelled, or stopped by its time limit (bench.visibility).
    "sleepy.sh": '#!/bin/sh\ndate +%s.%N > "$1"\nexec sleep 600\n',
    # Writes the moment before it allocates to $1, then maps memory 8 MiB at a time, the
    # kernel filling each map at once (MAP_POPULATE: no page fault per page), until it is
    # killed for going over its memory limit (bench.visibility); 2 GiB at most.
    "oom.sh": (
        "#!/bin/sh\nexec python3 -c 'import mmap, sys, time\n"
        'open(sys.argv[1], "w").write(repr(time.time()))\n'
        "flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE\n"
        "hog = []\n"
        "while len(hog) < 256:  # 2 GiB at most, should nothing enforce the limit\n"
        "    hog.append(mmap.mmap(-1, 8 << 20, flags=flags))\n"
        "time.sleep(600)\n"
        '\' "$1"\n'
    ),
}


def write_scripts(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in SCRIPTS.items():
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)
        paths[name] = path
    return paths


def job_spec(
    script: str,
    *,
    workdir: Path,
    args: list[str] | None = None,
    options: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobSpec:
    """The spec ``kbatch submit OPTIONS SCRIPT ARGS`` would send from ``workdir``.

    Made by the CLI's own code, so API submissions carry what CLI ones do
    (the environment captured at submit time included).
    """
    return build_spec(
        SCRIPTS[script],
        cli=parse_tokens(options or []),
        args=args or [],
        cwd=str(workdir),
        environ=os.environ if environ is None else environ,
        default_name=script,
    ).spec


def read_stamp(path: Path) -> float | None:
    """The start time a ``stamp.sh`` job wrote, once it is there."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return float(text) if text else None
    except ValueError:
        return None
