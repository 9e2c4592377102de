"""Safe, collision-free Kubernetes names for any JupyterHub user name.

Follows KubeSpawner's ``safe_slug``: a name that is already a valid DNS label
is used as it is; any other is lowercased, stripped to ``[a-z0-9-]`` and given
a hash of the original, so that two different users never share a slug.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string

__all__ = [
    "ANNOTATION_CANCELLED",
    "ANNOTATION_CANCELLED_BY",
    "ANNOTATION_CANCELLED_STARTED",
    "ANNOTATION_CANCELLED_TASKS",
    "ANNOTATION_CANCEL_REASON",
    "ANNOTATION_DESIRED",
    "ANNOTATION_ERROR",
    "ANNOTATION_FINALIZED",
    "ANNOTATION_IDEMPOTENCY",
    "ANNOTATION_LOG_SAVED",
    "ANNOTATION_NAME",
    "ANNOTATION_OBJECTS_READY",
    "ANNOTATION_OUTPUT",
    "ANNOTATION_RELEASING",
    "ANNOTATION_SETUP_FAILED",
    "ANNOTATION_SETUP_FAILED_AT",
    "ANNOTATION_SETUP_PENDING",
    "ANNOTATION_SPEC",
    "ANNOTATION_SPEC_DIGEST",
    "ANNOTATION_SUBMITTED",
    "ANNOTATION_THROTTLE",
    "ANNOTATION_THROTTLE_SET",
    "ANNOTATION_TIMED_OUT_TASKS",
    "ANNOTATION_USER",
    "LABEL_COMPLETION_INDEX",
    "LABEL_IDEMPOTENCY",
    "LABEL_INSTANCE",
    "LABEL_JOB_ID",
    "LABEL_MANAGED",
    "LABEL_USER",
    "MANAGED_BY",
    "NEVER_SCHEDULE",
    "idempotency_label",
    "is_dns_label",
    "job_object_name",
    "keyed_job_id",
    "namespace_for",
    "new_job_id",
    "safe_slug",
    "selector",
]

PREFIX = "kbatch.jupyter.org"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"  # the deployment (Helm release): one kbatch's objects
LABEL_JOB_ID = f"{PREFIX}/job-id"
LABEL_USER = f"{PREFIX}/user"
ANNOTATION_USER = f"{PREFIX}/username"
ANNOTATION_NAME = f"{PREFIX}/job-name"
ANNOTATION_SPEC = f"{PREFIX}/spec"
ANNOTATION_CANCELLED = f"{PREFIX}/cancelled"  # when a cancel was asked
ANNOTATION_CANCEL_REASON = f"{PREFIX}/cancel-reason"  # when not a user's: its dependency
ANNOTATION_CANCELLED_BY = f"{PREFIX}/cancelled-by"
ANNOTATION_DESIRED = (
    f"{PREFIX}/desired"  # what users asked: run, hold or cancel (lifecycle.Desired)
)
ANNOTATION_OBJECTS_READY = f"{PREFIX}/objects-ready"  # its ConfigMap and Secret exist
ANNOTATION_RELEASING = f"{PREFIX}/releasing"  # a replica's claim to start the job, with a time
ANNOTATION_SETUP_PENDING = f"{PREFIX}/setup-pending"  # why a start waits (a hook's transient error)
ANNOTATION_SETUP_FAILED = f"{PREFIX}/setup-failed"  # why a job could never start
ANNOTATION_SETUP_FAILED_AT = f"{PREFIX}/setup-failed-at"  # and when
ANNOTATION_SUBMITTED = f"{PREFIX}/submitted"  # to the microsecond: jobs list in submission order
ANNOTATION_SPEC_DIGEST = f"{PREFIX}/spec-digest"  # the whole spec's digest, for idempotency
ANNOTATION_FINALIZED = f"{PREFIX}/finalized"  # the end-of-job hook has run
ANNOTATION_IDEMPOTENCY = f"{PREFIX}/idempotency-key"
ANNOTATION_OUTPUT = f"{PREFIX}/output"
ANNOTATION_LOG_SAVED = f"{PREFIX}/log-saved"  # the pod's log was copied into the ConfigMap
ANNOTATION_ERROR = f"{PREFIX}/error"
# Arrays (one Indexed Job each): the tasks users cancelled and those the reconciler ended
# at their time limit (task indexes in --array's form), and the throttle users asked for.
ANNOTATION_CANCELLED_TASKS = f"{PREFIX}/cancelled-tasks"
ANNOTATION_CANCELLED_STARTED = f"{PREFIX}/cancelled-tasks-started"  # those running then
ANNOTATION_TIMED_OUT_TASKS = f"{PREFIX}/timed-out-tasks"
ANNOTATION_THROTTLE = f"{PREFIX}/throttle"
ANNOTATION_THROTTLE_SET = f"{PREFIX}/throttle-set"  # when: tasks running then run on
LABEL_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's
LABEL_IDEMPOTENCY = f"{PREFIX}/idempotency"  # selectable: a digest of user and key
MANAGED_BY = "kbatch"
# A node selector no node matches: put on a never-started Job's pod template
# (mutable while the Job is suspended) before ending it, so no pod of it ever runs.
NEVER_SCHEDULE = (f"{PREFIX}/never-schedule", "true")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_UNSAFE = re.compile(r"[^a-z0-9]+")
_ID_ALPHABET = string.ascii_lowercase + string.digits


def is_dns_label(name: str, max_length: int = 63) -> bool:
    return len(name) <= max_length and bool(_DNS_LABEL.match(name))


def _hash(name: str, length: int = 8) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:length]


def safe_slug(name: str, max_length: int = 40) -> str:
    """A DNS-label slug of ``name``: ``name`` itself when safe, else ``<clean>---<hash>``."""
    if is_dns_label(name, max_length) and "--" not in name:
        return name
    clean = _UNSAFE.sub("-", name.lower()).strip("-")
    if not clean or not clean[0].isalpha():
        clean = "x-" + clean if clean else "x"
    suffix = _hash(name)
    clean = clean[: max_length - len(suffix) - 3].strip("-")
    return f"{clean}---{suffix}"


def idempotency_label(user: str, key: str) -> str:
    """The label value that finds a user's submission by its idempotency key."""
    return _hash(f"{user}\0{key}", length=40)


