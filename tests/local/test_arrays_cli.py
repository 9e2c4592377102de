"""Arrays and sweeps through the real CLI and a real server process, over the fake
backend (``--backend fake``: tasks "run" on the event loop, their outcomes chosen by
``# fake:`` lines, so these tests do not wait on processes).  The same commands on the
local backend are tested by the conformance suite's contract below them."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from kbatch.client import Client
from kbatch.errors import InvalidRequest
from kbatch.models import JobSpec, JobState, SweepParams
from tests.local.test_bad_input import assert_clean_error
from tests.support.polling import wait_for
from tests.support.servers import CliResult, KbatchServer

CSV = "alpha,label\n" + "".join(f"0.{n},row {n}\n" for n in range(6))


@pytest.fixture
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KbatchServer]:
    """A server over the fake backend (4 slots) with small array limits."""
    state = tmp_path_factory.mktemp("kb", numbered=True) / "s"
    config = state.parent / "kbatch.toml"
    config.write_text(
        "[fake]\nslots = 4\n\n[policy]\nmax_array_tasks = 20000\nmax_params_bytes = 2048\n"
    )
    srv = KbatchServer(state, args=["--backend", "fake", "--config", str(config)])
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def kb(fake: KbatchServer, workdir: Path) -> Callable[..., CliResult]:
    """``kbatch ARGS...`` (or another program) run in the work directory."""

    def run(*args: str, program: str = "kbatch") -> CliResult:
        return fake.cli(*args, cwd=workdir, program=program)

    return run


def script(workdir: Path, name: str, *lines: str) -> str:
    (workdir / name).write_text("#!/bin/sh\n" + "".join(f"{line}\n" for line in lines))
    return name


def submitted(result: CliResult) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split()[-1]


def queue_json(kb: Callable[..., CliResult], *args: str) -> list[dict[str, object]]:
    result = kb("queue", "--json", *args)
    assert result.returncode == 0, result.stderr
    data: list[dict[str, object]] = json.loads(result.stdout)
    return data


def all_jobs(fake: KbatchServer) -> list[str]:
    with fake.client() as client:
        return [j.id for j in client.list(include_finished=True)]


def test_kqueue_shows_the_waiting_tasks_on_one_row(
    kb: Callable[..., CliResult], workdir: Path
) -> None:
    name = script(workdir, "long.sh", "# fake: run=forever", "echo working")
    result = kb("submit", "--array=0-9999%2", "--parsable", name)
    array_id = submitted(result)
    assert result.stdout == f"{array_id}\n"  # --parsable: the array's id alone

    def table() -> list[list[str]] | None:
        out = kb("queue", program="kbatch").stdout.splitlines()
        rows = [line.split() for line in out[1:]]
        return rows if len(rows) == 3 and rows[-1][-1] == "JobArrayTaskLimit" else None

    rows = wait_for(table, timeout=20, what="two running tasks and the group")
    assert rows is not None
    assert [r[0] for r in rows] == [f"{array_id}_0", f"{array_id}_1", f"{array_id}_[2-9999%2]"]
    assert [r[2] for r in rows] == ["RUNNING", "RUNNING", "PENDING"]
    assert kb(program="kqueue").stdout.splitlines()[-1].split()[0] == (f"{array_id}_[2-9999%2]")

    expanded = kb("queue", "-r").stdout.splitlines()[1:]
    assert [line.split()[0] for line in expanded] == [f"{array_id}_{i}" for i in range(10000)]
    objects = queue_json(kb)
    assert [o["id"] for o in objects] == [f"{array_id}_{i}" for i in range(10000)]
    assert {o["array_task_id"] for o in objects} == set(range(10000))
    assert objects[5]["state"] == "PENDING" and objects[0]["state"] == "RUNNING"

    assert kb("cancel", f"{array_id}_[5-9]").returncode == 0
    assert kb("cancel", f"{array_id}_1").stdout.strip().startswith(f"job {array_id}_1 ")
    finished = {o["id"]: o["state"] for o in queue_json(kb, "-a")}
    assert len(finished) == 10000  # cancelled before they started: still one per task
    assert [finished[f"{array_id}_{i}"] for i in (1, 5, 9, 10)] == [
        "CANCELLED",
        "CANCELLED",
        "CANCELLED",
        "PENDING",
    ]
    assert f"{array_id}_[5-9]" in kb("queue", "-a").stdout  # the cancelled group's row
    assert kb("cancel", array_id).returncode == 0
    assert queue_json(kb) == []


def test_a_sweep_fills_each_task_from_its_row(
    kb: Callable[..., CliResult], fake: KbatchServer, workdir: Path
) -> None:
    (workdir / "grid.csv").write_text(CSV)
    result = kb("submit", "--params", "grid.csv", "--wait", "--wrap", "echo {alpha} is {label}")
    array_id = result.stdout.split()[-1]
    assert result.returncode == 0, result.stderr
    with fake.client() as client:
        done = client.get(array_id)
        spec = client.spec(array_id)
    assert (done.state, done.array_tasks, done.array_counts) == (
        JobState.COMPLETED,
        "0-5",
        {"COMPLETED": 6},
    )
    assert spec.params is not None and spec.params.columns == ["alpha", "label"]
    assert kb("logs", f"{array_id}_3").stdout == "0.3 is row 3\n"
    assert kb("logs", "-f", f"{array_id}_5").stdout == "0.5 is row 5\n"
    refused = kb("logs", array_id)
    assert_clean_error(refused, f"{array_id} is an array", f"{array_id}_0")


def test_show_counts_failed_indexes_and_task_exit_codes(
    kb: Callable[..., CliResult], workdir: Path
) -> None:
    name = script(workdir, "some-fail.sh", "#SBATCH --array=0-5%3", "# fake: exit[1,3-4]=2")
    result = kb("submit", "--wait", name)
    array_id = result.stdout.split()[-1]
    assert result.returncode == 2, result.stderr  # --wait: the highest exit code
    shown = kb("show", array_id)
    assert shown.returncode == 0, shown.stderr
    fields = dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition(":") for line in shown.stdout.splitlines())
    )
    assert fields["State"] == "FAILED"
    assert fields["ExitCode"] == "2"
    assert fields["ArrayTaskId"] == "0-5%3"
    assert fields["TaskStates"] == "COMPLETED=3,FAILED=3"
    assert fields["FailedTasks"] == "1,3-4"
    assert fields["Array"] == "0-5%3"
    assert fields["StdOut"] == f"{workdir}/kbatch-%A_%a.out"
    tasks = [line.split() for line in kb("show", array_id, "--tasks").stdout.splitlines()]
    assert tasks[0] == ["TASK", "STATE", "EXITCODE", "REASON"]
    assert [t[:3] for t in tasks[1:]] == [
        [
            f"{array_id}_{i}",
            "FAILED" if i in (1, 3, 4) else "COMPLETED",
            "2" if i in (1, 3, 4) else "0",
        ]
        for i in range(6)
    ]
    as_json = json.loads(kb("show", array_id, "--tasks", "--json").stdout)
    assert [t["exit_code"] for t in as_json] == [0, 2, 0, 2, 2, 0]
    one = kb("show", f"{array_id}_3").stdout
    assert "ArrayJobId: " + array_id in one and "ArrayTaskId: 3" in one
    part = kb("show", f"{array_id}_[0-2]").stdout
    assert "TaskStates: COMPLETED=2,FAILED=1" in part and "FailedTasks: 1" in part


def test_resubmit_the_failed_tasks_with_their_rows(
    kb: Callable[..., CliResult], fake: KbatchServer, workdir: Path
) -> None:
    (workdir / "grid.csv").write_text(CSV)
    name = script(workdir, "sweep.sh", "# fake: exit[1,4]=3", 'echo "$alpha"')
    first = kb("submit", "--params", "grid.csv", "--array=0-5%2", "--wait", name)
    array_id = first.stdout.split()[-1]
    assert first.returncode == 3, first.stderr
    again = kb("resubmit", array_id, "--failed")
    assert again.returncode == 0, again.stderr
    new_id = again.stdout.split()[3]
    assert again.stdout == f"Submitted batch job {new_id} (tasks 1,4 of array {array_id})\n"
    with fake.client() as client:
        spec = client.spec(new_id)
        assert spec.array == "1,4%2"  # the same indexes, the same throttle
        assert spec.params is not None and spec.params.rows[4] == ["0.4", "row 4"]
        done = client.wait(new_id, poll=0.1, timeout=30)
    assert done.array_counts == {"FAILED": 2}
    assert kb("logs", f"{new_id}_4").stdout == "0.4\n"  # task 4 still has row 4
    parsable = kb("resubmit", array_id, "--state", "FAILED", "--parsable")
    assert parsable.stdout.strip().isdigit(), parsable.stderr

    before = all_jobs(fake)
    nothing = kb("resubmit", array_id, "--state", "TIMEOUT,OUT_OF_MEMORY")
    assert_clean_error(nothing, "no tasks that ended TIMEOUT, OUT_OF_MEMORY", "nothing to resubmit")
    assert "COMPLETED=4,FAILED=2" in nothing.stderr
    single = submitted(kb("submit", "--wrap", "true"))
    for args, fragments in (
        ([array_id], ["--failed", "--state"]),
        ([array_id, "--failed", "--state", "FAILED"], ["--failed", "--state"]),
        ([array_id, "--state", "RUNNING"], ["have not ended"]),
        ([array_id, "--state", "BROKEN"], ["BROKEN is not a state"]),
        ([f"{array_id}_1", "--failed"], ["is a task", f"({array_id})"]),
        ([single, "--failed"], [f"job {single} is not an array"]),
        (["999", "--failed"], ["no job 999"]),
        (["9_[", "--failed"], ["not a job id"]),
    ):
        assert_clean_error(kb("resubmit", *args), *fragments)
    assert all_jobs(fake) == [*before, single]  # nothing else was created


def test_update_the_throttle_of_a_running_array(
    kb: Callable[..., CliResult], fake: KbatchServer, workdir: Path
) -> None:
    name = script(workdir, "long.sh", "# fake: run=forever")
    array_id = submitted(kb("submit", "--array=0-9%1", name))
    result = kb("update", array_id, "--throttle", "3")
    assert (result.returncode, result.stdout) == (0, f"array {array_id}: at most 3 tasks at once\n")

    def three() -> bool:
        return kb("queue").stdout.splitlines()[-1].split()[0] == f"{array_id}_[3-9%3]"

    wait_for(three, timeout=20, what="three tasks running")
    assert kb("update", array_id, "--throttle", "none").stdout.endswith(": no throttle\n")
    single = submitted(kb("submit", "--hold", "--wrap", "true"))
    for args, fragments in (
        ([array_id, "--throttle", "-2"], ["whole number of tasks"]),
        ([array_id], ["nothing to update", "--throttle N"]),
        ([f"{array_id}_2", "--throttle", "2"], ["is a task"]),
        ([single, "--throttle", "2"], ["not an array"]),
        (["1;rm", "--throttle", "2"], ["not a job id"]),
    ):
        assert_clean_error(kb("update", *args), *fragments)
    with fake.client() as client:
        assert client.get(array_id).array_throttle is None
    kb("cancel", array_id, single)


def test_cancel_hold_and_release_tasks_and_ranges(
    kb: Callable[..., CliResult], fake: KbatchServer, workdir: Path
) -> None:
    name = script(workdir, "held.sh", "# fake: run=forever")
    array_id = submitted(kb("submit", "--hold", "--array=0-9", name))
    assert kb("release", f"{array_id}_[0-1]").stdout == f"job {array_id}_[0-1] released\n"
    assert kb("cancel", f"{array_id}_7").stdout == f"job {array_id}_7 cancelled\n"
    assert kb("hold", array_id).returncode == 0
    with fake.client() as client:
        wait_for(
            lambda: client.get(f"{array_id}_1").state is JobState.RUNNING,
            timeout=20,
            what="the released tasks to run",
        )
        assert client.get(f"{array_id}_2").reason == "JobHeldUser"
        assert client.get(f"{array_id}_7").state is JobState.CANCELLED
        for crafted in (f"{array_id}_[9-1]", f"{array_id}_x", f"{array_id}_[1;2]", "_[1]"):
            assert_clean_error(kb("cancel", crafted), "not a job id")
        assert client.get(array_id).array_counts == {"RUNNING": 2, "PENDING": 7, "CANCELLED": 1}
    cancelled = kb("cancel", array_id)
    assert cancelled.returncode == 0, cancelled.stderr
    with fake.client() as client:
        assert client.wait(array_id, poll=0.1, timeout=20).array_counts == {"CANCELLED": 10}


# -- bad input: one clear line, non-zero, and nothing created --------------------------------


@pytest.mark.parametrize(
    ("args", "files", "fragments"),
    [
        (["--array=1-x"], {}, ["--array=1-x", "'1-x' is not an index"]),
        (["--array=5-1"], {}, ["goes backwards"]),
        (["--array=0-9%0"], {}, ["throttle after %"]),
        (["--array=0-30000"], {}, ["more than 20000 tasks", "max_array_tasks"]),
        (["--seq", "3", "--array=0-2"], {}, ["not both"]),
        (["--seq", "0"], {}, ["whole number of at least 1"]),
        (["--params", "p.csv"], {"p.csv": b"a,b\n1,2\n3\n"}, ["row 3", "1 values for 2 columns"]),
        (["--params", "p.csv"], {"p.csv": b""}, ["is empty"]),
        (["--params", "p.csv"], {"p.csv": b"a\n\xff\xfe\n"}, ["is not UTF-8"]),
        (["--params", "p.csv"], {"p.csv": b"a,2x\n1,2\n"}, ["column '2x'", "row 1"]),
        (["--params", "p.csv"], {"p.csv": b"a,SLURM_X\n1,2\n"}, ["'SLURM_X'", "rename"]),
        (["--params", "p.csv"], {"p.csv": b"a\n"}, ["no data rows"]),
        (["--params", "p.csv", "--array=0-5"], {"p.csv": b"a\n1\n2\n3\n"}, ["has 3 data rows"]),
        (["--params", "missing.csv"], {}, ["no such file: missing.csv"]),
        (
            ["--params", "p.csv"],
            {"p.csv": b"a\n" + b"".join(b"%04d\n" % n for n in range(600))},
            ["over the 2048-byte limit", "max_params_bytes"],
        ),
    ],
)
def test_bad_arrays_and_sweeps_are_refused(
    kb: Callable[..., CliResult],
    fake: KbatchServer,
    workdir: Path,
    args: list[str],
    files: dict[str, bytes],
    fragments: list[str],
) -> None:
    for file_name, data in files.items():
        (workdir / file_name).write_bytes(data)
    assert_clean_error(kb("submit", *args, "--wrap", "echo {a}"), *fragments)
    assert all_jobs(fake) == []


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"array": "1-x"}, ["'1-x' is not an index"]),
        ({"array": "0-30000"}, ["more than 20000 tasks", "max_array_tasks"]),
        ({"array": "0-5", "params": SweepParams(columns=["a"], rows=[["1"]])}, ["1 data rows"]),
        ({"params": SweepParams(columns=["a", "b"], rows=[["1"]])}, ["one value per column"]),
        ({"params": SweepParams(columns=["1a"], rows=[["1"]])}, ["column '1a'"]),
        ({"params": SweepParams(columns=["KBATCH_X"], rows=[["1"]])}, ["'KBATCH_X'"]),
        ({"params": SweepParams(columns=["a"], rows=[])}, ["no rows"]),
        (
            {"params": SweepParams(columns=["a"], rows=[["x" * 100]] * 30)},
            ["max_params_bytes"],
        ),
    ],
)
def test_the_server_refuses_them_too(
    fake: KbatchServer, fields: dict[str, object], fragments: list[str]
) -> None:
    """What a client other than the CLI sends is checked by the server's policy."""
    spec = JobSpec(script="#!/bin/sh\ntrue\n", workdir="/tmp", **fields)  # type: ignore[arg-type]
    with fake.client() as client:
        with pytest.raises(InvalidRequest) as refused:
            client.submit(spec)
        for fragment in fragments:
            assert fragment in str(refused.value)
        assert client.list(include_finished=True) == []


