"""A shared watch cache (a reflector): list once, then follow one watch.

``kqueue`` for thousands of jobs is answered from memory, not by a request
per job; the cache re-lists when its watch is too old (410 Gone) or breaks.

It survives what a long-running server meets: an object it cannot read is
skipped (and logged), not a reason to give up a whole listing; a failing API
server or missing RBAC is retried with exponential backoff and jitter, and
logged once per kind of failure with a count rather than on every attempt;
and it says how stale its data may be (:meth:`WatchCache.stale_seconds`), so
the server's health check can tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from lightkube import ALL_NS, ApiError, AsyncClient

__all__ = ["WatchCache"]

log = logging.getLogger("kbatch.kubernetes.cache")

Key = tuple[str, str]
TOMBSTONES = 10_000  # deleted objects remembered, so late replies do not resurrect them
OnChange = Callable[[Key, dict[str, Any] | None, dict[str, Any] | None], None]
Slim = Callable[[dict[str, Any]], dict[str, Any]]
LIST_CHUNK = 500  # objects per page of a (re-)list: its peak memory is a page's, not all


def _resource_version(obj: dict[str, Any]) -> int | None:
    value = obj.get("metadata", {}).get("resourceVersion")
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class WatchCache:
    """Objects of one kind matching a label selector, keyed by ``(namespace, name)``.

    ``on_change(key, old, new)`` is called for every change (``new`` is None on
    deletion) after the first full list, and for every object of each re-list.
    An exception in ``on_change`` is logged and does not stop the cache.

    ``slim`` turns each object into what is kept of it (:mod:`.slim`): the
    cache holds, and ``on_change`` is given, only that.  It must keep
    ``metadata.name``, ``metadata.namespace`` and ``metadata.resourceVersion``.
    """

    def __init__(
        self,
        client: AsyncClient,
        resource: Any,
        *,
        labels: dict[str, Any],
        namespace: str = ALL_NS,
        on_change: OnChange | None = None,
        slim: Slim | None = None,
        base_delay: float = 0.2,
        max_delay: float = 30.0,
    ) -> None:
        self.client = client
        self.resource = resource
        self.labels = labels
        self.namespace = namespace
        self.objects: dict[Key, dict[str, Any]] = {}
        self.ready = asyncio.Event()
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.failures = 0  # consecutive failed attempts to list or watch
        self.last_error: str | None = None
        self.last_status: int | None = None  # the HTTP status of the last failure, if any
        self.synced_at: float | None = None  # monotonic: the last successful list
        self._broken_since: float | None = None  # monotonic: when the watch last broke
        self._deleted: dict[Key, int] = {}  # key -> resourceVersion when deleted
        self._on_change = on_change
        self._slim = slim
        self._task: asyncio.Task[None] | None = None

    @property
    def kind(self) -> str:
        return str(self.resource.__name__)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch-{self.kind}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def stale_seconds(self) -> float | None:
        """For how long the cache has not been following changes; None while it is."""
        if self._broken_since is None:
            return None
        return time.monotonic() - self._broken_since

    def observe(self, obj: dict[str, Any]) -> None:
        """Take an object the server just returned (e.g. from a patch) before the
        watch delivers it, unless the cache already holds a newer version."""
        if self._slim is not None:
            obj = self._slim(obj)
        key = self._key(obj)
        current = self.objects.get(key)
        gone = self._deleted.get(key)
        if current is None and gone is not None:
            version = _resource_version(obj)
            if version is None or version <= gone:
                return  # a reply that arrived after the watch said it was deleted
        if current is not None:
            new, old = _resource_version(obj), _resource_version(current)
            if new is None or old is None or new <= old:
                return
        self._apply(key, obj)

    def _tombstone(self, key: Key, obj: dict[str, Any]) -> None:
        """Remember the version a deleted object had, so that a late reply (a patch's)
        cannot bring it back (the newest TOMBSTONES are kept)."""
        version = _resource_version(obj)
        if version is None:
            return
        self._deleted.pop(key, None)
        self._deleted[key] = version
        while len(self._deleted) > TOMBSTONES:
            del self._deleted[next(iter(self._deleted))]

    def _apply(self, key: Key, new: dict[str, Any] | None) -> None:
        old = self.objects.pop(key, None) if new is None else self.objects.get(key)
        if new is not None:
            self.objects[key] = new
        if self._on_change is not None:
            try:
                self._on_change(key, old, new)
            except Exception:
                log.exception("%s %s/%s: cannot process it; skipped", self.kind, *key)

    @staticmethod
    def _key(obj: dict[str, Any]) -> Key:
        meta = obj["metadata"]
        return str(meta.get("namespace", "")), str(meta["name"])

    def _decode(self, item: Any) -> tuple[Key, dict[str, Any]] | None:
        """An item as a dict with its key, or None (logged) if it cannot be read."""
        try:
            obj = item.to_dict()
            if self._slim is not None:
                obj = self._slim(obj)
            return self._key(obj), obj
        except Exception:
            log.exception("%s: cannot read an object; skipped", self.kind)
            return None

    async def _relist(self) -> str:
        listing = self.client.list(
            self.resource, namespace=self.namespace, labels=self.labels, chunk_size=LIST_CHUNK
        )
        fresh: dict[Key, dict[str, Any]] = {}
        async for item in listing:
            decoded = self._decode(item)
            if decoded is not None:
                fresh[decoded[0]] = decoded[1]
        for key in set(self.objects) - set(fresh):
            self._apply(key, None)
        for key, obj in fresh.items():
            self._apply(key, obj)
        self.synced_at = time.monotonic()
        self._recovered()
        self.ready.set()
        return str(listing.resourceVersion)

    def _recovered(self) -> None:
        if self.failures:
            log.warning(
                "watching %s works again after %d failed attempt(s)", self.kind, self.failures
            )
        self.failures = 0
        self.last_error = None
        self.last_status = None
        self._broken_since = None

    def _failed(self, error: str) -> float:
        """Record a failed attempt; log it when it is new (or every power of ten); the delay."""
        self.failures += 1
        if self._broken_since is None:
            self._broken_since = time.monotonic()
        repeated = error == self.last_error
        count = self.failures
        if not repeated or (count & (count - 1) == 0 and count >= 8):  # new, or 8, 16, 32...
            log.warning(
                "watching %s failed (%d time(s) in a row), retrying with backoff: %s",
                self.kind,
                count,
                error,
            )
        self.last_error = error
        delay = min(self.base_delay * float(2 ** min(count - 1, 20)), self.max_delay)
        return delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security

    async def _run(self) -> None:
        while True:
            try:
                version = await self._relist()
                async for op, item in self.client.watch(
                    self.resource,
                    namespace=self.namespace,
                    labels=self.labels,
                    resource_version=version,
                ):
                    decoded = self._decode(item)
                    if decoded is not None:
                        key, obj = decoded
                        if op == "DELETED":
                            self._tombstone(key, obj)
                        self._apply(key, None if op == "DELETED" else obj)
                # the server ended the watch (its timeout): list and watch again
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status.code == 410:  # too old a version: re-list at once
                    continue
                self.last_status = exc.status.code
                await asyncio.sleep(self._failed(f"{exc.status.code}: {exc.status.message}"))
            except Exception as exc:  # noqa: BLE001 - the cache must outlive any error
                self.last_status = None
                await asyncio.sleep(self._failed(f"{type(exc).__name__}: {exc}"))
