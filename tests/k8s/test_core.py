"""The Kubernetes backend's core on a real control plane: idempotency, instances, the
watch cache's resilience and health, the reconciler (tokens made at start, holds,
cancels, the end hook once with several replicas) and the change events.

Each test here failed on the backend before the core was rebuilt (issue 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kbatch.backends.base import JobHooks
from kbatch.backends.kubernetes import names, status
from kbatch.backends.kubernetes.backend import KubernetesBackend
from kbatch.errors import Conflict, NotFound, PermissionDenied, ServiceUnavailable
from kbatch.models import Job, JobEvent, JobState
from tests.k8s.conftest import SHARED_NS, Installed
from tests.k8s.outcomes import outcome_args
from tests.k8s.test_backend import final, spec, started, until
from tests.support.k8s_cluster import K8sCluster

pytestmark = [pytest.mark.kubernetes, pytest.mark.anyio]

RUNNING = outcome_args("running")[0]  # kwok keeps the pod Running until it is deleted


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def jobs_labelled(cluster: K8sCluster, selector: str) -> list[dict[str, Any]]:
    return list(cluster.kubectl_json("get", "jobs", "-n", SHARED_NS, "-l", selector)["items"])


async def state_of(backend: KubernetesBackend, job_id: str) -> tuple[JobState, str | None]:
    job = await backend.get(job_id)
    return job.state, job.reason


# -- 1. idempotency: the API server refuses a second Job ----------------------------------


async def test_concurrent_retries_make_one_job(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared) as one, started(shared) as two:
        same = spec(name="retried")
        jobs = await asyncio.gather(
            one.submit("ivan", same, idempotency_key="retry-1"),
            one.submit("ivan", same, idempotency_key="retry-1"),
            two.submit("ivan", same, idempotency_key="retry-1"),  # another replica
            two.submit("ivan", same, idempotency_key="retry-1"),
        )
        assert len({j.id for j in jobs}) == 1
        label = names.idempotency_label("ivan", "retry-1")
        assert len(jobs_labelled(cluster, f"{names.LABEL_IDEMPOTENCY}={label}")) == 1
        with pytest.raises(Conflict) as info:
            await one.submit("ivan", spec(name="other"), idempotency_key="retry-1")
        assert (info.value.status, info.value.code) == (409, "idempotency_key_reused")
        assert (await final(one, jobs[0].id)).state is JobState.COMPLETED


# -- 2. instances: two deployments in one cluster ------------------------------------------


async def test_two_instances_do_not_see_each_other(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared, instance="blue") as blue, started(shared, instance="green") as green:
        b = await blue.submit("judy", spec(args=[RUNNING]), idempotency_key="k")
        g = await green.submit("judy", spec(args=[RUNNING]), idempotency_key="k")
        assert b.id != g.id  # the same user and key in two deployments: two jobs
        await until(lambda: _is(blue, b.id, JobState.RUNNING), what="blue running")
        await until(lambda: _is(green, g.id, JobState.RUNNING), what="green running")
        assert [j.id for j in (await blue.list(user="judy")).jobs] == [b.id]
        assert [j.id for j in (await green.list(user="judy")).jobs] == [g.id]
        with pytest.raises(NotFound):
            await blue.get(g.id)
        with pytest.raises(NotFound):
            await blue.cancel(g.id, by="judy")
        for kind in ("job", "configmap", "secret", "pod"):
            objs = cluster.kubectl_json(
                "get", kind, "-n", SHARED_NS, "-l", f"{names.LABEL_JOB_ID}={b.id}"
            )["items"]
            assert objs and all(
                o["metadata"]["labels"][names.LABEL_INSTANCE] == "blue" for o in objs
            ), kind
        await blue.cancel(b.id, by="judy")
        await green.cancel(g.id, by="judy")
        assert (await final(green, g.id)).state is JobState.CANCELLED


async def _is(backend: KubernetesBackend, job_id: str, state: JobState) -> bool:
    return (await backend.get(job_id)).state is state


# -- 3. the watch cache ------------------------------------------------------------------


async def test_one_bad_object_does_not_stop_the_cache(
    shared: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with started(shared, instance="badobj") as backend:
        bad = await backend.submit("kate", spec(), idempotency_key=None)
        good = await backend.submit("kate", spec(), idempotency_key=None)
        await final(backend, good.id)
    real = status.job_from_objects

    def broken(job: dict[str, Any], pods: list[dict[str, Any]], **kw: Any) -> Job:
        if job["metadata"]["labels"][names.LABEL_JOB_ID] == bad.id:
            raise ValueError("an object this version cannot read")
        return real(job, pods, **kw)

    monkeypatch.setattr("kbatch.backends.kubernetes.backend.job_from_objects", broken)
    async with started(shared, instance="badobj", cache_timeout=10) as fresh:
        listed = [j.id for j in (await fresh.list(user="kate")).jobs]
        assert good.id in listed and bad.id not in listed
        assert fresh.health().ok


class Proxy:
    """A TCP proxy to the API server that the test can cut and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers.difference_update({writer, up_writer})


