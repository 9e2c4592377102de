"""kqueue warns (on stderr) when the server lists jobs from data it could not refresh."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kbatch.cli.main import kqueue_main


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    body: bytes = request.param

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("server", [b'{"jobs": [], "stale_seconds": 42.0}'], indirect=True)
def test_stale_list_is_a_warning_on_stderr(
    server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KBATCH_URL", server)
    monkeypatch.setenv("KBATCH_TOKEN", "t")
    assert kqueue_main([]) == 0
    out, err = capsys.readouterr()
    assert "may have changed" in err and "42 s ago" in err
    assert "warning" not in out


@pytest.mark.parametrize("server", [b'{"jobs": []}'], indirect=True)
def test_fresh_list_has_no_warning(
    server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KBATCH_URL", server)
    monkeypatch.setenv("KBATCH_TOKEN", "t")
    assert kqueue_main([]) == 0
    assert capsys.readouterr().err == ""
