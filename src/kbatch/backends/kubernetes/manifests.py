"""Pure builders: a JobSpec and its context in, Kubernetes manifests (dicts) out.

A job is three objects: the Job, a ConfigMap holding the script and the
entrypoint, and a Secret holding the environment.  The Job is the record:
labels say whose job it is and which kbatch deployment (instance) made it,
annotations hold its name, the spec the user sent (without script and
environment), the desired state (run, hold, cancel) and any cancellation.
The ConfigMap and the Secret are owned by the Job, so deleting the Job cleans
them up.  The Job is always created suspended: the reconciler starts it (and
only then makes the job's token) when its desired state is ``run``.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources import files
from typing import Any

import msgspec

from kbatch.backends.derive import job_environment, job_name, output_paths
from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.notebook import NotebookDefaults
from kbatch.errors import SpecError
from kbatch.models import JobSpec

__all__ = [
    "CODE_DIR",
    "GPU_RESOURCE",
    "RESTRICTED",
    "TIME_LIMIT_GRACE",
    "CodeTransfer",
    "JobContext",
    "Manifests",
    "build_manifests",
    "check_not_root",
    "check_pod_security",
    "merge",
    "owner_reference",
    "spec_digest",
]

GPU_RESOURCE = "nvidia.com/gpu"
SCRIPT_DIR = "/kbatch"
# What Pod Security "restricted" asks of a container: the default of every job's
RESTRICTED: dict[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
TIME_LIMIT_GRACE = 30  # seconds the Job's deadline lies after the time limit the reconciler keeps
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
ENTRYPOINT = files("kbatch.backends.kubernetes").joinpath("entrypoint.sh").read_text()


CODE_DIR = "/code"  # where a job with uploaded files (--code) starts, an emptyDir
TRANSFER_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "256Mi"},
}


@dataclass(frozen=True)
class CodeTransfer:
    """How a job's pod gets its uploaded files and hands back its results (--code).

    Two containers of kbatch's own ``image`` beside the job's: an init container
    that downloads the files into ``/code`` before the job starts, and a native
    sidecar (an init container with ``restartPolicy: Always``) that, told by the
    kubelet that the job has ended, sends back what is new or changed.  Both reach
    the server at ``url`` with ``token``, good for this job's files alone.
    """

    url: str
    image: str
    token: str


@dataclass(frozen=True)
class JobContext:
    """Everything besides the user's spec that a job's manifests depend on."""

    job_id: str
    user: str
    namespace: str
    default_image: str
    instance: str = "kbatch"  # the deployment's instance label (its Helm release)
    output: str | None = None  # output file path in the job's file system; None: derived
    error: str | None = None  # None: derived (and None when the spec has no error pattern)
    ttl_seconds: int | None = None
    notebook: NotebookDefaults | None = None
    template: dict[str, Any] = field(default_factory=dict)  # admin's Job template, merged in
    extra_environment: dict[str, str] = field(default_factory=dict)  # from job hooks
    idempotency_key: str | None = None
    submitted: datetime | None = None  # when it was submitted (creationTimestamp has seconds)
    # the job container's securityContext when the notebook's does not say (the admin's)
    security_context: dict[str, Any] = field(default_factory=lambda: dict(RESTRICTED))
    forbid_root: bool = False  # refuse jobs that would run as user 0
    transfer: CodeTransfer | None = None  # with spec.code: how its files come and go


@dataclass(frozen=True)
class Manifests:
    job: dict[str, Any]
    config_map: dict[str, Any]
    secret: dict[str, Any]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: dicts merge key by key, lists of named items merge by name, else override wins."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        current = result.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            result[key] = merge(current, value)
        elif (
            isinstance(current, list)
            and isinstance(value, list)
            and all(isinstance(i, dict) and "name" in i for i in current + value)
        ):
            by_name = {item["name"]: item for item in current}
            for item in value:
                by_name[item["name"]] = merge(by_name.get(item["name"], {}), item)
            result[key] = list(by_name.values())
        else:
            result[key] = copy.deepcopy(value)
    return result


def _resources(spec: JobSpec) -> dict[str, Any]:
    quantities: dict[str, str] = {"cpu": str(spec.cpus)}
    if spec.memory:
        quantities["memory"] = str(spec.memory)
    limits = dict(quantities)
    if spec.gpus:
        limits[GPU_RESOURCE] = str(spec.gpus)
    return {"requests": quantities, "limits": limits}


def secret_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` without what a Secret cannot hold: keys are stricter than shell
    names, and exported shell functions (BASH_FUNC_x%%) are not wanted in a job."""
    return {k: v for k, v in env.items() if _SECRET_KEY.match(k)}


