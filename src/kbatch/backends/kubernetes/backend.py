"""The Kubernetes backend: talks to the API server; everything it builds comes from manifests.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import httpx2 as httpx  # lightkube is built on httpx2, a fork of httpx
from lightkube import ALL_NS, ApiError, AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.resources.batch_v1 import Job as K8sJob
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret

from kbatch.backends.base import Backend, check_spec
from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.cache import WatchCache
from kbatch.backends.kubernetes.manifests import JobContext, build_manifests, owner_reference
from kbatch.backends.kubernetes.notebook import (
    NOTEBOOK_LABELS,
    USERNAME_ANNOTATION,
    notebook_defaults,
)
from kbatch.backends.kubernetes.status import job_from_objects
from kbatch.errors import (
    ApiError as KbatchApiError,
)
from kbatch.errors import (
    ConfigError,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
)
from kbatch.models import Job, JobSpec, JobState
from kbatch.patterns import resolve_output

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KubernetesConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"config [kubernetes]: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        config = cls(**data)
        if config.namespace_mode not in ("per-user", "shared"):
            raise ConfigError("config [kubernetes]: namespace_mode must be per-user or shared")
        return config


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


def _job_id_of(obj: dict[str, Any] | None) -> str | None:
    """The kbatch job id a Job or Pod is labelled with."""
    if obj is None:
        return None
    labels = obj["metadata"].get("labels") or {}
    job_id = labels.get(names.LABEL_JOB_ID)
    return str(job_id) if job_id else None


class KubernetesBackend(Backend):
    name = "kubernetes"

    def __init__(self, config: KubernetesConfig, client: AsyncClient | None = None) -> None:
        self.config = config
        self._client = client
        self._jobs: WatchCache | None = None
        self._pods: WatchCache | None = None
        self._pods_by_job: dict[str, dict[str, dict[str, Any]]] = {}
        self._job_keys: dict[str, tuple[str, str]] = {}  # job id -> (namespace, name)
        self._models: dict[str, Job] = {}
        self._finishing: set[str] = set()
        self._namespaces: set[str] = set()

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> KubernetesBackend:
        return cls(KubernetesConfig.from_dict(data))

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise RuntimeError("the kubernetes backend has not been started")
        return self._client

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
        scope = ALL_NS if self.config.namespace_mode == "per-user" else self.config.namespace
        selector: dict[str, Any] = {names.LABEL_MANAGED: names.MANAGED_BY}
        self._jobs = WatchCache(
            self.client, K8sJob, labels=selector, namespace=scope, on_change=self._job_changed
        )
        self._pods = WatchCache(
            self.client, Pod, labels=selector, namespace=scope, on_change=self._pod_changed
        )
        self._jobs.start()
        self._pods.start()
        try:
            async with asyncio.timeout(self.config.cache_timeout):
                await self._pods.ready.wait()
                await self._jobs.ready.wait()
        except TimeoutError:
            raise ConfigError(
                f"could not list Jobs and Pods within {self.config.cache_timeout:.0f} s; "
                "check the API server address and the server's RBAC"
            ) from None
        log.info("kubernetes backend: %d jobs known", len(self._job_keys))

    async def stop(self) -> None:
        for cache in (self._jobs, self._pods):
            if cache is not None:
                await cache.stop()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- the watch cache's indexes ---------------------------------------------------

    def _job_changed(
        self, key: tuple[str, str], old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        job_id = _job_id_of(new or old)
        if not job_id:
            return
        if new is None:
            self._job_keys.pop(job_id, None)
            self._models.pop(job_id, None)
            return
        self._job_keys[job_id] = key
        self._refresh(job_id)

    def _pod_changed(
        self, key: tuple[str, str], old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        job_id = _job_id_of(new or old)
        if not job_id:
            return
        pods = self._pods_by_job.setdefault(job_id, {})
        if new is None:
            pods.pop(key[1], None)
        else:
            pods[key[1]] = new
        if job_id in self._job_keys:
            self._refresh(job_id)

    def _refresh(self, job_id: str) -> None:
        assert self._jobs is not None
        key = self._job_keys[job_id]
        obj = self._jobs.objects.get(key)
        if obj is None:
            return
        model = job_from_objects(obj, list(self._pods_by_job.get(job_id, {}).values()))
        self._models[job_id] = model
        finalized = names.ANNOTATION_FINALIZED in (obj["metadata"].get("annotations") or {})
        if model.state.is_terminal and not finalized and job_id not in self._finishing:
            self._finishing.add(job_id)
            asyncio.get_running_loop().create_task(self._finish(model, key))

    async def _finish(self, job: Job, key: tuple[str, str]) -> None:
        """Run the end hook once per job, and record on the Job that it ran."""
        await self.notify_finished(job)
        patch = {
            "metadata": {"annotations": {names.ANNOTATION_FINALIZED: datetime.now(UTC).isoformat()}}
        }
        try:
            await self.client.patch(K8sJob, key[1], patch, namespace=key[0])
        except (ApiError, httpx.HTTPError) as exc:
            log.warning("job %s: cannot record that it was finalized: %s", job.id, exc)
            self._finishing.discard(job.id)

    # -- the interface -------------------------------------------------------------

    async def validate(self, user: str, spec: JobSpec) -> None:
        check_spec(spec)

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
                    "metadata": {
                        "name": namespace,
                        "labels": {names.LABEL_MANAGED: names.MANAGED_BY},
                    },
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

    async def _find_by_key(self, user: str, key: str) -> Job | None:
        namespace = self.namespace_of(user)
        selector: dict[str, Any] = {names.LABEL_IDEMPOTENCY: names.idempotency_label(user, key)}
        try:
            async for found in self.client.list(K8sJob, namespace=namespace, labels=selector):
                return job_from_objects(found.to_dict(), [])
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise api_error(exc, "look up the job") from exc
        return None

    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        await self.validate(user, spec)
        if idempotency_key is not None and (
            existing := await self._find_by_key(user, idempotency_key)
        ):
            return existing
        namespace = self.namespace_of(user)
        await self._ensure_namespace(namespace)
        job_id = names.new_job_id()
        name = spec.name or "job"
        workdir = spec.workdir or "/"
        output = resolve_output(spec.output, workdir=workdir, job_id=job_id, name=name, user=user)
        error = (
            resolve_output(spec.error, workdir=workdir, job_id=job_id, name=name, user=user)
            if spec.error
            else None
        )
        notebook = await self._notebook(user, namespace)
        preview = Job(
            id=job_id,
            user=user,
            name=name,
            state=JobState.PENDING,
            submitted=datetime.now(UTC),
            time_limit=spec.time_limit,
            backend=self.name,
        )
        extra_env = await self.hooks.environment(preview)
        manifests = build_manifests(
            spec,
            JobContext(
                job_id=job_id,
                user=user,
                namespace=namespace,
                default_image=self.config.image,
                output=output,
                error=error,
                ttl_seconds=self.config.ttl_seconds,
                notebook=notebook,
                template=self.config.job_template,
                extra_environment=extra_env,
                idempotency_key=idempotency_key,
            ),
        )
        return await self._create(manifests.job, manifests.config_map, manifests.secret)

    async def _create(
        self, job: dict[str, Any], config_map: dict[str, Any], secret: dict[str, Any]
    ) -> Job:
        """Job (suspended), then its ConfigMap and Secret owned by it (together), then let it run.

        If any step fails, everything made so far is deleted: a failed
        submission leaves nothing behind.
        """
        namespace = job["metadata"]["namespace"]
        name = job["metadata"]["name"]
        created_job: dict[str, Any] | None = None
        try:
            created = await self.client.create(from_dict(job))
            created_job = created.to_dict()  # type: ignore[no-untyped-call]
            owner = [owner_reference(created_job)]
            config_map["metadata"]["ownerReferences"] = owner
            secret["metadata"]["ownerReferences"] = owner
            # Independent of each other: one round trip for both.
            await asyncio.gather(
                self.client.create(from_dict(config_map)), self.client.create(from_dict(secret))
            )
            released = await self.client.patch(
                K8sJob, name, {"spec": {"suspend": False}}, namespace=namespace
            )
            return job_from_objects(released.to_dict(), [])
        except (ApiError, httpx.HTTPError) as exc:
            if created_job is not None:
                await self._delete_quietly(namespace, name)
            raise api_error(exc, "create the job") from exc

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
                    namespace=ALL_NS
                    if self.config.namespace_mode == "per-user"
                    else self.config.namespace,
                    labels={names.LABEL_JOB_ID: job_id, names.LABEL_MANAGED: names.MANAGED_BY},
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
        self, *, user: str | None, states: Collection[JobState] | None = None
    ) -> list[Job]:
        jobs = [
            job
            for job in self._models.values()
            if (user is None or job.user == user) and (states is None or job.state in states)
        ]
        jobs.sort(key=lambda j: (j.submitted, j.id))
        return jobs

    async def cancel(self, job_id: str) -> Job:
        """Mark the Job cancelled and end it through its deadline.

        Lowering ``activeDeadlineSeconds`` makes the Job controller stop the pods
        (SIGTERM, then SIGKILL after the pod's grace period) and mark the Job
        failed, so it stays visible as CANCELLED until its TTL.
        """
        namespace, name = await self._lookup(job_id)
        patch = {
            "metadata": {
                "annotations": {names.ANNOTATION_CANCELLED: datetime.now(UTC).isoformat()}
            },
            "spec": {"activeDeadlineSeconds": 1, "suspend": False},
        }
        try:
            await self.client.patch(K8sJob, name, patch, namespace=namespace)
        except (ApiError, httpx.HTTPError) as exc:
            raise api_error(exc, "cancel the job") from exc
        return await self.get(job_id)

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
