"""The Kubernetes backend against a real API server, controller manager, scheduler and kwok."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from kbatch.backends.base import JobHooks
from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.backend import KubernetesBackend, KubernetesConfig
from kbatch.errors import InvalidRequest, NotFound, PermissionDenied, SpecError
from kbatch.models import Job, JobSpec, JobState
from tests.k8s.conftest import HUB_NS, SHARED_NS, Installed
from tests.support.k8s_cluster import K8sCluster

pytestmark = [pytest.mark.kubernetes, pytest.mark.anyio]

SCRIPT = "#!/bin/sh\necho hello from kbatch\n"
OUTCOME = "kwok.x-k8s.io/test-outcome"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def outcome(value: str, **annotations: str) -> dict[str, Any]:
    """A job template that tells kwok how the job's pod ends (see tests/support/kwok_stages.yaml)."""
    meta: dict[str, Any] = {"labels": {OUTCOME: value}}
    if annotations:
        meta["annotations"] = {
            f"kwok.x-k8s.io/test-{k.replace('_', '-')}": v for k, v in annotations.items()
        }
    return {"spec": {"template": {"metadata": meta}}}


@asynccontextmanager
async def started(installed: Installed, **config: Any) -> AsyncIterator[KubernetesBackend]:
    mode = "per-user" if installed.release == "kbatch-pu" else "shared"
    defaults: dict[str, Any] = {
        "kubeconfig": str(installed.kubeconfig),
        "namespace_mode": mode,
        "namespace": SHARED_NS,
        "image": "busybox:stable",
        "ttl_seconds": 3600,
    }
    if mode == "shared":
        defaults["notebook_namespace"] = HUB_NS
    defaults.update(config)
    backend = KubernetesBackend(KubernetesConfig(**defaults))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