def _environment(
    spec: JobSpec, ctx: JobContext, name: str, output: str, error: str | None
) -> dict[str, str]:
    env: dict[str, str] = dict(ctx.notebook.environment) if ctx.notebook else {}
    env.update(spec.environment)
    env.update(job_environment(spec, job_id=ctx.job_id, name=name))
    env["KBATCH_OPEN_MODE"] = spec.open_mode
    env["KBATCH_OUTPUT"] = output
    if error:
        env["KBATCH_ERROR"] = error
    env.update(ctx.extra_environment)
    if spec.code is not None and ctx.transfer is not None:
        env["KBATCH_CODE_DIR"] = CODE_DIR
        env["KBATCH_TRANSFER_URL"] = ctx.transfer.url
        env["KBATCH_TRANSFER_TOKEN"] = ctx.transfer.token
    return secret_environment(env)


def _public_spec(spec: JobSpec) -> str:
    """The spec as recorded on the Job: without the script and the environment."""
    return msgspec.json.encode(msgspec.structs.replace(spec, script="-", environment={})).decode()


def spec_digest(spec: JobSpec) -> str:
    """A digest of the whole spec (script and environment included): what makes two
    submissions with one idempotency key the same submission."""
    return hashlib.sha256(msgspec.msgpack.encode(spec)).hexdigest()[:32]


