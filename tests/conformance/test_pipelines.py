"""Dependencies, --begin and singleton (issue 13), as part of the backend contract."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta

import pytest

from kbatch.backends.base import Backend
from kbatch.models import Job, JobState
from tests.conformance.harness import Harness
from tests.conformance.test_contract import ended, state_of, until

pytestmark = pytest.mark.anyio


async def reason_is(backend: Backend, job_id: str, reason: str, within: float = 20.0) -> Job:
    async def check() -> Job | None:
        job = await backend.get(job_id)
        return job if job.reason == reason else None

    return await until(check, within=within, what=f"job {job_id} to wait with {reason}")


async def test_a_three_stage_pipeline_runs_in_order(harness: Harness) -> None:
    async with harness.backend() as backend:
        prep = await backend.submit("ann", harness.spec("succeed"), idempotency_key=None)
        train = await backend.submit(
            "ann", harness.spec("succeed", dependency=f"afterok:{prep.id}"), idempotency_key=None
        )
        evaluate = await backend.submit(
            "ann", harness.spec("succeed", dependency=f"afterok:{train.id}"), idempotency_key=None
        )
        done = [await ended(backend, j.id, within=90) for j in (prep, train, evaluate)]
        assert [j.state for j in done] == [JobState.COMPLETED] * 3
        for before, after in itertools.pairwise(done):
            assert before.finished is not None and after.started is not None
            assert after.started >= before.finished - timedelta(seconds=1)


async def test_afterok_on_a_failed_job_is_never_satisfied(harness: Harness) -> None:
    async with harness.backend() as backend:
        bad = await backend.submit("ann", harness.spec("fail"), idempotency_key=None)
        waits = await backend.submit(
            "ann", harness.spec("succeed", dependency=f"afterok:{bad.id}"), idempotency_key=None
        )
        killed = await backend.submit(
            "ann",
            harness.spec("succeed", dependency=f"afterok:{bad.id}", kill_on_invalid_dep=True),
            idempotency_key=None,
        )
        assert (await ended(backend, bad.id)).state is JobState.FAILED
        stuck = await reason_is(backend, waits.id, "DependencyNeverSatisfied")
        assert stuck.state is JobState.PENDING
        assert stuck.dependency == f"afterok:{bad.id}(failed)"
        gone = await ended(backend, killed.id)
        assert (gone.state, gone.reason, gone.started) == (
            JobState.CANCELLED,
            "DependencyNeverSatisfied",
            None,
        )
        await backend.cancel(waits.id, by="ann")


async def test_afterany_runs_after_a_timeout_and_waits_with_its_reason(harness: Harness) -> None:
    async with harness.backend() as backend:
        first = await backend.submit("ann", harness.spec("run", time_limit=3), idempotency_key=None)
        then = await backend.submit(
            "ann", harness.spec("succeed", dependency=f"afterany:{first.id}"), idempotency_key=None
        )
        await state_of(backend, first.id, JobState.RUNNING, within=harness.start_within)
        waiting = await reason_is(backend, then.id, "Dependency")
        assert waiting.state is JobState.PENDING
        # kbatch show: what it still waits on, as scontrol shows it
        assert waiting.dependency == f"afterany:{first.id}(unfulfilled)"
        assert (await ended(backend, first.id, within=60)).state is JobState.TIMEOUT
        assert (await ended(backend, then.id, within=60)).state is JobState.COMPLETED


async def test_singleton_runs_one_job_of_a_name_at_a_time(harness: Harness) -> None:
    async with harness.backend() as backend:
        jobs = [
            await backend.submit(
                "ann",
                harness.spec("run", name="solo", dependency="singleton"),
                idempotency_key=None,
            )
            for _ in range(3)
        ]
        await state_of(backend, jobs[0].id, JobState.RUNNING, within=harness.start_within)
        for job in jobs[1:]:
            await reason_is(backend, job.id, "Dependency")
        await backend.cancel(jobs[0].id, by="ann")
        await state_of(backend, jobs[1].id, JobState.RUNNING, within=harness.start_within)
        assert (await backend.get(jobs[2].id)).state is JobState.PENDING
        for job in jobs[1:]:
            await backend.cancel(job.id, by="ann")
            await ended(backend, job.id)


async def test_begin_a_few_seconds_out(harness: Harness) -> None:
    async with harness.backend() as backend:
        begin = datetime.now(UTC) + timedelta(seconds=3)
        job = await backend.submit(
            "ann", harness.spec("succeed", begin=begin), idempotency_key=None
        )
        waiting = await reason_is(backend, job.id, "BeginTime", within=5)
        assert waiting.state is JobState.PENDING
        done = await ended(backend, job.id, within=60)
        assert done.state is JobState.COMPLETED
        assert done.started is not None and done.started >= begin - timedelta(seconds=1)


async def test_hold_and_release_while_waiting_on_a_dependency(harness: Harness) -> None:
    async with harness.backend() as backend:
        first = await backend.submit("ann", harness.spec("run"), idempotency_key=None)
        then = await backend.submit(
            "ann", harness.spec("succeed", dependency=f"afterany:{first.id}"), idempotency_key=None
        )
        await reason_is(backend, then.id, "Dependency")
        held = await backend.hold(then.id)
        assert held.reason == "JobHeldUser"
        await backend.cancel(first.id, by="ann")
        await ended(backend, first.id)
        await asyncio.sleep(1)
        assert (await backend.get(then.id)).state is JobState.PENDING  # still held
        await backend.release(then.id)
        assert (await ended(backend, then.id, within=60)).state is JobState.COMPLETED
