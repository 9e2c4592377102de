"""The watch cache's slim records keep what the backend reads: every state derived from
a slimmed Job and its slimmed pods is the one derived from the whole objects."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import msgspec
import pytest

from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.arrays import TRACKING_FINALIZER, array_view
from kbatch.backends.kubernetes.manifests import JobContext, build_manifests
from kbatch.backends.kubernetes.slim import slim_job, slim_pod
from kbatch.backends.kubernetes.status import (
    can_never_start,
    desired_of,
    job_from_objects,
    pod_started,
    succeeded_unrecorded,
)
from kbatch.models import JobSpec

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z", "2026-01-01T00:01:00Z"
MANAGED = [
    {
        "apiVersion": "batch/v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:annotations": {f"f:{i}": {} for i in range(20)}}},
        "manager": "kbatch",
        "operation": "Update",
        "time": T0,
    }
]


def full_job(array: str | None = None, **status: Any) -> dict[str, Any]:
    """A Job as the API server returns it: the manifest kbatch makes, plus the server's."""
    spec = JobSpec(script="#!/bin/sh\ntrue\n", name="n", cpus=2, time_limit=60, array=array)
    ctx = JobContext(job_id="abc12345", user="ann", namespace="ns", default_image="img")
    job = build_manifests(spec, ctx).job
    job["metadata"].update(
        uid="u-1",
        resourceVersion="42",
        generation=2,
        creationTimestamp=T0,
        managedFields=MANAGED,
    )
    job["spec"].update(
        completions=job["spec"].get("completions", 1),
        parallelism=job["spec"].get("parallelism", 1),
        selector={"matchLabels": {"batch.kubernetes.io/controller-uid": "u-1"}},
        manualSelector=False,
        podReplacementPolicy="TerminatingOrFailed",
    )
    job["spec"]["template"]["metadata"]["labels"]["controller-uid"] = "u-1"
    job["status"] = {"startTime": T1, **status}
    return job


def cond(kind: str, reason: str = "", status: str = "True") -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": f"{kind} because {reason}",
        "lastProbeTime": T2,
        "lastTransitionTime": T2,
    }


def full_pod(
    phase: str,
    state: dict[str, Any] | None,
    *,
    index: int = 0,
    conditions: tuple[dict[str, Any], ...] = (),
    deleting: bool = False,
    finalizer: bool = True,
) -> dict[str, Any]:
    """A pod as the API server returns it, with its spec and all its status."""
    meta: dict[str, Any] = {
        "name": f"kbatch-abc12345-{index}-x",
        "generateName": "kbatch-abc12345-",
        "namespace": "ns",
        "uid": f"pod-{index}",
        "resourceVersion": "50",
        "creationTimestamp": T0,
        "labels": {
            names.LABEL_JOB_ID: "abc12345",
            names.LABEL_COMPLETION_INDEX: str(index),
            "batch.kubernetes.io/controller-uid": "u-1",
        },
        "annotations": {"batch.kubernetes.io/job-completion-index": str(index), "x": "y"},
        "ownerReferences": [{"kind": "Job", "name": "kbatch-abc12345", "uid": "u-1"}],
        "finalizers": [TRACKING_FINALIZER] if finalizer else [],
        "managedFields": MANAGED,
    }
    if deleting:
        meta["deletionTimestamp"] = T2
    container: dict[str, Any] = {
        "name": "job",
        "image": "img",
        "imageID": "sha256:0",
        "containerID": "containerd://1",
        "ready": phase == "Running",
        "restartCount": 0,
        "started": phase == "Running",
        "lastState": {},
    }
    if state is not None:
        container["state"] = state
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "job", "image": "img"}], "nodeName": "n1"},
        "status": {
            "phase": phase,
            "hostIP": "10.0.0.1",
            "podIP": "10.1.0.1",
            "qosClass": "Burstable",
            "startTime": T1,
            "conditions": [cond("Initialized"), cond("Ready"), *conditions],
            "containerStatuses": [container],
        },
    }


RUNNING = {"running": {"startedAt": T1}}
WAITING = {"waiting": {"reason": "ImagePullBackOff", "message": "back-off pulling"}}


def ended(code: int, reason: str = "Error", **more: Any) -> dict[str, Any]:
    return {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            "startedAt": T1,
            "finishedAt": T2,
            "containerID": "containerd://1",
            **more,
        }
    }


JOBS = {
    "plain": full_job(),
    "suspended": full_job(),
    "held": full_job(),
    "cancelled-never-started": full_job(),
    "setup-failed": full_job(),
    "complete": full_job(conditions=[cond("Complete")], completionTime=T2, succeeded=1),
    "failed": full_job(conditions=[cond("FailureTarget"), cond("Failed", "PodFailurePolicy")]),
    "deadline": full_job(conditions=[cond("Failed", "DeadlineExceeded")]),
}
JOBS["suspended"]["spec"]["suspend"] = True
JOBS["held"]["spec"]["suspend"] = True
JOBS["held"]["metadata"]["annotations"][names.ANNOTATION_DESIRED] = "hold"
never = JOBS["cancelled-never-started"]
never["spec"]["template"]["spec"]["nodeSelector"] = dict([names.NEVER_SCHEDULE])
never["metadata"]["annotations"].update(
    {names.ANNOTATION_DESIRED: "cancel", names.ANNOTATION_CANCELLED: T2}
)
JOBS["setup-failed"]["spec"]["suspend"] = True
JOBS["setup-failed"]["metadata"]["annotations"][names.ANNOTATION_SETUP_FAILED] = "no token"

