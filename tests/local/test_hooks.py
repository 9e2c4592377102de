"""Job hooks on the local backend: an in-process backend, real supervisors and job processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kbatch.backends.base import JobHooks
from kbatch.backends.local.backend import LocalBackend, LocalConfig
from kbatch.errors import ApiError, ServiceUnavailable
from kbatch.models import Job, JobSpec, JobState

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Hooks(JobHooks):
    def __init__(self) -> None:
        self.fail_with: Exception | None = None
        self.finished_ids: list[str] = []

    async def environment(self, job: Job) -> dict[str, str]:
        if self.fail_with is not None:
            raise self.fail_with
        return {"FROM_HOOK": f"token-for-{job.id}"}

    async def finished(self, job: Job) -> None:
        self.finished_ids.append(job.id)


@pytest.fixture
async def backend(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalBackend]:
    state = tmp_path_factory.mktemp("hk") / "s"
    local = LocalBackend(LocalConfig(state_dir=state, cpus=2, tick=0.2, kill_grace=1))
    await local.start()
    yield local
    await local.stop()


async def ended(backend: LocalBackend, job_id: str, limit: float = 30) -> Job:
    async with asyncio.timeout(limit):
        while not (job := await backend.get(job_id)).state.is_terminal:
            await asyncio.sleep(0.05)
    return job


def spec(workdir: Path, body: str = "echo $FROM_HOOK") -> JobSpec:
    return JobSpec(script=f"#!/bin/sh\n{body}\n", workdir=str(workdir))


async def test_hook_environment_and_end(backend: LocalBackend, tmp_path: Path) -> None:
    hooks = Hooks()
    backend.hooks = hooks
    job = await backend.submit("u", spec(tmp_path), idempotency_key=None)
    assert (await ended(backend, job.id)).state is JobState.COMPLETED
    assert (tmp_path / f"kbatch-{job.id}.out").read_text() == f"token-for-{job.id}\n"
    async with asyncio.timeout(10):
        while hooks.finished_ids != [job.id]:
            await asyncio.sleep(0.05)


async def test_transient_hook_failure_waits_then_runs(
    backend: LocalBackend, tmp_path: Path
) -> None:
    hooks = Hooks()
    hooks.fail_with = ServiceUnavailable("the hub is down", status=503)
    backend.hooks = hooks
    job = await backend.submit("u", spec(tmp_path), idempotency_key=None)
    current = await backend.get(job.id)
    assert (current.state, current.reason) == (JobState.PENDING, "JobSetupPending")
    hooks.fail_with = None  # the hub is back
    assert (await ended(backend, job.id)).state is JobState.COMPLETED


async def test_permanent_hook_failure_fails_the_job(backend: LocalBackend, tmp_path: Path) -> None:
    hooks = Hooks()
    hooks.fail_with = ApiError(
        "JupyterHub refused to create a token", status=502, code="hub_refused"
    )
    backend.hooks = hooks
    job = await backend.submit("u", spec(tmp_path), idempotency_key=None)
    done = await ended(backend, job.id)
    assert done.state is JobState.FAILED
    assert done.reason == "JobSetupFailed: JupyterHub refused to create a token"
    assert not (tmp_path / f"kbatch-{job.id}.out").exists()  # it never ran
    assert hooks.finished_ids == [job.id]
    hooks.fail_with = None  # a failed setup does not block the queue
    nxt = await backend.submit("u", spec(tmp_path), idempotency_key=None)
    assert (await ended(backend, nxt.id)).state is JobState.COMPLETED


class BlockingHooks(Hooks):
    """A start hook that waits (as the hub token request does) until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.go = asyncio.Event()
        self.made: list[str] = []

    async def environment(self, job: Job) -> dict[str, str]:
        self.entered.set()
        await self.go.wait()
        self.made.append(job.id)
        return {"FROM_HOOK": f"token-for-{job.id}"}