async def until(check: Callable[[], Any], limit: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + limit
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: last {result!r}")
        await asyncio.sleep(0.1)


async def final(backend: KubernetesBackend, job_id: str, limit: float = 60.0) -> Job:
    async def done() -> Job | None:
        job = await backend.get(job_id)
        return job if job.state.is_terminal else None

    return await until(done, limit, f"job {job_id} to end")


def spec(**kw: Any) -> JobSpec:
    return JobSpec(
        script=kw.pop("script", SCRIPT), workdir="/home/jovyan", name=kw.pop("name", "test"), **kw
    )


async def test_submit_runs_a_job_with_owned_objects(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared) as backend:
        job = await backend.submit(
            "alice", spec(cpus=1, memory=256 * 1024**2, args=["x"]), idempotency_key=None
        )
        assert job.state is JobState.PENDING and job.user == "alice" and job.backend == "kubernetes"
        name = names.job_object_name(job.id)
        k8s_job = cluster.kubectl_json("get", "job", name, "-n", SHARED_NS)
        assert k8s_job["metadata"]["labels"][names.LABEL_JOB_ID] == job.id
        assert k8s_job["metadata"]["labels"][names.LABEL_INSTANCE] == "kbatch"
        for kind in ("configmap", "secret"):
            owned = cluster.kubectl_json("get", kind, name, "-n", SHARED_NS)
            assert owned["metadata"]["ownerReferences"][0]["uid"] == k8s_job["metadata"]["uid"]
        done = await final(backend, job.id)
        assert (done.state, done.exit_code) == (JobState.COMPLETED, 0)
        assert done.started is not None and done.finished is not None
        released = cluster.kubectl_json("get", "job", name, "-n", SHARED_NS)
        assert released["spec"]["suspend"] is False  # the reconciler started it
        listed = (await backend.list(user="alice", states={JobState.COMPLETED})).jobs
        assert job.id in [j.id for j in listed]
        assert all(j.user == "alice" for j in listed)
        assert job.id not in [j.id for j in (await backend.list(user="bob")).jobs]


async def test_out_of_memory(shared: Installed) -> None:
    async with started(shared, job_template=outcome("oom")) as backend:
        job = await backend.submit("alice", spec(memory=64 * 1024**2), idempotency_key=None)
        done = await final(backend, job.id)
        assert (done.state, done.exit_code) == (JobState.OUT_OF_MEMORY, 137)


async def test_failure_with_exit_code(shared: Installed) -> None:
    async with started(shared, job_template=outcome("fail", exit_code="3")) as backend:
        done = await final(
            backend, (await backend.submit("alice", spec(), idempotency_key=None)).id
        )
        assert (done.state, done.exit_code, done.reason) == (JobState.FAILED, 3, "NonZeroExitCode")


async def test_time_limit_gives_timeout(shared: Installed) -> None:
    async with started(shared, job_template=outcome("running")) as backend:
        job = await backend.submit("alice", spec(time_limit=2), idempotency_key=None)
        await until(lambda: _state_is(backend, job.id, JobState.RUNNING), what="running")
        done = await final(backend, job.id)
        assert (done.state, done.reason) == (JobState.TIMEOUT, "TimeLimit")


async def _state_is(backend: KubernetesBackend, job_id: str, state: JobState) -> bool:
    return (await backend.get(job_id)).state is state


async def test_cancel_keeps_the_job_visible(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared, job_template=outcome("running")) as backend:
        job = await backend.submit("alice", spec(), idempotency_key=None)
        await until(lambda: _state_is(backend, job.id, JobState.RUNNING), what="running")
        await backend.cancel(job.id, by="alice")
        done = await final(backend, job.id)
        assert (done.state, done.reason) == (JobState.CANCELLED, "CancelledByUser")
        assert cluster.kubectl_json("get", "job", names.job_object_name(job.id), "-n", SHARED_NS)
        assert job.id in [
            j.id for j in (await backend.list(user="alice", states={JobState.CANCELLED})).jobs
        ]


async def test_unschedulable_job_is_pending_with_the_reason(shared: Installed) -> None:
    async with started(shared) as backend:
        job = await backend.submit("alice", spec(cpus=4000), idempotency_key=None)

        async def unschedulable() -> bool:
            current = await backend.get(job.id)
            # the scheduler's message, not just its reason (issue 11, item 3)
            reason = current.reason or ""
            return (
                current.state is JobState.PENDING
                and reason.startswith("Unschedulable: 0/")
                and "Insufficient cpu" in reason
            )

        await until(unschedulable, what="Unschedulable")
        await backend.cancel(job.id, by="alice")
        assert (await final(backend, job.id)).state is JobState.CANCELLED


async def test_logs(cluster: K8sCluster, shared: Installed, pod_log: Callable[[str], None]) -> None:
    pod_log("line one\nline two\n")
    async with started(shared) as backend:
        job = await backend.submit("alice", spec(), idempotency_key=None)
        await final(backend, job.id)
        text = b"".join([chunk async for chunk in backend.logs(job.id, follow=False)])
        assert text == b"line one\nline two\n"
        followed = b"".join([chunk async for chunk in backend.logs(job.id, follow=True)])
        assert followed == text


async def test_state_survives_a_restart(shared: Installed) -> None:
    async with started(shared) as backend:
        job = await backend.submit("carol", spec(name="keep"), idempotency_key=None)
        await final(backend, job.id)
    async with started(shared) as fresh:  # no database: the objects are the record
        again = await fresh.get(job.id)
        assert (again.name, again.user, again.state) == ("keep", "carol", JobState.COMPLETED)
        assert job.id in [j.id for j in (await fresh.list(user="carol")).jobs]


async def test_idempotent_submission(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared) as backend:
        first = await backend.submit("dave", spec(), idempotency_key="k-1")
        again = await backend.submit("dave", spec(), idempotency_key="k-1")
        other_user = await backend.submit("erin", spec(), idempotency_key="k-1")
        assert first.id == again.id != other_user.id


async def test_per_user_namespaces(cluster: K8sCluster, per_user: Installed) -> None:
    async with started(per_user) as backend:
        users = ["Frank@Example.org", "frank-example-org"]
        jobs = [await backend.submit(u, spec(), idempotency_key=None) for u in users]
        namespaces = {backend.namespace_of(u) for u in users}
        assert len(namespaces) == 2  # similar names never share a namespace
        for ns, job in zip([backend.namespace_of(u) for u in users], jobs, strict=True):
            got = cluster.kubectl_json("get", "job", names.job_object_name(job.id), "-n", ns)
            assert got["metadata"]["annotations"][names.ANNOTATION_USER] in users
        for job in jobs:
            assert (await final(backend, job.id, limit=90)).state is JobState.COMPLETED
        assert [j.user for j in (await backend.list(user=users[0])).jobs] == [users[0]]


async def test_failed_submission_leaves_nothing(cluster: K8sCluster, shared: Installed) -> None:
    ns = "kbatch-quota"
    cluster.kubectl("create", "namespace", ns)
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "no-secrets", "namespace": ns},
                "spec": {"hard": {"count/secrets": "0"}},
            }
        )
    )
    # The chart's Role covers SHARED_NS only; grant the same Role in this namespace.
    role = next(d for d in shared.documents if d["kind"] == "Role")
    binding = next(d for d in shared.documents if d["kind"] == "RoleBinding")
    import copy

    for doc in (copy.deepcopy(role), copy.deepcopy(binding)):
        doc["metadata"]["namespace"] = ns
        cluster.apply(json.dumps(doc))
    async with started(shared, namespace=ns) as backend:
        with pytest.raises(PermissionDenied, match="exceeded quota") as info:
            await backend.submit("alice", spec(), idempotency_key=None)
        assert info.value.status == 403
    for kind in ("jobs", "configmaps", "secrets"):
        left = cluster.kubectl_json("get", kind, "-n", ns, "-l", f"{names.LABEL_MANAGED}=kbatch")
        assert left["items"] == [], kind