PODS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "unschedulable": [
        full_pod(
            "Pending",
            None,
            conditions=(cond("PodScheduled", "Unschedulable", "False"),),
        )
    ],
    "waiting": [full_pod("Pending", WAITING)],
    "running": [full_pod("Running", RUNNING)],
    "succeeded": [full_pod("Succeeded", ended(0, "Completed"))],
    "oom": [full_pod("Failed", ended(137, "OOMKilled"))],
    "signal": [full_pod("Failed", ended(143, signal=15))],
    "evicted-and-replaced": [
        full_pod("Failed", ended(137), conditions=(cond("DisruptionTarget", "Evicted"),)),
        full_pod("Pending", None, index=1),
    ],
    "deleting": [full_pod("Running", RUNNING, deleting=True)],
}


@pytest.mark.parametrize(("job_case", "pods_case"), list(itertools.product(JOBS, PODS)))
def test_a_slim_record_derives_what_the_whole_object_does(job_case: str, pods_case: str) -> None:
    job, pods = JOBS[job_case], PODS[pods_case]
    before = copy.deepcopy((job, pods))
    slim, slim_pods = slim_job(job), [slim_pod(p) for p in pods]
    assert (job, pods) == before  # the objects are not changed
    assert job_from_objects(slim, slim_pods) == job_from_objects(job, pods)
    for no_pod, waiting in (("FailedCreate: quota", None), (None, "Dependency")):
        assert job_from_objects(slim, slim_pods, no_pod=no_pod, waiting=waiting) == (
            job_from_objects(job, pods, no_pod=no_pod, waiting=waiting)
        )
    assert succeeded_unrecorded(slim, slim_pods) == succeeded_unrecorded(job, pods)
    assert can_never_start(slim) == can_never_start(job)
    assert desired_of(slim) == desired_of(job)
    assert [pod_started(p) for p in slim_pods] == [pod_started(p) for p in pods]


def test_a_slim_record_keeps_what_the_reconciler_reads() -> None:
    job = JOBS["deadline"]
    slim = slim_job(job)
    for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "labels"):
        assert slim["metadata"][key] == job["metadata"][key]
    assert slim["metadata"]["annotations"] == job["metadata"]["annotations"]
    assert slim["status"] == job["status"]
    for key in ("suspend", "parallelism", "completions", "activeDeadlineSeconds"):
        assert slim["spec"].get(key) == job["spec"].get(key)
    pod = PODS["deleting"][0]
    kept = slim_pod(pod)
    assert kept["metadata"]["deletionTimestamp"] == T2
    assert kept["metadata"]["finalizers"] == [TRACKING_FINALIZER]
    assert kept["status"]["startTime"] == T1
    assert "managedFields" not in kept["metadata"] and "spec" not in kept
    assert "managedFields" not in slim["metadata"] and "template" not in slim["spec"]
    # what is kept is a small part of what came
    assert len(json.dumps(slim)) * 2 < len(json.dumps(job))
    assert len(json.dumps(kept)) * 2 < len(json.dumps(pod))


def test_an_array_from_slim_records_is_the_same_array() -> None:
    job = full_job("0-9%3", completedIndexes="0", failedIndexes="1-2")
    job["metadata"]["annotations"].update(
        {names.ANNOTATION_CANCELLED_TASKS: "2", names.ANNOTATION_CANCELLED_BY: "ann"}
    )
    job["status"]["uncountedTerminatedPods"] = {"failed": ["pod-3"]}
    pods = [
        full_pod("Succeeded", ended(0, "Completed"), index=0),
        full_pod("Failed", ended(4), index=1),
        full_pod("Failed", ended(143, signal=15), index=2),
        full_pod("Failed", ended(1), index=3, finalizer=False),
        full_pod("Running", RUNNING, index=4),
        full_pod("Pending", WAITING, index=5),
        full_pod("Running", RUNNING, index=6, deleting=True),
    ]
    spec = msgspec.json.decode(job["metadata"]["annotations"][names.ANNOTATION_SPEC], type=JobSpec)
    slim, slim_pods = slim_job(job), [slim_pod(p) for p in pods]
    whole = array_view(job, pods, job_from_objects(job, pods), spec)
    kept = array_view(slim, slim_pods, job_from_objects(slim, slim_pods), spec)
    assert kept.job == whole.job
    assert kept.rows() == whole.rows()
    assert kept.tasks == whole.tasks