@contextlib.asynccontextmanager
async def proxied(installed: Installed, tmp_path: Path) -> AsyncIterator[tuple[Proxy, Installed]]:
    config = yaml.safe_load(installed.kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    host, _, port = server.removeprefix("https://").rpartition(":")
    proxy = Proxy((host, int(port)))
    await proxy.start()
    config["clusters"][0]["cluster"]["server"] = f"https://{host}:{proxy.port}"
    path = tmp_path / "proxied.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    try:
        yield proxy, Installed(installed.release, path, installed.documents)
    finally:
        with contextlib.suppress(Exception):
            await proxy.cut()


async def test_health_says_when_the_cache_is_stale(
    shared: Installed, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        proxied(shared, tmp_path) as (proxy, through),
        started(through, instance="stale", stale_after=2.0) as backend,
    ):
        assert backend.health().ok and backend.health().stale_seconds is None
        caplog.clear()
        await proxy.cut()  # the API server is gone

        async def unhealthy() -> bool:
            return not backend.health().ok

        await until(unhealthy, limit=30, what="health to fail")
        health = backend.health()
        assert health.stale_seconds is not None and health.stale_seconds >= 2.0
        assert "Kubernetes API server" in health.detail
        await asyncio.sleep(3)  # keep failing: with backoff, and logged once per kind
        assert backend._jobs is not None and backend._jobs.failures >= 2
        warnings = [r for r in caplog.records if "watching Job failed" in r.getMessage()]
        assert 1 <= len(warnings) <= 3, [r.getMessage() for r in warnings]
        assert backend._jobs.failures < 30  # backoff, not hundreds of attempts a second
        await proxy.start()  # back (same port)

        async def healthy() -> bool:
            return backend.health().ok and backend.health().stale_seconds is None

        await until(healthy, limit=60, what="health to recover")


async def test_bookkeeping_of_deleted_jobs_is_dropped(
    cluster: K8sCluster, shared: Installed
) -> None:
    async with started(shared, instance="bookkeeping") as backend:
        jobs = [await backend.submit("liam", spec(), idempotency_key=None) for _ in range(3)]
        for job in jobs:
            await final(backend, job.id)
        cluster.kubectl(
            "delete",
            "jobs",
            "-n",
            SHARED_NS,
            "-l",
            f"{names.LABEL_INSTANCE}=bookkeeping",
            "--cascade=foreground",
        )

        async def forgotten() -> bool:
            return not (
                backend._models.keys() | backend._job_keys.keys() | backend._pods_by_job.keys()
            )

        await until(forgotten, what="deleted jobs to be forgotten")
        assert not backend.events._last  # ended jobs are not remembered by the event broker


# -- 4. the reconciler: tokens made at start, holds, cancels, the end hook once -----------


class Hooks(JobHooks):
    def __init__(self, fail: list[Exception] | None = None) -> None:
        self.fail = list(fail or [])
        self.made: list[str] = []
        self.ended: list[str] = []

    async def environment(self, job: Job) -> dict[str, str]:
        if self.fail:
            raise self.fail.pop(0)
        self.made.append(job.id)
        return {"JOB_TOKEN": f"token-for-{job.id}"}

    async def finished(self, job: Job) -> None:
        self.ended.append(job.id)


async def test_token_is_made_when_the_job_starts_not_at_submit(
    cluster: K8sCluster, shared: Installed
) -> None:
    async with started(shared, instance="tokens") as backend:
        hooks = Hooks()
        backend.hooks = hooks
        job = await backend.submit("mia", spec(hold=True), idempotency_key=None)
        await asyncio.sleep(1)
        assert await state_of(backend, job.id) == (JobState.PENDING, "JobHeldUser")
        assert hooks.made == []  # held in the queue: no token yet, none to expire
        name = names.job_object_name(job.id)
        assert cluster.kubectl_json("get", "job", name, "-n", SHARED_NS)["spec"]["suspend"]
        released = await backend.release(job.id)
        assert released.reason != "JobHeldUser"
        done = await final(backend, job.id)
        assert done.state is JobState.COMPLETED and hooks.made == [job.id]
        await until(lambda: _equal(hooks.ended, [job.id]), what="the end hook")


async def _equal(a: list[str], b: list[str]) -> bool:
    return a == b


async def test_transient_hook_failure_retries(shared: Installed) -> None:
    async with started(shared, instance="transient") as backend:
        hooks = Hooks(fail=[ServiceUnavailable("the hub is down", status=503)] * 2)
        backend.hooks = hooks
        job = await backend.submit("noah", spec(), idempotency_key=None)

        async def setup_pending() -> bool:
            return await state_of(backend, job.id) == (JobState.PENDING, "JobSetupPending")

        await until(setup_pending, what="JobSetupPending")
        done = await final(backend, job.id)
        assert done.state is JobState.COMPLETED and hooks.made == [job.id]


async def test_permanent_hook_failure_fails_the_job_unstarted(
    cluster: K8sCluster, shared: Installed
) -> None:
    async with started(shared, instance="permanent") as backend:
        hooks = Hooks(fail=[PermissionDenied("the user may not have a token", status=403)])
        backend.hooks = hooks
        job = await backend.submit("olga", spec(), idempotency_key=None)
        done = await final(backend, job.id)
        assert done.state is JobState.FAILED
        assert done.reason == "JobSetupFailed: the user may not have a token"
        assert done.finished is not None and done.started is None
        await until(lambda: _equal(hooks.ended, [job.id]), what="the end hook")
        pods = cluster.kubectl_json(
            "get", "pods", "-n", SHARED_NS, "-l", f"{names.LABEL_JOB_ID}={job.id}"
        )["items"]
        assert not any(p["status"].get("phase") == "Running" for p in pods)


async def test_a_token_made_for_a_start_that_fails_is_revoked(
    cluster: K8sCluster, shared: Installed
) -> None:
    async with started(shared, instance="revoke") as backend:
        hooks = Hooks()
        backend.hooks = hooks
        job = await backend.submit("pete", spec(hold=True), idempotency_key=None)
        name = names.job_object_name(job.id)
        cluster.kubectl("delete", "secret", name, "-n", SHARED_NS)  # the start will fail
        await backend.release(job.id)

        async def revoked() -> bool:
            return job.id in hooks.made and job.id in hooks.ended

        await until(revoked, what="the token to be made and revoked")
        assert await state_of(backend, job.id) == (JobState.PENDING, "JobSetupPending")
        assert cluster.kubectl_json("get", "job", name, "-n", SHARED_NS)["spec"]["suspend"]
        done = await backend.cancel(job.id, by="pete")
        assert done.state is JobState.CANCELLED


async def test_hold_release_and_cancel(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared, instance="holds") as backend:
        hooks = Hooks()
        backend.hooks = hooks
        held = await backend.submit("pia", spec(hold=True), idempotency_key=None)
        cancelled = await backend.cancel(held.id, by="admin")
        assert (cancelled.state, cancelled.cancelled_by) == (JobState.CANCELLED, "admin")
        assert hooks.made == []  # never started: no token was ever made

        running = await backend.submit("pia", spec(args=[RUNNING]), idempotency_key=None)
        await until(lambda: _is(backend, running.id, JobState.RUNNING), what="running")
        with pytest.raises(Conflict) as info:
            await backend.hold(running.id)
        assert info.value.code == "not_pending"
        unheld = await backend.release(running.id)  # not held: changes nothing
        assert unheld.state is JobState.RUNNING
        ended = await backend.cancel(running.id, by="pia")
        assert ended.state in (JobState.RUNNING, JobState.CANCELLED)
        done = await final(backend, running.id)
        assert (done.state, done.reason, done.cancelled_by) == (
            JobState.CANCELLED,
            "CancelledByUser",
            "pia",
        )

        pending = await backend.submit(
            "pia", spec(cpus=4000), idempotency_key=None
        )  # unschedulable
        now_held = await backend.hold(pending.id)
        assert (now_held.state, now_held.reason) == (JobState.PENDING, "JobHeldUser")
        name = names.job_object_name(pending.id)
        assert cluster.kubectl_json("get", "job", name, "-n", SHARED_NS)["spec"]["suspend"]
        await backend.cancel(pending.id, by="pia")
        assert (await final(backend, pending.id)).state is JobState.CANCELLED

        async def all_ended() -> bool:
            # (a start that lost a race with the hold revoked its token: the hook ran then too)
            return set(hooks.ended) == {held.id, running.id, pending.id}

        await until(all_ended, what="the end hook of every job")
        assert hooks.ended.count(held.id) == hooks.ended.count(running.id) == 1


async def test_end_hook_runs_once_with_two_replicas(shared: Installed) -> None:
    async with (
        started(shared, instance="replicas") as one,
        started(shared, instance="replicas") as two,
    ):
        hooks_one, hooks_two = Hooks(), Hooks()
        one.hooks, two.hooks = hooks_one, hooks_two
        jobs = await asyncio.gather(
            *(one.submit("quinn", spec(), idempotency_key=None) for _ in range(4)),
            *(two.submit("quinn", spec(), idempotency_key=None) for _ in range(4)),
        )
        for job in jobs:
            await final(one, job.id)
        ids = sorted(j.id for j in jobs)

        async def all_ended() -> bool:
            return sorted(hooks_one.ended + hooks_two.ended) == ids

        await until(all_ended, what="every end hook")
        await asyncio.sleep(2)  # and no second run comes late
        assert sorted(hooks_one.ended + hooks_two.ended) == ids
        assert sorted(hooks_one.made + hooks_two.made) == ids  # one token per job


# -- 5. events and pages -------------------------------------------------------------------


async def test_changes_are_published_and_lists_are_paged(shared: Installed) -> None:
    async with started(shared, instance="events") as backend:
        seen: list[JobEvent] = []
        stream = backend.watch("rosa")

        async def read() -> None:
            async for event in stream:
                seen.append(event)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.1)
        job = await backend.submit("rosa", spec(), idempotency_key=None)
        await final(backend, job.id)

        async def completed_seen() -> bool:
            return any(e.job and e.job.state is JobState.COMPLETED for e in seen)

        await until(completed_seen, what="the COMPLETED event")
        reader.cancel()
        await stream.aclose()
        states = [e.job.state for e in seen if e.job and e.job.id == job.id]
        assert states[0] is JobState.PENDING and states[-1] is JobState.COMPLETED
        assert all(e.job is None or e.job.user == "rosa" for e in seen)

        more = [await backend.submit("rosa", spec(), idempotency_key=None) for _ in range(2)]
        everything = [j.id for j in (await backend.list(user="rosa")).jobs]
        assert everything[-3:] == [job.id] + [j.id for j in more] or len(everything) == 3
        first = await backend.list(user="rosa", limit=2)
        assert len(first.jobs) == 2 and first.next is not None
        rest = await backend.list(user="rosa", limit=2, after=first.next)
        assert [j.id for j in first.jobs + rest.jobs] == everything and rest.next is None


