"""Job arrays on the local backend: real servers, real processes, the real store."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kbatch.errors import InvalidRequest, NotFound
from kbatch.models import JobSpec, JobState, SweepParams
from tests.support.polling import wait_for
from tests.support.servers import KbatchServer

ENV_SCRIPT = (
    "#!/bin/sh\n"
    'echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT '
    '$SLURM_ARRAY_TASK_MIN $SLURM_ARRAY_TASK_MAX $SLURM_ARRAY_TASK_STEP $KBATCH_ARRAY_TASK_ID"\n'
)
# Each task appends "start INDEX TIME" and "end INDEX TIME" to a shared file.
TIMED = (
    "#!/bin/sh\n"
    'echo "start $SLURM_ARRAY_TASK_ID $(date +%s.%N)" >> {log}\n'
    "sleep {seconds}\n"
    'echo "end $SLURM_ARRAY_TASK_ID $(date +%s.%N)" >> {log}\n'
)


def _intervals(log: Path) -> dict[int, tuple[float, float]]:
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    for line in log.read_text().splitlines():
        kind, index, moment = line.split()
        (starts if kind == "start" else ends)[int(index)] = float(moment)
    return {i: (starts[i], ends[i]) for i in starts if i in ends}


def _most_at_once(intervals: dict[int, tuple[float, float]]) -> int:
    events = sorted(
        [(s, 1) for s, _ in intervals.values()] + [(e, -1) for _, e in intervals.values()]
    )
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_each_task_runs_with_its_variables_and_its_own_output_file(
    server: KbatchServer, workdir: Path
) -> None:
    with server.client() as client:
        array = client.submit(JobSpec(script=ENV_SCRIPT, workdir=str(workdir), array="1-7:2"))
        assert array.array_job_id == array.id and array.array_tasks == "1-7:2"
        done = server.wait_state(array.id)
        assert done.state is JobState.COMPLETED and done.exit_code == 0
        assert done.array_counts == {"COMPLETED": 4}
        for index in (1, 3, 5, 7):
            text = (workdir / f"kbatch-{array.id}_{index}.out").read_text().split()
            assert text == [array.id, str(index), "4", "1", "7", "2", str(index)]
        task = client.get(f"{array.id}_5")
        assert (task.id, task.array_job_id, task.array_task_id) == (f"{array.id}_5", array.id, 5)
        assert task.state is JobState.COMPLETED
        assert b"5 4 1 7 2 5" in b"".join(client.logs(f"{array.id}_5"))
        with pytest.raises(InvalidRequest, match="give one task"):
            b"".join(client.logs(array.id))
        with pytest.raises(NotFound):
            client.get(f"{array.id}_2")  # not one of its indexes


def test_a_sweep_gives_each_task_its_row_and_a_failed_task_fails_the_array(
    server: KbatchServer, workdir: Path
) -> None:
    params = SweepParams(
        columns=["lr", "name"], rows=[["0.1", "a b"], ["0.2", "$(x)"], ["0.3", "c"]]
    )
    script = '#!/bin/sh\necho "lr=$lr name=$name"\n[ "$lr" != 0.2 ]\n'
    with server.client() as client:
        array = client.submit(
            JobSpec(script=script, workdir=str(workdir), params=params, output="%A-%a.txt")
        )
        assert array.array_tasks == "0-2"  # one task per row
        done = server.wait_state(array.id)
        assert (done.state, done.exit_code) == (JobState.FAILED, 1)
        assert done.array_counts == {"COMPLETED": 2, "FAILED": 1}
        assert (workdir / f"{array.id}-0.txt").read_text() == "lr=0.1 name=a b\n"
        assert (workdir / f"{array.id}-1.txt").read_text() == "lr=0.2 name=$(x)\n"
        assert client.get(f"{array.id}_1").state is JobState.FAILED


def test_the_throttle_holds_tasks_back_with_its_reason_and_can_be_changed(
    make_server: Callable[..., KbatchServer], workdir: Path
) -> None:
    server = make_server(cpus=4)
    log = workdir / "times.log"
    with server.client() as client:
        array = client.submit(
            JobSpec(script=TIMED.format(log=log, seconds=0.6), workdir=str(workdir), array="0-7%2")
        )

        def group_reason() -> str | None:
            rows = [j for j in client.list() if j.id == array.id]
            return rows[0].reason if rows else None

        assert wait_for(lambda: group_reason() == "JobArrayTaskLimit", timeout=15)
        group = next(j for j in client.list() if j.id == array.id)
        assert group.array_throttle == 2 and group.state is JobState.PENDING
        server.wait_state(f"{array.id}_3", JobState.RUNNING)  # 2 and 3 after 0 and 1 ended
        client.update(array.id, throttle=4)
        server.wait_state(array.id, timeout=60)
    intervals = _intervals(log)
    assert sorted(intervals) == list(range(8))
    first = {i: intervals[i] for i in (0, 1, 2, 3)}
    assert _most_at_once(first) <= 2  # before the change
    assert _most_at_once(intervals) >= 3  # after it: up to four at once on four CPUs
    starts = [intervals[i][0] for i in range(8)]
    assert max(starts[:2]) < min(starts[2:4])  # in index order (two at a time)


def test_a_100000_task_array_is_one_row_until_its_tasks_start(
    server: KbatchServer, workdir: Path
) -> None:
    with server.client() as client:
        array = client.submit(
            JobSpec(script="#!/bin/sh\ntrue\n", workdir=str(workdir), array="0-99999", hold=True)
        )
        rows = [j for j in client.list() if j.array_job_id == array.id]
        assert len(rows) == 1 and rows[0].array_tasks == "0-99999"
        assert rows[0].reason == "JobHeldUser"
        db = sqlite3.connect(f"file:{server.state_dir / 'jobs.sqlite'}?mode=ro", uri=True)
        (count,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
        db.close()
        assert count == 1
        whole = client.get(array.id)
        assert whole.array_counts == {"PENDING": 100000}
        cancelled = client.cancel(array.id)
        assert cancelled.state is JobState.CANCELLED
        assert cancelled.array_counts == {"CANCELLED": 100000}
        rows = [j for j in client.list(include_finished=True) if j.array_job_id == array.id]
        assert [(j.state, j.array_tasks) for j in rows] == [(JobState.CANCELLED, "0-99999")]


def test_cancel_one_task_a_range_or_all_and_the_others_keep_running(
    server: KbatchServer, workdir: Path
) -> None:
    with server.client() as client:
        array = client.submit(
            JobSpec(script="#!/bin/sh\nsleep 60\n", workdir=str(workdir), array="0-9")
        )
        a = array.id
        server.wait_state(f"{a}_1", JobState.RUNNING)
        client.cancel(f"{a}_0")
        assert server.wait_state(f"{a}_0").state is JobState.CANCELLED
        server.wait_state(f"{a}_2", JobState.RUNNING)  # the next index takes the free CPU
        some = client.cancel(f"{a}_[5-6,9]")
        assert some.array_counts == {"CANCELLED": 3}
        for index in (5, 6, 9):
            task = client.get(f"{a}_{index}")
            assert task.state is JobState.CANCELLED and task.started is None
            assert task.cancelled_by == client.whoami().name
        assert client.get(f"{a}_1").state is JobState.RUNNING
        assert client.get(a).state is JobState.RUNNING
        client.cancel(a)
        everything = server.wait_state(a)
        assert everything.state is JobState.CANCELLED
        assert everything.array_counts == {"CANCELLED": 10}
        assert not any(j.state.is_terminal is False for j in client.list(include_finished=True))


def test_hold_and_release_a_whole_array(server: KbatchServer, workdir: Path) -> None:
    with server.client() as client:
        array = client.submit(
            JobSpec(script="#!/bin/sh\necho ran\n", workdir=str(workdir), array="0-3", hold=True)
        )
        assert client.get(array.id).reason == "JobHeldUser"
        client.release(array.id)
        assert server.wait_state(array.id).state is JobState.COMPLETED
        again = client.submit(
            JobSpec(script="#!/bin/sh\nsleep 60\n", workdir=str(workdir), array="0-5")
        )
        server.wait_state(f"{again.id}_1", JobState.RUNNING)
        held = client.hold(again.id)  # the four that have not started
        assert held.array_counts == {"PENDING": 4, "RUNNING": 2}
        client.cancel(f"{again.id}_[0-1]")
        time.sleep(1.0)  # room to start: nothing may, while held
        assert client.get(again.id).array_counts == {"CANCELLED": 2, "PENDING": 4}
        client.release(again.id)
        server.wait_state(f"{again.id}_2", JobState.RUNNING)
        client.cancel(again.id)


def test_tasks_start_behind_earlier_jobs_and_outlive_a_server_crash(
    make_server: Callable[..., KbatchServer], workdir: Path
) -> None:
    server = make_server(cpus=1)
    log = workdir / "times.log"
    with server.client() as client:
        first = client.submit(
            JobSpec(
                script=f"#!/bin/sh\necho start first $(date +%s.%N) >> {log}\nsleep 1\n",
                workdir=str(workdir),
            )
        )
        array = client.submit(
            JobSpec(script=TIMED.format(log=log, seconds=0.5), workdir=str(workdir), array="0-3")
        )
        last = client.submit(
            JobSpec(
                script=f"#!/bin/sh\necho start last $(date +%s.%N) >> {log}\n", workdir=str(workdir)
            )
        )
        server.wait_state(f"{array.id}_0", JobState.RUNNING, timeout=30)
    server.kill9()
    server.start()
    server.wait_state(last.id, timeout=60)
    with server.client() as client:
        assert client.get(array.id).array_counts == {"COMPLETED": 4}
        assert client.get(first.id).state is JobState.COMPLETED
    starts = {}
    for line in log.read_text().splitlines():
        kind, who, moment = line.split()
        if kind == "start":
            starts[who] = float(moment)
    order = sorted(starts, key=starts.__getitem__)
    assert order == ["first", "0", "1", "2", "3", "last"]


def test_a_job_that_depends_on_an_array_waits_for_every_task(
    server: KbatchServer, workdir: Path
) -> None:
    log = workdir / "times.log"
    with server.client() as client:
        array = client.submit(
            JobSpec(script=TIMED.format(log=log, seconds=0.3), workdir=str(workdir), array="0-4")
        )
        after = client.submit(
            JobSpec(
                script=f"#!/bin/sh\necho start after $(date +%s.%N) >> {log}\n",
                workdir=str(workdir),
                dependency=f"afterok:{array.id}",
            )
        )
        assert server.wait_state(after.id).state is JobState.COMPLETED
    lines = log.read_text().splitlines()
    assert lines[-1].startswith("start after")
    assert sum(line.startswith("end") for line in lines) == 5


def test_another_users_array_and_its_tasks_are_404(server: KbatchServer, workdir: Path) -> None:
    with server.client() as client:
        array = client.submit(
            JobSpec(script="#!/bin/sh\nsleep 30\n", workdir=str(workdir), array="0-3", hold=True)
        )
    mallory = server.add_token("mallory")
    with server.client(token=mallory) as other:
        for ref in (array.id, f"{array.id}_1", f"{array.id}_[0-3]"):
            with pytest.raises(NotFound):
                other.get(ref)
            with pytest.raises(NotFound):
                other.cancel(ref)
            with pytest.raises(NotFound):
                other.release(ref)
        with pytest.raises(NotFound):
            other.update(array.id, throttle=1)
        with pytest.raises(NotFound):
            other.spec(array.id)
    with server.client() as client:
        assert client.get(array.id).array_counts == {"PENDING": 4}
        for odd in (f"{array.id}_[", f"{array.id}_[1-999999999]", f"{array.id}_[3-1]"):
            with pytest.raises(NotFound):
                client.get(odd)
        client.cancel(array.id)
