"""The pure parts of the core: the lifecycle's steps, job references, the work queue, events."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from kbatch.backends.base import paginate
from kbatch.backends.events import EventBroker
from kbatch.backends.workqueue import WorkQueue
from kbatch.errors import NotFound
from kbatch.lifecycle import IllegalTransition, check_transition, parse_job_ref
from kbatch.models import Job, JobState

P, R = JobState.PENDING, JobState.RUNNING


def test_allowed_steps() -> None:
    check_transition(P, R)
    for end in (JobState.COMPLETED, JobState.CANCELLED, JobState.FAILED, JobState.NODE_FAIL):
        check_transition(P, end)
        check_transition(R, end)
    check_transition(R, P, "LaunchInterrupted")
    check_transition(R, P, "PodReplaced")


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (JobState.COMPLETED, R, None),  # an ended job is final
        (JobState.CANCELLED, JobState.COMPLETED, None),
        (JobState.FAILED, P, None),
        (R, P, None),  # back to the queue only with a reason that says why
        (R, P, "Resources"),
        (P, P, None),
    ],
)
def test_forbidden_steps(old: JobState, new: JobState, reason: str | None) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(old, new, reason)


@pytest.mark.parametrize(
    ("text", "job_id", "index"),
    [
        ("123", "123", None),
        ("a1b2c3d4", "a1b2c3d4", None),
        ("123_7", "123", 7),
        ("kb-x_0", "kb-x", 0),
    ],
)
def test_job_refs(text: str, job_id: str, index: int | None) -> None:
    ref = parse_job_ref(text)
    assert (ref.job_id, ref.index, str(ref)) == (job_id, index, text)


@pytest.mark.parametrize(
    "text", ["", "²", "1\n", "1 ", "-1", "a/b", "1_", "_1", "1_x", "١٢", "x" * 64, "1_" + "9" * 10]
)
def test_malformed_refs_are_not_found(text: str) -> None:
    with pytest.raises(NotFound):
        parse_job_ref(text)


def _job(job_id: str, user: str = "u", state: JobState = P, reason: str | None = None) -> Job:
    return Job(
        id=job_id, user=user, name="n", state=state, reason=reason, submitted=datetime.now(UTC)
    )


def test_paginate_walks_every_job_once() -> None:
    jobs = [_job(str(i)) for i in range(1, 8)]
    key = lambda j: j.id.zfill(4)  # noqa: E731
    seen, after = [], None
    while True:
        page = paginate(jobs, limit=3, after=after, key=key)
        seen += [j.id for j in page.jobs]
        if page.next is None:
            break
        after = page.next
    assert seen == [j.id for j in jobs]
    assert paginate(jobs, limit=None, after=None, key=key).next is None
    assert paginate(jobs, limit=7, after=None, key=key).next is None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_work_queue_coalesces_and_never_hands_a_key_to_two_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.put("a")
    queue.put("a")
    queue.put("b")
    assert len(queue) == 2
    key = await queue.get()
    assert key == "a"
    queue.put("a")  # while "a" is processed: not handed out again yet
    assert await queue.get() == "b"
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    queue.done("a")  # now it is
    assert await asyncio.wait_for(getter, 1) == "a"
    queue.done("a")
    queue.done("b")
    queue.close()


@pytest.mark.anyio
async def test_work_queue_sync_waits_for_a_processing_that_began_after_it() -> None:
    queue: WorkQueue[str] = WorkQueue()
    processed: list[str] = []

    async def worker() -> None:
        while True:
            key = await queue.get()
            await asyncio.sleep(0.01)
            processed.append(key)
            queue.done(key)

    task = asyncio.create_task(worker())
    queue.put("k")
    await asyncio.sleep(0.005)  # "k" is being processed
    await asyncio.wait_for(queue.sync("k"), 1)
    assert processed == ["k", "k"]  # the sync waited for a second, fresh processing
    task.cancel()
    queue.close()


@pytest.mark.anyio
async def test_work_queue_backoff_grows_and_is_forgotten() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.01, max_delay=0.04)
    delays = [queue.put_backoff("k") for _ in range(5)]
    assert delays[0] <= 0.01 and all(d <= 0.04 for d in delays)
    assert queue.failures("k") == 5
    assert await asyncio.wait_for(queue.get(), 1) == "k"  # the timer put it back
    queue.forget("k")
    assert queue.failures("k") == 0
    queue.close()


@pytest.mark.anyio
async def test_events_go_to_their_user_and_a_slow_reader_is_told_to_resync() -> None:
    broker = EventBroker(queue_size=2)
    alice = broker.subscribe("alice")
    everyone = broker.subscribe(None)
    first = asyncio.ensure_future(alice.__anext__())
    await asyncio.sleep(0)
    broker.publish(_job("1", "bob"))
    broker.publish(_job("2", "alice"))
    event = await asyncio.wait_for(first, 1)
    assert event.job is not None and event.job.id == "2"
    broker.publish(_job("2", "alice"))  # the same state again: not news
    broker.publish(_job("2", "alice", R))
    got = await asyncio.wait_for(alice.__anext__(), 1)
    assert got.job is not None and got.job.state is R
    # The unread subscriber of everyone has overflowed: it is told to list again.
    for n in range(5):
        broker.publish(_job(str(10 + n), "carol"))
    assert (await asyncio.wait_for(everyone.__anext__(), 1)).type == "resync"
    await alice.aclose()
    await everyone.aclose()
    assert broker.subscribers == 0