# -- the outcome of a job's pod, chosen by an argument (for the conformance suite) --------


async def test_outcome_by_argument(shared: Installed) -> None:
    async with started(shared, instance="outcomes") as backend:
        failed = await backend.submit(
            "sam", spec(args=outcome_args("fail", exit_code=3)), idempotency_key=None
        )
        oom = await backend.submit("sam", spec(args=outcome_args("oom")), idempotency_key=None)
        later = await backend.submit(
            "sam", spec(args=["kbatch-test-duration=3s"]), idempotency_key=None
        )
        start = time.monotonic()
        done = await final(backend, failed.id)
        assert (done.state, done.exit_code) == (JobState.FAILED, 3)
        assert (await final(backend, oom.id)).state is JobState.OUT_OF_MEMORY
        assert (await final(backend, later.id)).state is JobState.COMPLETED
        assert time.monotonic() - start >= 2.5


# -- dependencies across a failover (issue 13) -------------------------------------------


async def test_a_second_replica_takes_over_jobs_that_wait(shared: Installed) -> None:
    """The record is in the objects: jobs waiting on others while the only server goes away
    are started by the next one, once, when their dependency is met."""
    async with started(shared, instance="failover") as first:
        prep = await first.submit(
            "uma", spec(args=outcome_args("succeed", duration="4s")), idempotency_key=None
        )
        train = await first.submit(
            "uma", spec(dependency=f"afterok:{prep.id}"), idempotency_key=None
        )

        async def waiting() -> bool:
            return (await first.get(train.id)).reason == "Dependency"

        await until(waiting, what="the dependent job to wait")
    # the first server is gone; its successor knows nothing but what the objects say
    async with started(shared, instance="failover") as second:
        done = await final(second, train.id, limit=90)
        before = await second.get(prep.id)
        assert (before.state, done.state) == (JobState.COMPLETED, JobState.COMPLETED)
        assert done.started is not None and before.finished is not None
        assert done.started >= before.finished


