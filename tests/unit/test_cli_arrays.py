"""Arrays in the CLI, pure: how rows are labelled and expanded, what show and resubmit pick."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import msgspec
import pytest

from kbatch.cli.output import label, print_job, print_table
from kbatch.cli.submit import exit_status
from kbatch.cli.tasks import (
    FAILED_STATES,
    array_rows,
    choose_tasks,
    expand,
    parse_throttle,
    print_tasks,
    resubmit_spec,
    state_counts,
)
from kbatch.client import requests as rq
from kbatch.errors import SpecError
from kbatch.models import Job, JobSpec, JobState, SweepParams

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job(job_id: str, state: JobState = JobState.PENDING, **fields: object) -> Job:
    return Job(id=job_id, user="u", name="sweep", state=state, submitted=NOW, **fields)  # type: ignore[arg-type]


def task(array_id: str, index: int, state: JobState, code: int | None = None) -> Job:
    return job(
        f"{array_id}_{index}", state, array_job_id=array_id, array_task_id=index, exit_code=code
    )


def group(array_id: str, tasks: str, state: JobState = JobState.PENDING, **fields: object) -> Job:
    return job(array_id, state, array_job_id=array_id, array_tasks=tasks, **fields)


def test_a_group_is_shown_as_squeue_does() -> None:
    assert label(group("123", "8-9999", array_throttle=50)) == "123_[8-9999%50]"
    assert label(group("123", "1,3-5")) == "123_[1,3-5]"
    assert label(task("123", 7, JobState.RUNNING)) == "123_7"
    assert label(job("124")) == "124"


def test_kqueue_shows_the_group_on_one_row(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        task("123", 7, JobState.RUNNING),
        group("123", "8-9999", array_throttle=50, reason="JobArrayTaskLimit"),
    ]
    print_table(rows)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert out[1].split()[:3] == ["123_7", "sweep", "RUNNING"]
    assert out[2].split()[0] == "123_[8-9999%50]"
    assert out[2].split()[-1] == "JobArrayTaskLimit"


def test_expand_makes_one_row_per_task() -> None:
    rows = expand(
        [task("9", 0, JobState.RUNNING), group("9", "1-3,7", array_throttle=2), job("10")]
    )
    assert [r.id for r in rows] == ["9_0", "9_1", "9_2", "9_3", "9_7", "10"]
    assert [r.array_task_id for r in rows] == [0, 1, 2, 3, 7, None]
    assert all(r.array_tasks is None for r in rows)
    assert {r.array_job_id for r in rows[:5]} == {"9"}
    cancelled = expand([group("9", "4-5", JobState.CANCELLED)])
    assert [(r.id, r.state) for r in cancelled] == [
        ("9_4", JobState.CANCELLED),
        ("9_5", JobState.CANCELLED),
    ]
    # JSON: one object per task, with its own id
    encoded = json.loads(msgspec.json.encode(rows))
    assert [o["id"] for o in encoded][:2] == ["9_0", "9_1"]


def test_array_rows_keeps_one_array_in_index_order() -> None:
    rows = [
        group("9", "3-4"),
        task("9", 1, JobState.FAILED, 2),
        job("10"),
        task("11", 0, JobState.COMPLETED, 0),
        task("9", 0, JobState.COMPLETED, 0),
        group("9", "2", JobState.CANCELLED),
    ]
    assert [r.id for r in array_rows(rows, "9")] == ["9_0", "9_1", "9_2", "9_3", "9_4"]
    assert array_rows(rows, "10") == []  # a job, not an array


def test_failed_indexes_in_slurms_form() -> None:
    from kbatch.arrays import IndexSet

    tasks = [task("5", i, JobState.COMPLETED, 0) for i in range(10)]
    for i, state in ((1, JobState.FAILED), (3, JobState.TIMEOUT), (4, JobState.OUT_OF_MEMORY)):
        tasks[i] = task("5", i, state, 1)
    tasks[5] = task("5", 5, JobState.FAILED, 2)
    tasks[8] = task("5", 8, JobState.CANCELLED)
    assert str(IndexSet.of(choose_tasks(tasks, FAILED_STATES))) == "1,3-5"
    assert choose_tasks(tasks, [JobState.TIMEOUT, JobState.OUT_OF_MEMORY]) == [3, 4]
    assert choose_tasks(tasks, [JobState.NODE_FAIL]) == []


def test_state_counts_in_slurms_order() -> None:
    assert state_counts({"FAILED": 2, "PENDING": 9991, "COMPLETED": 7}) == (
        "PENDING=9991,COMPLETED=7,FAILED=2"
    )


def test_show_of_an_array(capsys: pytest.CaptureFixture[str]) -> None:
    whole = group(
        "5",
        "0-9",
        JobState.FAILED,
        array_throttle=3,
        exit_code=2,
        array_counts={"COMPLETED": 6, "FAILED": 4},
    )
    print_job(whole, {"FailedTasks": "1,3-5"})
    out = capsys.readouterr().out
    assert "ArrayJobId: 5" in out
    assert "ArrayTaskId: 0-9%3" in out
    assert "ArrayTasks: 10" in out
    assert "TaskStates: COMPLETED=6,FAILED=4" in out
    assert "FailedTasks: 1,3-5" in out
    assert "ExitCode: 2" in out
    print_job(task("5", 7, JobState.FAILED, 2))
    out = capsys.readouterr().out
    assert "ArrayTaskId: 7" in out and "TaskStates" not in out


def test_show_tasks_lists_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    print_tasks([task("5", 0, JobState.COMPLETED, 0), task("5", 1, JobState.FAILED, 3)])
    out = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert out == [
        ["TASK", "STATE", "EXITCODE", "REASON"],
        ["5_0", "COMPLETED", "0"],
        ["5_1", "FAILED", "3"],
    ]


def test_resubmit_keeps_the_indexes_the_rows_and_the_throttle() -> None:
    params = SweepParams(columns=["a"], rows=[[str(n)] for n in range(10)])
    spec = JobSpec(
        script="#!/bin/sh\ntrue\n",
        array="0-9%4",
        params=params,
        hold=True,
        dependency="afterok:3",
        begin=NOW,
    )
    again = resubmit_spec(spec, [5, 1, 3, 4], 4)
    assert again.array == "1,3-5%4"
    assert again.params == params  # task 3 keeps row 3
    assert (again.hold, again.dependency, again.begin) == (False, None, None)
    assert resubmit_spec(spec, [2], None).array == "2"


@pytest.mark.parametrize(("text", "value"), [("8", 8), ("0", None), ("none", None)])
def test_throttle_values(text: str, value: int | None) -> None:
    assert parse_throttle(text) == value


@pytest.mark.parametrize("text", ["-1", "x", "1.5", "", "²", "999999999"])
def test_bad_throttles_say_what_to_give(text: str) -> None:
    with pytest.raises(SpecError, match="whole number of tasks"):
        parse_throttle(text)


def test_wait_exits_with_the_highest_code() -> None:
    assert exit_status(group("5", "0-3", JobState.FAILED, exit_code=7)) == 7
    assert exit_status(group("5", "0-3", JobState.COMPLETED, exit_code=0)) == 0
    # cancelled before any task ran: no exit code, but not a success
    assert exit_status(group("5", "0-3", JobState.CANCELLED)) == 1
    assert exit_status(group("5", "0-3", JobState.CANCELLED, exit_code=0)) == 1


def test_spec_and_update_requests() -> None:
    assert (rq.job_spec("8").method, rq.job_spec("8").path) == ("GET", "/api/v1/jobs/8/spec")
    request = rq.update_job("8", throttle=5)
    assert (request.method, request.path) == ("POST", "/api/v1/jobs/8/update")
    assert json.loads(request.body or b"") == {"throttle": 5}
    assert json.loads(rq.update_job("8", throttle=None).body or b"") == {"throttle": 0}
    assert rq.cancel_job("8_[1-5,9]").path == "/api/v1/jobs/8_%5B1-5%2C9%5D/cancel"


def test_new_commands_parse() -> None:
    from kbatch.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["update", "12", "--throttle", "8"])
    assert (args.job_id, args.throttle) == ("12", "8")
    args = parser.parse_args(["resubmit", "12", "--state", "TIMEOUT,OUT_OF_MEMORY"])
    assert (args.failed, args.state) == (False, "TIMEOUT,OUT_OF_MEMORY")
    assert parser.parse_args(["queue", "-r"]).array is True
    assert parser.parse_args(["show", "12", "--tasks"]).tasks is True
    assert isinstance(args, argparse.Namespace)


def test_a_cancelled_group_has_no_throttle_to_show() -> None:
    assert label(group("123", "5-9", JobState.CANCELLED, array_throttle=2)) == "123_[5-9]"
