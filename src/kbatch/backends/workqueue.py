"""A work queue of job ids for reconcilers, in the manner of client-go's and dask-gateway's.

* A key is queued at most once, however often it is put (changes coalesce).
* A key is never handed to two workers at once: put while it is being
  processed, it is marked dirty and handed out again after ``done``.
* ``put_backoff`` retries a key after an exponential delay with jitter, per
  key; ``forget`` resets it after a success.
* ``sync`` puts a key and waits until a processing of it that *began after the
  call* has finished: how an API call (cancel) waits for its effect without
  ever changing a job's state itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["WorkQueue", "stop_workers"]

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, *, base_delay: float = 0.1, max_delay: float = 30.0) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._queue: deque[K] = deque()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._waiting: dict[K, list[asyncio.Future[None]]] = {}  # for the next processing
        self._inflight: dict[K, list[asyncio.Future[None]]] = {}  # for the current one
        self._nonempty = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, key: K) -> None:
        """Queue ``key`` now (a no-op if it is queued; dirty if it is being processed)."""
        if self._closed:
            return
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.append(key)
        self._notify()

    def put_after(self, key: K, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds, unless something queues it sooner."""
        if self._closed or key in self._timers or key in self._queued:
            return
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def put_backoff(self, key: K) -> float:
        """Retry ``key`` later: base_delay * 2**failures (capped), with jitter; the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay: float = min(self.base_delay * (2**failures), self.max_delay)
        delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security
        self.put_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Reset the backoff of ``key`` (it was processed successfully)."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    async def sync(self, key: K) -> None:
        """Put ``key`` and wait until it has been processed once since this call."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        self.put(key)
        try:
            await asyncio.shield(future)
        finally:
            if not future.done():
                with contextlib.suppress(ValueError):
                    self._waiting.get(key, []).remove(future)

    async def get(self) -> K:
        """The next key to process; the caller must call :meth:`done` with it."""
        while not self._queue:
            if self._closed:
                raise asyncio.CancelledError("the work queue is closed")
            self._nonempty.clear()
            await self._nonempty.wait()
        key = self._queue.popleft()
        self._queued.discard(key)
        self._processing.add(key)
        self._inflight[key] = self._waiting.pop(key, [])
        return key

    def done(self, key: K) -> None:
        """``key`` has been processed; hand it out again if it was put meanwhile."""
        self._processing.discard(key)
        for future in self._inflight.pop(key, []):
            if not future.done():
                future.set_result(None)
        if key in self._dirty:
            self._dirty.discard(key)
            self.put(key)
        elif self._waiting.get(key):
            self.put(key)

    def close(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for futures in (*self._waiting.values(), *self._inflight.values()):
            for future in futures:
                if not future.done():
                    future.cancel()
        self._notify()

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.put(key)

    def _notify(self) -> None:
        self._nonempty.set()


async def stop_workers(queue: WorkQueue[Any], workers: Sequence[asyncio.Task[None]]) -> None:
    """Close ``queue`` and end the reconciler tasks that read it, waiting for each."""
    queue.close()
    for task in workers:
        task.cancel()
    for task in workers:
        with contextlib.suppress(asyncio.CancelledError):
            await task