def test_the_api_refuses_a_throttle_that_is_not_a_number(fake: KbatchServer) -> None:
    with fake.client() as client:
        array = client.submit(JobSpec(script="#!/bin/sh\n", workdir="/tmp", array="0-3", hold=True))
        with pytest.raises(ValueError, match="no limit"):
            client.update(array.id, throttle=-1)
        single = client.submit(JobSpec(script="#!/bin/sh\n", workdir="/tmp", hold=True))
        with pytest.raises(Exception, match="not an array"):
            client.update(single.id, throttle=2)
        assert client.get(array.id).array_throttle is None
        client.cancel(array.id)
        client.cancel(single.id)


def test_client_wait_on_an_array_returns_its_aggregate(fake: KbatchServer) -> None:
    with fake.client() as client:
        array = client.submit(
            JobSpec(script="#!/bin/sh\n# fake: exit[2]=4\n", workdir="/tmp", array="0-3")
        )
        done = client.wait(array.id, poll=0.1, timeout=30)
        assert (done.state, done.exit_code, done.array_counts) == (
            JobState.FAILED,
            4,
            {"COMPLETED": 3, "FAILED": 1},
        )
        part = client.wait(f"{array.id}_[0-1]", poll=0.1, timeout=5)
        assert part.state is JobState.COMPLETED
    assert isinstance(Client, type)


