"""From a Job and its pods (as dicts) to kbatch's states.  Pure.

===========================================  ==============================
Kubernetes                                   kbatch
===========================================  ==============================
condition Complete                           COMPLETED, exit code 0
condition Failed, reason DeadlineExceeded    TIMEOUT (CANCELLED if we set it)
condition Failed, container OOMKilled        OUT_OF_MEMORY
condition Failed, setup-failed annotation    FAILED, JobSetupFailed: <why>
condition Failed, otherwise                  FAILED, the container's exit code
desired cancel (or setup failed) and no pod  CANCELLED (FAILED) at once: the
can ever start (suspended / never-schedule)  Job is never started
desired cancel, a pod may still run          RUNNING/PENDING, reason Cancelling
a pod running, or one that ended before the  RUNNING (never back to PENDING)
Job controller wrote its condition
a pod that ran, replaced by a new one        PENDING, reason PodReplaced
suspended, desired hold                      PENDING, reason JobHeldUser
suspended, a start hook failed transiently   PENDING, reason JobSetupPending
pods pending / none yet / suspended          PENDING, with the scheduler's or
                                             kubelet's reason and message
                                             (Unschedulable: 0/1 nodes are...,
                                             ImagePullBackOff...)
no pod: the Job controller cannot create it  PENDING, FailedCreate: <its event's
                                             message> (Pod Security, a quota)
===========================================  ==============================
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from kbatch.backends.kubernetes import names
from kbatch.lifecycle import Desired
from kbatch.models import Job, JobSpec, JobState

__all__ = [
    "can_never_start",
    "desired_of",
    "failed_create_reason",
    "job_from_objects",
    "parse_time",
    "pod_started",
    "short_message",
    "succeeded_unrecorded",
]


def desired_of(job: dict[str, Any]) -> Desired:
    """The desired state recorded on a Job (``run`` when absent or unreadable)."""
    value = (job.get("metadata", {}).get("annotations") or {}).get(names.ANNOTATION_DESIRED)
    try:
        return Desired(value) if value else Desired.RUN
    except ValueError:
        return Desired.RUN


def pod_started(pod: dict[str, Any]) -> bool:
    """Whether the pod's container has started (is running or has run)."""
    status = pod.get("status", {})
    if status.get("phase") in ("Running", "Succeeded"):
        return True
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        if state.get("running") or state.get("terminated"):
            return True
    return False


def can_never_start(job: dict[str, Any]) -> bool:
    """The Job is suspended, or its pods can be scheduled nowhere (how a job that
    never started is ended without starting it)."""
    spec = job.get("spec") or {}
    if spec.get("suspend"):
        return True
    pod_spec = (spec.get("template") or {}).get("spec") or {}
    return names.NEVER_SCHEDULE[0] in (pod_spec.get("nodeSelector") or {})


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _parse_time_or_none(value: str | None) -> datetime | None:
    """A time written in an annotation: None when absent or unreadable."""
    try:
        return parse_time(value)
    except ValueError:
        return None


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
            reason = str(condition.get("reason") or "Unschedulable")
            message = condition.get("message")  # "0/2 nodes are available: 2 Insufficient cpu"
            return f"{reason}: {short_message(message)}" if message else reason
    return str(status.get("reason") or "None")


MESSAGE_CHARS = 200


