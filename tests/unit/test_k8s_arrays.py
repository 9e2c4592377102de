"""Arrays on Kubernetes, the pure parts: the Indexed Job, the ConfigMap's task lines run
for real by /bin/sh, and the tasks' states from a Job and its pods."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.arrays import (
    TRACKING_FINALIZER,
    array_view,
    k8s_positions,
    task_order,
)
from kbatch.backends.kubernetes.manifests import JobContext, Manifests, build_manifests
from kbatch.backends.kubernetes.status import job_from_objects
from kbatch.models import JobSpec, JobState, SweepParams

SCRIPT = "#!/bin/sh\nenv -0\n"


def manifests(tmp_path: Path, **fields: Any) -> Manifests:
    spec = JobSpec(script=SCRIPT, workdir=str(tmp_path), **fields)
    ctx = JobContext(job_id="arr1", user="ann", namespace="ns", default_image="img")
    return build_manifests(spec, ctx)


def task_env(tmp_path: Path, made: Manifests, position: int) -> dict[str, str]:
    """The environment task ``position`` sees: its Secret, then the entrypoint's doing."""
    for key, value in made.config_map["data"].items():
        (tmp_path / key).write_text(value)
    (tmp_path / "script").chmod(0o755)
    env = {**made.secret["stringData"], "PATH": os.environ["PATH"]}
    env["JOB_COMPLETION_INDEX"] = str(position)
    proc = subprocess.run(
        ["/bin/sh", str(tmp_path / "entrypoint"), str(tmp_path / "script")],
        env=env,
        capture_output=True,
        check=True,
    )
    pairs = (item.split(b"=", 1) for item in proc.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


def test_an_array_is_an_indexed_job(tmp_path: Path) -> None:
    made = manifests(tmp_path, array="3-7%2", time_limit=60)
    spec = made.job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"]) == (5, 2)
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"]) == (0, 5)
    assert "backoffLimit" not in spec and "activeDeadlineSeconds" not in spec
    assert spec["template"]["spec"]["activeDeadlineSeconds"] == 90  # per task (pod)
    assert spec["podFailurePolicy"]["rules"][0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    annotations = made.job["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_THROTTLE] == "2"
    assert annotations[names.ANNOTATION_CANCELLED_TASKS] == ""
    assert made.config_map["data"]["tasks"] == "3\n4\n5\n6\n7\n"
    plain = manifests(tmp_path)
    assert "completionMode" not in plain.job["spec"] and "tasks" not in plain.config_map["data"]


def test_each_task_gets_its_variables_and_output(tmp_path: Path) -> None:
    made = manifests(tmp_path, array="1,5,9")
    env = task_env(tmp_path, made, 2)
    assert env["SLURM_ARRAY_TASK_ID"] == env["KBATCH_ARRAY_TASK_ID"] == "9"
    assert env["SLURM_ARRAY_JOB_ID"] == env["KBATCH_ARRAY_JOB_ID"] == "arr1"
    assert (env["SLURM_ARRAY_TASK_MIN"], env["SLURM_ARRAY_TASK_MAX"]) == ("1", "9")
    assert (env["SLURM_ARRAY_TASK_COUNT"], env["SLURM_ARRAY_TASK_STEP"]) == ("3", "4")
    assert env["SLURM_JOB_ID"] == env["KBATCH_JOB_ID"] == env["SLURM_JOBID"] == "arr1_9"
    assert env["KBATCH_OUTPUT"] == f"{tmp_path}/kbatch-arr1_9.out"
    assert (tmp_path / "kbatch-arr1_9.out").exists()  # the entrypoint copied it there
    assert "kbatch_mark" not in env and "KBATCH_NL" not in env


@pytest.mark.parametrize(
    "pattern",
    ["out-%4a-%j.txt", "x4294967291-%a.out"],  # padded, or holding the marker's digits
)
def test_output_patterns_the_template_cannot_express_go_on_each_line(
    tmp_path: Path, pattern: str
) -> None:
    made = manifests(tmp_path, array="0-11", output=pattern)
    env = task_env(tmp_path, made, 11)
    expected = pattern.replace("%4a", "0011").replace("%a", "11").replace("%j", "arr1_11")
    assert env["KBATCH_OUTPUT"] == f"{tmp_path}/{expected}"


def test_a_sweep_row_reaches_its_task_unchanged(tmp_path: Path) -> None:
    hostile = "it's $HOME `id` $(id) \"q\"\nline two\r\n; exit 3 \\ '"
    params = SweepParams(columns=["alpha", "note"], rows=[["1", "plain"], ["2", hostile]])
    made = manifests(tmp_path, params=params, array="0-1")
    assert len(made.config_map["data"]["tasks"].splitlines()) == 2
    env = task_env(tmp_path, made, 1)
    assert (env["alpha"], env["note"]) == ("2", hostile)
    spec = msgspec.json.decode(made.job["metadata"]["annotations"][names.ANNOTATION_SPEC])
    assert "params" not in spec  # the table is in the ConfigMap (annotations hold 256 KiB)
    assert msgspec.json.decode(made.config_map["data"]["params"])["rows"][1][1] == hostile


def test_ten_thousand_tasks_fit_one_config_map(tmp_path: Path) -> None:
    made = manifests(tmp_path, array="0-99999")
    size = sum(len(v.encode()) for v in made.config_map["data"].values())
    assert size < 1024 * 1024  # a ConfigMap's limit, even at 100,000 tasks


def test_kubernetes_index_lists() -> None:
    assert k8s_positions("0,3-5,9", 10) == {0, 3, 4, 5, 9}
    assert k8s_positions("", 10) == set() and k8s_positions(None, 10) == set()
    assert k8s_positions("7-99", 9) == {7, 8}
    assert task_order("1-7:3")[0] == (1, 4, 7) and task_order("1-7:3")[1][7] == 2


# -- states of tasks from a Job and its pods ---------------------------------------------

NOW = "2026-01-01T00:00:00Z"


def job_obj(array: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    spec = msgspec.json.encode(JobSpec(script="-", array=array)).decode()
    return {
        "metadata": {
            "name": "kbatch-arr1",
            "namespace": "ns",
            "labels": {names.LABEL_JOB_ID: "arr1"},
            "annotations": {
                names.ANNOTATION_USER: "ann",
                names.ANNOTATION_SPEC: spec,
                names.ANNOTATION_SUBMITTED: datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
                **(annotations or {}),
            },
        },
        "spec": {"suspend": False, "parallelism": 2, "completions": len(task_order(array)[0])},
        "status": {},
    }


def pod(position: int, phase: str, *, finalizer: bool = True, **terminated: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {"startedAt": NOW}}
    if terminated:
        state = {"terminated": {"startedAt": NOW, "finishedAt": NOW, **terminated}}
    return {
        "metadata": {
            "name": f"kbatch-arr1-{position}",
            "uid": f"uid-{position}",
            "creationTimestamp": NOW,
            "labels": {names.LABEL_JOB_ID: "arr1", names.LABEL_COMPLETION_INDEX: str(position)},
            "finalizers": [TRACKING_FINALIZER] if finalizer else [],
        },
        "status": {"phase": phase, "containerStatuses": [{"state": state}]},
    }


def view_of(obj: dict[str, Any], pods: list[dict[str, Any]]) -> Any:
    spec = msgspec.json.decode(obj["metadata"]["annotations"][names.ANNOTATION_SPEC], type=JobSpec)
    return array_view(obj, pods, job_from_objects(obj, pods), spec)


def rows(view: Any) -> list[tuple[str, JobState, str | None, str | None]]:
    return [(r.id, r.state, r.reason, r.array_tasks) for r in view.rows()]


def test_started_tasks_one_row_each_the_rest_one_group() -> None:
    obj = job_obj("10-15")
    obj["status"] = {"completedIndexes": "0", "failedIndexes": "1"}
    pods = [
        pod(1, "Failed", exitCode=4),
        pod(2, "Running"),
        pod(3, "Running"),
    ]
    view = view_of(obj, pods)
    assert rows(view) == [
        ("arr1_10", JobState.COMPLETED, None, None),
        ("arr1_11", JobState.FAILED, "NonZeroExitCode", None),
        ("arr1_12", JobState.RUNNING, None, None),
        ("arr1_13", JobState.RUNNING, None, None),
        ("arr1", JobState.PENDING, "JobArrayTaskLimit", "14-15"),
    ]
    assert view.job.state is JobState.RUNNING
    assert view.job.array_counts == {"COMPLETED": 1, "FAILED": 1, "PENDING": 2, "RUNNING": 2}
    assert view.task(15).id == "arr1_15" and view.task(15).state is JobState.PENDING
    assert view.task(16) is None
    assert view.task(11).exit_code == 4


def test_cancelled_tasks_and_a_pod_the_job_controller_took_back() -> None:
    obj = job_obj(
        "0-4",
        {
            names.ANNOTATION_CANCELLED_TASKS: "1,4",
            names.ANNOTATION_TIMED_OUT_TASKS: "2",
            names.ANNOTATION_CANCELLED_BY: "ann",
        },
    )
    obj["status"] = {"failedIndexes": "1-2"}
    pods = [
        pod(0, "Failed", finalizer=False, exitCode=143),  # stopped by a lowered throttle
        pod(1, "Failed", exitCode=143),
        pod(2, "Failed", exitCode=143),
    ]
    view = view_of(obj, pods)
    assert view.task(0).state is JobState.PENDING and view.task(0).reason == "PodReplaced"
    assert (view.task(1).state, view.task(1).cancelled_by) == (JobState.CANCELLED, "ann")
    assert (view.task(2).state, view.task(2).reason) == (JobState.TIMEOUT, "TimeLimit")
    assert (view.task(4).state, view.task(4).reason) == (JobState.CANCELLED, "CancelledByUser")
    assert view.task(3).state is JobState.PENDING
    sub = view.subset(view.indexes.parse("1-2"))
    assert sub.state is JobState.TIMEOUT and sub.array_counts == {"CANCELLED": 1, "TIMEOUT": 1}


def test_a_held_array_waits_as_one_row() -> None:
    obj = job_obj("0-9999%50", {names.ANNOTATION_DESIRED: "hold", names.ANNOTATION_THROTTLE: "50"})
    obj["spec"]["suspend"] = True
    view = view_of(obj, [])
    assert rows(view) == [("arr1", JobState.PENDING, "JobHeldUser", "0-9999")]
    assert view.rows()[0].array_throttle == 50 and view.job.array_throttle == 50


def test_a_refresh_keeps_the_rows_of_ended_tasks() -> None:
    obj = job_obj("0-3")
    obj["status"] = {"completedIndexes": "0"}
    before = view_of(obj, [pod(0, "Succeeded", exitCode=0), pod(1, "Running")])
    spec = msgspec.json.decode(obj["metadata"]["annotations"][names.ANNOTATION_SPEC], type=JobSpec)
    pods = [pod(1, "Failed", exitCode=2)]  # task 0's pod is gone; task 1 has ended
    after = array_view(obj, pods, job_from_objects(obj, pods), spec, previous=before)
    assert after.tasks[0] is before.tasks[0]  # not built again
    assert (after.tasks[1].state, after.tasks[1].exit_code) == (JobState.FAILED, 2)
    assert after.job.array_counts == {"COMPLETED": 1, "FAILED": 1, "PENDING": 2}