# -- per-user limits (issue 9, on Kubernetes) ------------------------------------------------


async def test_per_user_limits_hold_jobs_without_pods(shared: Installed) -> None:
    """Beyond a limit a job waits suspended, with Slurm's reason, and no pod; another
    user's job is not held by it; the job starts when the limit frees."""
    from kbatch.backends.userlimits import UserLimits

    async with started(shared, instance="limits") as backend:
        backend.limits = UserLimits(max_running_jobs_per_user=1, max_submitted_jobs_per_user=3)
        running = spec(args=outcome_args("running"))
        first = await backend.submit("vera", running, idempotency_key=None)
        second = await backend.submit("vera", spec(), idempotency_key=None)
        third = await backend.submit("vera", spec(), idempotency_key=None)
        with pytest.raises(PermissionDenied, match="max_submitted_jobs_per_user"):
            await backend.submit("vera", spec(), idempotency_key=None)
        other = await backend.submit("walt", spec(), idempotency_key=None)

        async def held() -> bool:
            return (await state_of(backend, second.id)) == (
                JobState.PENDING,
                "QOSMaxJobsPerUserLimit",
            ) and (await state_of(backend, third.id))[1] == "QOSMaxJobsPerUserLimit"

        await until(held, what="vera's later jobs to be held by her limit")
        assert (await final(backend, other.id)).state is JobState.COMPLETED  # walt's: not held
        assert not backend._pods_by_job.get(second.id)  # held without a pod
        await backend.cancel(first.id, by="vera")
        for job in (second, third):
            assert (await final(backend, job.id, limit=90)).state is JobState.COMPLETED
