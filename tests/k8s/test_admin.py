"""What a cluster admin and a hub user meet on a real cluster (issue 11), on the real
control plane: outages of the API server, missing RBAC, a deleted namespace, the log.

Each test here failed on the backend before the change that made it pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.backend import KubernetesBackend, KubernetesConfig
from kbatch.errors import ApiError as KbatchApiError
from kbatch.errors import ConfigError, ServiceUnavailable, SpecError
from kbatch.models import API_PREFIX, Identity, JobState
from kbatch.server.app import create_app
from kbatch.server.auth.base import Authenticator, Credentials
from kbatch.server.policy import Policy
from tests.k8s.conftest import SHARED_NS, Installed, _install
from tests.k8s.outcomes import outcome_args
from tests.k8s.test_backend import final, spec, started, until
from tests.k8s.test_core import proxied
from tests.support.k8s_cluster import K8sCluster

pytestmark = [pytest.mark.kubernetes, pytest.mark.anyio]

RUNNING = outcome_args("running")[0]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- 5. API server outages ------------------------------------------------------------


async def test_submit_during_an_outage_is_a_503_naming_the_api_server(
    shared: Installed, tmp_path: Path
) -> None:
    async with (
        proxied(shared, tmp_path) as (proxy, through),
        started(through, instance="outage") as backend,
    ):
        await proxy.cut()
        for key in (None, "outage-key"):  # both the plain and the idempotent path
            with pytest.raises(ServiceUnavailable) as info:
                await backend.submit("oscar", spec(), idempotency_key=key)
            assert info.value.status == 503
            assert "Kubernetes API server" in str(info.value)


async def test_logs_during_an_outage_fail_before_anything_is_sent(
    shared: Installed, tmp_path: Path
) -> None:
    async with (
        proxied(shared, tmp_path) as (proxy, through),
        started(through, instance="outage-logs") as backend,
    ):
        job = await backend.submit("oscar", spec(), idempotency_key=None)
        await final(backend, job.id)
        await proxy.cut()
        for follow in (False, True):
            chunks = backend.logs(job.id, follow=follow)
            # the first step (what the server awaits before it answers 200) fails
            with pytest.raises(ServiceUnavailable, match="Kubernetes API server"):
                await asyncio.wait_for(anext(chunks), 30)


async def test_list_says_how_stale_it_may_be(shared: Installed, tmp_path: Path) -> None:
    async with (
        proxied(shared, tmp_path) as (proxy, through),
        started(through, instance="outage-list") as backend,
    ):
        job = await backend.submit("oscar", spec(args=[RUNNING]), idempotency_key=None)
        assert (await backend.list(user="oscar")).stale_seconds is None
        await proxy.cut()

        async def stale() -> float | None:
            return (await backend.list(user="oscar")).stale_seconds

        seconds = await until(stale, limit=30, what="the list to say it is stale")
        assert seconds > 0
        assert [j.id for j in (await backend.list(user="oscar")).jobs] == [job.id]  # from cache
        await proxy.start()
        await backend.cancel(job.id, by="oscar")


# -- 6. missing RBAC ------------------------------------------------------------------------


async def test_missing_rbac_fails_at_once_naming_the_permission(
    cluster: K8sCluster, shared: Installed, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.kubectl("create", "namespace", "kbatch-norbac", check=False)
    backend = KubernetesBackend(
        KubernetesConfig(
            kubeconfig=str(shared.kubeconfig),
            namespace_mode="shared",
            namespace="kbatch-norbac",
            cache_timeout=30,
        )
    )
    begun = time.monotonic()
    with pytest.raises(ConfigError) as info:
        await backend.start()
    took = time.monotonic() - begun
    await backend.stop()
    assert took < 5, took  # not after cache_timeout
    message = str(info.value)
    assert "\n" not in message
    assert "cannot list" in message and "in namespace kbatch-norbac: forbidden" in message
    assert "jobs.batch" in message or "pods" in message
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) <= 4  # no storm of attempts logged


# -- 7. a namespace an admin deleted ------------------------------------------------------


async def test_deleted_namespace_is_recreated_on_the_next_submit(
    cluster: K8sCluster, per_user: Installed
) -> None:
    async with started(per_user) as backend:
        first = await backend.submit("nina", spec(), idempotency_key=None)
        await final(backend, first.id)
        namespace = backend.namespace_of("nina")
        cluster.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=60s")
        job = await backend.submit("nina", spec(), idempotency_key=None)
        assert (await final(backend, job.id)).state is JobState.COMPLETED
        assert cluster.kubectl_json("get", "namespace", namespace)["metadata"]["name"] == namespace


# -- 8. one log line per API request ---------------------------------------------------------


async def test_api_requests_are_not_logged_one_by_one(
    shared: Installed, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("httpx2").setLevel(logging.NOTSET)  # as a fresh process has it
    caplog.set_level(logging.INFO)
    async with started(shared, instance="quiet") as backend:
        job = await backend.submit("quinn", spec(), idempotency_key=None)
        await final(backend, job.id)
    lines = [r for r in caplog.records if r.name.startswith("httpx")]
    assert lines == [], [r.getMessage() for r in lines[:3]]


async def test_logs_error_is_an_http_error_status_not_a_dropped_200(
    shared: Installed, tmp_path: Path
) -> None:
    async with (
        proxied(shared, tmp_path) as (proxy, through),
        started(through, instance="outage-http") as backend,
    ):
        job = await backend.submit("oscar", spec(), idempotency_key=None)
        await final(backend, job.id)
        await proxy.cut()
        app = create_app(backend, OneUser("oscar"), Policy())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kbatch") as http:
            for follow in ("0", "1"):
                response = await http.get(
                    f"{API_PREFIX}/jobs/{job.id}/logs", params={"follow": follow}
                )
                assert response.status_code == 503, response.text
                assert "Kubernetes API server" in response.json()["error"]["message"]


class OneUser(Authenticator):
    def __init__(self, name: str) -> None:
        self.name = name

    async def authenticate(self, credentials: Credentials) -> Identity:
        return Identity(name=self.name)


# -- 4. the output of jobs that were cancelled or timed out ---------------------------------


async def test_output_of_timed_out_and_cancelled_jobs_is_kept(
    shared: Installed, pod_log: Callable[[str], None]
) -> None:
    pod_log("working...\nstill working\n")
    async with started(shared, instance="kept") as backend:
        timed = await backend.submit(
            "kim", spec(args=[RUNNING], time_limit=3), idempotency_key=None
        )
        cancelled = await backend.submit("kim", spec(args=[RUNNING]), idempotency_key=None)
        await until(lambda: _running(backend, cancelled.id), what="running")
        await backend.cancel(cancelled.id, by="kim")
        assert (await final(backend, timed.id)).state is JobState.TIMEOUT
        assert (await final(backend, cancelled.id)).state is JobState.CANCELLED
        for job in (timed, cancelled):

            async def pods_gone(job_id: str = job.id) -> bool:
                return not backend._pods_by_job.get(job_id)

            await until(pods_gone, what="the pod to be deleted")
            text = b"".join([c async for c in backend.logs(job.id, follow=False)])
            assert text == b"working...\nstill working\n", job.id


async def test_output_that_is_gone_is_an_error_not_nothing(
    cluster: K8sCluster, shared: Installed
) -> None:
    async with started(shared, instance="gone") as backend:
        job = await backend.submit("kim", spec(), idempotency_key=None)
        await final(backend, job.id)
        cluster.kubectl(
            "delete", "pods", "-n", SHARED_NS, "-l", f"{names.LABEL_JOB_ID}={job.id}", "--wait"
        )

        async def pods_gone() -> bool:
            return not backend._pods_by_job.get(job.id)

        await until(pods_gone, what="the pod to be deleted")
        with pytest.raises(KbatchApiError) as info:
            _ = [c async for c in backend.logs(job.id, follow=False)]
        assert info.value.status == 410 and "is gone" in str(info.value)


async def _running(backend: KubernetesBackend, job_id: str) -> bool:
    return (await backend.get(job_id)).state is JobState.RUNNING


# -- 2. security context: restricted by default, the notebook's user, no root if forbidden ---


@contextlib.contextmanager
def pod_security_restricted(cluster: K8sCluster) -> Iterator[None]:
    label = "pod-security.kubernetes.io/enforce"
    cluster.kubectl("label", "namespace", SHARED_NS, f"{label}=restricted", "--overwrite")
    try:
        yield
    finally:
        cluster.kubectl("label", "namespace", SHARED_NS, f"{label}-")


async def test_default_job_is_accepted_by_pod_security_restricted(
    cluster: K8sCluster, shared: Installed
) -> None:
    with pod_security_restricted(cluster):
        async with started(shared, instance="restricted", notebook_namespace=None) as backend:
            job = await backend.submit("rita", spec(), idempotency_key=None)
            assert (await final(backend, job.id, limit=30)).state is JobState.COMPLETED


async def test_forbidden_root_is_refused_before_anything_is_created(
    cluster: K8sCluster, shared: Installed
) -> None:
    root = {"spec": {"template": {"spec": {"securityContext": {"runAsUser": 0}}}}}
    async with started(shared, instance="noroot", forbid_root=True, job_template=root) as backend:
        with pytest.raises(SpecError, match="may not run as root"):
            await backend.submit("rita", spec(), idempotency_key=None)
    assert (
        cluster.kubectl_json(
            "get", "jobs", "-n", SHARED_NS, "-l", f"{names.LABEL_INSTANCE}=noroot"
        )["items"]
        == []
    )


# -- 3. a job that can't get a pod says why -------------------------------------------------


async def test_job_refused_a_pod_says_why(cluster: K8sCluster, shared: Installed) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "kbatch-test-cpu", "namespace": SHARED_NS},
        "spec": {"hard": {"requests.cpu": "1"}},
    }
    cluster.apply(json.dumps(quota))
    try:
        async with started(shared, instance="quota") as backend:
            job = await backend.submit("rita", spec(cpus=2), idempotency_key=None)

            async def explained() -> str | None:
                current = await backend.get(job.id)
                reason = current.reason or ""
                return reason if reason.startswith("FailedCreate: ") else None

            reason = await until(explained, limit=30, what="the FailedCreate reason")
            assert "exceeded quota" in reason and "requests.cpu" in reason, reason
            assert len(reason) <= 220
            await backend.cancel(job.id, by="rita")
            assert (await final(backend, job.id)).state is JobState.CANCELLED
    finally:
        cluster.kubectl("delete", "resourcequota", "kbatch-test-cpu", "-n", SHARED_NS)


# -- 9. per-user namespaces: Pod Security label and quota (chart and config options) -------


async def test_per_user_namespaces_get_the_admins_labels_and_quota(
    cluster: K8sCluster, helm: Path
) -> None:
    installed = _install(
        cluster,
        helm,
        "kbatch-pq",
        "--set",
        "kubernetes.namespaceMode=per-user",
        "--set-json",
        'kubernetes.namespaceQuota={"requests.cpu":"4"}',
    )
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    async with started(
        installed,
        instance="kbatch-pq",
        namespace_mode="per-user",
        namespace_template="kbatch-pq-{username}",
        namespace_labels=labels,
        namespace_quota={"requests.cpu": "4"},
        notebook_namespace=None,
    ) as backend:
        job = await backend.submit("paula", spec(), idempotency_key=None)
        namespace = backend.namespace_of("paula")
        made = cluster.kubectl_json("get", "namespace", namespace)
        assert made["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        quota = cluster.kubectl_json("get", "resourcequota", "kbatch", "-n", namespace)
        assert quota["spec"]["hard"] == {"requests.cpu": "4"}
        # the default job passes Pod Security restricted and fits the quota
        assert (await final(backend, job.id, limit=30)).state is JobState.COMPLETED


# -- 10. submissions at volume: fewer requests per job ------------------------------------


async def test_a_job_with_nothing_to_do_before_it_starts_is_started_by_its_submitter(
    shared: Installed,
) -> None:
    async with started(shared, instance="fewer") as backend:
        client = backend.client
        calls: list[str] = []
        real_patch, real_create = client.patch, client.create

        bodies: list[str] = []

        async def patch(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"patch {args[0].__name__}")
            bodies.append(json.dumps(args[2]))
            return await real_patch(*args, **kwargs)

        async def create(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"create {args[0].kind}")
            return await real_create(*args, **kwargs)

        real_list = client.list

        def listing(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"list {args[0].__name__}")
            return real_list(*args, **kwargs)

        client.patch, client.create = patch, create  # type: ignore[method-assign]
        client.list = listing  # type: ignore[method-assign]
        job = await backend.submit("fern", spec(), idempotency_key=None)
        assert (await final(backend, job.id)).state is JobState.COMPLETED

        async def finalized() -> bool:
            obj = backend._object(job.id) or {}
            return names.ANNOTATION_FINALIZED in (obj["metadata"].get("annotations") or {})

        await until(finalized, what="the end to be recorded")
        # the Job, its ConfigMap and Secret; ready-and-started in one patch (no claim,
        # no separate release); the end (claimed with a precondition: a status update
        # by the Job controller in between makes it try once more); no look at events
        made = sorted(c for c in calls if c.startswith("create"))
        assert made == ["create ConfigMap", "create Job", "create Secret"], calls
        assert not [c for c in calls if c.startswith("list") and c != "list Pod"], calls
        starts = [b for b in bodies if '"/spec/suspend"' in b or '"suspend": false' in b]
        assert len(starts) == 1 and '"op": "test"' in starts[0], bodies
        assert not [b for b in bodies if names.ANNOTATION_RELEASING in b], bodies
        ends = [b for b in bodies if names.ANNOTATION_FINALIZED in b]
        assert len(bodies) == 1 + len(ends) and 1 <= len(ends) <= 2, bodies
        # concurrent submissions share one listing of the notebook pods
        calls.clear()
        many = await asyncio.gather(
            *(backend.submit("fern", spec(), idempotency_key=None) for _ in range(10))
        )
        assert calls.count("list Pod") <= 2, calls
        for one in many:
            await final(backend, one.id)
        held = await backend.submit("fern", spec(hold=True), idempotency_key=None)
        assert (await backend.get(held.id)).reason == "JobHeldUser"  # held: not started
        # a hold (or cancel) that came between create and start: the start is refused
        obj = backend._object(held.id)
        assert obj is not None and await backend._ready_and_start(obj) is None
        assert (await backend.get(held.id)).reason == "JobHeldUser"
        await backend.cancel(held.id, by="fern")