async def test_cancel_while_the_start_hook_waits_never_runs_the_job(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """A cancel that arrives while the start hook waits on I/O wins: nothing runs, and the
    token the hook made is given back exactly once (it used to start the script anyway)."""
    hooks = BlockingHooks()
    backend.hooks = hooks
    submitting = asyncio.create_task(
        backend.submit("u", spec(tmp_path, "echo ran > ran"), idempotency_key=None)
    )
    async with asyncio.timeout(10):
        await hooks.entered.wait()
    cancelling = asyncio.create_task(backend.cancel("1", by="u"))
    await asyncio.sleep(0.2)  # the cancel is recorded and waits for the job's reconciler
    assert not cancelling.done()
    hooks.go.set()
    job = await cancelling
    await submitting
    assert (job.state, job.reason, job.cancelled_by) == (
        JobState.CANCELLED,
        "CancelledByUser",
        "u",
    )
    await backend.reconcile()
    await asyncio.sleep(1)  # a supervisor started by mistake would have run the script by now
    assert not (tmp_path / "ran").exists()
    assert not (backend.jobs_dir / "1").exists()
    assert hooks.made == ["1"]
    assert hooks.finished_ids == ["1"]  # the token made for the start is revoked, once


async def test_a_supervisor_that_cannot_start_gives_back_the_token(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    state = tmp_path_factory.mktemp("hk") / "s"
    broken = LocalBackend(
        LocalConfig(state_dir=state, cpus=2, tick=0.2, python="/nonexistent/python")
    )
    hooks = Hooks()
    broken.hooks = hooks
    await broken.start()
    try:
        job = await broken.submit("u", spec(tmp_path), idempotency_key=None)
        done = await ended(broken, job.id)
        assert done.state is JobState.FAILED
        assert (done.reason or "").startswith("LaunchFailed:")
        assert hooks.finished_ids == [job.id]  # it used to keep the hub token alive
    finally:
        await broken.stop()


async def test_finished_hook_runs_once_after_a_restart(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A job that ended while the server was down gets its end hook at the next start, once."""
    state = tmp_path_factory.mktemp("hk") / "s"
    config = LocalConfig(state_dir=state, cpus=2, tick=0.2, kill_grace=1)
    first = LocalBackend(config)
    await first.start()
    job = await first.submit("u", spec(tmp_path, "sleep 1"), idempotency_key=None)
    await first.stop()  # the job goes on without the server
    await asyncio.sleep(2)
    hooks = Hooks()
    second = LocalBackend(config)
    second.hooks = hooks
    await second.start()
    try:
        assert (await ended(second, job.id)).state is JobState.COMPLETED
        await second.reconcile()
        assert hooks.finished_ids == [job.id]
    finally:
        await second.stop()
    third = LocalBackend(config)
    third.hooks = hooks
    await third.start()
    await third.reconcile()
    await third.stop()
    assert hooks.finished_ids == [job.id]  # not again


async def test_jobs_waiting_on_others_survive_a_restart(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Dependencies and --begin are state on disk: a server stopped while jobs wait loses
    nothing, and the next one starts them when they may, once each."""
    from datetime import UTC, datetime, timedelta

    state = tmp_path_factory.mktemp("hk") / "s"
    config = LocalConfig(state_dir=state, cpus=2, tick=0.2, kill_grace=1)
    first = LocalBackend(config)
    await first.start()
    prep = await first.submit(
        "u", spec(tmp_path, "sleep 1; echo prep >> order"), idempotency_key=None
    )
    train = await first.submit(
        "u",
        JobSpec(
            script="#!/bin/sh\necho train >> order\n",
            workdir=str(tmp_path),
            dependency=f"afterok:{prep.id}",
        ),
        idempotency_key=None,
    )
    later = await first.submit(
        "u",
        JobSpec(
            script="#!/bin/sh\necho later >> order\n",
            workdir=str(tmp_path),
            begin=datetime.now(UTC) + timedelta(seconds=3),
        ),
        idempotency_key=None,
    )
    assert (await first.get(train.id)).reason == "Dependency"
    await first.stop()  # prep goes on without the server; train and later wait on disk
    await asyncio.sleep(1.5)
    second = LocalBackend(config)
    await second.start()
    try:
        done = [await ended(second, j.id) for j in (prep, train, later)]
        assert [j.state for j in done] == [JobState.COMPLETED] * 3
        assert (tmp_path / "order").read_text() == "prep\ntrain\nlater\n"  # each ran once
    finally:
        await second.stop()
