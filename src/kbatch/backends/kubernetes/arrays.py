"""Arrays on Kubernetes: one Indexed Job per array.  Pure: dicts in, models out.

The Job runs completion indexes ``0..n-1``; task ``indexes[k]`` (``1,5,9`` or
``0-99:3`` are sparse) runs as completion index ``k``.  Line ``k`` of the job's
ConfigMap key ``tasks`` holds what differs between tasks, as shell assignments
quoted here (:func:`task_lines`); the entrypoint reads its line for
``$JOB_COMPLETION_INDEX`` and ``eval``s it, so a task needs nothing but a POSIX shell.

A task's state comes from the Job's ``status.completedIndexes`` and
``status.failedIndexes`` and from its pods (their ``batch.kubernetes.io/
job-completion-index`` label), read from the watch cache: no request per task
(:func:`array_view`).  Annotations on the Job record what only kbatch knows:
the tasks users cancelled and those ended at their time limit (task indexes in
``--array``'s form), and the throttle.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from kbatch.arrays import (
    IndexSet,
    aggregate_state,
    params_environment,
    parse_array,
    task_environment,
)
from kbatch.backends.derive import output_paths
from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.status import (
    _cancel_reason,
    _condition,
    _disrupted,
    _pending_reason,
    _terminated,
    can_never_start,
    desired_of,
    parse_time,
    pod_started,
)
from kbatch.lifecycle import Desired
from kbatch.models import Job, JobSpec, JobState

__all__ = [
    "ARRAY_KEY",
    "MARK",
    "MAX_TASKS",
    "PARAMS_KEY",
    "TASKS_KEY",
    "ArrayView",
    "array_header",
    "array_view",
    "contains",
    "k8s_positions",
    "make_indexed",
    "quote",
    "task_lines",
    "task_order",
]

TASKS_KEY = "tasks"  # the ConfigMap key of the tasks' lines
ARRAY_KEY = "array"  # and of what they share
PARAMS_KEY = "params"  # and of a sweep's table (JSON)
# The Job API's bound for an Indexed Job with maxFailedIndexes (and on parallelism).
MAX_TASKS = 100_000
# What stands for the task's index in the output paths' template: no index is this high.
MARK = 4_294_967_291
TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"  # the Job controller's, on its pods
_NEWLINE = "'\"$KBATCH_NL\"'"  # the entrypoint sets KBATCH_NL to a newline: one line per task


def quote(value: str) -> str:
    """``value`` as one shell word on one line: single-quoted, a newline as ``$KBATCH_NL``."""
    body = value.replace("'", "'\\''").replace("\n", _NEWLINE).replace("\r", "'\"$KBATCH_CR\"'")
    return f"'{body}'"


def _output_template(
    spec: JobSpec, *, array_id: str, user: str, indexes: IndexSet
) -> tuple[str, str] | None:
    """The output and error paths of every task as one text with MARK where its index
    goes, if that is what they are (checked on the first and last task), else None."""

    def paths(task: int) -> tuple[str, str]:
        found = output_paths(
            spec, job_id=f"{array_id}_{task}", user=user, array_id=array_id, task=task
        )
        return found.output, found.error or ""

    template = paths(MARK)
    for index in (indexes.first, indexes.last):
        if tuple(t.replace(str(MARK), str(index)) for t in template) != paths(index):
            return None  # e.g. %4a pads, or the pattern holds MARK's digits
    return template


def array_header(spec: JobSpec, *, array_id: str, user: str, indexes: IndexSet) -> str:
    """The ConfigMap's ``array``, sourced by the entrypoint of every task: what all tasks
    share (Slurm's and kbatch's array variables but the task's id) and the template of
    their output paths (``kbatch_output``: MARK stands for the task's index)."""
    shared = task_environment(array_id, indexes.first, indexes)
    for key in ("SLURM_ARRAY_TASK_ID", "KBATCH_ARRAY_TASK_ID"):
        del shared[key]
    template = _output_template(spec, array_id=array_id, user=user, indexes=indexes)
    output, error = template or ("", "")
    values = {
        "kbatch_array_id": array_id,
        "kbatch_mark": str(MARK),
        "kbatch_output": output,
        "kbatch_error": error,
    }
    lines = [f"{name}={quote(value)}" for name, value in values.items()]
    lines.append("export " + " ".join(f"{k}={quote(v)}" for k, v in shared.items()))
    return "\n".join(lines) + "\n"


def task_lines(spec: JobSpec, *, array_id: str, user: str, indexes: IndexSet) -> str:
    """The ConfigMap's ``tasks``: line ``k`` is completion index k's task index, then its
    row of a sweep as ``NAME='value'`` (and its output paths when no template fits)."""
    template = _output_template(spec, array_id=array_id, user=user, indexes=indexes)
    lines = []
    for index in indexes:
        env = dict(params_environment(spec.params, index))
        if template is None:
            paths = output_paths(
                spec, job_id=f"{array_id}_{index}", user=user, array_id=array_id, task=index
            )
            env["KBATCH_OUTPUT"] = paths.output
            if paths.error:
                env["KBATCH_ERROR"] = paths.error
        words = [str(index), *(f"{name}={quote(value)}" for name, value in env.items())]
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=64)
def task_order(text: str) -> tuple[tuple[int, ...], dict[int, int]]:
    """An array's indexes (its ``--array`` text) in completion-index order, and back."""
    order = tuple(IndexSet.parse(text))
    return order, {index: k for k, index in enumerate(order)}


def k8s_positions(text: str | None, limit: int) -> set[int]:
    """The completion indexes of a Job status field such as ``1,3-5,7`` (below ``limit``)."""
    found: set[int] = set()
    for item in (text or "").split(","):
        start, _, stop = item.strip().partition("-")
        if not start.isdigit() or (stop and not stop.isdigit()):
            continue
        first, last = int(start), int(stop or start)
        found.update(range(first, min(last, limit - 1) + 1))
    return found


def contains(indexes: IndexSet, index: int) -> bool:
    """``index in indexes`` in O(log runs) (IndexSet's own test walks every run)."""
    starts = [run.start for run in indexes.runs]
    k = bisect.bisect_right(starts, index) - 1
    return k >= 0 and index in indexes.runs[k]


def _index_of(pod: dict[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    value = (meta.get("labels") or {}).get(names.LABEL_COMPLETION_INDEX) or (
        meta.get("annotations") or {}
    ).get("batch.kubernetes.io/job-completion-index")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _newest(pods: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The pod that speaks for each completion index: the newest, a live one first."""
    best: dict[int, tuple[tuple[str, bool], dict[str, Any]]] = {}
    for pod in pods:
        k = _index_of(pod)
        if k is None:
            continue
        alive = (pod.get("status") or {}).get("phase") not in ("Failed", "Succeeded")
        key = ((pod.get("metadata") or {}).get("creationTimestamp") or "", alive)
        if k not in best or key >= best[k][0]:
            best[k] = (key, pod)
    return {k: pod for k, (_, pod) in best.items()}


def _times(pod: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    started: datetime | None = None
    finished: datetime | None = None
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        running = state.get("running") or state.get("terminated") or {}
        started = parse_time(running.get("startedAt")) or started
        finished = parse_time((state.get("terminated") or {}).get("finishedAt")) or finished
    return started, finished


@dataclass
class ArrayView:
    """An array as kbatch shows it: the whole, each started task, the waiting groups."""

    job: Job  # the whole array (aggregate state, counts, highest exit code)
    tasks: dict[int, Job]  # task index -> its row, for every task that started
    groups: list[Job]  # rows of tasks not started, by state and reason (array_tasks)
    indexes: IndexSet
    waiting: dict[int, Job] = field(default_factory=dict)  # index -> its group's row

    def task(self, index: int) -> Job | None:
        """Task ``index`` (None if the array has no such task)."""
        found = self.tasks.get(index)
        if found is not None:
            return found
        for group in self.groups:
            if group.array_tasks and contains(IndexSet.parse(group.array_tasks), index):
                return msgspec.structs.replace(
                    group,
                    id=f"{self.job.id}_{index}",
                    array_task_id=index,
                    array_tasks=None,
                    array_throttle=None,
                )
        return None

    def rows(self) -> list[Job]:
        return [*self.tasks.values(), *self.groups]

    def subset(self, wanted: IndexSet) -> Job | None:
        """The tasks of ``wanted`` that the array has, as one job (None if none)."""
        chosen = [i for i in self.indexes if contains(wanted, i)]
        if not chosen:
            return None
        jobs = [job for i in chosen if (job := self.task(i)) is not None]
        shown = f"{self.job.id}_[{IndexSet.of(chosen)}]"
        return _aggregate(self.job, jobs, id=shown, tasks=IndexSet.of(chosen))


def _aggregate(base: Job, jobs: list[Job], *, id: str, tasks: IndexSet) -> Job:
    counts: dict[JobState, int] = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    state = aggregate_state(counts)
    codes = [j.exit_code for j in jobs if j.exit_code is not None]
    starts = [j.started for j in jobs if j.started is not None]
    ends = [j.finished for j in jobs if j.finished is not None]
    reason = None
    if state is JobState.PENDING:
        reason = next((j.reason for j in jobs if j.state is JobState.PENDING), None)
    elif state.is_terminal and state is not JobState.COMPLETED:
        reason = next((j.reason for j in jobs if j.state is state), None)
    return msgspec.structs.replace(
        base,
        id=id,
        state=state,
        reason=reason,
        exit_code=max(codes) if codes and state.is_terminal else None,
        started=min(starts) if starts else None,
        finished=max(ends) if ends and state.is_terminal else None,
        array_tasks=str(tasks),
        array_counts={str(k): v for k, v in sorted(counts.items())},
    )


def array_view(
    obj: dict[str, Any],
    pods: list[dict[str, Any]],
    base: Job,
    spec: JobSpec,
    *,
    no_pod: str | None = None,
    waiting: str | None = None,
    previous: ArrayView | None = None,
) -> ArrayView:
    """The array a Job (``base``: its model as a job, ``spec``: its recorded spec) and
    its pods stand for; see the module's docstring.  The rows of tasks that had ended
    in ``previous`` (the view before this change) are kept as they were: an end is
    final, and a long array's refresh then costs what changed, not what ran."""
    ended_before = {} if previous is None else previous.tasks
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    array_id = base.id
    order, _ = task_order(spec.array or "0")
    indexes = IndexSet.parse(spec.array or "0")
    status = obj.get("status") or {}
    job_spec = obj.get("spec") or {}
    n = len(order)
    completed = k8s_positions(status.get("completedIndexes"), n)
    failed = k8s_positions(status.get("failedIndexes"), n)
    cancelled = IndexSet.parse(annotations.get(names.ANNOTATION_CANCELLED_TASKS, ""))
    ran_before = IndexSet.parse(annotations.get(names.ANNOTATION_CANCELLED_STARTED, ""))
    timed_out = IndexSet.parse(annotations.get(names.ANNOTATION_TIMED_OUT_TASKS, ""))
    whole_cancel = desired_of(obj) is Desired.CANCEL
    setup_failed = annotations.get(names.ANNOTATION_SETUP_FAILED)
    job_ended = _condition(obj, "Failed") or _condition(obj, "FailureTarget")
    never = can_never_start(obj)
    newest = _newest(pods)
    active = sum(
        1 for p in newest.values() if (p.get("status") or {}).get("phase") in ("Pending", "Running")
    )
    parallelism = job_spec.get("parallelism")
    throttle_text = annotations.get(names.ANNOTATION_THROTTLE)
    throttle = int(throttle_text) if throttle_text and throttle_text.isdigit() else None
    cancel_reason = _cancel_reason(annotations)
    by = annotations.get(names.ANNOTATION_CANCELLED_BY)
    template = msgspec.structs.replace(
        base, array_job_id=array_id, array_throttle=None, array_tasks=None, array_counts=None
    )

    def task_job(index: int, state: JobState, reason: str | None, **extra: Any) -> Job:
        task_id = f"{array_id}_{index}"
        paths = output_paths(spec, job_id=task_id, user=base.user, array_id=array_id, task=index)
        return msgspec.structs.replace(
            template,
            id=task_id,
            array_task_id=index,
            state=state,
            reason=reason,
            output=paths.output,
            error=paths.error,
            cancelled_by=by if state is JobState.CANCELLED else None,
            **extra,
        )

    def ended(index: int, pod: dict[str, Any] | None) -> tuple[JobState, str | None, int | None]:
        terminated = _terminated(pod)
        code = terminated.get("exitCode") if terminated else None
        pod_reason = ((pod or {}).get("status") or {}).get("reason")
        if contains(timed_out, index) or pod_reason == "DeadlineExceeded":
            return JobState.TIMEOUT, "TimeLimit", code
        if contains(cancelled, index) or whole_cancel:
            return JobState.CANCELLED, cancel_reason, code
        if terminated and terminated.get("reason") == "OOMKilled":
            return JobState.OUT_OF_MEMORY, "OutOfMemory: the task went over its --mem limit", code
        if terminated is not None:
            signal = terminated.get("signal")
            return JobState.FAILED, f"Signal {signal}" if signal else "NonZeroExitCode", code
        return JobState.FAILED, str(pod_reason or "Failed"), code

    uncounted = set((status.get("uncountedTerminatedPods") or {}).get("failed") or [])

    def counted(pod: dict[str, Any]) -> bool:
        """A failed pod the Job controller counts (its index fails): not one it took its
        finalizer from and deleted because parallelism was lowered (that task waits again)."""
        meta = pod.get("metadata") or {}
        if job_ended or whole_cancel:  # the Job's end (or cancel) stopped it: it is over
            return True
        return TRACKING_FINALIZER in (meta.get("finalizers") or []) or meta.get("uid") in uncounted

    tasks: dict[int, Job] = {}
    started_positions = completed | failed | set(newest)
    for k in sorted(started_positions):
        if k >= n:
            continue
        index = order[k]
        kept = ended_before.get(index)
        if kept is not None and kept.state.is_terminal and kept.array_job_id == array_id:
            tasks[index] = kept
            continue
        pod = newest.get(k)
        phase = ((pod or {}).get("status") or {}).get("phase")
        began, finished = _times(pod) if pod is not None else (None, None)
        if k in completed or phase == "Succeeded":
            tasks[index] = task_job(
                index, JobState.COMPLETED, None, exit_code=0, started=began, finished=finished
            )
        elif k in failed or (
            phase == "Failed" and pod is not None and not _disrupted(pod) and counted(pod)
        ):
            state, reason, code = ended(index, pod)
            tasks[index] = task_job(
                index, state, reason, exit_code=code, started=began, finished=finished
            )
        elif pod is not None and phase != "Failed" and pod_started(pod) and not _disrupted(pod):
            pending_cancel = whole_cancel or contains(cancelled, index)
            tasks[index] = task_job(
                index, JobState.RUNNING, "Cancelling" if pending_cancel else None, started=began
            )
    for index in ran_before:  # running when cancelled, their pods gone since
        if index not in tasks and contains(indexes, index) and (whole_cancel or job_ended):
            tasks[index] = task_job(index, JobState.CANCELLED, cancel_reason)
    tasks = dict(sorted(tasks.items()))
    # tasks that have not started, grouped by what keeps them
    default_state, default_reason = JobState.PENDING, "None"
    if setup_failed and never:
        default_state, default_reason = JobState.FAILED, f"JobSetupFailed: {setup_failed}"
    elif whole_cancel and (never or job_ended):
        default_state, default_reason = JobState.CANCELLED, cancel_reason
    elif job_ended:
        default_state, default_reason = JobState.CANCELLED, str(job_ended.get("reason") or "Failed")
    elif whole_cancel:
        default_reason = "Cancelling"
    elif desired_of(obj) is Desired.HOLD:  # suspended, or its tasks running on
        default_reason = "JobHeldUser"
    elif job_spec.get("suspend"):
        if annotations.get(names.ANNOTATION_SETUP_PENDING):
            default_reason = "JobSetupPending"
        elif waiting:
            default_reason = waiting
    elif no_pod:
        default_reason = no_pod
    elif parallelism is not None and active >= parallelism:
        default_reason = "JobArrayTaskLimit"
    groups: dict[tuple[JobState, str], list[int]] = {}
    special: dict[int, tuple[JobState, str]] = {}
    for k, pod in newest.items():
        if k < n and order[k] not in tasks:  # a pod that has not started, or was replaced
            replaced = _disrupted(pod) or (pod.get("status") or {}).get("phase") == "Failed"
            reason = "PodReplaced" if replaced else _pending_reason(pod)
            special[order[k]] = (
                default_state,
                reason if default_state is JobState.PENDING else default_reason,
            )
    for index in cancelled:
        if not contains(indexes, index) or contains(ran_before, index):
            continue
        seen = tasks.get(index)
        if seen is None or seen.state is not JobState.COMPLETED:
            # cancelled before it started: whatever a pod made since did meanwhile
            tasks.pop(index, None)
            special[index] = (JobState.CANCELLED, cancel_reason)
    if special:
        for index in indexes:
            key = special.get(index, (default_state, default_reason))
            if index not in tasks:
                groups.setdefault(key, []).append(index)
    elif len(tasks) == 0:
        groups[(default_state, default_reason)] = list(order)
    else:
        rest = [i for i in order if i not in tasks]
        if rest:
            groups[(default_state, default_reason)] = rest
    group_rows = []
    for (state, reason), members in groups.items():
        shown = IndexSet.of(members) if len(members) != n else indexes
        group_rows.append(
            msgspec.structs.replace(
                template,
                id=array_id,
                array_job_id=array_id,
                state=state,
                reason=reason,
                started=None,
                finished=base.finished if state.is_terminal else None,
                exit_code=None,
                array_tasks=str(shown),
                array_throttle=throttle if state is JobState.PENDING else None,
                cancelled_by=by if state is JobState.CANCELLED else None,
            )
        )
    group_rows.sort(key=lambda j: (j.state is not JobState.PENDING, j.array_tasks or ""))
    counts: dict[JobState, int] = {}
    for job in tasks.values():
        counts[job.state] = counts.get(job.state, 0) + 1
    for (state, _), members in groups.items():
        counts[state] = counts.get(state, 0) + len(members)
    whole_state = aggregate_state(counts)
    codes = [j.exit_code for j in tasks.values() if j.exit_code is not None]
    starts = [j.started for j in tasks.values() if j.started is not None]
    ends = [j.finished for j in tasks.values() if j.finished is not None]
    if whole_state is JobState.PENDING:
        whole_reason = next((g.reason for g in group_rows if g.state is JobState.PENDING), None)
    elif whole_state.is_terminal and whole_state is not JobState.COMPLETED:
        whole_reason = next(
            (j.reason for j in [*tasks.values(), *group_rows] if j.state is whole_state), None
        )
    else:
        whole_reason = "Cancelling" if whole_cancel else None
    whole = msgspec.structs.replace(
        base,
        state=whole_state,
        reason=whole_reason,
        exit_code=max(codes) if codes and whole_state.is_terminal else None,
        started=min(starts) if starts else None,
        finished=(max(ends) if ends else base.finished) if whole_state.is_terminal else None,
        array_job_id=array_id,
        array_tasks=str(indexes),
        array_throttle=throttle,
        array_counts={str(k): v for k, v in sorted(counts.items())},
        cancelled_by=by if whole_state is JobState.CANCELLED else None,
    )
    return ArrayView(job=whole, tasks=tasks, groups=group_rows, indexes=indexes)


def spec_of_annotations(annotations: Mapping[str, str]) -> JobSpec | None:
    try:
        spec: JobSpec = msgspec.json.decode(
            annotations.get(names.ANNOTATION_SPEC, ""), type=JobSpec
        )
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return spec


def make_indexed(
    job: dict[str, Any], config_data: dict[str, str], spec: JobSpec, *, user: str, grace: int
) -> None:
    """Turn a job's manifests (built as for one job) into an array's, in place.

    One Indexed Job: ``completions`` tasks, at most ``parallelism`` (the throttle) at
    once; ``backoffLimitPerIndex: 0`` and ``maxFailedIndexes`` = all, so a failed task
    is not retried and does not stop the others (the disruption rule still retries a
    pod lost to its node).  The time limit is each task's: the pod's own deadline (the
    kubelet enforces it, from the pod's start) lies ``grace`` s after the limit the
    reconciler keeps; the Job has none.  The ConfigMap gets the tasks' lines and the
    sweep's table (the Job's annotations could not hold it: 256 KiB in all)."""
    request = parse_array(spec.array or "0")
    count = len(request.indexes)
    meta = job["metadata"]
    array_id = meta["labels"][names.LABEL_JOB_ID]
    job_spec = job["spec"]
    job_spec.pop("backoffLimit", None)  # with backoffLimitPerIndex it must count all failures
    job_spec.pop("activeDeadlineSeconds", None)
    job_spec.update(
        {
            "completionMode": "Indexed",
            "completions": count,
            "parallelism": min(request.throttle or count, count),
            "backoffLimitPerIndex": 0,
            "maxFailedIndexes": count,
        }
    )
    if spec.time_limit:
        job_spec["template"]["spec"]["activeDeadlineSeconds"] = spec.time_limit + grace
    annotations = meta["annotations"]
    # present from the start, so that a JSON patch can test their value (a claim)
    annotations[names.ANNOTATION_CANCELLED_TASKS] = ""
    annotations[names.ANNOTATION_TIMED_OUT_TASKS] = ""
    annotations[names.ANNOTATION_THROTTLE] = str(request.throttle or "")
    annotations.pop(names.ANNOTATION_OUTPUT, None)  # each task has its own (%A_%a)
    annotations.pop(names.ANNOTATION_ERROR, None)
    public = msgspec.json.decode(annotations[names.ANNOTATION_SPEC])
    public.pop("params", None)
    annotations[names.ANNOTATION_SPEC] = msgspec.json.encode(public).decode()
    config_data[ARRAY_KEY] = array_header(
        spec, array_id=array_id, user=user, indexes=request.indexes
    )
    config_data[TASKS_KEY] = task_lines(spec, array_id=array_id, user=user, indexes=request.indexes)
    if spec.params is not None:
        config_data[PARAMS_KEY] = msgspec.json.encode(spec.params).decode()
