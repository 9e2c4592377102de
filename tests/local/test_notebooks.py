"""Notebooks as jobs end to end: a real server, real job processes, a real python3 kernel.

The job's ``python3`` is the test venv's (first on the PATH the job inherits, as
in an activated environment): it has papermill and ipykernel's ``python3`` kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from kbatch.models import JobState
from tests.support.polling import wait_for
from tests.support.servers import CliResult, KbatchServer

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module", autouse=True)
def python3_kernel() -> None:
    """ipykernel's wheel installs the python3 kernelspec into the venv; make sure of it."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--sys-prefix"],
            check=True,
            capture_output=True,
        )


def job_env(**extra: str) -> dict[str, str]:
    return {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", **extra}


def code(source: str, *tags: str) -> dict[str, Any]:
    cell: dict[str, Any] = {
        "cell_type": "code",
        "metadata": {"tags": list(tags)} if tags else {},
        "source": source,
        "outputs": [],
        "execution_count": None,
    }
    return cell


def write_notebook(path: Path, *cells: dict[str, Any], kernel: str = "python3") -> Path:
    path.write_text(
        json.dumps(
            {
                "nbformat": 4,
                "nbformat_minor": 5,
                "metadata": {
                    "kernelspec": {"name": kernel, "language": "python", "display_name": kernel}
                },
                "cells": [
                    {"cell_type": "markdown", "metadata": {}, "source": "# An analysis"},
                    *cells,
                ],
            }
        )
    )
    return path


PARAMETERS = code(
    "count = 1\nratio = 0.5\nverbose = False\nlabel = 'default'\nmissing = 'set'\n", "parameters"
)
SHOW = code("print(repr(count), repr(ratio), repr(verbose), repr(label), repr(missing))")


def submit(server: KbatchServer, workdir: Path, *args: str, **env: str) -> CliResult:
    return server.cli("submit", "--parsable", *args, cwd=workdir, env=job_env(**env))


def stream_text(nb: dict[str, Any]) -> str:
    return "".join(
        "".join(o.get("text", ""))
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c["outputs"]
        if o["output_type"] == "stream"
    )


def test_notebook_runs_with_typed_parameters(server: KbatchServer, workdir: Path) -> None:
    write_notebook(workdir / "analysis.ipynb", PARAMETERS, SHOW, code("count * 2"))
    result = submit(
        server,
        workdir,
        "-p",  # before the notebook: Slurm's --partition, ignored
        "gpu",
        "analysis.ipynb",
        "-p",
        "count",
        "7",
        "-p",
        "ratio",
        "1.5e-3",
        "-p",
        "verbose",
        "True",
        "-p",
        "label",
        "two words",
        "-p",
        "missing",
        "None",
    )
    assert result.returncode == 0, result.stderr
    assert "ignoring -p gpu" in result.stderr
    job_id = result.stdout.strip()
    job = server.wait_state(job_id, timeout=120)
    log = (workdir / f"kbatch-{job_id}.out").read_text()
    assert job.state is JobState.COMPLETED and job.exit_code == 0, log
    assert job.name == "analysis.ipynb"
    executed = json.loads((workdir / f"analysis-{job_id}.ipynb").read_text())
    assert stream_text(executed) == "7 0.0015 True 'two words' None\n"
    last = executed["cells"][-1]["outputs"][0]
    assert "".join(last["data"]["text/plain"]) == "14"
    injected = [
        c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])
    ]
    assert len(injected) == 1 and "count = 7" in "".join(injected[0]["source"])
    # the log: cell-by-cell progress, numbered as in the submitted notebook, and the output
    assert "kbatch: cell 2/4 started" in log
    assert "kbatch: injected parameters finished" in log
    assert "kbatch: cell 3/4 finished in" in log
    assert "7 0.0015 True 'two words' None\n" in log
    assert (
        f"analysis.ipynb completed; the executed notebook is {workdir}/analysis-{job_id}.ipynb"
        in log
    )


