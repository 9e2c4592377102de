"""Fair share and per-user limits on the local backend, with real supervisors and jobs.

Users here are kbatch users (names), all jobs running as the test's account:
the limits and the order count users, not Unix accounts.  Jobs that must hold
a slot wait for a file the test creates; the rest are ``true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from kbatch.backends.local.backend import LocalBackend, LocalConfig
from kbatch.backends.userlimits import UserLimits
from kbatch.errors import PermissionDenied
from kbatch.models import Job, JobSpec, JobState
from kbatch.server.policy import Policy
from tests.support.servers import KbatchServer

pytestmark = pytest.mark.anyio
T = TypeVar("T")
G = 1024**3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def until(check: Callable[[], Awaitable[T | None]], *, within: float = 30.0) -> T:
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s (last {result!r})")
        await asyncio.sleep(0.02)


async def state_of(backend: LocalBackend, job_id: str, *states: JobState) -> Job:
    wanted = set(states) or {s for s in JobState if s.is_terminal}

    async def reached() -> Job | None:
        job = await backend.get(job_id)
        return job if job.state in wanted else None

    return await until(reached)


@contextlib.asynccontextmanager
async def local(
    tmp: Path, cpus: int, limits: UserLimits | None = None
) -> AsyncIterator[LocalBackend]:
    backend = LocalBackend(
        LocalConfig(state_dir=tmp / "s", cpus=cpus, memory=64 * G, tick=0.2, kill_grace=1)
    )
    backend.limits = limits or UserLimits()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


class Jobs:
    """Specs for jobs that end at once, or hold their slot until released."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def quick(self, **fields: Any) -> JobSpec:
        return JobSpec(
            script="#!/bin/sh\ntrue\n", workdir=str(self.workdir), output="/dev/null", **fields
        )

    def holding(self, name: str, **fields: Any) -> JobSpec:
        go = self.workdir / f"go-{name}"
        script = f"#!/bin/sh\nwhile [ ! -e {go} ]; do sleep 0.02; done\n"
        return JobSpec(script=script, workdir=str(self.workdir), output="/dev/null", **fields)

    def release(self, name: str) -> None:
        (self.workdir / f"go-{name}").touch()


@pytest.fixture
def jobs(tmp_path: Path) -> Jobs:
    work = tmp_path / "work"
    work.mkdir()
    return Jobs(work)


async def test_one_users_queue_of_200_cannot_starve_another_users_job(
    tmp_path_factory: pytest.TempPathFactory, jobs: Jobs
) -> None:
    async with local(tmp_path_factory.mktemp("fs"), cpus=1) as backend:
        first = await backend.submit("ann", jobs.holding("first"), idempotency_key=None)
        await state_of(backend, first.id, JobState.RUNNING)
        queue = [
            await backend.submit("ann", jobs.quick(), idempotency_key=None) for _ in range(199)
        ]
        single = await backend.submit("bob", jobs.quick(), idempotency_key=None)
        await backend.reconcile()
        assert (await backend.get(single.id)).state is JobState.PENDING
        jobs.release("first")  # the one slot frees: bob's job is the next to start
        bobs = await state_of(backend, single.id, JobState.COMPLETED)
        anns_next = await state_of(backend, queue[0].id, JobState.COMPLETED)
        assert bobs.started is not None and anns_next.started is not None
        assert bobs.started <= anns_next.started, (bobs.started, anns_next.started)
        # bob waited for one slot, not behind ann's queue: most of it has not started yet
        waiting = await backend.list(user="ann", states={JobState.PENDING})
        assert len(waiting.jobs) > 150, len(waiting.jobs)


@pytest.mark.parametrize(
    ("limits", "fields", "reason"),
    [
        (UserLimits(max_running_jobs_per_user=1), {}, "QOSMaxJobsPerUserLimit"),
        (UserLimits(max_cpus_per_user=2), {"cpus": 2}, "QOSMaxCpuPerUserLimit"),
        (UserLimits(max_memory_per_user=G), {"memory": G}, "QOSMaxMemoryPerUserLimit"),
    ],
)
async def test_each_limit_holds_a_job_until_it_frees(
    tmp_path_factory: pytest.TempPathFactory,
    jobs: Jobs,
    limits: UserLimits,
    fields: dict[str, int],
    reason: str,
) -> None:
    async with local(tmp_path_factory.mktemp("lim"), cpus=8, limits=limits) as backend:
        first = await backend.submit("ann", jobs.holding("first", **fields), idempotency_key=None)
        await state_of(backend, first.id, JobState.RUNNING)
        held = await backend.submit("ann", jobs.quick(**fields), idempotency_key=None)
        other = await backend.submit("bob", jobs.quick(**fields), idempotency_key=None)
        await backend.reconcile()
        waiting = await backend.get(held.id)
        assert (waiting.state, waiting.reason) == (JobState.PENDING, reason)
        # another user's job is held by nothing of ann's
        assert (await state_of(backend, other.id, JobState.COMPLETED)).state is JobState.COMPLETED
        jobs.release("first")
        assert (await state_of(backend, held.id, JobState.COMPLETED)).reason is None