@pytest.mark.parametrize(
    "job_id", ["1_[5-1]", "1_[", "1_[1;2]", "1_[]", "1_1234567890", "1_-1", "_[1]", "1_[1]x"]
)
def test_crafted_task_ids_are_the_usual_404(fake: KbatchServer, job_id: str) -> None:
    """No route hands the backend a task reference it could not have made."""
    with fake.client() as client:
        client.submit(JobSpec(script="#!/bin/sh\n", workdir="/tmp", array="0-3", hold=True))
    parts = urlsplit(fake.url)
    for method, action, body in (
        ("GET", "", None),
        ("GET", "/spec", None),
        ("POST", "/update", b'{"throttle": 2}'),
        ("POST", "/cancel", b""),
        ("GET", "/logs", None),
    ):
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
        headers = {"Authorization": f"Bearer {fake.token}", "Content-Type": "application/json"}
        conn.request(method, f"/api/v1/jobs/{quote(job_id, safe='')}{action}", body, headers)
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
        assert response.status == 404, (method, action, answer)
        assert answer["error"]["code"] == "not_found"
    with fake.client() as client:
        assert client.get("1").array_counts == {"PENDING": 4}  # nothing happened to it


def test_the_same_commands_on_the_local_backend(server: KbatchServer, workdir: Path) -> None:
    """The sweep, show, logs and resubmit with real processes: task 1 fails on its row."""
    (workdir / "grid.csv").write_text("alpha\n0.0\n0.1\n0.2\n")

    def run(*args: str) -> CliResult:
        return server.cli(*args, cwd=workdir)

    first = run(
        "submit", "--params", "grid.csv", "--array=0-2%1", "--wait",
        "--wrap", 'echo "alpha={alpha} task={index}"; test {alpha} != 0.1 || exit 4',
    )  # fmt: skip
    assert first.returncode == 4, first.stderr  # the highest exit code of its tasks
    array_id = first.stdout.split()[-1]
    assert (workdir / f"kbatch-{array_id}_2.out").read_text() == "alpha=0.2 task=2\n"
    assert run("logs", f"{array_id}_1").stdout == "alpha=0.1 task=1\n"
    shown = run("show", array_id).stdout
    assert "TaskStates: COMPLETED=2,FAILED=1" in shown and "FailedTasks: 1\n" in shown
    tasks = [line.split()[:3] for line in run("show", array_id, "--tasks").stdout.splitlines()]
    assert tasks[1:] == [
        [f"{array_id}_0", "COMPLETED", "0"],
        [f"{array_id}_1", "FAILED", "4"],
        [f"{array_id}_2", "COMPLETED", "0"],
    ]
    again = run("resubmit", array_id, "--failed", "--parsable")
    assert again.returncode == 0, again.stderr
    new_id = again.stdout.strip()
    done = server.wait_state(new_id)
    assert (done.state, done.array_tasks, done.exit_code) == (JobState.FAILED, "1", 4)
    assert (workdir / f"kbatch-{new_id}_1.out").read_text() == "alpha=0.1 task=1\n"  # row 1