def selector(instance: str) -> dict[str, str]:
    """The labels that select one kbatch deployment's objects, and nothing of another's."""
    return {LABEL_MANAGED: MANAGED_BY, LABEL_INSTANCE: instance}


def keyed_job_id(instance: str, user: str, key: str) -> str:
    """The job id of ``user``'s submission with idempotency ``key``: the same on every
    replica and retry, so the API server itself refuses a second Job (409).

    A letter and 11 base-36 characters of a digest (over 2**56 values).
    """
    digest = int.from_bytes(hashlib.sha256(f"{instance}\0{user}\0{key}".encode()).digest())
    first = string.ascii_lowercase[digest % 26]
    digest //= 26
    rest = []
    for _ in range(11):
        digest, digit = divmod(digest, len(_ID_ALPHABET))
        rest.append(_ID_ALPHABET[digit])
    return first + "".join(rest)


def new_job_id() -> str:
    """A short, unique job id: a letter and 7 lowercase letters or digits."""
    first = secrets.choice(string.ascii_lowercase)
    return first + "".join(secrets.choice(_ID_ALPHABET) for _ in range(7))


def job_object_name(job_id: str) -> str:
    return f"kbatch-{job_id}"


def namespace_for(user: str, template: str) -> str:
    """The namespace of a user's jobs: ``template`` with ``{username}`` as a safe slug."""
    name = template.format(username=safe_slug(user, max_length=40))
    if not is_dns_label(name):
        raise ValueError(f"namespace template {template!r} gives an invalid name {name!r}")
    return name
