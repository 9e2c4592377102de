"""`make demo`: a real session on the local backend, every command shown as typed.

Starts a server in a temporary state directory, submits a Slurm script
unchanged, a job that fails, a one-liner and a job that waits for CPUs, shows
`kqueue --all` and an output file, and stops the server.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path, env: dict[str, str], check: bool = True) -> str:
    print(f"\n$ {shlex.join(args)}", flush=True)
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        check=False,
    )
    sys.stdout.write(proc.stdout)
    sys.stdout.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="kbatch-demo-"))
    work = root / "work"
    work.mkdir()
    for name in ("slurm-job.sh", "fails.sh"):
        shutil.copy(HERE / name, work / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KBATCH_", "JUPYTERHUB_"))}
    env["KBATCH_STATE_DIR"] = str(root / "state")
    env["KBATCH_CONFIG_DIR"] = str(root / "config")
    print(f"kbatch demo in {root} (a server of its own, on 1 CPU so that jobs queue)")
    try:
        run("kbatch", "server", "--background", "--cpus", "1", cwd=work, env=env)
        run("kbatch", "submit", "slurm-job.sh", cwd=work, env=env)
        run("kbatch", "submit", "fails.sh", cwd=work, env=env)
        run(
            "kbatch", "submit", "-J", "one-liner", "--wrap", "sleep 1; echo done", cwd=work, env=env
        )
        run(
            "kbatch",
            "submit",
            "-c",
            "1",
            "-t",
            "1:00",
            "--wrap",
            "echo I waited for a CPU",
            cwd=work,
            env=env,
        )
        run("kqueue", cwd=work, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            active = subprocess.run(
                [str(BIN / "kqueue"), "--json"],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            if active == "[]":
                break
            time.sleep(0.2)
        run("kqueue", "--all", cwd=work, env=env)
        out = sorted(work.glob("estimate-pi-*.out"))
        print(f"\n$ cat {out[0].name}")
        print(out[0].read_text(), end="")
        run("kbatch", "logs", "2", cwd=work, env=env)
        run("kbatch", "show", "2", cwd=work, env=env)
    finally:
        run("kbatch", "server", "stop", cwd=work, env=env, check=False)
    print(f"\nEverything the demo made is in {root}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
