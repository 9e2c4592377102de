"""Bounds on what a client's connection may hold: time before its headers, and a count.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not
the time a client takes to send a request's headers: a connection that sends
half a request line and stops is held forever.  1,100 of them exhausted the
default file limit; the event loop then logged a traceback for every failed
``accept`` (19 MB in ten seconds) and no one else was answered.

:class:`BoundedH11Protocol` is uvicorn's h11 protocol with

- a header timer: from the connection's start, or the first byte of a later
  request on it, until that request's headers are complete; when it fires the
  client is answered 408 and the connection closed;
- a connection count: past ``max_connections``, a new connection is answered
  503 at once and closed, so it holds its file descriptor for an instant.

What it drops is counted and logged as one summary line at most every
:data:`SUMMARY_EVERY` seconds, never a line (or a traceback) per connection;
:func:`quiet_exception_handler` does the same for the event loop's ``accept``
failures.  :func:`raise_file_limit` gives the server the file descriptors the
system allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "BoundedH11Protocol",
    "ConnectionLimits",
    "bounded_protocol",
    "fast_http_available",
    "quiet_exception_handler",
    "raise_file_limit",
]

log = logging.getLogger("kbatch.server")
SUMMARY_EVERY = 10.0  # seconds between two summary lines
BURST = 1.0  # seconds from the first dropped connection to the line that tells of it
RESERVED_FDS = 256  # for the store, supervisors' pipes, logs: never given to connections


def _response(status: str, code: str, message: str) -> bytes:
    """A whole response in the API's error shape, written before the connection is closed."""
    body = f'{{"error": {{"code": "{code}", "message": "{message}"}}}}'.encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


_BUSY = _response(
    "503 Service Unavailable", "too_many_connections", "the server has too many connections; retry"
)
_TOO_SLOW = _response(
    "408 Request Timeout", "header_timeout", "the request headers took too long to arrive"
)


@dataclass
class ConnectionLimits:
    header_timeout: float = 10.0  # seconds to send a request's headers
    max_connections: int = 1000
    _counts: Counter[str] = field(default_factory=Counter)
    _last_summary: float = 0.0
    _flush: asyncio.TimerHandle | None = None

    def count(self, what: str, loop: asyncio.AbstractEventLoop) -> None:
        """Note one dropped connection (or failed accept); summarize now and then."""
        self._counts[what] += 1
        if self._flush is None:
            # A burst is told in one line a second after it starts; what follows, in
            # the next line, at most one every SUMMARY_EVERY seconds.
            since = time.monotonic() - self._last_summary
            delay = max(BURST, SUMMARY_EVERY - since)
            self._flush = loop.call_later(delay, self.summarize)

    def summarize(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._last_summary = time.monotonic()
        if not self._counts:
            return
        parts = [f"{n} {what}" for what, n in sorted(self._counts.items())]
        self._counts.clear()
        log.warning(
            "connections dropped: %s (header timeout %g s, limit %d)",
            ", ".join(parts),
            self.header_timeout,
            self.max_connections,
        )


class _OneWrite:
    """A connection's transport whose writes of one turn of the event loop go out as one.

    uvicorn writes a response's headers, then its body: two system calls, two TCP
    segments, and on loopback the receiver's side of each is run by the sender.  Held
    until the loop's next turn (the body follows at once, in the same step of the
    handler), they go as one; a streamed response's later chunks each go at the turn
    after they are written.  Everything else is the transport's own.
    """

    def __init__(self, transport: asyncio.BaseTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._loop = loop
        self._parts: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._parts:
            self._loop.call_soon(self._flush)
        self._parts.append(bytes(data))

    def _flush(self) -> None:
        if not self._parts:
            return
        data = b"".join(self._parts)
        self._parts.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._parts.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Bounded:
    """The header timer and connection limit (see the module), over either of uvicorn's
    HTTP protocols: both keep ``connections``, ``cycle``, ``loop`` and ``transport``,
    and make a new ``cycle`` when a request's headers are complete."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _refused = False
    _header_timer: asyncio.TimerHandle | None = None
    connections: set[Any]
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            # uvloop's transports have asyncio.Transport's methods, not its class.
            self.transport = cast(asyncio.Transport, transport)
            with contextlib.suppress(OSError):
                self.transport.write(_BUSY)
            transport.close()
            self.limits.count("over the connection limit", self.loop)
            return
        super().connection_made(_OneWrite(transport, self.loop))  # type: ignore[misc]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            return
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        between_requests = self.cycle is None or self.cycle.response_complete
        if between_requests and self._header_timer is None:
            self._arm()  # a new request starts: its headers are on the clock
        before = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a request's headers are complete
            self._disarm()

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served (its headers came in a pipelined batch)
        if not self.transport.is_closing():
            with contextlib.suppress(OSError):
                self.transport.write(_TOO_SLOW)
            self.transport.close()
        self.limits.count("slower than the header timeout", self.loop)


class BoundedH11Protocol(_Bounded, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with a header timer and a connection limit."""


def fast_http_available() -> bool:
    """Whether httptools (uvicorn's C HTTP parser) and uvloop are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("httptools", "uvloop"))


def bounded_protocol(limits: ConnectionLimits, *, fast: bool = False) -> type[asyncio.Protocol]:
    """A protocol class (uvicorn's ``http=``) bound to ``limits``: on httptools with
    ``fast`` (see :func:`fast_http_available`), else on h11."""
    base: type[asyncio.Protocol] = BoundedH11Protocol
    if fast:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = type("BoundedHttpToolsProtocol", (_Bounded, HttpToolsProtocol), {})
    return type(base.__name__, (base,), {"limits": limits})


def quiet_exception_handler(
    limits: ConnectionLimits,
) -> Any:  # the loop's handler type is private to asyncio's stubs
    """An event-loop exception handler that counts failed ``accept`` calls instead of
    logging a traceback for each (the loop retries them itself a second later)."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            limits.count("not accepted: out of file descriptors", loop)
            return
        loop.default_exception_handler(context)

    return handle


def raise_file_limit(max_connections: int) -> int:
    """Raise the soft limit on open files to the hard limit; the connections that fit.

    The result is ``max_connections`` or less, so that connections never take the
    descriptors the server needs for everything else.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(16, min(max_connections, soft - RESERVED_FDS))
