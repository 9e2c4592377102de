"""The backend contract (:mod:`kbatch.backends.base`), as tests every backend must pass.

Each test runs once per backend (``tests/conformance/conftest.py``): the fake,
the local backend with real processes, and Kubernetes on the real control
plane.  A new backend is done when it passes these.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from kbatch.backends.base import Backend, JobHooks
from kbatch.errors import Conflict, NotFound
from kbatch.lifecycle import TRANSITIONS
from kbatch.models import Job, JobEvent, JobState
from tests.conformance.harness import Harness

pytestmark = pytest.mark.anyio
T = TypeVar("T")


async def until(check: Callable[[], Awaitable[T | None]], *, within: float, what: str) -> T:
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what} (last {result!r})")
        await asyncio.sleep(0.05)


async def state_of(backend: Backend, job_id: str, *states: JobState, within: float) -> Job:
    async def reached() -> Job | None:
        job = await backend.get(job_id)
        return job if job.state in states else None

    return await until(reached, within=within, what=f"job {job_id} to be {states}")


async def ended(backend: Backend, job_id: str, within: float = 60.0) -> Job:
    async def done() -> Job | None:
        job = await backend.get(job_id)
        return job if job.state.is_terminal else None

    return await until(done, within=within, what=f"job {job_id} to end")


class Recorder(JobHooks):
    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[str] = []

    async def environment(self, job: Job) -> dict[str, str]:
        self.started.append(job.id)
        return {}

    async def finished(self, job: Job) -> None:
        self.ended.append(job.id)


@contextlib.asynccontextmanager
async def recording(backend: Backend) -> AsyncIterator[list[JobEvent]]:
    """Every event the backend publishes while the block runs."""
    events: list[JobEvent] = []
    stream = backend.watch(None)

    async def read() -> None:
        async for event in stream:
            events.append(event)

    reader = asyncio.create_task(read())
    try:
        yield events
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await stream.aclose()


def steps(events: list[JobEvent], job_id: str) -> list[JobState]:
    """The states a job went through, repeats folded."""
    seen: list[JobState] = []
    for event in events:
        if (
            event.job is not None
            and event.job.id == job_id
            and (not seen or seen[-1] is not event.job.state)
        ):
            seen.append(event.job.state)
    return seen


async def test_a_job_runs_to_completion_and_says_so(harness: Harness) -> None:
    async with harness.backend() as backend:
        hooks = Recorder()
        backend.hooks = hooks
        async with recording(backend) as events:
            job = await backend.submit("alice", harness.spec("succeed"), idempotency_key=None)
            assert job.state in (JobState.PENDING, JobState.RUNNING)
            assert (job.user, job.backend) == ("alice", backend.name)
            done = await ended(backend, job.id)
            await until(lambda: _true(hooks.ended == [job.id]), within=10, what="the end hook")
        assert (done.state, done.exit_code) == (JobState.COMPLETED, 0)
        assert done.started is not None and done.finished is not None
        assert hooks.started == [job.id]
        states = steps(events, job.id)
        assert states[-1] is JobState.COMPLETED
        for old, new in itertools.pairwise(states):
            assert (old, new) in TRANSITIONS  # never a step the lifecycle forbids
        listed = await backend.list(user="alice", states={JobState.COMPLETED})
        assert job.id in [j.id for j in listed.jobs]


async def _true(value: bool) -> bool:
    return value


async def test_a_failing_job_is_failed_with_its_exit_code(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit("alice", harness.spec("fail"), idempotency_key=None)
        done = await ended(backend, job.id)
        assert (done.state, done.exit_code) == (JobState.FAILED, 3)


async def test_its_output_is_in_the_logs(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit(
            "alice", harness.spec("succeed", text="conformance-42"), idempotency_key=None
        )
        await ended(backend, job.id)
        text = b"".join([chunk async for chunk in backend.logs(job.id, follow=False)])
        assert b"conformance-42" in text


async def test_cancel_a_running_job(harness: Harness) -> None:
    async with harness.backend() as backend:
        hooks = Recorder()
        backend.hooks = hooks
        job = await backend.submit("alice", harness.spec("run"), idempotency_key=None)
        await state_of(backend, job.id, JobState.RUNNING, within=harness.start_within)
        await backend.cancel(job.id, by="root")
        done = await ended(backend, job.id)
        assert (done.state, done.cancelled_by) == (JobState.CANCELLED, "root")
        again = await backend.cancel(job.id, by="alice")  # cancelling an ended job: no change
        assert (again.state, again.cancelled_by) == (JobState.CANCELLED, "root")
        listed = await backend.list(user="alice", states={JobState.CANCELLED})
        assert job.id in [j.id for j in listed.jobs]  # it stays visible
        await until(lambda: _true(hooks.ended == [job.id]), within=10, what="the end hook")


async def test_a_held_job_waits_until_released(harness: Harness) -> None:
    async with harness.backend() as backend:
        hooks = Recorder()
        backend.hooks = hooks
        job = await backend.submit(
            "alice", harness.spec("succeed", hold=True), idempotency_key=None
        )
        assert job.state is JobState.PENDING
        await state_of(backend, job.id, JobState.PENDING, within=5)
        await asyncio.sleep(1.0)  # time enough to have started, were it not held
        held = await backend.get(job.id)
        assert (held.state, held.reason) == (JobState.PENDING, "JobHeldUser")
        assert hooks.started == []  # nothing was prepared for a start
        await backend.release(job.id)
        done = await ended(backend, job.id)
        assert done.state is JobState.COMPLETED


async def test_hold_and_cancel_before_it_starts(harness: Harness) -> None:
    async with harness.backend() as backend:
        hooks = Recorder()
        backend.hooks = hooks
        job = await backend.submit(
            "alice", harness.spec("succeed", hold=True), idempotency_key=None
        )
        cancelled = await backend.cancel(job.id, by="alice")
        done = cancelled if cancelled.state.is_terminal else await ended(backend, job.id)
        assert (done.state, done.reason) == (JobState.CANCELLED, "CancelledByUser")
        assert done.started is None  # it never ran
        assert hooks.started == []
        await until(lambda: _true(hooks.ended == [job.id]), within=10, what="the end hook")


async def test_a_running_job_cannot_be_held(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit("alice", harness.spec("run"), idempotency_key=None)
        await state_of(backend, job.id, JobState.RUNNING, within=harness.start_within)
        with pytest.raises(Conflict, match="only pending jobs"):
            await backend.hold(job.id)
        await backend.cancel(job.id, by="alice")
        await ended(backend, job.id)


async def test_hold_a_pending_job_then_release_it(harness: Harness) -> None:
    async with harness.backend() as backend:
        first = await backend.submit(
            "alice", harness.spec("succeed", hold=True), idempotency_key=None
        )
        await backend.release(first.id)
        await ended(backend, first.id)
        second = await backend.submit(
            "alice", harness.spec("succeed", hold=True), idempotency_key=None
        )
        await backend.release(second.id)
        with contextlib.suppress(Conflict):  # it may already have started: then 409
            held = await backend.hold(second.id)
            assert held.state in (JobState.PENDING,)
        await backend.release(second.id)
        assert (await ended(backend, second.id)).state is JobState.COMPLETED


async def test_idempotent_submission(harness: Harness) -> None:
    async with harness.backend() as backend:
        spec = harness.spec("succeed", hold=True)
        first, second = await asyncio.gather(
            backend.submit("alice", spec, idempotency_key="key-1"),
            backend.submit("alice", spec, idempotency_key="key-1"),
        )
        third = await backend.submit("alice", spec, idempotency_key="key-1")
        assert first.id == second.id == third.id
        other_user = await backend.submit("bob", spec, idempotency_key="key-1")
        assert other_user.id != first.id  # keys are per user
        with pytest.raises(Conflict, match="another spec"):
            await backend.submit("alice", harness.spec("fail", hold=True), idempotency_key="key-1")
        mine = (await backend.list(user="alice")).jobs
        assert [j.id for j in mine].count(first.id) == 1
        for job_id in (first.id, other_user.id):
            await backend.cancel(job_id, by="test")


@pytest.mark.parametrize("job_id", ["no-such-job", "1\n", "²", "9" * 25, "", "a/b", "1_"])
async def test_unknown_or_malformed_ids_are_not_found(harness: Harness, job_id: str) -> None:
    async with harness.backend() as backend:
        with pytest.raises(NotFound):
            await backend.get(job_id)
        with pytest.raises(NotFound):
            await backend.cancel(job_id, by="alice")


async def test_listing_pages_oldest_first_and_per_user(harness: Harness) -> None:
    async with harness.backend() as backend:
        ids = []
        for n in range(5):
            job = await backend.submit(
                "carol", harness.spec("succeed", hold=True, name=f"p{n}"), idempotency_key=None
            )
            ids.append(job.id)
        await backend.submit("dave", harness.spec("succeed", hold=True), idempotency_key=None)
        seen: list[str] = []
        after = None
        pages = 0
        while True:
            page = await backend.list(user="carol", limit=2, after=after)
            pages += 1
            assert len(page.jobs) <= 2
            seen += [j.id for j in page.jobs]
            if page.next is None:
                break
            after = page.next
        assert seen == ids  # every job once, in submission order
        assert pages == 3
        everyone = await backend.list(user=None)
        assert {j.user for j in everyone.jobs} >= {"carol", "dave"}
        for job in everyone.jobs:
            await backend.cancel(job.id, by="test")


async def test_a_time_limit_gives_timeout(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit("alice", harness.spec("run", time_limit=1), idempotency_key=None)
        done = await ended(backend, job.id, within=60)
        assert done.state is JobState.TIMEOUT


async def test_events_are_per_user(harness: Harness) -> None:
    async with harness.backend() as backend:
        mine: list[JobEvent] = []
        stream = backend.watch("erin")

        async def read() -> None:
            async for event in stream:
                mine.append(event)

        reader = asyncio.create_task(read())
        try:
            theirs = await backend.submit("frank", harness.spec("succeed"), idempotency_key=None)
            own = await backend.submit("erin", harness.spec("succeed"), idempotency_key=None)
            await ended(backend, own.id)
            await ended(backend, theirs.id)
            await until(
                lambda: _true(any(e.job and e.job.state.is_terminal for e in mine)),
                within=10,
                what="erin's end event",
            )
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await stream.aclose()
        assert {e.job.user for e in mine if e.job is not None} == {"erin"}


async def test_health_is_ok(harness: Harness) -> None:
    async with harness.backend() as backend:
        assert backend.health().ok