async def test_rbac_forbidden_is_a_clear_403(cluster: K8sCluster, shared: Installed) -> None:
    cluster.kubectl("create", "namespace", "kbatch-elsewhere", check=False)
    backend = KubernetesBackend(
        KubernetesConfig(
            kubeconfig=str(shared.kubeconfig),
            namespace_mode="shared",
            namespace="kbatch-elsewhere",
            cache_timeout=3,
        )
    )
    from kbatch.errors import ConfigError

    with pytest.raises(ConfigError, match="RBAC"):
        await backend.start()
    await backend.stop()


async def test_kubernetes_rejection_is_a_clear_422(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared) as backend:
        before = cluster.kubectl_json("get", "jobs", "-n", SHARED_NS)["items"]
        # arguments are recorded in the Job's annotations, which Kubernetes caps at 256 KiB
        with pytest.raises(InvalidRequest, match=r"Kubernetes rejected the job.*Too long") as info:
            await backend.submit("alice", spec(args=["x" * 300_000]), idempotency_key=None)
        assert info.value.status == 422
        assert cluster.kubectl_json("get", "jobs", "-n", SHARED_NS)["items"] == before


async def test_bad_input_refused_before_anything_is_created(shared: Installed) -> None:
    async with started(shared) as backend:
        before = len((await backend.list(user=None)).jobs)
        with pytest.raises(SpecError, match="interpreter line"):
            await backend.submit("alice", spec(script="echo no shebang\n"), idempotency_key=None)
        with pytest.raises(SpecError, match="%q is not known"):
            await backend.submit("alice", spec(output="%q.out"), idempotency_key=None)
        assert len((await backend.list(user=None)).jobs) == before
        with pytest.raises(NotFound):
            await backend.get("nosuchjob")


