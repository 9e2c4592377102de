"""The stream of job changes a backend publishes and the API serves (``GET /api/v1/events``).

Each subscriber has a bounded queue: a reader too slow to keep up is not
allowed to hold the server's memory; it gets a ``resync`` event instead (list
again, then go on reading) and the changes it missed are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from kbatch.models import Job, JobEvent

__all__ = ["EventBroker"]


class _Subscriber:
    __slots__ = ("overflowed", "queue", "user")

    def __init__(self, user: str | None, size: int) -> None:
        self.user = user
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue(size)
        self.overflowed = False


class EventBroker:
    def __init__(self, *, queue_size: int = 10_000) -> None:
        self.queue_size = queue_size
        self._subscribers: set[_Subscriber] = set()
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

    async def subscribe(self, user: str | None) -> AsyncIterator[JobEvent]:
        """Changes of ``user``'s jobs (everyone's with None), until the caller stops reading."""
        sub = _Subscriber(user, self.queue_size)
        self._subscribers.add(sub)
        try:
            while True:
                if sub.overflowed:
                    while not sub.queue.empty():
                        sub.queue.get_nowait()
                    sub.overflowed = False
                    yield JobEvent(type="resync")
                    continue
                yield await sub.queue.get()
        finally:
            with contextlib.suppress(KeyError):
                self._subscribers.remove(sub)
