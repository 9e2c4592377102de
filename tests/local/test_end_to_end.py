"""The local backend end to end: a real server process, real job processes, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kbatch.models import JobState
from tests.support.polling import wait_for, wait_for_file
from tests.support.servers import KbatchServer


def submit(server: KbatchServer, *args: str, cwd: Path) -> str:
    result = server.cli("submit", "--parsable", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(body)
    return path


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def test_submit_run_and_report(server: KbatchServer, workdir: Path) -> None:
    write_script(workdir, "hello.sh", '#!/bin/bash\necho "hello $1 from $SLURM_JOB_ID in $PWD"\n')
    result = server.cli("submit", "hello.sh", "world", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Submitted batch job ")
    job_id = result.stdout.split()[-1]
    job = server.wait_state(job_id)
    assert job.state is JobState.COMPLETED and job.exit_code == 0
    assert job.name == "hello.sh"
    out = workdir / f"kbatch-{job_id}.out"
    assert out.read_text() == f"hello world from {job_id} in {workdir}\n"

    listing = server.cli("queue", "--all", "--json")
    jobs = json.loads(listing.stdout)
    assert [j["id"] for j in jobs] == [job_id]
    for key in ("id", "name", "state", "exit_code", "reason", "submitted", "started", "finished"):
        assert key in jobs[0]
    assert jobs[0]["state"] == "COMPLETED"
    # finished jobs leave the default listing, as in squeue
    assert server.cli("queue", "--json").stdout.strip() == "[]"
    table = server.cli("queue", "-a", program="kbatch").stdout.splitlines()
    assert table[0].split() == ["JOBID", "NAME", "STATE", "TIME", "REASON"]
    kqueue = server.cli("-a", program="kqueue")
    assert kqueue.returncode == 0 and "COMPLETED" in kqueue.stdout


def test_sbatch_script_runs_unchanged(server: KbatchServer, workdir: Path) -> None:
    (workdir / "logs").mkdir()
    write_script(
        workdir,
        "slurm.sh",
        "#!/bin/bash\n"
        "#SBATCH --job-name=analysis\n"
        "#SBATCH --partition=standard\n"
        "#SBATCH --time=00:05:00\n"
        "#SBATCH --mem=200M\n"
        "#SBATCH --cpus-per-task=2\n"
        "#SBATCH --output=logs/%x-%j.out\n"
        "#SBATCH --error=logs/%x-%j.err\n"
        "echo cpus=$SLURM_CPUS_PER_TASK\n"
        "echo oops >&2\n",
    )
    result = server.cli("submit", "slurm.sh", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "ignoring --partition=standard (line 3)" in result.stderr
    job_id = result.stdout.split()[-1]
    job = server.wait_state(job_id)
    assert job.state is JobState.COMPLETED
    assert (job.name, job.cpus, job.memory, job.time_limit) == ("analysis", 2, 200 * 1024**2, 300)
    assert (workdir / f"logs/analysis-{job_id}.out").read_text() == "cpus=2\n"
    assert (workdir / f"logs/analysis-{job_id}.err").read_text() == "oops\n"


def test_failure_states_are_distinct(server: KbatchServer, workdir: Path) -> None:
    failed = submit(server, "--wrap", "echo partial; exit 3", cwd=workdir)
    killed = submit(server, "--wrap", "kill -9 $$", cwd=workdir)
    assert server.wait_state(failed).state is JobState.FAILED
    job = server.wait_state(failed)
    assert (job.exit_code, job.reason) == (3, "NonZeroExitCode")
    job = server.wait_state(killed)
    assert job.state is JobState.FAILED
    assert job.exit_code == 128 + 9 and job.reason == "Signal 9 (SIGKILL)"


def test_time_limit_gives_timeout(server: KbatchServer, workdir: Path) -> None:
    job_id = submit(server, "--time=0:02", "--wrap", "echo started; sleep 60", cwd=workdir)
    job = server.wait_state(job_id, timeout=30)
    assert job.state is JobState.TIMEOUT
    assert job.reason == "TimeLimit"
    assert job.started and job.finished
    assert 1.5 < (job.finished - job.started).total_seconds() < 20


OOM = "python3 -c 'import time; x = bytearray(400 * 1024 * 1024); time.sleep(30)'"


def test_memory_limit_gives_out_of_memory(server: KbatchServer, workdir: Path) -> None:
    job_id = submit(server, "--mem=64M", "--wrap", OOM, cwd=workdir)
    job = server.wait_state(job_id, timeout=30)
    assert job.state is JobState.OUT_OF_MEMORY, (
        job,
        (workdir / f"kbatch-{job_id}.out").read_text(),
    )
    within = submit(
        server, "--mem=64M", "--wrap", "python3 -c 'x = bytearray(8 * 1024 * 1024)'", cwd=workdir
    )
    assert server.wait_state(within).state is JobState.COMPLETED


def test_memory_limit_without_cgroups(make_server, workdir: Path) -> None:
    """The fallback for machines without a writable cgroup: watching the processes."""
    server = make_server(memory_limiter="polling")
    job_id = submit(server, "--mem=64M", "--wrap", OOM, cwd=workdir)
    job = server.wait_state(job_id, timeout=30)
    assert job.state is JobState.OUT_OF_MEMORY
    started = json.loads((server.state_dir / "jobs" / job_id / "started.json").read_text())
    assert started["limiter"] == "polling"


def test_cancel_stops_the_job_and_its_children(server: KbatchServer, workdir: Path) -> None:
    write_script(
        workdir,
        "tree.sh",
        "#!/bin/bash\n"
        "sleep 300 & echo $! >> pids\n"
        "bash -c 'sleep 300 & echo $! >> pids; wait' & echo $! >> pids\n"
        "echo $$ >> pids\n"
        "wait\n",
    )
    job_id = submit(server, "tree.sh", cwd=workdir)
    pids = wait_for(
        lambda: (
            [int(p) for p in (workdir / "pids").read_text().split()]
            if (workdir / "pids").exists() and len((workdir / "pids").read_text().split()) == 4
            else None
        ),
        what="the job's processes",
    )
    assert all(pid_alive(p) for p in pids)
    result = server.cli("cancel", job_id)
    assert result.returncode == 0, result.stderr
    job = server.wait_state(job_id)
    assert job.state is JobState.CANCELLED
    wait_for(
        lambda: not any(pid_alive(p) for p in pids),
        timeout=10,
        what="every process of the job to end",
    )


def test_cancel_escalates_to_sigkill(server: KbatchServer, workdir: Path) -> None:
    write_script(
        workdir,
        "stubborn.sh",
        "#!/bin/bash\ntrap '' TERM\necho $$ > pid\nwhile true; do sleep 0.1; done\n",
    )
    job_id = submit(server, "stubborn.sh", cwd=workdir)
    pid = int(wait_for_file(workdir / "pid"))
    server.cli("cancel", job_id)
    job = server.wait_state(job_id, timeout=20)
    assert job.state is JobState.CANCELLED
    assert not pid_alive(pid)


def test_cancel_pending_job(make_server, workdir: Path) -> None:
    server = make_server(cpus=1)
    running = submit(server, "--wrap", "sleep 30", cwd=workdir)
    pending = submit(server, "--wrap", "echo never", cwd=workdir)
    assert server.wait_state(pending, JobState.PENDING).reason == "Resources"
    assert server.cli("cancel", pending).returncode == 0
    job = server.wait_state(pending)
    assert job.state is JobState.CANCELLED and job.started is None
    server.cli("cancel", running)
    assert server.wait_state(running).state is JobState.CANCELLED
    assert not (workdir / f"kbatch-{pending}.out").exists()


def test_queueing_when_cpus_are_full(server: KbatchServer, workdir: Path) -> None:
    # the server has 2 CPUs: a 2-CPU job, then two 1-CPU jobs that must wait, in order
    (workdir / "go").write_text("")
    first = submit(server, "-c", "2", "--wrap", "while [ -e go ]; do sleep 0.05; done", cwd=workdir)
    second = submit(server, "-c", "1", "--wrap", "date +%s.%N > second", cwd=workdir)
    third = submit(server, "-c", "1", "--wrap", "date +%s.%N > third", cwd=workdir)
    server.wait_state(first, JobState.RUNNING)
    job = server.wait_state(second, JobState.PENDING)
    assert job.reason == "Resources"
    table = server.cli("queue").stdout
    assert "Resources" in table
    (workdir / "go").unlink()
    assert server.wait_state(second).state is JobState.COMPLETED
    assert server.wait_state(third).state is JobState.COMPLETED
    jobs = {j.id: j for j in server.client().list(include_finished=True)}
    assert jobs[second].started >= jobs[first].finished  # type: ignore[operator]


def test_strict_submission_order(make_server, workdir: Path) -> None:
    """A small job does not overtake a big one that waits for resources."""
    server = make_server(cpus=2)
    (workdir / "go").write_text("")
    blocker = submit(
        server, "-c", "1", "--wrap", "while [ -e go ]; do sleep 0.05; done", cwd=workdir
    )
    big = submit(server, "-c", "2", "--wrap", "true", cwd=workdir)
    small = submit(server, "-c", "1", "--wrap", "true", cwd=workdir)
    assert server.wait_state(big, JobState.PENDING).reason == "Resources"
    assert server.wait_state(small, JobState.PENDING).reason == "Priority"
    (workdir / "go").unlink()
    for job_id in (blocker, big, small):
        assert server.wait_state(job_id).state is JobState.COMPLETED
    jobs = {j.id: j for j in server.client().list(include_finished=True)}
    assert jobs[small].started >= jobs[big].started


def test_job_survives_the_submitting_session(server: KbatchServer, workdir: Path) -> None:
    """Killing the whole session of the shell that ran kbatch submit leaves the job alone."""
    kbatch = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "kbatch"
    import sys

    kbatch = Path(sys.executable).with_name("kbatch")
    shell = subprocess.Popen(
        [
            "bash",
            "-c",
            f"{kbatch} submit --parsable --wrap 'sleep 2; echo survived' > id; sleep 300",
        ],
        cwd=workdir,
        env=server.env(),
        start_new_session=True,
    )
    job_id = wait_for_file(workdir / "id")
    server.wait_state(job_id, JobState.RUNNING)
    os.killpg(shell.pid, signal.SIGKILL)  # the terminal, its shell and everything in its group
    shell.wait()
    job = server.wait_state(job_id, timeout=30)
    assert job.state is JobState.COMPLETED
    assert (workdir / f"kbatch-{job_id}.out").read_text() == "survived\n"


def test_server_kill9_and_restart_loses_nothing(server: KbatchServer, workdir: Path) -> None:
    (workdir / "go").write_text("")
    quick = submit(server, "--wrap", "sleep 1; exit 7", cwd=workdir)
    slow = submit(
        server, "--wrap", "while [ -e go ]; do sleep 0.05; done; echo slow done", cwd=workdir
    )
    server.wait_state(quick, JobState.RUNNING)
    server.wait_state(slow, JobState.RUNNING)
    server.kill9()
    # while the server is down, one job ends
    wait_for(
        lambda: (server.state_dir / "jobs" / quick / "result.json").exists(),
        what="quick job to end",
    )
    server.start()
    job = server.wait_state(quick)
    assert (job.state, job.exit_code) == (JobState.FAILED, 7)
    assert server.client().get(slow).state is JobState.RUNNING  # still tracked
    (workdir / "go").unlink()
    job = server.wait_state(slow)
    assert job.state is JobState.COMPLETED
    assert (workdir / f"kbatch-{slow}.out").read_text() == "slow done\n"
    # and the server takes new work
    assert (
        server.wait_state(submit(server, "--wrap", "true", cwd=workdir)).state is JobState.COMPLETED
    )


def test_supervisor_death_is_node_fail_not_completed(server: KbatchServer, workdir: Path) -> None:
    write_script(workdir, "long.sh", "#!/bin/bash\necho $$ > pid\nsleep 300\n")
    job_id = submit(server, "long.sh", cwd=workdir)
    pid = int(wait_for_file(workdir / "pid"))
    supervisor = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # ppid
    os.kill(supervisor, signal.SIGKILL)
    job = server.wait_state(job_id, timeout=30)
    assert job.state is JobState.NODE_FAIL
    assert "SupervisorLost" in (job.reason or "")
    wait_for(lambda: not pid_alive(pid), what="the orphaned job to be stopped")


def test_logs_and_follow(server: KbatchServer, workdir: Path) -> None:
    (workdir / "go").write_text("")
    job_id = submit(
        server, "--wrap", "echo one; while [ -e go ]; do sleep 0.05; done; echo two", cwd=workdir
    )
    wait_for(lambda: server.cli("logs", job_id).stdout == "one\n", what="first line")
    follower = subprocess.Popen(
        [str(Path(__import__("sys").executable).with_name("kbatch")), "logs", "-f", job_id],
        env=server.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)  # let the follower attach before the job ends (any order passes)
    assert follower.poll() is None  # following a running job does not return
    (workdir / "go").unlink()
    out, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0
    assert out == "one\ntwo\n"


def test_environment_is_captured_at_submit_time(server: KbatchServer, workdir: Path) -> None:
    env_job = server.cli(
        "submit",
        "--parsable",
        "--wrap",
        "echo $MY_VAR $OTHER",
        cwd=workdir,
        env={"MY_VAR": "captured", "OTHER": "x"},
    ).stdout.strip()
    none_job = server.cli(
        "submit",
        "--parsable",
        "--export=NONE,ONLY=1",
        "--wrap",
        "echo [$MY_VAR] [$ONLY]",
        cwd=workdir,
        env={"MY_VAR": "captured"},
    ).stdout.strip()
    server.wait_state(env_job)
    server.wait_state(none_job)
    assert (workdir / f"kbatch-{env_job}.out").read_text() == "captured x\n"
    assert (workdir / f"kbatch-{none_job}.out").read_text() == "[] [1]\n"


def test_chdir_and_output_patterns(server: KbatchServer, workdir: Path) -> None:
    (workdir / "sub").mkdir()
    job_id = submit(
        server, "-D", "sub", "-J", "named", "-o", "%x_%4j.log", "--wrap", "pwd", cwd=workdir
    )
    server.wait_state(job_id)
    assert (workdir / "sub" / f"named_{job_id.zfill(4)}.log").read_text() == f"{workdir / 'sub'}\n"


def test_output_is_written_as_the_job_runs(server: KbatchServer, workdir: Path) -> None:
    (workdir / "go").write_text("")
    job_id = submit(
        server, "--wrap", "echo early; while [ -e go ]; do sleep 0.05; done", cwd=workdir
    )
    out = workdir / f"kbatch-{job_id}.out"
    wait_for(lambda: out.exists() and out.read_text() == "early\n", what="output while running")
    assert server.client().get(job_id).state is JobState.RUNNING
    (workdir / "go").unlink()
    server.wait_state(job_id)


def test_wait_flag_returns_the_exit_code(server: KbatchServer, workdir: Path) -> None:
    result = server.cli("submit", "--wait", "--wrap", "exit 4", cwd=workdir)
    assert result.returncode == 4
    assert server.cli("submit", "-W", "--wrap", "true", cwd=workdir).returncode == 0


def test_show(server: KbatchServer, workdir: Path) -> None:
    job_id = submit(server, "--comment", "hello there", "--wrap", "true", cwd=workdir)
    server.wait_state(job_id)
    shown = server.cli("show", job_id).stdout
    assert f"JobId: {job_id}" in shown and "Comment: hello there" in shown
    as_json = json.loads(server.cli("show", job_id, "--json").stdout)
    assert as_json["state"] == "COMPLETED"


@pytest.mark.parametrize("state_filter", ["COMPLETED", "CD"])
def test_queue_state_filter(server: KbatchServer, workdir: Path, state_filter: str) -> None:
    done = submit(server, "--wrap", "true", cwd=workdir)
    failed = submit(server, "--wrap", "false", cwd=workdir)
    server.wait_state(done)
    server.wait_state(failed)
    listed = json.loads(server.cli("queue", "-t", state_filter, "--json").stdout)
    assert [j["id"] for j in listed] == [done]


def test_a_failing_job_may_say_why_in_one_safe_line(server: KbatchServer, workdir: Path) -> None:
    """$KBATCH_REASON_FILE (what a notebook job uses to name its failing cell): its first line
    joins the reason, made inert, and only for a job that failed."""
    write_script(
        workdir,
        "why.sh",
        '#!/bin/sh\nprintf "\\033]0;pwned\\007bad input in row 7\\nsecond line\\n" > "$KBATCH_REASON_FILE"\n'
        "exit 3\n",
    )
    failed = server.wait_state(submit(server, "why.sh", cwd=workdir))
    assert failed.reason == "NonZeroExitCode: ?]0;pwned?bad input in row 7"
    write_script(workdir, "fine.sh", '#!/bin/sh\necho "not a failure" > "$KBATCH_REASON_FILE"\n')
    done = server.wait_state(submit(server, "fine.sh", cwd=workdir))
    assert (done.state, done.reason) == (JobState.COMPLETED, None)
