"""From a Job and its pods (as dicts) to kbatch's states.  Pure.

===========================================  ==============================
Kubernetes                                   kbatch
===========================================  ==============================
condition Complete                           COMPLETED, exit code 0
condition Failed, reason DeadlineExceeded    TIMEOUT (CANCELLED if we set it)
condition Failed, container OOMKilled        OUT_OF_MEMORY
condition Failed, otherwise                  FAILED, the container's exit code
cancelled annotation, not yet finished       RUNNING/PENDING, reason Cancelling
a pod running                                RUNNING
pods pending / none yet / suspended          PENDING, with the scheduler's or
                                             kubelet's reason (Unschedulable,
                                             ImagePullBackOff...)
===========================================  ==============================
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from kbatch.backends.kubernetes import names
from kbatch.models import Job, JobSpec, JobState

__all__ = ["job_from_objects", "parse_time"]


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def _newest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod that speaks for the job: the newest, a live one before an ended one
    (a replacement made in the same second as the pod it replaces)."""
    if not pods:
        return None

    def key(pod: dict[str, Any]) -> tuple[str, bool]:
        alive = pod.get("status", {}).get("phase") not in ("Failed", "Succeeded")
        return pod.get("metadata", {}).get("creationTimestamp") or "", alive

    return max(pods, key=key)


def _terminated(pod: dict[str, Any] | None) -> dict[str, Any] | None:
    if pod is None:
        return None
    for status in pod.get("status", {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return dict(terminated)
    return None


def _pending_reason(pod: dict[str, Any] | None) -> str:
    if pod is None:
        return "None"
    status = pod.get("status", {})
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"])
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("reason") or "Unschedulable")
    return str(status.get("reason") or "None")


def _state(
    job: dict[str, Any], pods: list[dict[str, Any]]
) -> tuple[JobState, str | None, int | None]:
    cancelled = names.ANNOTATION_CANCELLED in (job.get("metadata", {}).get("annotations") or {})
    pod = _newest(pods)
    if _condition(job, "Complete") or _condition(job, "SuccessCriteriaMet"):
        return JobState.COMPLETED, None, 0
    failed = _condition(job, "Failed") or _condition(job, "FailureTarget")
    if failed:
        terminated = _terminated(pod)
        exit_code = terminated.get("exitCode") if terminated else None
        if cancelled:
            return JobState.CANCELLED, "CancelledByUser", exit_code
        if failed.get("reason") == "DeadlineExceeded":
            return JobState.TIMEOUT, "TimeLimit", exit_code
        if terminated and terminated.get("reason") == "OOMKilled":
            return (
                JobState.OUT_OF_MEMORY,
                "OutOfMemory: the job went over its --mem limit",
                exit_code,
            )
        if terminated is not None:
            reason = "NonZeroExitCode"
            signal = terminated.get("signal")
            if signal:
                reason = f"Signal {signal}"
            return JobState.FAILED, reason, exit_code
        pod_reason = pod.get("status", {}).get("reason") if pod else None
        return JobState.FAILED, str(pod_reason or failed.get("reason") or "Failed"), exit_code
    active = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
    if active:
        return JobState.RUNNING, "Cancelling" if cancelled else None, None
    if cancelled:
        return JobState.PENDING, "Cancelling", None
    return JobState.PENDING, _pending_reason(pod), None


def _started(job: dict[str, Any], pods: list[dict[str, Any]]) -> datetime | None:
    times: list[datetime] = []
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            state = status.get("state") or {}
            started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
            if (parsed := parse_time(started)) is not None:
                times.append(parsed)
    return min(times) if times else None


def job_from_objects(job: dict[str, Any], pods: list[dict[str, Any]]) -> Job:
    """The wire :class:`Job` of a Kubernetes Job and its pods."""
    meta = job.get("metadata", {})
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    try:
        spec = msgspec.json.decode(annotations.get(names.ANNOTATION_SPEC, ""), type=JobSpec)
    except (msgspec.DecodeError, msgspec.ValidationError):
        spec = JobSpec(script="-")
    state, reason, exit_code = _state(job, pods)
    started = _started(job, pods)
    finished: datetime | None = None
    if state.is_terminal:
        finished = parse_time(job.get("status", {}).get("completionTime"))
        for kind in ("Failed", "Complete", "FailureTarget", "SuccessCriteriaMet"):
            condition = _condition(job, kind)
            if finished is None and condition is not None:
                finished = parse_time(condition.get("lastTransitionTime"))
    return Job(
        id=str(labels.get(names.LABEL_JOB_ID, "")),
        user=str(annotations.get(names.ANNOTATION_USER, "")),
        name=str(annotations.get(names.ANNOTATION_NAME, meta.get("name", ""))),
        state=state,
        reason=reason,
        exit_code=exit_code,
        submitted=parse_time(meta.get("creationTimestamp"))
        or datetime.fromtimestamp(0).astimezone(),
        started=started,
        finished=finished,
        workdir=spec.workdir,
        output=annotations.get(names.ANNOTATION_OUTPUT),
        error=annotations.get(names.ANNOTATION_ERROR),
        cpus=spec.cpus,
        memory=spec.memory,
        gpus=spec.gpus,
        time_limit=spec.time_limit,
        comment=spec.comment,
        backend="kubernetes",
    )
