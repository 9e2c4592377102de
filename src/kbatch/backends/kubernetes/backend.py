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
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx  # lightkube is built on httpx2, a fork of httpx
from lightkube import ALL_NS, ApiError, AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.resources.batch_v1 import Job as K8sJob
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret

from kbatch.backends.base import Backend, BackendHealth, decode_section, not_pending, paginate
from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.cache import WatchCache
from kbatch.backends.kubernetes.manifests import (
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
from kbatch.backends.kubernetes.status import (
    desired_of,
    job_from_objects,
    parse_time,
    pod_started,
)
from kbatch.backends.workqueue import WorkQueue
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
from kbatch.lifecycle import Desired
from kbatch.models import Job, JobList, JobSpec, JobState

__all__ = ["KubernetesBackend", "KubernetesConfig", "api_error"]

log = logging.getLogger("kbatch.kubernetes")


@dataclass
class KubernetesConfig:
    kubeconfig: str | None = None  # default: in-cluster config, else $KUBECONFIG / ~/.kube/config
    context: str | None = None
    namespace_mode: str = "per-user"  # or "shared"
    namespace_template: str = "kbatch-{username}"
    namespace: str = "default"  # the namespace of every job in shared mode
    create_namespaces: bool = True
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
RELEASE_CLAIM_SECONDS = 60.0  # a replica's claim to start a job lapses after this
OBJECTS_GRACE_SECONDS = 120.0  # a Job whose ConfigMap/Secret never came is ended after this


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


def _list_key(job: Job) -> str:
    return f"{job.submitted.isoformat()}|{job.id}"


def _job_id_of(obj: dict[str, Any] | None) -> str | None:
    """The kbatch job id a Job or Pod is labelled with."""
    if obj is None:
        return None
    labels = obj["metadata"].get("labels") or {}
    job_id = labels.get(names.LABEL_JOB_ID)
    return str(job_id) if job_id else None


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
        self._namespaces: set[str] = set()
        self._queue: WorkQueue[str] = WorkQueue(base_delay=0.5, max_delay=60.0)
        self._workers: list[asyncio.Task[None]] = []
        self._replica = uuid.uuid4().hex[:12]  # names this replica's claims
        # job id -> when its start may be tried again (monotonic): watch events, which
        # queue a job at once, must not cut a hook's backoff short
        self._retry_at: dict[str, float] = {}

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
            self.client, K8sJob, labels=selector, namespace=self._scope, on_change=self._job_changed
        )
        self._pods = WatchCache(
            self.client, Pod, labels=selector, namespace=self._scope, on_change=self._pod_changed
        )
        self._pods.start()
        self._jobs.start()
        try:
            async with asyncio.timeout(self.config.cache_timeout):
                await self._pods.ready.wait()
                await self._jobs.ready.wait()
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

    async def stop(self) -> None:
        self._queue.close()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
            if not self._pods_by_job.get(job_id):
                self._pods_by_job.pop(job_id, None)
            self._queue.forget(job_id)
            self._retry_at.pop(job_id, None)
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
        model = job_from_objects(obj, list(self._pods_by_job.get(job_id, {}).values()))
        self._models[job_id] = model
        self.events.publish(model)
        return model

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
        elif obj["spec"].get("suspend"):
            await self._release(obj, model)
        self._queue.forget(job_id)
        self._retry_at.pop(job_id, None)

    async def _end(self, obj: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        """End the Job through its deadline: the Job controller stops its pods (SIGTERM,
        then SIGKILL after the grace period) and marks it failed, so it stays visible."""
        spec = obj["spec"]
        if spec.get("activeDeadlineSeconds") == 1 and not spec.get("suspend"):
            return None  # done already; the Job controller does the rest
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
        if claimed_at is not None and owner != self._replica:
            left = RELEASE_CLAIM_SECONDS - (datetime.now(UTC) - claimed_at).total_seconds()
            if left > 0:
                self._queue.put_after(job_id, left)
                return  # another replica is starting it
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
            body = from_dict(
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace, "labels": dict(self.selector)},
                }
            )
            try:
                await self.client.create(body)
            except ApiError as exc:
                if exc.status.code != 409:
                    raise api_error(exc, f"create the namespace {namespace}") from exc
            except httpx.HTTPError as exc:
                raise api_error(exc, f"create the namespace {namespace}") from exc
        self._namespaces.add(namespace)

    async def _notebook(self, user: str, namespace: str) -> Any:
        if not self.config.notebook_namespace:
            return None
        try:
            pods = [
                pod.to_dict()
                async for pod in self.client.list(
                    Pod, namespace=self.config.notebook_namespace, labels=dict(NOTEBOOK_LABELS)
                )
            ]
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
        for value, option in ((spec.dependency, "--dependency"), (spec.begin, "--begin")):
            if value is not None:
                raise SpecError(
                    f"{option} is not supported by the Kubernetes backend yet (the local "
                    "backend has it); submit the job when it may start",
                    field=option.strip("-"),
                )

    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        await self.validate(user, spec)
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
            ),
        )
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
            ready = {"metadata": {"annotations": {names.ANNOTATION_OBJECTS_READY: "true"}}}
            patched = await self._patch_job(created, ready)
        except _HTTP_ERRORS as exc:
            raise api_error(exc, "create the job") from exc
        if patched is None:
            raise NotFound("the job was deleted while it was being created", status=404)
        return job_from_objects(patched, [])

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
        return job_from_objects(found, pods)

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
        model = self._models.get(job_id)
        if model is not None:
            return model
        namespace, name = await self._lookup(job_id)
        try:
            found = await self.client.get(K8sJob, name, namespace=namespace)
        except (ApiError, httpx.HTTPError) as exc:
            raise api_error(exc, "read the job") from exc
        return job_from_objects(found.to_dict(), list(self._pods_by_job.get(job_id, {}).values()))

    async def list(
        self,
        *,
        user: str | None,
        states: Collection[JobState] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> JobList:
        jobs = [
            job
            for job in self._models.values()
            if (user is None or job.user == user) and (states is None or job.state in states)
        ]
        # (time, id) sorts as the cursors do (ISO times of one offset), far faster
        jobs.sort(key=lambda j: (j.submitted, j.id))
        return paginate(jobs, limit=limit, after=after, key=_list_key)

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

        It stays visible as CANCELLED until its TTL, with ``cancelled_by``.
        """
        job = await self.get(job_id)
        if job.state.is_terminal:
            return job
        await self._set_desired(
            job_id,
            {
                names.ANNOTATION_DESIRED: Desired.CANCEL.value,
                names.ANNOTATION_CANCELLED: _now(),
                names.ANNOTATION_CANCELLED_BY: by,
            },
        )
        return await self._settled(job_id)

    async def hold(self, job_id: str) -> Job:
        job = await self.get(job_id)
        pods = self._pods_by_job.get(job_id, {}).values()
        if job.state is not JobState.PENDING or any(pod_started(p) for p in pods):
            raise not_pending(job, "held")
        await self._set_desired(job_id, {names.ANNOTATION_DESIRED: Desired.HOLD.value})
        held = await self._settled(job_id)
        pods = self._pods_by_job.get(job_id, {}).values()
        if held.state is JobState.RUNNING or any(pod_started(p) for p in pods):
            # it started before the hold took effect: too late, as if it had come later
            await self._set_desired(job_id, {names.ANNOTATION_DESIRED: Desired.RUN.value})
            raise not_pending(held, "held")
        return held

    async def release(self, job_id: str) -> Job:
        obj = self._object(job_id)
        if obj is None:
            await self._lookup(job_id)  # NotFound for unknown ids
            obj = self._object(job_id)
        if obj is not None and desired_of(obj) is not Desired.HOLD:
            return await self.get(job_id)
        await self._set_desired(job_id, {names.ANNOTATION_DESIRED: Desired.RUN.value})
        return await self._settled(job_id)

    async def logs(
        self, job_id: str, *, follow: bool, stream: str = "output"
    ) -> AsyncIterator[bytes]:
        namespace, _ = await self._lookup(job_id)
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