async def test_the_gpu_limit_holds_a_job_until_it_frees(
    tmp_path_factory: pytest.TempPathFactory, jobs: Jobs
) -> None:
    limits = UserLimits(max_gpus_per_user=1)
    tmp = tmp_path_factory.mktemp("gpu")
    backend = LocalBackend(LocalConfig(state_dir=tmp / "s", cpus=4, gpus=2, tick=0.2))
    backend.limits = limits
    await backend.start()
    try:
        first = await backend.submit("ann", jobs.holding("g", gpus=1), idempotency_key=None)
        await state_of(backend, first.id, JobState.RUNNING)
        held = await backend.submit("ann", jobs.quick(gpus=1), idempotency_key=None)
        await backend.reconcile()
        job = await backend.get(held.id)
        assert (job.state, job.reason) == (JobState.PENDING, "QOSMaxGRESPerUser")
        jobs.release("g")
        assert (await state_of(backend, held.id, JobState.COMPLETED)).state is JobState.COMPLETED
    finally:
        await backend.stop()


async def test_submissions_beyond_the_limit_are_refused_and_nothing_is_made(
    tmp_path_factory: pytest.TempPathFactory, jobs: Jobs
) -> None:
    limits = UserLimits(max_submitted_jobs_per_user=2)
    async with local(tmp_path_factory.mktemp("sub"), cpus=1, limits=limits) as backend:
        one = await backend.submit("ann", jobs.holding("s"), idempotency_key="k1")
        await backend.submit("ann", jobs.quick(), idempotency_key=None)
        with pytest.raises(PermissionDenied, match="policy max_submitted_jobs_per_user"):
            await backend.submit("ann", jobs.quick(), idempotency_key=None)
        # a retry of a job already made is not a new submission; other users are not counted
        assert (await backend.submit("ann", jobs.holding("s"), idempotency_key="k1")).id == one.id
        await backend.submit("bob", jobs.quick(), idempotency_key=None)
        assert len((await backend.list(user="ann")).jobs) == 2
        # each task of an array counts: bob has one job, and may not add an array of two
        with pytest.raises(PermissionDenied, match="this submission adds 2"):
            await backend.submit(
                "bob", msgspec.structs.replace(jobs.quick(), array="0-1"), idempotency_key=None
            )
        jobs.release("s")
        await state_of(backend, one.id, JobState.COMPLETED)
        await until(lambda: _active(backend, "ann", 0))
        await backend.submit("ann", jobs.quick(), idempotency_key=None)  # room again


async def _active(backend: LocalBackend, user: str, count: int) -> bool:
    page = await backend.list(user=user, states={JobState.PENDING, JobState.RUNNING})
    return len(page.jobs) == count


def test_the_servers_policy_reaches_the_backend(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Per-user limits in kbatch.toml's [policy], through the real server and CLI."""
    state = tmp_path_factory.mktemp("kb") / "s"
    config = state.parent / "kbatch.toml"
    config.write_text(
        "[local]\ntick = 0.2\nkill_grace = 1\n"
        "[policy]\nmax_running_jobs_per_user = 1\nmax_submitted_jobs_per_user = 3\n"
        'max_memory_per_user = "2G"\n'
    )
    server = KbatchServer(state, args=["--cpus", "4", "--config", str(config)])
    server.start()
    try:
        go = state.parent / "go"
        script = f"while [ ! -e {go} ]; do sleep 0.02; done"
        ids = []
        for _ in range(2):
            done = server.cli(
                "submit", "--parsable", "--mem=1G", "--wrap", script, cwd=state.parent
            )
            assert done.returncode == 0, done.stderr
            ids.append(done.stdout.strip())
        server.wait_state(ids[0], JobState.RUNNING)
        with server.client() as client:
            until_reason = time.monotonic() + 10
            while client.get(ids[1]).reason != "QOSMaxJobsPerUserLimit":
                assert time.monotonic() < until_reason, client.get(ids[1])
                time.sleep(0.05)
        no_mem = server.cli("submit", "--wrap", "true", cwd=state.parent)
        assert no_mem.returncode != 0 and "max_memory_per_user" in no_mem.stderr
        too_big = server.cli("submit", "--mem=3G", "--wrap", "true", cwd=state.parent)
        assert too_big.returncode != 0 and "max_memory_per_user" in too_big.stderr
        server.cli("submit", "--mem=1G", "--wrap", "true", cwd=state.parent)
        refused = server.cli("submit", "--mem=1G", "--wrap", "true", cwd=state.parent)
        assert refused.returncode != 0
        assert "max_submitted_jobs_per_user) is 3" in refused.stderr, refused.stderr
        go.touch()
        assert server.wait_state(ids[1]).state is JobState.COMPLETED
        queue = server.cli("queue", "--all", "--json")
        assert queue.returncode == 0
    finally:
        server.stop()


def test_policy_refuses_a_job_no_user_could_ever_run() -> None:
    from kbatch.errors import SpecError
    from kbatch.server.policy import check

    policy = Policy(max_cpus_per_user=2, max_gpus_per_user=0)
    with pytest.raises(SpecError, match="max_cpus_per_user"):
        check(JobSpec(script="#!/bin/sh\n", cpus=3), policy)
    with pytest.raises(SpecError, match="max_gpus_per_user"):
        check(JobSpec(script="#!/bin/sh\n", gpus=1), policy)
    assert check(JobSpec(script="#!/bin/sh\n", cpus=2), policy).cpus == 2