def test_params_yaml_and_nb_output(server: KbatchServer, workdir: Path) -> None:
    write_notebook(workdir / "nb.ipynb", PARAMETERS, SHOW)
    (workdir / "params.yaml").write_text(
        "count: 3\nratio: 2.5\nverbose: true\nlabel: from yaml\nmissing: null\n"
    )
    (workdir / "runs").mkdir()
    result = submit(
        server,
        workdir,
        "-J",
        "sweep",
        "nb.ipynb",
        "--params-yaml",
        "params.yaml",
        "-p",
        "count",
        "4",  # the command line overrides the file
        "--nb-output",
        "runs/%x-%j.ipynb",
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    job = server.wait_state(job_id, timeout=120)
    assert job.state is JobState.COMPLETED, (workdir / f"kbatch-{job_id}.out").read_text()
    executed = json.loads((workdir / "runs" / f"sweep-{job_id}.ipynb").read_text())
    assert stream_text(executed) == "4 2.5 True 'from yaml' None\n"


def test_raising_cell_fails_the_job(server: KbatchServer, workdir: Path) -> None:
    write_notebook(
        workdir / "bad.ipynb",
        code("print('before')"),
        code("x = {}\nx['missing_key']"),
        code("print('never reached')"),
    )
    job_id = submit(server, workdir, "bad.ipynb").stdout.strip()
    job = server.wait_state(job_id, timeout=120)
    log = (workdir / f"kbatch-{job_id}.out").read_text()
    assert job.state is JobState.FAILED and job.exit_code == 1, log
    # kbatch show names the failing cell, as the log does
    assert job.reason == (
        "NonZeroExitCode: bad.ipynb failed at cell 3 (In [2]): KeyError: 'missing_key'"
    )
    assert "kbatch: cell 3/4 FAILED after" in log
    assert "kbatch: bad.ipynb failed at cell 3 (In [2]): KeyError: 'missing_key'" in log
    assert "x['missing_key']" in log  # the traceback, without colours
    assert "\x1b[" not in log
    assert "never reached" not in log
    partial = json.loads((workdir / f"bad-{job_id}.ipynb").read_text())
    assert f"partial executed notebook is {workdir}/bad-{job_id}.ipynb" in log
    errors = [o["ename"] for c in partial["cells"] for o in c.get("outputs", []) if "ename" in o]
    assert errors == ["KeyError"]
    assert stream_text(partial) == "before\n"
    shown = server.cli("show", job_id)
    assert "FAILED" in shown.stdout and "failed at cell 3 (In [2])" in shown.stdout


def test_missing_kernel_fails_at_once(server: KbatchServer, workdir: Path) -> None:
    write_notebook(workdir / "r.ipynb", code("1"), kernel="no-such-kernel")
    job_id = submit(server, workdir, "r.ipynb").stdout.strip()
    job = server.wait_state(job_id, timeout=60)
    log = (workdir / f"kbatch-{job_id}.out").read_text()
    assert job.state is JobState.FAILED and job.exit_code == 2, log
    assert "the notebook's kernel 'no-such-kernel' is not installed where the job runs" in log
    assert "installed kernels: " in log and "python3" in log
    assert job.started and job.finished
    assert (job.finished - job.started).total_seconds() < 20
    assert not (workdir / f"r-{job_id}.ipynb").exists()
    # --kernel picks one that is there
    job_id = submit(server, workdir, "r.ipynb", "--kernel", "python3").stdout.strip()
    assert server.wait_state(job_id, timeout=120).state is JobState.COMPLETED


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"cells": [', "is not a notebook: it is not valid JSON"),
        ('{"nbformat": 3, "worksheets": []}', "is nbformat 3; only nbformat 4 notebooks run"),
        ("[1, 2]", "is not a notebook: it has no cells"),
    ],
)
def test_not_a_notebook_is_refused(
    server: KbatchServer, workdir: Path, content: str, message: str
) -> None:
    (workdir / "broken.ipynb").write_text(content)
    result = submit(server, workdir, "broken.ipynb")
    assert result.returncode != 0
    assert message in result.stderr
    assert server.cli("queue", "--all", "--json").stdout.strip() == "[]"


def test_unknown_parameter_is_refused(server: KbatchServer, workdir: Path) -> None:
    write_notebook(workdir / "nb.ipynb", PARAMETERS, SHOW)
    result = submit(server, workdir, "nb.ipynb", "-p", "cuont", "3")
    assert result.returncode != 0
    assert (
        "unknown parameter 'cuont' for nb.ipynb: its parameters cell assigns "
        "count, ratio, verbose, label, missing" in result.stderr
    )
    write_notebook(workdir / "plain.ipynb", SHOW)
    result = submit(server, workdir, "plain.ipynb", "-p", "count", "3")
    assert result.returncode != 0
    assert "plain.ipynb has no cell tagged 'parameters'" in result.stderr
    result = submit(server, workdir, "nb.ipynb", "--mem", "1G")
    assert result.returncode != 0
    assert "give job options such as --mem before the notebook" in result.stderr
    assert server.cli("queue", "--all", "--json").stdout.strip() == "[]"
    assert sorted(p.name for p in workdir.iterdir()) == ["nb.ipynb", "plain.ipynb"]


