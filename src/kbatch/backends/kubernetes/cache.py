"""A shared watch cache (a reflector): list once, then follow one watch.

``kqueue`` for thousands of jobs is answered from memory, not by a request
per job; the cache re-lists when its watch is too old (410 Gone) or breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from lightkube import ALL_NS, ApiError, AsyncClient

__all__ = ["WatchCache"]

log = logging.getLogger("kbatch.kubernetes.cache")


class WatchCache:
    """Objects of one kind matching a label selector, keyed by ``(namespace, name)``.

    ``on_change(key, old, new)`` is called for every change (``new`` is None on
    deletion) after the first full list, and for every object of each re-list.
    """

    def __init__(
        self,
        client: AsyncClient,
        resource: Any,
        *,
        labels: dict[str, Any],
        namespace: str = ALL_NS,
        on_change: Callable[[tuple[str, str], dict[str, Any] | None, dict[str, Any] | None], None]
        | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.labels = labels
        self.namespace = namespace
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.ready = asyncio.Event()
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch-{self.resource.__name__}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _apply(self, key: tuple[str, str], new: dict[str, Any] | None) -> None:
        old = self.objects.pop(key, None) if new is None else self.objects.get(key)
        if new is not None:
            self.objects[key] = new
        if self._on_change is not None:
            self._on_change(key, old, new)

    @staticmethod
    def _key(obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj["metadata"]
        return str(meta.get("namespace", "")), str(meta["name"])

    async def _relist(self) -> str:
        listing = self.client.list(self.resource, namespace=self.namespace, labels=self.labels)
        fresh = {}
        async for item in listing:
            obj = item.to_dict()
            fresh[self._key(obj)] = obj
        for key in set(self.objects) - set(fresh):
            self._apply(key, None)
        for key, obj in fresh.items():
            self._apply(key, obj)
        self.ready.set()
        return str(listing.resourceVersion)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                version = await self._relist()
                delay = 0.1
                async for op, item in self.client.watch(
                    self.resource,
                    namespace=self.namespace,
                    labels=self.labels,
                    resource_version=version,
                ):
                    obj = item.to_dict()
                    self._apply(self._key(obj), None if op == "DELETED" else obj)
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status.code != 410:
                    log.warning(
                        "watching %s failed: %s", self.resource.__name__, exc.status.message
                    )
            except Exception as exc:  # noqa: BLE001 - the cache must outlive any error
                log.warning(
                    "watching %s failed, re-listing in %.1fs: %s",
                    self.resource.__name__,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