async def test_notebook_is_the_default_environment(cluster: K8sCluster, shared: Installed) -> None:
    node = cluster.kubectl_json("get", "nodes")["items"][0]["metadata"]["name"]
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "jupyter-grace",
                    "namespace": HUB_NS,
                    "labels": {
                        "component": "singleuser-server",
                        "hub.jupyter.org/username": "grace",
                    },
                    "annotations": {"hub.jupyter.org/username": "grace"},
                },
                "spec": {
                    "nodeName": node,
                    "containers": [
                        {
                            "name": "notebook",
                            "image": "quay.io/jupyter/scipy-notebook:2026",
                            "env": [
                                {"name": "MEM_LIMIT", "value": "1073741824"},
                                {"name": "JUPYTERHUB_API_TOKEN", "value": "never-copied"},
                            ],
                            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
                        }
                    ],
                    "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
                    "tolerations": [
                        {
                            "key": "hub.jupyter.org/dedicated",
                            "operator": "Equal",
                            "value": "user",
                            "effect": "NoSchedule",
                        }
                    ],
                },
            }
        )
    )
    cluster.kubectl(
        "wait",
        "--for=jsonpath={.status.phase}=Running",
        "pod/jupyter-grace",
        "-n",
        HUB_NS,
        "--timeout=60s",
    )
    async with started(shared) as backend:
        job = await backend.submit("grace", spec(), idempotency_key=None)
        name = names.job_object_name(job.id)
        pod = cluster.kubectl_json("get", "job", name, "-n", SHARED_NS)["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == "quay.io/jupyter/scipy-notebook:2026"
        assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
        assert pod["tolerations"][0]["key"] == "hub.jupyter.org/dedicated"
        secret = cluster.kubectl_json("get", "secret", name, "-n", SHARED_NS)
        import base64

        env = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert env["MEM_LIMIT"] == "1073741824" and "JUPYTERHUB_API_TOKEN" not in env
        overridden = await backend.submit("grace", spec(image="python:3.12"), idempotency_key=None)
        pod = cluster.kubectl_json(
            "get", "job", names.job_object_name(overridden.id), "-n", SHARED_NS
        )
        assert pod["spec"]["template"]["spec"]["containers"][0]["image"] == "python:3.12"


class RecordingHooks(JobHooks):
    def __init__(self) -> None:
        self.ended: list[str] = []

    async def environment(self, job: Job) -> dict[str, str]:
        return {"JOB_SECRET": f"for-{job.id}"}

    async def finished(self, job: Job) -> None:
        self.ended.append(job.id)


async def test_hooks_run_around_the_job(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared) as backend:
        hooks = RecordingHooks()
        backend.hooks = hooks
        job = await backend.submit("alice", spec(), idempotency_key=None)
        await final(backend, job.id)
        secret = cluster.kubectl_json(
            "get", "secret", names.job_object_name(job.id), "-n", SHARED_NS
        )
        import base64

        assert base64.b64decode(secret["data"]["JOB_SECRET"]).decode() == f"for-{job.id}"
        await until(lambda: _contains(hooks.ended, job.id), what="the end hook")


async def _contains(items: list[str], item: str) -> bool:
    return item in items


async def test_pod_lost_to_disruption_is_retried_not_failed(
    cluster: K8sCluster, shared: Installed
) -> None:
    """A pod that fails with DisruptionTarget (node loss, preemption) is replaced; the job goes on."""
    async with started(shared, job_template=outcome("running")) as backend:
        job = await backend.submit("alice", spec(), idempotency_key=None)
        await until(lambda: _state_is(backend, job.id, JobState.RUNNING), what="running")
        selector = f"{names.LABEL_JOB_ID}={job.id}"
        first = cluster.kubectl_json("get", "pods", "-n", SHARED_NS, "-l", selector)["items"][0]
        name = first["metadata"]["name"]
        # What the node lifecycle controller writes when it evicts a pod from a lost node.
        status = {
            "status": {
                "phase": "Failed",
                "reason": "NodeLost",
                "conditions": [
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "DeletionByTaintManager",
                    }
                ],
            }
        }
        cluster.kubectl(
            "patch",
            "pod",
            name,
            "-n",
            SHARED_NS,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(status),
        )

        def replaced() -> bool:
            pods = cluster.kubectl_json("get", "pods", "-n", SHARED_NS, "-l", selector)["items"]
            return any(
                p["metadata"]["name"] != name and p["status"].get("phase") == "Running"
                for p in pods
            )

        async def replaced_async() -> bool:
            return replaced()

        await until(replaced_async, what="a replacement pod")
        await until(lambda: _state_is(backend, job.id, JobState.RUNNING), what="running again")
        k8s_job = cluster.kubectl_json("get", "job", names.job_object_name(job.id), "-n", SHARED_NS)
        assert k8s_job["status"].get("failed", 0) in (
            0,
            1,
        )  # counted as failed pod, not as job failure
        assert not any(c["type"] == "Failed" for c in k8s_job["status"].get("conditions") or [])
        await backend.cancel(job.id, by="alice")
        assert (await final(backend, job.id)).state is JobState.CANCELLED


async def test_forbidden_submission_is_a_clear_403(cluster: K8sCluster, shared: Installed) -> None:
    """RBAC that lets the server watch but not create: a 403 naming RBAC, and nothing made."""
    ns = "kbatch-readonly"
    cluster.kubectl("create", "namespace", ns)
    reader = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "kbatch-reader", "namespace": ns},
        "rules": [
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "kbatch-reader", "namespace": ns},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "kbatch-reader",
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": shared.release, "namespace": "kbatch-system"}
        ],
    }
    cluster.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": [reader, binding]}))
    async with started(shared, namespace=ns) as backend:
        with pytest.raises(
            PermissionDenied, match=r"does not allow the kbatch server.*RBAC"
        ) as info:
            await backend.submit("alice", spec(), idempotency_key=None)
        assert (info.value.status, info.value.code) == (403, "forbidden")
    assert cluster.kubectl_json("get", "jobs", "-n", ns)["items"] == []
