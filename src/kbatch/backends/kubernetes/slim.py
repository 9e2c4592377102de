"""What the watch cache keeps of a Job or a Pod: the fields the backend reads.

A Job as the API server returns it carries its whole pod template and its
``managedFields`` (about 20 KB as Python dicts); the backend reads its
labels, annotations, a few ``spec`` fields and its status.  A Pod carries its
spec and much status the backend never looks at.  The cache keeps one slim
record per object, built here and nowhere else, in the same shape as the
object (a dict with the same keys at the same paths), so that every reader
(:mod:`.status`, :mod:`.arrays`, the reconciler) reads a slim record as it
would the whole object.  Keep these lists in step with what they read: a
field dropped here reads as absent.

Strings that repeat in every object (keys, the namespace, label values) are
interned, so ten thousand records share one copy of each.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

from kbatch.backends.kubernetes import names

__all__ = ["slim_job", "slim_pod"]

_META = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
)
# read by the reconciler, status.py and arrays.py (the template: only whether it is
# made unschedulable, names.NEVER_SCHEDULE)
_JOB_SPEC = ("suspend", "parallelism", "completions", "activeDeadlineSeconds", "completionMode")
# a Job's status is small (conditions, counts, times, indexes): kept whole
_POD_STATUS = ("phase", "reason", "startTime")
_POD_CONDITIONS = ("PodScheduled", "DisruptionTarget")  # why it waits; whether it was evicted
_CONDITION = ("type", "status", "reason", "message")
_TERMINATED = ("exitCode", "reason", "signal", "startedAt", "finishedAt")
_POD_ANNOTATIONS = ("batch.kubernetes.io/job-completion-index",)
_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"


def _intern(value: Any) -> Any:
    return sys.intern(value) if isinstance(value, str) else value


def _strings(mapping: Mapping[str, Any] | None, *, values: bool = True) -> dict[str, Any]:
    """A copy of a mapping of strings, its keys (and values) interned."""
    if not mapping:
        return {}
    if values:
        return {sys.intern(k): _intern(v) for k, v in mapping.items()}
    return {sys.intern(k): v for k, v in mapping.items()}


def _pick(mapping: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: mapping[k] for k in keys if mapping.get(k) is not None}


def _metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    out = _pick(meta, _META)
    out["namespace"] = _intern(out.get("namespace", ""))
    out["labels"] = _strings(meta.get("labels"))
    return out


def slim_job(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a Job the backend reads, in the Job's own shape."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    metadata = _metadata(meta)
    metadata["annotations"] = _strings(meta.get("annotations"), values=False)
    slim_spec = _pick(spec, _JOB_SPEC)
    pod_spec = (spec.get("template") or {}).get("spec") or {}
    selector = pod_spec.get("nodeSelector") or {}
    key = names.NEVER_SCHEDULE[0]
    if key in selector:
        slim_spec["template"] = {"spec": {"nodeSelector": {key: selector[key]}}}
    return {"metadata": metadata, "spec": slim_spec, "status": dict(obj.get("status") or {})}


def _container_status(status: Mapping[str, Any]) -> dict[str, Any]:
    state = status.get("state") or {}
    slim: dict[str, Any] = {}
    if (running := state.get("running")) is not None:
        slim["running"] = _pick(running, ("startedAt",))
    if (terminated := state.get("terminated")) is not None:
        slim["terminated"] = _pick(terminated, _TERMINATED)
    if (waiting := state.get("waiting")) is not None:
        slim["waiting"] = _pick(waiting, ("reason",))
    return {"name": _intern(status.get("name")), "state": slim}


def slim_pod(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a Pod the backend reads, in the Pod's own shape."""
    meta = obj.get("metadata") or {}
    metadata = _metadata(meta)
    annotations = meta.get("annotations") or {}
    metadata["annotations"] = {
        sys.intern(k): annotations[k] for k in _POD_ANNOTATIONS if k in annotations
    }
    if _TRACKING_FINALIZER in (meta.get("finalizers") or ()):
        metadata["finalizers"] = [_TRACKING_FINALIZER]
    status = obj.get("status") or {}
    slim_status = _pick(status, _POD_STATUS)
    if "phase" in slim_status:
        slim_status["phase"] = _intern(slim_status["phase"])
    conditions = [
        _pick(c, _CONDITION)
        for c in status.get("conditions") or ()
        if c.get("type") in _POD_CONDITIONS
    ]
    if conditions:
        slim_status["conditions"] = conditions
    containers = [_container_status(c) for c in status.get("containerStatuses") or ()]
    if containers:
        slim_status["containerStatuses"] = containers
    return {"metadata": metadata, "status": slim_status}
