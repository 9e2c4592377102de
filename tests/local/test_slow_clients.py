"""Slow and idle clients cannot starve a real server (issue 10, item 7).

Connections that never finish their headers used to be held forever; with the
default file limit, 1,100 of them stopped the server answering and filled its
log with a traceback per failed accept.  Here a server with a 2 s header
timeout is sent a few hundred stalled connections over loopback.
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.polling import wait_for
from tests.support.servers import KbatchServer

STALLED = 300
PARTIAL = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: "


def start(tmp_path_factory: pytest.TempPathFactory, **top: object) -> KbatchServer:
    state = tmp_path_factory.mktemp("kb") / "s"
    config = state.parent / "kbatch.toml"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in top.items()))
    srv = KbatchServer(state, args=["--cpus", "1", "--config", str(config)], log_level=None)
    srv.start()
    return srv


@pytest.fixture
def lowered_file_limit() -> Iterator[None]:
    """Start the server with a 1024 soft file limit, as on a default Linux login."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024 and hard != resource.RLIM_INFINITY:
        pytest.skip("the hard file limit is already at most 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def slow_server(
    tmp_path_factory: pytest.TempPathFactory, lowered_file_limit: None
) -> Iterator[KbatchServer]:
    srv = start(tmp_path_factory, header_timeout=2, keepalive_timeout=2)
    yield srv
    srv.stop()


def address(server: KbatchServer) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def stall(server: KbatchServer, count: int, partial: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(address(server), timeout=10)
        if partial:
            sock.sendall(partial)
        socks.append(sock)
    return socks


def answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends before it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


def soft_file_limit(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.MULTILINE)
    assert match, limits
    return int(match[1])


def test_stalled_connections_are_closed_and_others_still_answered(
    slow_server: KbatchServer,
) -> None:
    assert slow_server.proc is not None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert soft_file_limit(slow_server.proc.pid) == hard  # raised from 1024 at start
    log_before = len(slow_server.log())
    opened = time.monotonic()
    socks = stall(slow_server, STALLED // 2, PARTIAL) + stall(slow_server, STALLED // 2, b"")
    try:
        # Meanwhile a normal request is answered at once.
        start = time.monotonic()
        with slow_server.client(retry_for=0, timeout=5) as client:
            assert client.whoami().name
        assert time.monotonic() - start < 2
        # Every stalled connection is answered 408 and closed after the header timeout.
        for sock in socks:
            data = answer(sock, timeout=15)
            assert data.startswith(b"HTTP/1.1 408"), data[:100]
        assert time.monotonic() - opened < 15
    finally:
        for sock in socks:
            sock.close()

    def summarized() -> int:
        lines = re.findall(r"(\d+) slower than the header timeout", slow_server.log())
        return sum(int(n) for n in lines)

    wait_for(lambda: summarized() >= STALLED, timeout=25, what="the summary line")
    grown = slow_server.log()[log_before:]
    assert "Traceback" not in grown
    assert len(grown) < 5000, grown[:2000]


def test_an_idle_keep_alive_connection_is_closed(slow_server: KbatchServer) -> None:
    (sock,) = stall(slow_server, 1, b"")
    with sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.monotonic()
        data = answer(sock, timeout=15)  # the answer, then the close after the idle time
        assert b" 200 " in data.split(b"\r\n")[0]
        assert time.monotonic() - start < 10


def test_a_slow_second_request_on_a_kept_connection_is_timed_out(
    slow_server: KbatchServer,
) -> None:
    (sock,) = stall(slow_server, 1, b"")
    with sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(PARTIAL)  # and never the rest
        assert b"HTTP/1.1 408" in answer(sock, timeout=15)  # after the first body


def test_connections_over_the_limit_are_answered_503_at_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = start(tmp_path_factory, header_timeout=30, max_connections=40)
    try:
        socks = stall(srv, 60, PARTIAL)
        try:
            busy = 0
            for sock in socks[40:]:
                data = answer(sock, timeout=5)
                busy += data.startswith(b"HTTP/1.1 503")
            assert busy == 20
        finally:
            for sock in socks:
                sock.close()
        # Once they are gone, the server answers again.
        assert wait_for(srv.answers, timeout=10, what="the server to answer")
        wait_for(lambda: "20 over the connection limit" in srv.log(), what="the summary")
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