def build_manifests(spec: JobSpec, ctx: JobContext) -> Manifests:
    name = names.job_object_name(ctx.job_id)
    display_name = job_name(spec)
    notebook = ctx.notebook or NotebookDefaults()
    image = spec.image or notebook.image or ctx.default_image
    paths = output_paths(spec, job_id=ctx.job_id, user=ctx.user)
    output = ctx.output or paths.output
    error = ctx.error or paths.error
    labels = {
        **names.selector(ctx.instance),
        names.LABEL_JOB_ID: ctx.job_id,
        names.LABEL_USER: names.safe_slug(ctx.user, max_length=63),
    }
    annotations = {
        names.ANNOTATION_USER: ctx.user,
        names.ANNOTATION_NAME: display_name,
        names.ANNOTATION_SPEC: _public_spec(spec),
        names.ANNOTATION_SPEC_DIGEST: spec_digest(spec),
        names.ANNOTATION_DESIRED: "hold" if spec.hold else "run",
        names.ANNOTATION_OUTPUT: output,
    }
    if ctx.idempotency_key:
        annotations[names.ANNOTATION_IDEMPOTENCY] = ctx.idempotency_key
        labels[names.LABEL_IDEMPOTENCY] = names.idempotency_label(ctx.user, ctx.idempotency_key)
    if error:
        annotations[names.ANNOTATION_ERROR] = error
    if ctx.submitted is not None:
        annotations[names.ANNOTATION_SUBMITTED] = ctx.submitted.isoformat()
    container: dict[str, Any] = {
        "name": "job",
        "image": image,
        "command": ["/bin/sh", f"{SCRIPT_DIR}/entrypoint", f"{SCRIPT_DIR}/script", *spec.args],
        "envFrom": [{"secretRef": {"name": name}}],
        "resources": _resources(spec),
        "volumeMounts": [
            {"name": "kbatch-script", "mountPath": SCRIPT_DIR, "readOnly": True},
            *notebook.volume_mounts,
        ],
    }
    if spec.workdir:
        container["workingDir"] = spec.workdir
    security = merge(ctx.security_context, notebook.container_security_context)
    run_as = security.get("runAsUser", notebook.security_context.get("runAsUser"))
    if run_as == 0 and not ctx.forbid_root:
        security.pop("runAsNonRoot", None)  # the notebook runs as root, so may its jobs
    if security:
        container["securityContext"] = security
    init_containers: list[dict[str, Any]] = []
    code_volumes: list[dict[str, Any]] = []
    if spec.code is not None:
        if ctx.transfer is None:
            raise SpecError("this server cannot send uploaded files to pods", field="code")
        init_containers, code_volumes = _code_transfer(ctx.transfer, name, security)
        container["workingDir"] = CODE_DIR
        container["volumeMounts"].append({"name": "kbatch-code", "mountPath": CODE_DIR})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [
            {"name": "kbatch-script", "configMap": {"name": name, "defaultMode": 0o755}},
            *code_volumes,
            *notebook.volumes,
        ],
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if notebook.node_selector:
        pod_spec["nodeSelector"] = notebook.node_selector
    if notebook.tolerations:
        pod_spec["tolerations"] = notebook.tolerations
    if notebook.security_context:
        pod_spec["securityContext"] = notebook.security_context
    check_pod_security(pod_spec)
    job_spec: dict[str, Any] = {
        "suspend": True,  # the reconciler starts it (see the module's docstring)
        "backoffLimit": 0,
        "podFailurePolicy": {
            "rules": [
                # a pod lost to node failure or preemption is retried, not a failure
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if spec.time_limit:
        # The reconciler ends the job at its time limit, after keeping its log (the
        # Job controller deletes the pod, and its log with it); the Job's own deadline,
        # a little later, ends it should the kbatch server be down then.
        job_spec["activeDeadlineSeconds"] = spec.time_limit + TIME_LIMIT_GRACE
    if ctx.ttl_seconds is not None:
        job_spec["ttlSecondsAfterFinished"] = ctx.ttl_seconds
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": ctx.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": job_spec,
    }
    if ctx.template:
        job = merge(job, ctx.template)
    if ctx.forbid_root:
        check_not_root(job["spec"]["template"]["spec"])
    meta = {"name": name, "namespace": ctx.namespace, "labels": dict(labels)}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {"script": spec.script, "entrypoint": ENTRYPOINT},
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": copy.deepcopy(meta),
        "type": "Opaque",
        "stringData": _environment(spec, ctx, display_name, output, error),
    }
    return Manifests(job=job, config_map=config_map, secret=secret)


def _code_transfer(
    transfer: CodeTransfer, name: str, security: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The init container and native sidecar that move a job's files, and their volume.

    They run as the job does (its securityContext), so the files they write are the
    job's own; they read the job's Secret for the URL, the job id and the token.
    """

    def transfer_container(container_name: str, action: str) -> dict[str, Any]:
        return {
            "name": container_name,
            "image": transfer.image,
            "command": ["python", "-m", "kbatch.uploads.pod", action, CODE_DIR],
            "envFrom": [{"secretRef": {"name": name}}],
            "resources": copy.deepcopy(TRANSFER_RESOURCES),
            "volumeMounts": [{"name": "kbatch-code", "mountPath": CODE_DIR}],
            **({"securityContext": copy.deepcopy(security)} if security else {}),
        }

    download = transfer_container("kbatch-code-in", "download")
    # A native sidecar: started before the job, sent SIGTERM once the job's container has
    # ended, then it hands back the results (within the pod's termination grace period).
    results = {**transfer_container("kbatch-results-out", "sidecar"), "restartPolicy": "Always"}
    return [download, results], [{"name": "kbatch-code", "emptyDir": {}}]


def owner_reference(job: dict[str, Any]) -> dict[str, Any]:
    """An ownerReference to a created Job (it needs the uid the API server gave it)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": False,
        "blockOwnerDeletion": False,
    }


_FORBIDDEN_POD = {
    "hostNetwork": "host network",
    "hostPID": "host PID namespace",
    "hostIPC": "host IPC namespace",
    "serviceAccountName": "a service account",
    "serviceAccount": "a service account",
}


def check_not_root(pod_spec: dict[str, Any]) -> None:
    """Refuse a pod that would run as root (user 0) where the admin forbids it."""
    pod_user = (pod_spec.get("securityContext") or {}).get("runAsUser")
    for container in [*(pod_spec.get("containers") or []), *(pod_spec.get("initContainers") or [])]:
        user = (container.get("securityContext") or {}).get("runAsUser", pod_user)
        if user == 0:
            raise SpecError(
                "jobs may not run as root (runAsUser 0, from the notebook or the job "
                "template); the admin's policy forbids it (kubernetes forbid_root)"
            )


def check_pod_security(pod_spec: dict[str, Any]) -> None:
    """Refuse what no job built from a user's request may have: host access, privilege,
    a service account.  Everything users send is a JobSpec field, so this is a
    last guard against defaults (e.g. copied from a notebook) that would grant them."""
    for key, what in _FORBIDDEN_POD.items():
        if pod_spec.get(key):
            raise SpecError(f"jobs may not use {what} ({key})")
    for volume in pod_spec.get("volumes") or []:
        if "hostPath" in volume:
            raise SpecError(f"jobs may not mount host paths (volume {volume.get('name')})")
    for container in [*(pod_spec.get("containers") or []), *(pod_spec.get("initContainers") or [])]:
        context = container.get("securityContext") or {}
        if context.get("privileged") or context.get("allowPrivilegeEscalation"):
            raise SpecError("jobs may not run privileged containers")
        added = (context.get("capabilities") or {}).get("add") or []
        if added:
            raise SpecError(f"jobs may not add capabilities ({', '.join(added)})")
