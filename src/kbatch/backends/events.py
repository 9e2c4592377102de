"""The stream of job changes a backend publishes and the API serves (``GET /api/v1/events``).

Each subscriber has a bounded queue: a reader too slow to keep up is not
allowed to hold the server's memory; it gets a ``resync`` event instead (list
again, then go on reading) and the changes it missed are dropped.
"""

from __future__ import annotations

import asyncio

from kbatch.models import Job, JobEvent

__all__ = ["EventBroker", "Subscription"]


class Subscription:
    """One reader's changes; subscribed when made (not when first read), so a reader
    that subscribes and then lists misses nothing.  ``aclose()`` unsubscribes."""

    def __init__(self, broker: EventBroker, user: str | None, size: int) -> None:
        self.user = user
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue(size)
        self.overflowed = False
        self._broker = broker

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> JobEvent:
        if self.overflowed:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.overflowed = False
            return JobEvent(type="resync")
        return await self.queue.get()

    async def aclose(self) -> None:
        self._broker._subscribers.discard(self)


class EventBroker:
    def __init__(self, *, queue_size: int = 10_000) -> None:
        self.queue_size = queue_size
        self._subscribers: set[Subscription] = set()
        self._last: dict[str, tuple[object, ...]] = {}

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, job: Job) -> None:
        """Tell subscribers that ``job`` changed (repeats of the same state are dropped)."""
        signature = (job.state, job.reason, job.exit_code, job.started, job.finished)
        if self._last.get(job.id) == signature:
            return
        if job.state.is_terminal:
            self._last.pop(job.id, None)  # bounded: only active jobs are remembered
        else:
            self._last[job.id] = signature
        if not self._subscribers:
            return
        event = JobEvent(type="job", job=job)
        for sub in self._subscribers:
            if sub.user is not None and sub.user != job.user:
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.overflowed = True

    def subscribe(self, user: str | None) -> Subscription:
        """Changes of ``user``'s jobs (everyone's with None) from now on, until ``aclose()``."""
        sub = Subscription(self, user, self.queue_size)
        self._subscribers.add(sub)
        return sub
