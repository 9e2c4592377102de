"""The Kubernetes backend: talks to the API server; everything it builds comes from manifests.py.

The Job is the record, and holds both what users want (the desired state, an
annotation: run, hold or cancel) and what is (its status and its pods').  A
watch cache follows the Jobs and pods of this deployment (its instance label);
every change queues the job's id on a :class:`WorkQueue`, and a reconciler
takes one job at a time from it and does what the desired state asks:

* run: a Job is created suspended; the reconciler claims it (a patch with a
  resourceVersion precondition, so one replica does it), makes the job's
  environment (``hooks.environment``: the job's token, made right before it
  starts, so it cannot expire while the job waits), writes it into the job's
  Secret and unsuspends the Job.  A transient hook failure leaves the job
  PENDING (``JobSetupPending``) and is retried with backoff; a permanent one
  ends it FAILED (``JobSetupFailed: ...``) without it ever starting.
* hold: the Job stays (or is put back) suspended, if no pod has started.
* cancel: the Job is ended through its deadline (the Job controller stops the
  pods); a Job that never started gets a node selector no node matches first,
  so it never will.
* ended: the end hook runs once per job, whatever the number of replicas: a
  replica first claims it with a precondition patch of the finalized annotation.

API calls write the desired state and wait (``WorkQueue.sync``) for the
reconciler; they never move a job themselves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import operator
import time
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import msgspec  # lightkube is built on httpx2, a fork of httpx
from lightkube import ALL_NS, ApiError, AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.resources.batch_v1 import Job as K8sJob
from lightkube.resources.core_v1 import ConfigMap, Event, Pod, Secret
from lightkube.types import PatchType

from kbatch.arrays import IndexSet
from kbatch.backends.base import (
    Backend,
    BackendHealth,
    JobHooks,
    decode_section,
    not_pending,
    paginate,
)
from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.arrays import (
    MAX_TASKS,
    PARAMS_KEY,
    ArrayView,
    array_view,
    contains,
    task_order,
)
from kbatch.backends.kubernetes.cache import WatchCache
from kbatch.backends.kubernetes.manifests import (
    RESTRICTED,
    CodeTransfer,
    JobContext,
    Manifests,
    build_manifests,
    owner_reference,
    secret_environment,
)
from kbatch.backends.kubernetes.notebook import (
    NOTEBOOK_LABELS,
    USERNAME_ANNOTATION,
    notebook_defaults,
)
from kbatch.backends.kubernetes.slim import slim_job, slim_pod
from kbatch.backends.kubernetes.status import (
    desired_of,
    failed_create_reason,
    job_from_objects,
    parse_time,
    pod_started,
    succeeded_unrecorded,
)
from kbatch.backends.userlimits import Usage, held_by
from kbatch.backends.workqueue import WorkQueue, stop_workers
from kbatch.dependencies import (
    Dependency,
    DependencyStatus,
    describe,
    evaluate,
    parse_dependency,
)
from kbatch.errors import (
    ApiError as KbatchApiError,
)
from kbatch.errors import (
    ConfigError,
    Conflict,
    InvalidRequest,
    KbatchError,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
    SpecError,
    TransportError,
)
from kbatch.lifecycle import Desired, JobRef, parse_job_ref
from kbatch.models import Job, JobList, JobSpec, JobState, SweepParams

__all__ = ["KubernetesBackend", "KubernetesConfig", "api_error"]

log = logging.getLogger("kbatch.kubernetes")


@dataclass
class KubernetesConfig:
    kubeconfig: str | None = None  # default: in-cluster config, else $KUBECONFIG / ~/.kube/config
    context: str | None = None
    namespace_mode: str = "shared"  # or "per-user" (as the README and the chart say)
    namespace_template: str = "kbatch-{username}"
    namespace: str = "default"  # the namespace of every job in shared mode
    create_namespaces: bool = True
    # per-user mode: labels of each namespace it creates (e.g. Pod Security's
    # {"pod-security.kubernetes.io/enforce" = "restricted"}), and a ResourceQuota's
    # spec.hard made in it (e.g. {"requests.cpu" = "8", "count/jobs.batch" = "100"})
    namespace_labels: dict[str, str] = field(default_factory=dict)
    namespace_quota: dict[str, str] = field(default_factory=dict)
    image: str = "quay.io/jupyter/minimal-notebook:latest"  # when there is no notebook to copy
    ttl_seconds: int | None = 7 * 24 * 3600
    notebook_namespace: str | None = None  # where the hub's singleuser pods run; None: don't look
    job_template: dict[str, Any] = field(default_factory=dict)  # merged into every Job (admin's)
    cache_timeout: float = 30.0
    # This deployment's objects carry app.kubernetes.io/instance=<instance> (the chart
    # sets its release name): two deployments in one cluster never see each other's jobs.
    instance: str = "kbatch"
    stale_after: float = 5.0  # /health fails when the watch has been broken this long
    reconcile_workers: int = 8
    cancel_timeout: float = 30.0  # how long cancel/hold/release wait for the reconciler
    # The job container's securityContext where the notebook's does not say: what Pod
    # Security "restricted" asks (the notebook's container context is merged over it).
    security_context: dict[str, Any] = field(default_factory=lambda: dict(RESTRICTED))
    forbid_root: bool = False  # refuse jobs that would run as user 0 (runAsUser: 0)
    # Uploaded files (submit --code): the server's URL as job pods reach it (e.g.
    # http://kbatch.kbatch-system.svc:8765/services/kbatch) and an image with kbatch in
    # it (the server's own) for the containers that move the files.  Without both,
    # jobs with --code are refused.
    transfer_url: str | None = None
    transfer_image: str | None = None
    transfer_token_days: float = 30.0  # at most; the token also dies with the job's record

    def __post_init__(self) -> None:
        if self.namespace_mode not in ("per-user", "shared"):
            raise ConfigError("config [kubernetes]: namespace_mode must be per-user or shared")
        if not names.is_dns_label(self.instance):
            raise ConfigError(
                f"config [kubernetes]: instance {self.instance!r} must be a DNS label "
                "(lowercase letters, digits and '-', at most 63)"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KubernetesConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"config [kubernetes]: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        tables = ("job_template", "security_context", "namespace_labels", "namespace_quota")
        data = dict(data)
        for key in tables:  # a table may also be given as JSON text (the chart does)
            if isinstance(data.get(key), str):
                try:
                    data[key] = json.loads(data[key])
                except ValueError as exc:
                    raise ConfigError(f"config [kubernetes]: {key} is not JSON: {exc}") from exc
        return decode_section(data, cls, "kubernetes")


def api_error(exc: Exception, doing: str) -> KbatchApiError:
    """A user-facing error, with the right HTTP status, for a failed API server call."""
    if isinstance(exc, ApiError):
        status = exc.status
        code = status.code or 500
        message = status.message or str(exc)
        if code == 403 and "exceeded quota" in message:
            return PermissionDenied(
                f"Kubernetes refused to {doing}: {message}", status=403, code="quota_exceeded"
            )
        if code == 403:
            return PermissionDenied(
                f"Kubernetes does not allow the kbatch server to {doing} ({message}); "
                "an admin must check its RBAC",
                status=403,
                code="forbidden",
            )
        if code == 404:
            return NotFound(f"Kubernetes: {message}", status=404, code="not_found")
        if code == 409:
            return Conflict(f"Kubernetes could not {doing}: {message}", status=409, code="conflict")
        if code in (400, 422):
            return InvalidRequest(
                f"Kubernetes rejected the job: {message}", status=422, code="invalid_spec"
            )
        return ServiceUnavailable(
            f"Kubernetes failed to {doing}: {message}", status=503, code="kubernetes_unavailable"
        )
    return ServiceUnavailable(
        f"cannot reach the Kubernetes API server to {doing}: {exc}",
        status=503,
        code="kubernetes_unavailable",
    )


_HTTP_ERRORS = (ApiError, httpx.HTTPError)
_Ops = list[dict[str, Any]]  # a JSON patch
RELEASE_CLAIM_SECONDS = 60.0  # a replica's claim to start a job lapses after this
OBJECTS_GRACE_SECONDS = 120.0
NO_POD_RECHECK = 5.0  # how often a released Job without a pod is asked why
NOTEBOOKS_FOR = 2.0  # seconds one listing of the notebook pods serves submissions
NO_POD_GRACE = 3.0  # seconds a released Job may have no pod before its events are read
TASK_LOG_CHARS = 64 * 1024  # the tail of a stopped task's log kept in the ConfigMap
SAVED_LOG_CHARS = (
    512 * 1024
)  # the tail of a log kept in the ConfigMap (1 MiB at most)  # a Job whose ConfigMap/Secret never came is ended after this


def _annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("annotations") or {})


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _age(obj: Mapping[str, Any]) -> float:
    created = parse_time(obj.get("metadata", {}).get("creationTimestamp"))
    return 0.0 if created is None else (datetime.now(UTC) - created).total_seconds()


def _is_transient(exc: BaseException) -> bool:
    """A hook error worth retrying (the hub is down) rather than failing the job for."""
    return isinstance(exc, ServiceUnavailable | TransportError) or not isinstance(exc, KbatchError)


class _Retrying(Exception):
    """The reconciler has scheduled its own retry (with backoff) of this job."""


def _namespace_missing(exc: ApiError, namespace: str) -> bool:
    """The API server refused an object because its namespace is gone (or going)."""
    message = exc.status.message or ""
    if exc.status.code == 404:
        return f'namespaces "{namespace}" not found' in message
    return exc.status.code == 403 and "because it is being terminated" in message


def _ended(pods: list[dict[str, Any]]) -> bool:
    return bool(pods) and all(
        p.get("status", {}).get("phase") in ("Succeeded", "Failed") for p in pods
    )


def _list_key(job: Job) -> str:
    """Submission order; an array's tasks in index order after it, its waiting groups last."""
    if job.array_job_id is not None and job.array_task_id is not None:
        return f"{job.submitted.isoformat()}|{job.array_job_id}|t{job.array_task_id:010d}"
    if job.array_job_id is not None:
        return f"{job.submitted.isoformat()}|{job.id}|~{job.state.value}"
    return f"{job.submitted.isoformat()}|{job.id}"


