"""The client retries what a proxy says while the server restarts, not the server's own answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kbatch.client import Client
from kbatch.errors import ServiceUnavailable


class Server:
    def __init__(self, body: bytes) -> None:
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def serve() -> Iterator[type[Server]]:
    started: list[Server] = []

    def make(body: bytes) -> Server:
        server = Server(body)
        started.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in started:
        server.httpd.shutdown()


def test_server_answer_is_not_retried(serve) -> None:
    server = serve(
        b'{"error": {"code": "hub_unavailable", "message": "JupyterHub at http://hub is unreachable"}}'
    )
    with (
        Client(server.url, "t", retry_for=30) as client,
        pytest.raises(ServiceUnavailable, match="hub is unreachable"),
    ):
        client.get("1")
    assert server.hits == 1


def test_proxy_503_is_retried(serve) -> None:
    server = serve(b"Service Unavailable")
    with (
        Client(server.url, "t", retry_for=0.5) as client,
        pytest.raises(ServiceUnavailable, match="HTTP 503"),
    ):
        client.get("1")
    assert server.hits > 1