def short_message(message: str) -> str:
    """A Kubernetes message on one line, cut to MESSAGE_CHARS (kqueue shows it in a column)."""
    text = " ".join(str(message).split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _state(
    job: dict[str, Any],
    pods: list[dict[str, Any]],
    no_pod: str | None = None,
    waiting: str | None = None,
) -> tuple[JobState, str | None, int | None]:
    annotations = job.get("metadata", {}).get("annotations") or {}
    desired = desired_of(job)
    cancelled = desired is Desired.CANCEL or names.ANNOTATION_CANCELLED in annotations
    setup_failed = annotations.get(names.ANNOTATION_SETUP_FAILED)
    pod = _newest(pods)
    if _condition(job, "Complete") or _condition(job, "SuccessCriteriaMet"):
        return JobState.COMPLETED, None, 0
    ran = any(pod_started(p) for p in pods)
    if (cancelled or setup_failed) and not ran and can_never_start(job):
        # ended without ever starting: nothing can run any more, so this is final
        if setup_failed:
            return JobState.FAILED, f"JobSetupFailed: {setup_failed}", None
        return JobState.CANCELLED, _cancel_reason(annotations), None
    failed = _condition(job, "Failed") or _condition(job, "FailureTarget")
    if failed:
        terminated = _terminated(pod)
        exit_code = terminated.get("exitCode") if terminated else None
        if setup_failed and not ran:
            return JobState.FAILED, f"JobSetupFailed: {setup_failed}", None
        if cancelled:
            return JobState.CANCELLED, _cancel_reason(annotations), exit_code
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
    if pod is not None and pod_started(pod) and not _disrupted(pod):
        # The pod has ended and the Job controller has not yet written the Job's
        # condition (about a second): still RUNNING, never back to PENDING.
        return JobState.RUNNING, "Cancelling" if cancelled else None, None
    if ran:  # a pod ran and was lost (node loss, preemption); its replacement waits
        return JobState.PENDING, "PodReplaced", None
    if cancelled:
        return JobState.PENDING, "Cancelling", None
    if (job.get("spec") or {}).get("suspend"):
        if desired is Desired.HOLD:
            return JobState.PENDING, "JobHeldUser", None
        if annotations.get(names.ANNOTATION_SETUP_PENDING):
            return JobState.PENDING, "JobSetupPending", None
        if waiting:  # a gate the reconciler found closed: Dependency, BeginTime...
            return JobState.PENDING, waiting, None
    if pod is None and no_pod:  # the Job controller could not make a pod, and said why
        return JobState.PENDING, no_pod, None
    return JobState.PENDING, _pending_reason(pod), None


def _cancel_reason(annotations: dict[str, Any]) -> str:
    """Who ended a job that was cancelled: a user, or its dependency that can never be met."""
    return str(annotations.get(names.ANNOTATION_CANCEL_REASON) or "CancelledByUser")


def _disrupted(pod: dict[str, Any]) -> bool:
    """The pod was ended from outside (node loss, preemption): the Job replaces it."""
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return True
    return False


def succeeded_unrecorded(job: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
    """The job's pod has ended with success and the Job controller has not yet written
    the Job's condition (it batches pod updates for about a second).  Jobs waiting on
    this one take it as COMPLETED at once: with one pod and ``backoffLimit: 0`` a
    Succeeded pod makes the Job Complete.  (Only a Job deadline passing in that second
    could make it fail instead, and kbatch ends a job at its time limit, 30 s before.)"""
    for kind in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"):
        if _condition(job, kind):
            return False
    pod = _newest(pods)
    return (
        pod is not None
        and pod.get("status", {}).get("phase") == "Succeeded"
        and not _disrupted(pod)
    )


def _started(job: dict[str, Any], pods: list[dict[str, Any]]) -> datetime | None:
    times: list[datetime] = []
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            state = status.get("state") or {}
            started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
            if (parsed := parse_time(started)) is not None:
                times.append(parsed)
    return min(times) if times else None


def job_from_objects(
    job: dict[str, Any],
    pods: list[dict[str, Any]],
    *,
    no_pod: str | None = None,
    waiting: str | None = None,
) -> Job:
    """The wire :class:`Job` of a Kubernetes Job and its pods; ``no_pod``: why the Job
    controller could not create a pod (from its FailedCreate event), if it could not."""
    meta = job.get("metadata", {})
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    try:
        spec = msgspec.json.decode(annotations.get(names.ANNOTATION_SPEC, ""), type=JobSpec)
    except (msgspec.DecodeError, msgspec.ValidationError):
        spec = JobSpec(script="-")
    state, reason, exit_code = _state(job, pods, no_pod, waiting)
    started = _started(job, pods)
    finished: datetime | None = None
    if state.is_terminal and started is None:  # ended before it started: when it was ended
        finished = _parse_time_or_none(
            annotations.get(names.ANNOTATION_CANCELLED)
            or annotations.get(names.ANNOTATION_SETUP_FAILED_AT)
        )
    if state.is_terminal and finished is None:
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
        submitted=_parse_time_or_none(annotations.get(names.ANNOTATION_SUBMITTED))
        or parse_time(meta.get("creationTimestamp"))
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
        cancelled_by=annotations.get(names.ANNOTATION_CANCELLED_BY)
        if state is JobState.CANCELLED
        else None,
        dependency=spec.dependency,
        begin=spec.begin,
    )


def failed_create_reason(events: list[dict[str, Any]]) -> str | None:
    """``FailedCreate: <message>`` of the newest FailedCreate event of a Job (the Job
    controller's: Pod Security refused the pod, a ResourceQuota is exceeded), or None."""
    failed = [e for e in events if e.get("reason") == "FailedCreate" and e.get("message")]
    if not failed:
        return None

    def when(event: dict[str, Any]) -> str:
        return str(
            event.get("lastTimestamp")
            or event.get("eventTime")
            or (event.get("metadata") or {}).get("creationTimestamp")
            or ""
        )

    newest = max(failed, key=when)
    message = str(newest["message"])
    # "Error creating: pods "x" is forbidden: ..." says more without its first words
    message = message.removeprefix("Error creating: ")
    return f"FailedCreate: {short_message(message)}"