def _job_id_of(obj: dict[str, Any] | None) -> str | None:
    """The kbatch job id a Job or Pod is labelled with."""
    if obj is None:
        return None
    labels = obj["metadata"].get("labels") or {}
    job_id = labels.get(names.LABEL_JOB_ID)
    return str(job_id) if job_id else None


def _phase(pod: dict[str, Any] | None) -> str | None:
    phase = ((pod or {}).get("status") or {}).get("phase")
    return str(phase) if phase else None


def _spec_of(obj: dict[str, Any]) -> JobSpec | None:
    """The spec a Job records (without script and environment), or None if unreadable."""
    try:
        text = _annotations(obj).get(names.ANNOTATION_SPEC, "")
        spec: JobSpec = msgspec.json.decode(text, type=JobSpec)
        return spec
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _parse_time_or(value: str | None, default: datetime) -> datetime:
    try:
        return parse_time(value) or default
    except ValueError:
        return default


def _pod_start(pod: dict[str, Any]) -> datetime | None:
    """When the pod's container started (its task's time counts from then)."""
    for status in pod.get("status", {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        began = (state.get("running") or state.get("terminated") or {}).get("startedAt")
        if began:
            return parse_time(began)
    return parse_time(pod.get("status", {}).get("startTime"))


def _annotation_path(key: str) -> str:
    """A JSON patch's path to an annotation (``/`` escaped as ``~1``)."""
    return "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")


def _tasks_not_supported(job_id: str, action: str) -> Conflict:
    return Conflict(
        f"single tasks of an array cannot be {action} on Kubernetes (its tasks are one "
        f"Job); hold or release the whole array ({job_id.partition('_')[0]}), or change "
        "its throttle",
        status=409,
        code="not_supported",
    )


def _kill_on_invalid_dep(obj: dict[str, Any]) -> bool:
    spec = _spec_of(obj)
    return bool(spec and spec.kill_on_invalid_dep)


class KubernetesBackend(Backend):
    name = "kubernetes"
    config_class = KubernetesConfig

    def __init__(self, config: KubernetesConfig, client: AsyncClient | None = None) -> None:
        super().__init__()
        self.config = config
        self._client = client
        self._jobs: WatchCache | None = None
        self._pods: WatchCache | None = None
        self._pods_by_job: dict[str, dict[str, dict[str, Any]]] = {}
        self._job_keys: dict[str, tuple[str, str]] = {}  # job id -> (namespace, name)
        self._models: dict[str, Job] = {}
        self._views: dict[str, ArrayView] = {}  # array id -> its tasks, from the cache
        self._namespaces: set[str] = set()
        self._queue: WorkQueue[str] = WorkQueue(base_delay=0.5, max_delay=60.0)
        self._workers: list[asyncio.Task[None]] = []
        self._replica = uuid.uuid4().hex[:12]  # names this replica's claims
        # job id -> when its start may be tried again (monotonic): watch events, which
        # queue a job at once, must not cut a hook's backoff short
        self._retry_at: dict[str, float] = {}
        self._no_pod: dict[str, str] = {}  # job id -> why the Job controller made no pod
        self._waiting: dict[str, str] = {}  # job id -> why its gate is closed (Dependency...)
        self._user_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        self._events_warned = False
        self._notebooks: tuple[float, list[dict[str, Any]]] = (float("-inf"), [])
        self._notebooks_lock = asyncio.Lock()
        # list()'s order: each job's key, made when its model is, and every row sorted,
        # made again only after a change (kqueue's pages each ask for the whole list)
        self._list_keys: dict[str, str] = {}
        self._listed: list[tuple[str, Job]] | None = None

    @classmethod
    def from_config(
        cls, section: Mapping[str, Any], *, state_dir: Path | None = None
    ) -> KubernetesBackend:
        # The Kubernetes backend keeps no state of its own: state_dir is not used.
        return cls(KubernetesConfig.from_dict(section))

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise RuntimeError("the kubernetes backend has not been started")
        return self._client

    @property
    def selector(self) -> dict[str, str]:
        return names.selector(self.config.instance)

    @property
    def _scope(self) -> str:
        return ALL_NS if self.config.namespace_mode == "per-user" else self.config.namespace

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        httpx_log = logging.getLogger("httpx2")  # lightkube's HTTP client: a line per request
        if httpx_log.level == logging.NOTSET:
            httpx_log.setLevel(logging.WARNING)
        if self._client is None:
            if self.config.kubeconfig:
                kubeconfig = KubeConfig.from_file(self.config.kubeconfig)
            else:
                kubeconfig = KubeConfig.from_env()
            single = kubeconfig.get(context_name=self.config.context)
            if single is None:
                raise ConfigError(f"the kubeconfig has no context {self.config.context!r}")
            self._client = AsyncClient(single, field_manager="kbatch")
        selector: dict[str, Any] = dict(self.selector)
        self._jobs = WatchCache(
            self.client,
            K8sJob,
            labels=selector,
            namespace=self._scope,
            on_change=self._job_changed,
            slim=slim_job,
        )
        self._pods = WatchCache(
            self.client,
            Pod,
            labels=selector,
            namespace=self._scope,
            on_change=self._pod_changed,
            slim=slim_pod,
        )
        self._pods.start()
        self._jobs.start()
        try:
            async with asyncio.timeout(self.config.cache_timeout):
                while not (self._pods.ready.is_set() and self._jobs.ready.is_set()):
                    for cache in (self._jobs, self._pods):
                        # refused three times in a row (not a Role still being made):
                        # no retry will fix RBAC, so say so now rather than at the timeout
                        if cache.last_status in (401, 403) and cache.failures >= 3:
                            raise ConfigError(self._forbidden(cache))
                    await asyncio.sleep(0.05)
        except TimeoutError:
            errors = "; ".join(
                f"{c.kind}: {c.last_error}" for c in (self._jobs, self._pods) if c.last_error
            )
            raise ConfigError(
                f"could not list Jobs and Pods within {self.config.cache_timeout:.0f} s; "
                f"check the API server address and the server's RBAC ({errors or 'no answer'})"
            ) from None
        self._workers = [
            asyncio.create_task(self._work(), name=f"kbatch-reconcile-{i}")
            for i in range(self.config.reconcile_workers)
        ]
        log.info("kubernetes backend: %d jobs known", len(self._job_keys))

    def _forbidden(self, cache: WatchCache) -> str:
        """One line naming the permission the server's ServiceAccount lacks."""
        info = cache.resource._api_info
        plural = f"{info.plural}.{info.resource.group}" if info.resource.group else info.plural
        where = "all namespaces" if cache.namespace == ALL_NS else f"namespace {cache.namespace}"
        verb = "forbidden" if cache.last_status == 403 else "unauthorized"
        return (
            f"cannot list {plural} in {where}: {verb} "
            f"(the kbatch server's RBAC must allow list and watch; the API server said: "
            f"{cache.last_error})"
        )

    async def stop(self) -> None:
        await stop_workers(self._queue, self._workers)
        self._workers = []
        for cache in (self._jobs, self._pods):
            if cache is not None:
                await cache.stop()
        if self._client is not None:
            await self._client.close()
            self._client = None

    def health(self) -> BackendHealth:
        worst: tuple[float, WatchCache] | None = None
        for cache in (self._jobs, self._pods):
            stale = cache.stale_seconds() if cache is not None else None
            if cache is not None and stale is not None and (worst is None or stale > worst[0]):
                worst = (stale, cache)
        if worst is None:
            return BackendHealth()
        stale, cache = worst
        if stale < self.config.stale_after:
            return BackendHealth(stale_seconds=stale)
        return BackendHealth(
            ok=False,
            detail=(
                f"cannot follow the Kubernetes API server's {cache.kind}s for {stale:.0f} s "
                f"({cache.failures} failed attempts: {cache.last_error}); "
                "jobs are listed from data that may be stale"
            ),
            stale_seconds=stale,
        )

    # -- the watch cache's indexes ---------------------------------------------------

    def _job_changed(
        self, key: tuple[str, str], old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        job_id = _job_id_of(new or old)
        if not job_id:
            return
        if new is None:  # deleted (its TTL, or by hand): forget everything about it
            self._job_keys.pop(job_id, None)
            self._models.pop(job_id, None)
            self._views.pop(job_id, None)
            self._list_keys.pop(job_id, None)
            self._listed = None
            if not self._pods_by_job.get(job_id):
                self._pods_by_job.pop(job_id, None)
            self._queue.forget(job_id)
            self._retry_at.pop(job_id, None)
            self._no_pod.pop(job_id, None)
            self._waiting.pop(job_id, None)
            return
        self._job_keys[job_id] = key
        self._refresh(job_id)
        self._queue.put(job_id)

    def _pod_changed(
        self, key: tuple[str, str], old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        job_id = _job_id_of(new or old)
        if not job_id:
            return
        pods = self._pods_by_job.setdefault(job_id, {})
        if new is None:
            pods.pop(key[1], None)
            if not pods:
                self._pods_by_job.pop(job_id, None)
        else:
            pods[key[1]] = new
        if job_id in self._job_keys:
            self._refresh(job_id)
            self._queue.put(job_id)
            succeeded = _phase(new) == "Succeeded" and _phase(old) != "Succeeded"
            if succeeded and self._waiting:
                for waiting in self._waiting:  # they may wait on it: see _state_for_dependents
                    if waiting != job_id:
                        self._queue.put(waiting)

    def _object(self, job_id: str) -> dict[str, Any] | None:
        key = self._job_keys.get(job_id)
        if key is None or self._jobs is None:
            return None
        return self._jobs.objects.get(key)

    def _refresh(self, job_id: str) -> Job | None:
        """The job's model from the cached objects; a change is published."""
        obj = self._object(job_id)
        if obj is None:
            return None
        model, view = self._model(
            obj,
            list(self._pods_by_job.get(job_id, {}).values()),
            no_pod=self._no_pod.get(job_id),
            waiting=self._waiting.get(job_id),
        )
        before = self._models.get(job_id)
        self._models[job_id] = model
        self._list_keys[job_id] = _list_key(model)
        self._listed = None
        self.events.publish(model)
        if view is not None:
            old = self._views.get(job_id)
            self._views[job_id] = view
            for index, task in view.tasks.items():  # tasks that moved on, as jobs of their own
                seen = old.tasks.get(index) if old is not None else None
                if seen is None or (seen.state, seen.reason) != (task.state, task.reason):
                    self.events.publish(task)
        if self._waiting and (before is None or before.state is not model.state):
            for waiting in self._waiting:  # a job they may wait on has moved on
                if waiting != job_id:
                    self._queue.put(waiting)
        return model

    def _model(
        self,
        obj: dict[str, Any],
        pods: list[dict[str, Any]],
        *,
        no_pod: str | None = None,
        waiting: str | None = None,
    ) -> tuple[Job, ArrayView | None]:
        """The job a Job and its pods stand for; for an array, the whole and its tasks."""
        model = job_from_objects(obj, pods, no_pod=no_pod, waiting=waiting)
        spec = _spec_of(obj)
        if spec is None or not spec.array:
            return model, None
        previous = self._views.get(model.id)
        view = array_view(obj, pods, model, spec, no_pod=no_pod, waiting=waiting, previous=previous)
        return view.job, view

    def _observe(self, obj: Any) -> dict[str, Any]:
        """A Job the API server just returned, taken into the cache at once."""
        data: dict[str, Any] = obj.to_dict()
        if self._jobs is not None:
            self._jobs.observe(data)
        return data

    # -- the reconciler ----------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await self._reconcile(job_id)
            except asyncio.CancelledError:
                raise
            except _Retrying:
                pass
            except Exception as exc:  # noqa: BLE001 - a reconciler outlives any error
                message = str(exc) if isinstance(exc, KbatchError) else repr(exc)
                log.warning("job %s: reconciling failed, will retry: %s", job_id, message)
                self._queue.put_backoff(job_id)
            finally:
                self._queue.done(job_id)

    async def _patch_job(
        self, obj: dict[str, Any], patch: dict[str, Any], *, precondition: bool = False
    ) -> dict[str, Any] | None:
        """Merge-patch the Job; with ``precondition``, only if it has not changed since
        ``obj`` (else None: someone else changed it first)."""
        meta = obj["metadata"]
        if precondition:
            patch = {**patch, "metadata": {**patch.get("metadata", {})}}
            patch["metadata"]["resourceVersion"] = meta["resourceVersion"]
        try:
            patched = await self.client.patch(
                K8sJob, meta["name"], patch, namespace=meta["namespace"]
            )
        except ApiError as exc:
            if precondition and exc.status.code == 409:
                return None
            if exc.status.code == 404:
                return None
            raise api_error(exc, "update the job") from exc
        except httpx.HTTPError as exc:
            raise api_error(exc, "update the job") from exc
        return self._observe(patched)

    async def _reconcile(self, job_id: str) -> None:
        obj = self._object(job_id)
        model = self._refresh(job_id)
        if obj is None or model is None:
            return
        annotations = _annotations(obj)
        desired = desired_of(obj)
        pods = list(self._pods_by_job.get(job_id, {}).values())
        if desired is Desired.CANCEL or names.ANNOTATION_SETUP_FAILED in annotations:
            obj = await self._end(obj, pods) or obj
        if model.state.is_terminal:
            if names.ANNOTATION_FINALIZED not in annotations:
                await self._finalize(obj, model)
        elif desired is Desired.CANCEL or names.ANNOTATION_SETUP_FAILED in annotations:
            pass  # ending: the Job controller does the rest
        elif desired is Desired.HOLD:
            patch: dict[str, Any] = {}
            if not obj["spec"].get("suspend") and not any(pod_started(p) for p in pods):
                patch["spec"] = {"suspend": True}
            if names.ANNOTATION_RELEASING in annotations:  # a start the hold cut short
                patch["metadata"] = {"annotations": {names.ANNOTATION_RELEASING: None}}
            if patch:
                await self._patch_job(obj, patch)
            elif job_id in self._views and not obj["spec"].get("suspend"):
                await self._reconcile_tasks(obj, pods)  # a held array whose tasks run on
        elif obj["spec"].get("suspend"):
            # With per-user limits, one user's releases go one at a time (in this replica):
            # each sees what the one before it started.
            limited = self.limits.any()
            async with self._user_locks[model.user] if limited else contextlib.nullcontext():
                if await self._gated(obj, model):
                    return
                await self._release(obj, model)
        else:
            if job_id in self._views:
                await self._reconcile_tasks(obj, pods)
            else:
                await self._enforce_time_limit(obj, model, pods)
            await self._explain_no_pod(obj, model, pods)
        self._queue.forget(job_id)
        self._retry_at.pop(job_id, None)

    async def _reconcile_tasks(self, obj: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        """A running array's tasks: the pods of cancelled tasks are deleted (the Job
        controller counts the index failed: backoffLimitPerIndex 0), and so are those of
        tasks past their time limit, once recorded as timed out; their logs are kept in
        the ConfigMap first.  A lowered throttle takes effect as running tasks end."""
        job_id = _job_id_of(obj) or ""
        spec = _spec_of(obj)
        if spec is None or not spec.array:
            return
        annotations = _annotations(obj)
        order = task_order(spec.array)[0]
        cancelled = IndexSet.parse(annotations.get(names.ANNOTATION_CANCELLED_TASKS, ""))
        now = datetime.now(UTC)
        ending: list[tuple[int, dict[str, Any]]] = []
        timed_out: list[int] = []
        next_check: float | None = None
        for pod in pods:
            meta = pod["metadata"]
            if meta.get("deletionTimestamp") or pod.get("status", {}).get("phase") in (
                "Succeeded",
                "Failed",
            ):
                continue
            position = (meta.get("labels") or {}).get(names.LABEL_COMPLETION_INDEX, "")
            if not position.isdigit() or int(position) >= len(order):
                continue
            index = order[int(position)]
            if contains(cancelled, index):
                ending.append((index, pod))
            elif spec.time_limit and pod_started(pod):
                began = _pod_start(pod) or now
                left = spec.time_limit - (now - began).total_seconds()
                if left <= 0:
                    timed_out.append(index)
                    ending.append((index, pod))
                else:
                    next_check = left if next_check is None else min(next_check, left)
        if timed_out:
            old = annotations.get(names.ANNOTATION_TIMED_OUT_TASKS, "")
            new = str(IndexSet.of([*IndexSet.parse(old), *timed_out]))
            path = _annotation_path(names.ANNOTATION_TIMED_OUT_TASKS)
            claimed = await self._json_patch(
                obj,
                [
                    {"op": "test", "path": path, "value": old},
                    {"op": "replace", "path": path, "value": new},
                ],
            )
            if not claimed:  # another replica's: the watch brings its change back
                return
        if ending:
            await self._save_task_logs(obj, [p for _, p in ending if pod_started(p)])
            await asyncio.gather(*(self._delete_pod(p) for _, p in ending))
        if next_check is not None:
            self._queue.put_after(job_id, next_check)
        wanted = self._wanted_parallelism(obj, now)
        if int(obj["spec"].get("parallelism") or 0) > wanted:
            await self._json_patch(
                obj, [{"op": "replace", "path": "/spec/parallelism", "value": wanted}]
            )

    async def _delete_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            await self.client.delete(Pod, meta["name"], namespace=meta["namespace"])
        except ApiError as exc:
            if exc.status.code != 404:
                raise api_error(exc, "stop a task") from exc
        except httpx.HTTPError as exc:
            raise api_error(exc, "stop a task") from exc

    async def _save_task_logs(self, obj: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        """Keep the logs of tasks about to be stopped in the ConfigMap (``log-<index>``,
        the last TASK_LOG_CHARS each): their pods, and logs, go.  Best effort."""
        spec = _spec_of(obj)
        if not pods or spec is None or not spec.array:
            return
        order = task_order(spec.array)[0]
        meta = obj["metadata"]
        namespace = meta["namespace"]

        async def read(pod: dict[str, Any]) -> tuple[str, str] | None:
            position = (pod["metadata"].get("labels") or {}).get(names.LABEL_COMPLETION_INDEX)
            if position is None or not position.isdigit() or int(position) >= len(order):
                return None
            try:
                lines = [
                    line
                    async for line in self.client.log(
                        pod["metadata"]["name"], namespace=namespace, container="job"
                    )
                ]
            except _HTTP_ERRORS as exc:
                log.warning("job %s: cannot keep a task's log: %s", _job_id_of(obj), exc)
                return None
            return f"log-{order[int(position)]}", "".join(lines)[-TASK_LOG_CHARS:]

        found = [kept for kept in await asyncio.gather(*(read(p) for p in pods)) if kept]
        if not found:
            return
        try:
            await self.client.patch(
                ConfigMap, meta["name"], {"data": dict(found)}, namespace=namespace
            )
        except _HTTP_ERRORS as exc:
            log.warning("job %s: cannot keep its tasks' logs: %s", _job_id_of(obj), exc)

    async def _explain_no_pod(
        self, obj: dict[str, Any], job: Job, pods: list[dict[str, Any]]
    ) -> None:
        """A released Job without a pod: read the Job controller's events for why (Pod
        Security or a ResourceQuota refused the pod), shown as the job's reason; looked
        again every NO_POD_RECHECK seconds while it lasts.

        Events are read on demand, for this rare case, rather than watched: they carry
        no labels of kbatch's, so a watch would follow every Job event of the namespace
        (of the cluster, per-user) for the few that matter."""
        job_id = job.id
        started = (obj.get("status") or {}).get("startTime")
        if pods or job.state is not JobState.PENDING or not started:
            if self._no_pod.pop(job_id, None) is not None:
                self._refresh(job_id)
            return
        waited = (datetime.now(UTC) - (parse_time(started) or datetime.now(UTC))).total_seconds()
        if waited < NO_POD_GRACE and job_id not in self._no_pod:
            # the pod is usually on its way: ask only if it has not come after a while
            self._queue.put_after(job_id, NO_POD_GRACE - waited)
            return
        meta = obj["metadata"]
        try:
            events = [
                event.to_dict()
                async for event in self.client.list(
                    Event,
                    namespace=meta["namespace"],
                    fields={"involvedObject.kind": "Job", "involvedObject.uid": meta["uid"]},
                )
            ]
        except _HTTP_ERRORS as exc:
            if not self._events_warned:
                self._events_warned = True
                log.warning("cannot read the events of Jobs (why a job has no pod): %s", exc)
            return
        reason = failed_create_reason(events)
        if reason != self._no_pod.get(job_id):
            if reason is None:
                self._no_pod.pop(job_id, None)
            else:
                self._no_pod[job_id] = reason
            self._refresh(job_id)
        self._queue.put_after(job_id, NO_POD_RECHECK)

    async def _enforce_time_limit(
        self, obj: dict[str, Any], job: Job, pods: list[dict[str, Any]]
    ) -> None:
        """At the job's time limit: keep its log, then end it through its deadline (TIMEOUT).

        The Job's own deadline lies TIME_LIMIT_GRACE later, for when no server is up."""
        started = parse_time((obj.get("status") or {}).get("startTime"))
        if not job.time_limit or started is None or obj["spec"].get("activeDeadlineSeconds") == 1:
            return
        left = job.time_limit - (datetime.now(UTC) - started).total_seconds()
        if left > 0:
            self._queue.put_after(job.id, left)
            return
        obj = await self._save_log(obj, pods)
        await self._patch_job(obj, {"spec": {"activeDeadlineSeconds": 1}})

    async def _save_log(self, obj: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any]:
        """Copy the log of the job's pod into its ConfigMap before the pod (and its log)
        is deleted by a cancel or a time limit; the Job is marked (log-saved).  A failure
        is logged, never a reason not to end the job."""
        ran = sorted(
            (p for p in pods if pod_started(p)),
            key=lambda p: p["metadata"].get("creationTimestamp") or "",
        )
        if not ran:
            return obj
        meta = obj["metadata"]
        namespace = meta["namespace"]
        try:
            lines = [
                line
                async for line in self.client.log(
                    ran[-1]["metadata"]["name"], namespace=namespace, container="job"
                )
            ]
            text = "".join(lines)
            if len(text) > SAVED_LOG_CHARS:
                text = text[-SAVED_LOG_CHARS:]
            await self.client.patch(
                ConfigMap, meta["name"], {"data": {"log": text}}, namespace=namespace
            )
            saved = {"metadata": {"annotations": {names.ANNOTATION_LOG_SAVED: _now()}}}
            return await self._patch_job(obj, saved) or obj
        except (*_HTTP_ERRORS, KbatchError) as exc:
            log.warning("job %s: cannot keep its log before it ends: %s", _job_id_of(obj), exc)
            return obj

    async def _end(self, obj: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        """End the Job through its deadline: the Job controller stops its pods (SIGTERM,
        then SIGKILL after the grace period) and marks it failed, so it stays visible."""
        spec = obj["spec"]
        if spec.get("activeDeadlineSeconds") == 1 and not spec.get("suspend"):
            return None  # done already; the Job controller does the rest
        if _job_id_of(obj) in self._views:  # an array: each running task's log
            running = [p for p in pods if pod_started(p) and not _ended([p])]
            await self._save_task_logs(obj, running)
        elif any(pod_started(p) for p in pods) and not _ended(pods):
            obj = await self._save_log(obj, pods)  # the Job controller deletes the pod
        patch: dict[str, Any] = {"spec": {"activeDeadlineSeconds": 1, "suspend": False}}
        if spec.get("suspend") and not any(pod_started(p) for p in pods):
            # never started: make sure it never does (the template is mutable while suspended)
            never = {names.NEVER_SCHEDULE[0]: names.NEVER_SCHEDULE[1]}
            patch["spec"]["template"] = {"spec": {"nodeSelector": never}}
        try:
            return await self._patch_job(obj, patch)
        except InvalidRequest:
            if "template" not in patch["spec"]:
                raise
            del patch["spec"]["template"]
            return await self._patch_job(obj, patch)

    async def _finalize(self, obj: dict[str, Any], job: Job) -> None:
        """Run the end hook exactly once per job, whichever replica sees the end first.

        The finalized annotation is claimed with a resourceVersion precondition
        before the hook runs: of two replicas, one patch fails (409) and that one skips.
        """
        claimed = await self._patch_job(
            obj,
            {"metadata": {"annotations": {names.ANNOTATION_FINALIZED: _now()}}},
            precondition=True,
        )
        if claimed is None:
            return  # another replica has it, or the Job changed: the watch brings it back
        await self.run_finished_hook(job)

    def _dependency_states(self, job: Job) -> tuple[Dependency, dict[str, JobState], bool]:
        """The job's dependency, the states of the jobs it names, and whether its
        singleton term (if any) is clear: all from the watch cache."""
        assert job.dependency is not None
        dependency = parse_dependency(job.dependency)
        states = {
            i: self._state_for_dependents(i, m)
            for i in dependency.job_ids
            if (m := self._models.get(i))
        }
        singleton = any(t.kind == "singleton" for t in dependency.terms)
        earlier_active = singleton and any(
            m.user == job.user
            and m.name == job.name
            and (m.submitted, m.id) < (job.submitted, job.id)
            and not m.state.is_terminal
            for m in self._models.values()
        )
        return dependency, states, not earlier_active

    def _state_for_dependents(self, job_id: str, model: Job) -> JobState:
        """The job's state as the jobs waiting on it see it: COMPLETED as soon as its pod
        has succeeded, without the Job controller's second before it says so."""
        if model.state is JobState.RUNNING and job_id not in self._views:  # arrays: per task
            obj = self._object(job_id)
            pods = list(self._pods_by_job.get(job_id, {}).values())
            if obj is not None and succeeded_unrecorded(obj, pods):
                return JobState.COMPLETED
        return model.state

    def _with_dependency_detail(self, job: Job) -> Job:
        """A pending job's dependency as scontrol shows it: each term (un)fulfilled."""
        if job.dependency is None or job.state is not JobState.PENDING:
            return job
        dependency, states, clear = self._dependency_states(job)
        shown = describe(dependency, states, singleton_clear=clear)
        return msgspec.structs.replace(job, dependency=shown)

    def _held_by_limits(self, job: Job) -> str | None:
        """The per-user limit (Slurm's reason) that keeps ``job`` from starting now, if any:
        what the user's released, unfinished Jobs hold, from the watch cache.  A job also
        waits behind an earlier job of the same user that a limit holds (submission order)."""
        usage = Usage()
        for other_id, other in self._models.items():
            if other.user != job.user or other_id == job.id or other.state.is_terminal:
                continue
            obj = self._object(other_id)
            if obj is None:
                continue
            if not obj["spec"].get("suspend"):
                usage = usage.plus(other.cpus, other.memory or 0, other.gpus)
            elif self._waiting.get(other_id, "").startswith("QOS") and (
                other.submitted,
                other.id,
            ) < (job.submitted, job.id):
                return self._waiting[other_id]
        return held_by(self.limits, usage, job.cpus, job.memory or 0, job.gpus)

    def _check_submit_limit(self, user: str, spec: JobSpec) -> None:
        """Refuse a submission over max_submitted_jobs_per_user; each task of an array
        counts, as in Slurm (those of the user's arrays that have not ended too)."""
        limit = self.limits.max_submitted_jobs_per_user
        if limit is None:
            return
        active = 0
        for job_id, model in self._models.items():
            if model.user != user or model.state.is_terminal:
                continue
            view = self._views.get(job_id)
            if view is None:
                active += 1
                continue
            counts = view.job.array_counts or {}
            active += sum(n for state, n in counts.items() if not JobState(state).is_terminal)
        adding = len(IndexSet.parse(spec.array)) if spec.array else 1
        if active + adding > limit:
            asked = f"; this submission adds {adding}" if adding > 1 else ""
            raise PermissionDenied(
                f"you have {active} jobs pending or running{asked}; the limit (policy "
                f"max_submitted_jobs_per_user) is {limit}: wait for some to end or cancel some",
                status=403,
                code="submit_limit",
            )

    async def _gated(self, obj: dict[str, Any], job: Job) -> bool:
        """Whether the job must wait yet for its --begin or its dependency; its reason
        is then shown (computed from the cache by every replica alike, never stored).
        A dependency that can never be met cancels the job if it asked for that."""
        reason: str | None = None
        now = datetime.now(UTC)
        if job.begin is not None and job.begin > now:
            reason = "BeginTime"
            self._queue.put_after(job.id, (job.begin - now).total_seconds() + 0.05)
        elif job.dependency is not None:
            dependency, states, clear = self._dependency_states(job)
            status, _, _ = evaluate(dependency, states, singleton_clear=clear)
            if status is not DependencyStatus.MET:
                reason = str(status.value)
                if status is DependencyStatus.NEVER and _kill_on_invalid_dep(obj):
                    await self._patch_job(
                        obj,
                        {
                            "metadata": {
                                "annotations": {
                                    names.ANNOTATION_DESIRED: Desired.CANCEL.value,
                                    names.ANNOTATION_CANCELLED: _now(),
                                    names.ANNOTATION_CANCEL_REASON: reason,
                                }
                            }
                        },
                    )
        if reason is None and self.limits.any():
            reason = self._held_by_limits(job)
        if reason is None:
            if self._waiting.pop(job.id, None) is not None:
                self._refresh(job.id)
            return False
        if self._waiting.get(job.id) != reason:
            self._waiting[job.id] = reason
            self._refresh(job.id)
        return True

    async def _release(self, obj: dict[str, Any], job: Job) -> None:
        """Make the job's environment (its token), write it into its Secret, unsuspend it."""
        annotations = _annotations(obj)
        job_id = job.id
        wait = self._retry_at.get(job_id, 0.0) - time.monotonic()
        if wait > 0:
            self._queue.put_after(job_id, wait)
            raise _Retrying
        if names.ANNOTATION_OBJECTS_READY not in annotations:
            if _age(obj) < OBJECTS_GRACE_SECONDS:
                self._queue.put_after(job_id, OBJECTS_GRACE_SECONDS)
                return  # the submitter is still making its ConfigMap and Secret
            await self._fail_setup(obj, "its ConfigMap and Secret were never created")
            return
        claim = annotations.get(names.ANNOTATION_RELEASING, "")
        owner, _, when = claim.partition(" ")
        try:
            claimed_at = parse_time(when) if when else None
        except ValueError:  # unreadable: as if there were no claim
            claimed_at = None
        left = (
            RELEASE_CLAIM_SECONDS - (datetime.now(UTC) - claimed_at).total_seconds()
            if claimed_at is not None
            else 0.0
        )
        if left > 0 and owner != self._replica:
            self._queue.put_after(job_id, left)
            return  # another replica is starting it
        if left > RELEASE_CLAIM_SECONDS / 2 and owner == self._replica:
            claimed: dict[str, Any] | None = obj  # claimed with its submission: ours still
        else:
            claimed = await self._patch_job(
                obj,
                {
                    "metadata": {
                        "annotations": {names.ANNOTATION_RELEASING: f"{self._replica} {_now()}"}
                    }
                },
                precondition=True,
            )
        if claimed is None:
            return  # changed meanwhile (held, cancelled, claimed): the watch brings it back
        environment: dict[str, str] | None = None
        try:
            environment = await self.hooks.environment(job)
            if environment:
                meta = claimed["metadata"]
                await self.client.patch(
                    Secret,
                    meta["name"],
                    {"stringData": secret_environment(environment)},
                    namespace=meta["namespace"],
                )
            released = await self._patch_job(
                claimed,
                {
                    "metadata": {
                        "annotations": {
                            names.ANNOTATION_RELEASING: None,
                            names.ANNOTATION_SETUP_PENDING: None,
                        }
                    },
                    "spec": {"suspend": False},
                },
                precondition=True,
            )
            if released is None:
                raise Conflict("the job changed while it was being started", status=409)
        except asyncio.CancelledError:
            if environment is not None:
                await self.run_finished_hook(job)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure after the token was made revokes it
            if environment is not None:  # the token was made: revoke it
                await self.run_finished_hook(job)
            if isinstance(exc, _HTTP_ERRORS):
                exc = api_error(exc, "start the job")
            if environment is None and not _is_transient(exc):
                await self._fail_setup(claimed, str(exc))
                return
            delay = self._queue.put_backoff(job_id)
            self._retry_at[job_id] = time.monotonic() + delay
            log.warning("job %s: cannot start it yet, retrying in %.1f s: %s", job_id, delay, exc)
            current = self._object(job_id) or claimed
            message = str(exc)[:1000] or type(exc).__name__
            if _annotations(current).get(names.ANNOTATION_SETUP_PENDING) != message:
                with contextlib.suppress(KbatchError):
                    await self._patch_job(
                        current,
                        {"metadata": {"annotations": {names.ANNOTATION_SETUP_PENDING: message}}},
                    )
            raise _Retrying from None

    async def _fail_setup(self, obj: dict[str, Any], message: str) -> None:
        """The job can never start: end it, FAILED with reason ``JobSetupFailed: <message>``."""
        log.warning("job %s: cannot be started: %s", _job_id_of(obj), message)
        await self._patch_job(
            obj,
            {
                "metadata": {
                    "annotations": {
                        names.ANNOTATION_SETUP_FAILED: message[:1000] or "error",
                        names.ANNOTATION_SETUP_FAILED_AT: _now(),
                        names.ANNOTATION_RELEASING: None,
                        names.ANNOTATION_SETUP_PENDING: None,
                    }
                }
            },
        )
        # the watch brings the change back; _end then ends it without starting it

    # -- the interface -------------------------------------------------------------

    def namespace_of(self, user: str) -> str:
        if self.config.namespace_mode == "shared":
            return self.config.namespace
        try:
            return names.namespace_for(user, self.config.namespace_template)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    async def _ensure_namespace(self, namespace: str) -> None:
        if namespace in self._namespaces or self.config.namespace_mode == "shared":
            return
        if self.config.create_namespaces:
            labels = {**self.config.namespace_labels, **self.selector}
            body = from_dict(
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace, "labels": labels},
                }
            )
            try:
                await self.client.create(body)
            except ApiError as exc:
                if exc.status.code != 409:
                    raise api_error(exc, f"create the namespace {namespace}") from exc
            except httpx.HTTPError as exc:
                raise api_error(exc, f"create the namespace {namespace}") from exc
            if self.config.namespace_quota:
                await self._ensure_quota(namespace)
        self._namespaces.add(namespace)

    async def _ensure_quota(self, namespace: str) -> None:
        """The admin's ResourceQuota (namespace_quota) in a per-user namespace."""
        quota = {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "kbatch", "namespace": namespace, "labels": dict(self.selector)},
            "spec": {"hard": dict(self.config.namespace_quota)},
        }
        try:
            await self.client.create(from_dict(quota))
        except ApiError as exc:
            if exc.status.code != 409:  # there already: the admin may have changed it
                raise api_error(exc, f"create the ResourceQuota of {namespace}") from exc
        except httpx.HTTPError as exc:
            raise api_error(exc, f"create the ResourceQuota of {namespace}") from exc

    async def _notebook_pods(self) -> list[dict[str, Any]]:
        """The hub's notebook pods, listed at most once every NOTEBOOKS_FOR seconds
        (concurrent submissions share one listing: one request, not one each)."""
        async with self._notebooks_lock:
            listed_at, pods = self._notebooks
            if time.monotonic() - listed_at < NOTEBOOKS_FOR:
                return pods
            pods = [
                pod.to_dict()
                async for pod in self.client.list(
                    Pod, namespace=self.config.notebook_namespace, labels=dict(NOTEBOOK_LABELS)
                )
            ]
            self._notebooks = (time.monotonic(), pods)
            return pods

    async def _notebook(self, user: str, namespace: str) -> Any:
        if not self.config.notebook_namespace:
            return None
        try:
            pods = await self._notebook_pods()
        except (ApiError, httpx.HTTPError) as exc:
            log.warning("cannot look up the notebook of %s: %s", user, exc)
            return None
        mine = [
            p
            for p in pods
            if (p["metadata"].get("annotations") or {}).get(USERNAME_ANNOTATION) == user
            and (p.get("status") or {}).get("phase") == "Running"
        ]
        if not mine:
            return None
        return notebook_defaults(
            mine[0], same_namespace=self.config.notebook_namespace == namespace
        )

    async def validate(self, user: str, spec: JobSpec) -> None:
        await super().validate(user, spec)
        if spec.array:
            count = len(IndexSet.parse(spec.array))
            if count > MAX_TASKS:
                raise SpecError(
                    f"--array={spec.array}: {count} tasks; an array on Kubernetes (one "
                    f"Indexed Job) has at most {MAX_TASKS}: split it",
                    field="array",
                )

    @property
    def supports_code(self) -> bool:
        return bool(self.config.transfer_url and self.config.transfer_image)

    def _transfer(self, spec: JobSpec, job_id: str) -> CodeTransfer | None:
        """How the pod of a job with uploaded files gets them (and hands back results)."""
        if spec.code is None:
            return None
        url, image = self.config.transfer_url, self.config.transfer_image
        if self.uploads is None or not url or not image:
            raise SpecError(
                "this server cannot send uploaded files to Kubernetes pods (the admin sets "
                "[kubernetes] transfer_url and transfer_image); submit without --code",
                field="code",
            )
        expires = time.time() + self.config.transfer_token_days * 86400
        return CodeTransfer(
            url=url, image=image, token=self.uploads.transfer_token(job_id, expires)
        )

    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        await self.validate(user, spec)
        if (
            idempotency_key is None
            or names.keyed_job_id(self.config.instance, user, idempotency_key) not in self._models
        ):  # a retry of a job it has is not a new submission
            self._check_submit_limit(user, spec)
        namespace = self.namespace_of(user)
        await self._ensure_namespace(namespace)
        if idempotency_key is not None:
            # the same id on every retry and replica: the API server refuses a second Job
            job_id = names.keyed_job_id(self.config.instance, user, idempotency_key)
        else:
            job_id = names.new_job_id()
        notebook = await self._notebook(user, namespace)
        manifests = build_manifests(
            spec,
            JobContext(
                job_id=job_id,
                user=user,
                namespace=namespace,
                default_image=self.config.image,
                instance=self.config.instance,
                ttl_seconds=self.config.ttl_seconds,
                notebook=notebook,
                template=self.config.job_template,
                idempotency_key=idempotency_key,
                submitted=datetime.now(UTC),
                security_context=self.config.security_context,
                forbid_root=self.config.forbid_root,
                transfer=self._transfer(spec, job_id),
            ),
        )
        if spec.code is not None and self.uploads is not None:
            self.uploads.attach(job_id, user, spec.code)  # before its pod can ask for them
        return await self._create(manifests, keyed=idempotency_key is not None)

    async def _create(self, manifests: Manifests, *, keyed: bool) -> Job:
        """The Job (suspended), then its ConfigMap and Secret owned by it (together), then
        the Job marked complete; the reconciler starts it.

        If a step fails, everything made so far is deleted: a failed submission
        leaves nothing behind.  A keyed Job that exists already is the same
        submission (its objects are completed if a crash left them half made), or a
        :class:`Conflict` if its spec differs.
        """
        job = manifests.job
        namespace = job["metadata"]["namespace"]
        name = job["metadata"]["name"]
        try:
            try:
                created = self._observe(await self.client.create(from_dict(job)))
            except ApiError as exc:
                if not _namespace_missing(exc, namespace) or namespace not in self._namespaces:
                    raise
                # an admin deleted the namespace since it was made: make it again, once
                self._namespaces.discard(namespace)
                await self._ensure_namespace(namespace)
                created = self._observe(await self.client.create(from_dict(job)))
        except ApiError as exc:
            if not (keyed and exc.status.code == 409):
                raise api_error(exc, "create the job") from exc
            return await self._existing(manifests)
        except httpx.HTTPError as exc:
            raise api_error(exc, "create the job") from exc
        try:
            return await self._complete(created, manifests)
        except KbatchApiError:
            await self._delete_quietly(namespace, name)
            raise

    async def _complete(self, created: dict[str, Any], manifests: Manifests) -> Job:
        owner = [owner_reference(created)]
        config_map, secret = manifests.config_map, manifests.secret
        config_map["metadata"]["ownerReferences"] = owner
        secret["metadata"]["ownerReferences"] = owner

        async def make(body: dict[str, Any]) -> None:
            try:
                await self.client.create(from_dict(body))
            except ApiError as exc:
                if exc.status.code != 409:  # made by an earlier attempt: fine
                    raise

        try:
            await asyncio.gather(make(config_map), make(secret))
            ready: dict[str, Any] = {
                "metadata": {"annotations": {names.ANNOTATION_OBJECTS_READY: "true"}}
            }
            patched = None
            if self._starts_at_once(created):
                # Nothing to do before it starts: mark it ready and start it in one
                # request, if its desired state is still run (no hold or cancel came
                # meanwhile): else as below, and the reconciler decides.
                patched = await self._ready_and_start(created)
            elif desired_of(created) is Desired.RUN:
                # this replica will start it: claim that now, saving the reconciler a
                # request (a crash leaves the claim, which lapses: RELEASE_CLAIM_SECONDS)
                claim = f"{self._replica} {_now()}"
                ready["metadata"]["annotations"][names.ANNOTATION_RELEASING] = claim
            if patched is None:
                patched = await self._patch_job(created, ready)
        except _HTTP_ERRORS as exc:
            raise api_error(exc, "create the job") from exc
        if patched is None:
            raise NotFound("the job was deleted while it was being created", status=404)
        return self._model(patched, [])[0]

    async def _ready_and_start(self, created: dict[str, Any]) -> dict[str, Any] | None:
        """Mark the Job ready and unsuspend it, if its desired state is still ``run``
        (a JSON patch's test: not a resourceVersion precondition, which the Job
        controller's own status updates would fail); None if it is not."""
        meta = created["metadata"]
        desired = "/metadata/annotations/" + names.ANNOTATION_DESIRED.replace("/", "~1")
        ready = "/metadata/annotations/" + names.ANNOTATION_OBJECTS_READY.replace("/", "~1")
        ops = [
            {"op": "test", "path": desired, "value": Desired.RUN.value},
            {"op": "add", "path": ready, "value": "true"},
            {"op": "replace", "path": "/spec/suspend", "value": False},
        ]
        try:
            patched = await self.client.patch(
                K8sJob, meta["name"], ops, namespace=meta["namespace"], patch_type=PatchType.JSON
            )
        except ApiError as exc:
            if exc.status.code in (409, 422):  # the test failed: held or cancelled meanwhile
                return None
            raise
        return self._observe(patched)

    def _starts_at_once(self, created: dict[str, Any]) -> bool:
        """Whether a just-made Job may be started by its submitter, saving the
        reconciler two requests (claim, release): nothing is to run before it starts
        (the start hook is the default one, which makes no environment) and its
        desired state is run.  Any condition the reconciler checks before a release
        must be checked here too."""
        no_start_hook = type(self.hooks).environment is JobHooks.environment
        gated = _spec_of(created) is None or any(
            getattr(_spec_of(created), f) is not None for f in ("dependency", "begin")
        )
        limited = self.limits.any()  # only the reconciler counts a user's running jobs
        return no_start_hook and not gated and not limited and desired_of(created) is Desired.RUN

    async def _existing(self, manifests: Manifests) -> Job:
        meta = manifests.job["metadata"]
        try:
            found = self._observe(
                await self.client.get(K8sJob, meta["name"], namespace=meta["namespace"])
            )
        except _HTTP_ERRORS as exc:
            raise api_error(exc, "look up the job") from exc
        mine = meta["annotations"][names.ANNOTATION_SPEC_DIGEST]
        theirs = _annotations(found).get(names.ANNOTATION_SPEC_DIGEST)
        job_id = _job_id_of(found) or ""
        if mine != theirs:
            key = meta["annotations"].get(names.ANNOTATION_IDEMPOTENCY, "")
            raise Conflict(
                f"Idempotency-Key {key!r} was used for job {job_id} "
                "with another spec; use a new key for a new job",
                status=409,
                code="idempotency_key_reused",
            )
        if names.ANNOTATION_OBJECTS_READY not in _annotations(found):
            return await self._complete(found, manifests)  # an earlier attempt was cut short
        pods = list(self._pods_by_job.get(job_id, {}).values())
        return self._model(found, pods)[0]

    async def _delete_quietly(self, namespace: str, name: str) -> None:
        for resource in (K8sJob, ConfigMap, Secret):
            with contextlib.suppress(ApiError, httpx.HTTPError):
                await self.client.delete(resource, name, namespace=namespace, grace_period=0)

    async def _lookup(self, job_id: str) -> tuple[str, str]:
        key = self._job_keys.get(job_id)
        if key is not None:
            return key
        if names.is_dns_label(job_id, 20):  # just created: the watch may not have seen it yet
            try:
                async for found in self.client.list(
                    K8sJob,
                    namespace=self._scope,
                    labels={names.LABEL_JOB_ID: job_id, **self.selector},
                ):
                    obj = found.to_dict()
                    return obj["metadata"]["namespace"], obj["metadata"]["name"]
            except (ApiError, httpx.HTTPError) as exc:
                raise api_error(exc, "look up the job") from exc
        raise NotFound(f"no job {job_id}", status=404, code="not_found")

    async def get(self, job_id: str) -> Job:
        ref = parse_job_ref(job_id)
        if ref.tasks is not None:
            return self._tasks_of(ref, await self._array(ref))
        model = self._models.get(job_id)
        if model is not None:
            return self._with_dependency_detail(model)
        namespace, name = await self._lookup(job_id)
        try:
            found = await self.client.get(K8sJob, name, namespace=namespace)
        except (ApiError, httpx.HTTPError) as exc:
            raise api_error(exc, "read the job") from exc
        pods = list(self._pods_by_job.get(job_id, {}).values())
        return self._model(found.to_dict(), pods)[0]

    async def _array(self, ref: JobRef) -> ArrayView:
        """The array ``ref`` names (NotFound if it names no array)."""
        view = self._views.get(ref.job_id)
        if view is None:
            namespace, name = await self._lookup(ref.job_id)
            try:
                found = (await self.client.get(K8sJob, name, namespace=namespace)).to_dict()
            except (ApiError, httpx.HTTPError) as exc:
                raise api_error(exc, "read the job") from exc
            view = self._model(found, list(self._pods_by_job.get(ref.job_id, {}).values()))[1]
        if view is None:
            raise NotFound(
                f"no job {ref}: job {ref.job_id} is not an array", status=404, code="not_found"
            )
        return view

    @staticmethod
    def _tasks_of(ref: JobRef, view: ArrayView) -> Job:
        """Task ``ID_INDEX`` of an array, or its tasks ``ID_[...]`` as one job."""
        if ref.index is not None:
            task = view.task(ref.index)
        else:
            assert ref.indexes is not None
            task = view.subset(ref.indexes)
        if task is None:
            raise NotFound(f"no job {ref}", status=404, code="not_found")
        return task

    async def spec(self, job_id: str) -> JobSpec | None:
        """The spec the job was submitted with: what its Job records (everything but the
        script and the environment) and the script from its ConfigMap.

        The environment is left out: it lives only in the job's Secret, which the server
        never reads back (its RBAC cannot), and which also holds the job's token.
        None when the Job's record is unreadable or its ConfigMap is gone."""
        obj = self._object(job_id)
        if obj is None:
            namespace, name = await self._lookup(job_id)
            try:
                obj = (await self.client.get(K8sJob, name, namespace=namespace)).to_dict()
            except _HTTP_ERRORS as exc:
                raise api_error(exc, "read the job") from exc
        recorded = _spec_of(obj)
        if recorded is None:
            return None
        meta = obj["metadata"]
        try:
            config_map = await self.client.get(ConfigMap, meta["name"], namespace=meta["namespace"])
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise api_error(exc, "read the job's script") from exc
        except httpx.HTTPError as exc:
            raise api_error(exc, "read the job's script") from exc
        data = config_map.data or {}
        script = data.get("script")
        if not script:
            return None
        params = recorded.params
        if PARAMS_KEY in data:  # a sweep's table is kept in the ConfigMap, not on the Job
            try:
                params = msgspec.json.decode(data[PARAMS_KEY], type=SweepParams)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None
        return msgspec.structs.replace(recorded, script=script, environment={}, params=params)

    async def list(
        self,
        *,
        user: str | None,
        states: Collection[JobState] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> JobList:
        listed = self._listed
        if listed is None:
            listed = []
            for job_id, job in self._models.items():
                view = self._views.get(job_id)
                if view is None:
                    listed.append((self._list_keys.get(job_id) or _list_key(job), job))
                else:
                    listed.extend((_list_key(row), row) for row in view.rows())
            listed.sort(key=operator.itemgetter(0))
            self._listed = listed
        jobs = [
            job
            for _, job in listed
            if (user is None or job.user == user) and (states is None or job.state in states)
        ]
        page = paginate(jobs, limit=limit, after=after, key=_list_key)
        stale = self.health().stale_seconds
        if stale is not None:
            page.stale_seconds = round(stale, 1)
        return page

    async def _set_desired(self, job_id: str, annotations: dict[str, str]) -> None:
        namespace, name = await self._lookup(job_id)
        patch = {"metadata": {"annotations": annotations}}
        try:
            self._observe(await self.client.patch(K8sJob, name, patch, namespace=namespace))
        except (ApiError, httpx.HTTPError) as exc:
            raise api_error(exc, "update the job") from exc

    async def _settled(self, job_id: str) -> Job:
        """Wait for the reconciler to act on the job's desired state; the job then."""
        try:
            async with asyncio.timeout(self.config.cancel_timeout):
                await self._queue.sync(job_id)
        except TimeoutError:
            log.warning("job %s: the reconciler did not finish in time", job_id)
        return await self.get(job_id)

    async def cancel(self, job_id: str, *, by: str) -> Job:
        """Ask for the job to end; the reconciler ends it through its deadline (see _end).

        It stays visible as CANCELLED until its TTL, with ``cancelled_by``.  Some tasks
        of an array (``ID_7``, ``ID_[1-5]``) are recorded on the Job and their pods
        deleted by the reconciler; the others keep running.
        """
        ref = parse_job_ref(job_id)
        if ref.tasks is not None:
            return await self._cancel_tasks(ref, by)
        job = await self.get(job_id)
        if job.state.is_terminal:
            return job
        desired = {
            names.ANNOTATION_DESIRED: Desired.CANCEL.value,
            names.ANNOTATION_CANCELLED: _now(),
            names.ANNOTATION_CANCELLED_BY: by,
        }
        view = self._views.get(job_id)
        obj = self._object(job_id)
        if view is not None and obj is not None:
            # the tasks running now ran: they stay rows of their own once the Job
            # controller has deleted their pods (the others never started)
            had = _annotations(obj).get(names.ANNOTATION_CANCELLED_STARTED, "")
            ran = [i for i, t in view.tasks.items() if t.state is JobState.RUNNING]
            desired[names.ANNOTATION_CANCELLED_STARTED] = str(
                IndexSet.of([*IndexSet.parse(had), *ran])
            )
        await self._set_desired(job_id, desired)
        return await self._settled(job_id)

    async def _cancel_tasks(self, ref: JobRef, by: str) -> Job:
        """Add the named tasks that have not ended to the Job's cancelled tasks: a JSON
        patch that tests the value it extends, so concurrent cancels (of any replica) add
        up; the reconciler then deletes their pods, and never lets them start."""
        assert ref.tasks is not None
        for _ in range(10):
            view = await self._array(ref)
            self._tasks_of(ref, view)  # NotFound if it names none of the array's tasks
            obj = self._object(ref.job_id)
            if obj is None:
                namespace, name = await self._lookup(ref.job_id)
                obj = (await self.client.get(K8sJob, name, namespace=namespace)).to_dict()
            if view.job.state.is_terminal or desired_of(obj) is Desired.CANCEL:
                break
            old = _annotations(obj).get(names.ANNOTATION_CANCELLED_TASKS, "")
            adding = [
                i
                for i in view.indexes
                if contains(ref.tasks, i)
                and not ((task := view.task(i)) is not None and task.state.is_terminal)
            ]
            if not adding:
                break
            new = str(IndexSet.of([*IndexSet.parse(old), *adding]))
            # those running now ran; the others never will (a pod the Job controller
            # makes for one of them is deleted, whatever it did meanwhile)
            ran = [i for i in adding if (t := view.tasks.get(i)) is not None and t.started]
            had = _annotations(obj).get(names.ANNOTATION_CANCELLED_STARTED, "")
            started = str(IndexSet.of([*IndexSet.parse(had), *ran]))
            ops = [
                {
                    "op": "test",
                    "path": _annotation_path(names.ANNOTATION_CANCELLED_TASKS),
                    "value": old,
                },
                {
                    "op": "replace",
                    "path": _annotation_path(names.ANNOTATION_CANCELLED_TASKS),
                    "value": new,
                },
                {"op": "add", "path": _annotation_path(names.ANNOTATION_CANCELLED_BY), "value": by},
                {
                    "op": "add",
                    "path": _annotation_path(names.ANNOTATION_CANCELLED_STARTED),
                    "value": started,
                },
            ]
            if await self._json_patch(obj, ops):
                break
            await self._fresh(ref.job_id)  # another cancel came first: read it and add to it
        return await self._settled_ref(ref)

    async def _settled_ref(self, ref: JobRef) -> Job:
        await self._settled(ref.job_id)
        return await self.get(str(ref))

    async def _fresh(self, job_id: str) -> dict[str, Any]:
        """The Job as the API server has it now, taken into the cache."""
        namespace, name = await self._lookup(job_id)
        try:
            return self._observe(await self.client.get(K8sJob, name, namespace=namespace))
        except _HTTP_ERRORS as exc:
            raise api_error(exc, "read the job") from exc

    async def _json_patch(self, obj: dict[str, Any], ops: _Ops) -> bool:
        """Apply a JSON patch whose ``test`` ops claim it; False if a test failed."""
        meta = obj["metadata"]
        try:
            patched = await self.client.patch(
                K8sJob, meta["name"], ops, namespace=meta["namespace"], patch_type=PatchType.JSON
            )
        except ApiError as exc:
            if exc.status.code in (409, 422):
                return False
            raise api_error(exc, "update the job") from exc
        except httpx.HTTPError as exc:
            raise api_error(exc, "update the job") from exc
        self._observe(patched)
        return True

    async def set_throttle(self, job_id: str, throttle: int | None) -> Job:
        """An array's throttle: recorded on the Job and its ``parallelism`` raised at once;
        lowered only as far as the tasks running allow (the Job controller would stop the
        others), then further by the reconciler as they end."""
        ref = parse_job_ref(job_id)
        if ref.tasks is not None:
            raise Conflict(
                f"job {ref} is some tasks of an array; the throttle is the array's: "
                f"use {ref.job_id}",
                status=409,
                code="not_an_array",
            )
        view = self._views.get(ref.job_id)
        if view is None:
            try:
                view = await self._array(ref)
            except NotFound:
                await self.get(ref.job_id)  # NotFound for unknown ids
                raise Conflict(
                    f"job {ref.job_id} is not an array; only an array has a throttle",
                    status=409,
                    code="not_an_array",
                ) from None
        obj = self._object(ref.job_id) or await self._fresh(ref.job_id)
        now = datetime.now(UTC)
        ops: _Ops = [
            {
                "op": "add",
                "path": _annotation_path(names.ANNOTATION_THROTTLE),
                "value": str(throttle or ""),
            },
            {
                "op": "add",
                "path": _annotation_path(names.ANNOTATION_THROTTLE_SET),
                "value": now.isoformat(),
            },
        ]
        if not view.job.state.is_terminal:
            parallelism = self._parallelism(obj, throttle, now)
            ops.append({"op": "replace", "path": "/spec/parallelism", "value": parallelism})
        await self._json_patch(obj, ops)
        return await self._settled_ref(ref)

    def _wanted_parallelism(self, obj: dict[str, Any], now: datetime) -> int:
        """What an array's ``parallelism`` may be now: its throttle (none while it is
        held), but never below the tasks running when that was set."""
        annotations = _annotations(obj)
        throttle = annotations.get(names.ANNOTATION_THROTTLE, "")
        since = _parse_time_or(annotations.get(names.ANNOTATION_THROTTLE_SET), now)
        held = desired_of(obj) is Desired.HOLD
        return self._parallelism(
            obj, int(throttle) if throttle.isdigit() else None, since, held=held
        )

    def _parallelism(
        self, obj: dict[str, Any], throttle: int | None, since: datetime, *, held: bool = False
    ) -> int:
        """What an array's ``parallelism`` may be for ``throttle``, set at ``since``: never
        below the tasks that were running then (they run to their end; the Job controller
        would stop them).  Tasks started since beyond it are stopped and wait again (the
        Job controller takes its finalizer from such a pod first: its index is not failed)."""
        count = int(obj["spec"].get("completions") or 1)
        wanted = 0 if held else min(throttle or count, count)
        running = 0
        for pod in self._pods_by_job.get(_job_id_of(obj) or "", {}).values():
            began = _pod_start(pod) if pod_started(pod) else None
            if pod.get("status", {}).get("phase") == "Running" and began and began <= since:
                running += 1
        return max(wanted, min(running, count))

    async def hold(self, job_id: str) -> Job:
        ref = parse_job_ref(job_id)
        if ref.tasks is not None:
            task = await self.get(job_id)
            if task.state is not JobState.PENDING:
                raise not_pending(task, "held")
            raise _tasks_not_supported(job_id, "held")
        job = await self.get(job_id)
        pods = self._pods_by_job.get(job_id, {}).values()
        started = any(pod_started(p) for p in pods)
        if job_id in self._views and started and not job.state.is_terminal:
            return await self._hold_running_array(job_id)
        if job.state is not JobState.PENDING or started:
            raise not_pending(job, "held")
        await self._set_desired(job_id, {names.ANNOTATION_DESIRED: Desired.HOLD.value})
        held = await self._settled(job_id)
        pods = self._pods_by_job.get(job_id, {}).values()
        if held.state is JobState.RUNNING or any(pod_started(p) for p in pods):
            # it started before the hold took effect: too late, as if it had come later
            await self._set_desired(job_id, {names.ANNOTATION_DESIRED: Desired.RUN.value})
            raise not_pending(held, "held")
        return held

    async def _hold_running_array(self, job_id: str) -> Job:
        """Hold an array some of whose tasks run: they run on, no other starts (its
        ``parallelism`` goes down to the tasks running now, then lower as they end)."""
        obj = self._object(job_id) or await self._fresh(job_id)
        if desired_of(obj) is not Desired.HOLD:
            now = datetime.now(UTC)
            ops: _Ops = [
                {
                    "op": "test",
                    "path": _annotation_path(names.ANNOTATION_DESIRED),
                    "value": Desired.RUN.value,
                },
                {
                    "op": "replace",
                    "path": _annotation_path(names.ANNOTATION_DESIRED),
                    "value": Desired.HOLD.value,
                },
                {
                    "op": "add",
                    "path": _annotation_path(names.ANNOTATION_THROTTLE_SET),
                    "value": now.isoformat(),
                },
                {
                    "op": "replace",
                    "path": "/spec/parallelism",
                    "value": self._parallelism(obj, 0, now, held=True),
                },
            ]
            if not await self._json_patch(obj, ops):
                raise Conflict(
                    f"job {job_id} changed while it was being held (cancelled?); try again",
                    status=409,
                    code="conflict",
                )
        return await self._settled(job_id)

    async def release(self, job_id: str) -> Job:
        if parse_job_ref(job_id).tasks is not None:
            raise _tasks_not_supported(job_id, "released")
        obj = self._object(job_id)
        if obj is None:
            await self._lookup(job_id)  # NotFound for unknown ids
            obj = self._object(job_id)
        if obj is not None and job_id in self._views and desired_of(obj) is Desired.HOLD:
            # a held array: its parallelism back to its throttle (a hold of running
            # tasks lowered it); a suspended one is then started by the reconciler
            now = datetime.now(UTC)
            throttle = _annotations(obj).get(names.ANNOTATION_THROTTLE, "")
            limit = int(throttle) if throttle.isdigit() else None
            await self._json_patch(
                obj,
                [
                    {
                        "op": "replace",
                        "path": _annotation_path(names.ANNOTATION_DESIRED),
                        "value": Desired.RUN.value,
                    },
                    {
                        "op": "add",
                        "path": _annotation_path(names.ANNOTATION_THROTTLE_SET),
                        "value": now.isoformat(),
                    },
                    {
                        "op": "replace",
                        "path": "/spec/parallelism",
                        "value": self._parallelism(obj, limit, now),
                    },
                ],
            )
            return await self._settled(job_id)
        if obj is not None and desired_of(obj) is not Desired.HOLD:
            return await self.get(job_id)
        await self._set_desired(job_id, {names.ANNOTATION_DESIRED: Desired.RUN.value})
        return await self._settled(job_id)

    async def logs(
        self, job_id: str, *, follow: bool, stream: str = "output"
    ) -> AsyncIterator[bytes]:
        ref = parse_job_ref(job_id)
        if ref.tasks is not None or ref.job_id in self._views:
            async for chunk in self._task_logs(ref, follow=follow):
                yield chunk
            return
        namespace, name = await self._lookup(job_id)
        try:  # the API server answers (else a 503 before anything is sent), and the Job is there
            current = self._observe(await self.client.get(K8sJob, name, namespace=namespace))
        except ApiError as exc:
            if exc.status.code == 404:
                raise NotFound(f"no job {job_id}", status=404, code="not_found") from exc
            raise api_error(exc, "read the job's log") from exc
        except httpx.HTTPError as exc:
            raise api_error(exc, "read the job's log") from exc
        while True:
            pods = sorted(
                self._pods_by_job.get(job_id, {}).values(),
                key=lambda p: p["metadata"].get("creationTimestamp") or "",
            )
            started = [
                p
                for p in pods
                if p.get("status", {}).get("phase") in ("Running", "Succeeded", "Failed")
            ]
            if started:
                break
            job = await self.get(job_id)
            if not follow or job.state.is_terminal:
                async for chunk in self._kept_log(job, self._object(job_id) or current):
                    yield chunk
                return
            await asyncio.sleep(0.5)
        pod = started[-1]
        pod_name = pod["metadata"]["name"]
        ended = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
        if not follow or ended:
            try:
                async for line in self.client.log(pod_name, namespace=namespace, container="job"):
                    yield line.encode()
            except (ApiError, httpx.HTTPError) as exc:
                raise api_error(exc, "read the job's log") from exc
            return
        async for chunk in self._follow(job_id, pod_name, namespace):
            yield chunk

    async def _task_logs(self, ref: JobRef, *, follow: bool) -> AsyncIterator[bytes]:
        """The log of task ``ID_INDEX``: its pod's (the newest that started), or once the
        pod is gone the copy kept in the ConfigMap when it was cancelled or timed out."""
        view = await self._array(ref)
        if ref.index is None:
            raise InvalidRequest(
                f"job {ref} is {'some tasks of ' if ref.indexes is not None else ''}an array: "
                f"name one task for its log, e.g. {ref.job_id}_{view.indexes.first}",
                status=422,
                code="array_logs",
            )
        task_id = str(ref)
        self._tasks_of(ref, view)  # NotFound for an index the array does not have
        spec = _spec_of(self._object(ref.job_id) or await self._fresh(ref.job_id))
        order = task_order((spec.array if spec else None) or str(view.indexes))[1]
        position = str(order[ref.index])
        namespace, name = await self._lookup(ref.job_id)
        while True:
            started = sorted(
                (
                    p
                    for p in self._pods_by_job.get(ref.job_id, {}).values()
                    if (p["metadata"].get("labels") or {}).get(names.LABEL_COMPLETION_INDEX)
                    == position
                    and p.get("status", {}).get("phase") in ("Running", "Succeeded", "Failed")
                ),
                key=lambda p: p["metadata"].get("creationTimestamp") or "",
            )
            if started:
                break
            task = await self.get(task_id)
            if not follow or task.state.is_terminal:
                async for chunk in self._kept_task_log(task, namespace, name):
                    yield chunk
                return
            await asyncio.sleep(0.5)
        pod = started[-1]
        pod_name = pod["metadata"]["name"]
        if not follow or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            lines: list[str] = []
            try:
                async for line in self.client.log(pod_name, namespace=namespace, container="job"):
                    lines.append(line)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise api_error(exc, "read the task's log") from exc
                # the pod went meanwhile (the watch had not said): the kept copy, if any
                async for chunk in self._kept_task_log(await self.get(task_id), namespace, name):
                    yield chunk
                return
            except httpx.HTTPError as exc:
                raise api_error(exc, "read the task's log") from exc
            for line in lines:
                yield line.encode()
            return
        async for chunk in self._follow(task_id, pod_name, namespace):
            yield chunk

    async def _kept_task_log(self, task: Job, namespace: str, name: str) -> AsyncIterator[bytes]:
        try:
            kept = await self.client.get(ConfigMap, name, namespace=namespace)
        except _HTTP_ERRORS as exc:
            raise api_error(exc, "read the task's kept log") from exc
        text = (kept.data or {}).get(f"log-{task.array_task_id}")
        if text is not None:
            yield text.encode()
            return
        if task.started is not None or task.state in (
            JobState.COMPLETED,
            JobState.FAILED,
            JobState.OUT_OF_MEMORY,
        ):
            where = f"; its output file was {task.output}" if task.output else ""
            raise KbatchApiError(
                f"the output of task {task.id} is gone: its pod was deleted and no copy "
                f"of its log was kept{where}",
                status=410,
                code="output_gone",
            )

    async def _kept_log(self, job: Job, obj: dict[str, Any]) -> AsyncIterator[bytes]:
        """The log of a job whose pod is gone: the copy kept when it was cancelled or
        timed out, else (if it ran) a 410 saying it is gone, never an empty success."""
        meta = obj["metadata"]
        if names.ANNOTATION_LOG_SAVED in _annotations(obj):
            try:
                kept = await self.client.get(ConfigMap, meta["name"], namespace=meta["namespace"])
            except _HTTP_ERRORS as exc:
                raise api_error(exc, "read the job's kept log") from exc
            text = (kept.data or {}).get("log", "")
            if text:
                yield text.encode()
            return
        counts = obj.get("status") or {}
        uncounted = counts.get("uncountedTerminatedPods") or {}
        ran = (
            counts.get("succeeded")
            or counts.get("failed")
            or uncounted.get("succeeded")
            or uncounted.get("failed")
            or job.started is not None
            or job.state is JobState.COMPLETED
        )
        if ran:
            where = f"; its output file was {job.output}" if job.output else ""
            raise KbatchApiError(
                f"the output of job {job.id} is gone: its pod was deleted and no copy "
                f"of its log was kept{where}",
                status=410,
                code="output_gone",
            )

    async def _follow(self, job_id: str, pod_name: str, namespace: str) -> AsyncIterator[bytes]:
        """Follow a running pod's log until the job has ended and the log is quiet.

        A kubelet ends the stream when the container exits; this does not rely
        on it, so a stream that stays open cannot keep ``kbatch logs -f`` waiting.
        """
        lines: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for line in self.client.log(
                    pod_name, namespace=namespace, container="job", follow=True
                ):
                    await lines.put(line.encode())
                await lines.put(None)
            except (ApiError, httpx.HTTPError) as exc:
                await lines.put(exc)

        reader = asyncio.create_task(read())
        quiet_after_end = 0
        try:
            while True:
                try:
                    item = await asyncio.wait_for(lines.get(), timeout=0.5)
                except TimeoutError:
                    if (await self.get(job_id)).state.is_terminal:
                        quiet_after_end += 1
                        if quiet_after_end >= 2:  # a second of silence after the end
                            return
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise api_error(
                        item if isinstance(item, Exception) else RuntimeError(item),
                        "follow the job's log",
                    )
                quiet_after_end = 0
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