def test_logs_follow_shows_cells_as_they_run(server: KbatchServer, workdir: Path) -> None:
    follower_lines: list[str] = []
    write_notebook(
        workdir / "slow.ipynb",
        code("print('first cell output', flush=True)"),
        code(
            "import os, time\n"
            "deadline = time.monotonic() + 60\n"
            "while not os.path.exists('go') and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "print('released')"
        ),
        code("print('last')"),
    )
    job_id = submit(server, workdir, "slow.ipynb").stdout.strip()
    follower = subprocess.Popen(
        [str(VENV_BIN / "kbatch"), "logs", "-f", job_id],
        env=server.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert follower.stdout is not None
    stdout = follower.stdout

    def read() -> None:
        for line in stdout:
            follower_lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(
            lambda: any("kbatch: cell 3/4 started" in line for line in follower_lines),
            timeout=120,
            what="the second code cell to start in the followed log",
        )
        seen = "".join(follower_lines)
        assert "kbatch: cell 2/4 finished in" in seen
        assert "first cell output\n" in seen
        assert "released" not in seen
        with server.client() as client:
            assert client.get(job_id).state is JobState.RUNNING
        (workdir / "go").touch()
        assert follower.wait(timeout=60) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    reader.join(timeout=10)
    seen = "".join(follower_lines)
    assert seen.index("released") < seen.index("kbatch: cell 3/4 finished in")
    assert seen.index("kbatch: cell 4/4 started") < seen.index("last\n")
    assert server.wait_state(job_id).state is JobState.COMPLETED


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


SLEEPER = code("import os, time\nopen('kernel.pid', 'w').write(str(os.getpid()))\ntime.sleep(300)")


def kernel_pid(workdir: Path) -> int:
    text = wait_for(
        lambda: (workdir / "kernel.pid").exists() and (workdir / "kernel.pid").read_text(),
        timeout=120,
        what="the kernel to start",
    )
    return int(text)


def test_cancel_ends_the_kernel_too(server: KbatchServer, workdir: Path) -> None:
    write_notebook(workdir / "long.ipynb", SLEEPER)
    job_id = submit(server, workdir, "long.ipynb").stdout.strip()
    pid = kernel_pid(workdir)  # jupyter_client starts it in a session of its own
    assert server.cli("cancel", job_id).returncode == 0
    job = server.wait_state(job_id, timeout=60)
    assert job.state is JobState.CANCELLED
    wait_for(lambda: pid_gone(pid), timeout=10, what=f"the kernel {pid} to end")
    assert (workdir / f"long-{job_id}.ipynb").exists()  # saved when the cell started


def test_time_limit_gives_timeout_and_ends_the_kernel(server: KbatchServer, workdir: Path) -> None:
    write_notebook(workdir / "long.ipynb", SLEEPER)
    job_id = submit(server, workdir, "--time=0:15", "long.ipynb").stdout.strip()
    pid = kernel_pid(workdir)
    job = server.wait_state(job_id, timeout=60)
    assert (job.state, job.reason) == (JobState.TIMEOUT, "TimeLimit")
    wait_for(lambda: pid_gone(pid), timeout=10, what=f"the kernel {pid} to end")


def test_memory_limit_counts_the_kernel(server: KbatchServer, workdir: Path) -> None:
    write_notebook(
        workdir / "big.ipynb",
        code("import time\nx = bytearray(400 * 1024 * 1024)\ntime.sleep(30)"),
    )
    job_id = submit(server, workdir, "--mem=150M", "big.ipynb").stdout.strip()
    job = server.wait_state(job_id, timeout=120)
    started = json.loads((server.state_dir / "jobs" / job_id / "started.json").read_text())
    log = (workdir / f"kbatch-{job_id}.out").read_text()
    if started["limiter"] == "polling":
        # The kernel runs in a session of its own (jupyter_client does that), outside the
        # job's process group that the polling limiter sums: only a cgroup counts it.
        pytest.xfail("known gap: without cgroups a notebook's kernel escapes --mem")
    assert job.state is JobState.OUT_OF_MEMORY, log


def test_a_sweep_over_a_csv_runs_one_notebook_per_row(server: KbatchServer, workdir: Path) -> None:
    write_notebook(workdir / "sweep.ipynb", PARAMETERS, SHOW)
    (workdir / "grid.csv").write_text("count,label\n1,first\n2,second row\n3,None\n")
    result = submit(server, workdir, "--params", "grid.csv", "sweep.ipynb", "-p", "ratio", "2.5")
    assert result.returncode == 0, result.stderr
    array_id = result.stdout.strip()
    job = server.wait_state(array_id, timeout=180)
    assert job.state is JobState.COMPLETED, [
        (workdir / f"kbatch-{array_id}_{i}.out").read_text() for i in range(3)
    ]
    assert job.array_counts == {"COMPLETED": 3}
    shown = []
    for index in range(3):
        executed = json.loads((workdir / f"sweep-{array_id}_{index}.ipynb").read_text())
        shown.append(stream_text(executed))
    assert shown == [
        "1 2.5 False 'first' 'set'\n",
        "2 2.5 False 'second row' 'set'\n",
        "3 2.5 False None 'set'\n",  # typed as -p types values
    ]


def test_a_sweep_column_the_notebook_does_not_take_is_refused(
    server: KbatchServer, workdir: Path
) -> None:
    write_notebook(workdir / "sweep.ipynb", PARAMETERS, SHOW)
    (workdir / "grid.csv").write_text("count,colour\n1,red\n")
    result = submit(server, workdir, "--params", "grid.csv", "sweep.ipynb")
    assert result.returncode != 0
    assert "column 'colour' is not a parameter of sweep.ipynb" in result.stderr
    assert json.loads(server.cli("queue", "--all", "--json").stdout) == []
