"""The HTTP API itself: error shape, authentication on every route, idempotent submit."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from kbatch.client import Client
from kbatch.models import JobSpec
from tests.support.polling import wait_for
from tests.support.servers import KbatchServer


def request(
    server: KbatchServer,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body, all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def assert_error_shape(body: bytes) -> dict[str, str]:
    data = json.loads(body)
    assert set(data) == {"error"}
    assert {"code", "message"} <= set(data["error"])
    return data["error"]


ROUTES = [
    ("GET", "/api/v1/whoami"),
    ("GET", "/api/v1/jobs"),
    ("POST", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs/1"),
    ("POST", "/api/v1/jobs/1/cancel"),
    ("POST", "/api/v1/jobs/1/hold"),
    ("POST", "/api/v1/jobs/1/release"),
    ("GET", "/api/v1/jobs/1/logs"),
    ("GET", "/api/v1/events"),
]


def test_no_unauthenticated_route_touches_jobs(server: KbatchServer, workdir: Path) -> None:
    with server.client() as client:
        client.submit(JobSpec(script="#!/bin/sh\nsleep 5\n", workdir=str(workdir)))
    for method, path in ROUTES:
        for token in (None, "wrong"):
            status, body = request(server, method, path, b"{}" if method == "POST" else None, token)
            assert status == 401, (method, path, status)
            assert_error_shape(body)
    assert server.client().get("1").state.value in (
        "RUNNING",
        "PENDING",
    )  # the cancel did not happen


def test_public_routes_hold_no_job_data(server: KbatchServer) -> None:
    status, body = request(server, "GET", "/api/v1/health")
    assert status == 200
    assert set(json.loads(body)) == {"status", "version", "backend", "detail", "stale_seconds"}
    status, body = request(server, "GET", "/api/v1/openapi.json")
    document = json.loads(body)
    assert status == 200 and document["openapi"].startswith("3.")
    assert "/api/v1/jobs" in document["paths"]
    assert {"JobSpec", "Job", "ErrorBody"} <= set(document["components"]["schemas"])


def test_error_shape_for_every_kind_of_error(server: KbatchServer, workdir: Path) -> None:
    token = server.token
    cases = [
        ("POST", "/api/v1/jobs", b"{not json", 400, "malformed_json"),
        (
            "POST",
            "/api/v1/jobs",
            b'{"spec": {"script": "#!/bin/sh\\n", "cpus": 0}}',
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            b'{"spec": {"script": "x", "surprise": 1}}',
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            json.dumps({"spec": {"script": "#!/bin/sh\n", "workdir": "/nope"}}).encode(),
            422,
            "invalid_spec",
        ),
        ("GET", "/api/v1/jobs/424242", None, 404, "not_found"),
        ("GET", "/api/v1/nothing-here", None, 404, "http_error"),
        ("DELETE", "/api/v1/jobs", None, 405, "http_error"),
        ("GET", "/api/v1/jobs?state=BOGUS", None, 422, "invalid_state"),
        ("GET", "/api/v1/jobs?all_users=true", None, 200, None),
    ]
    for method, path, body, status, code in cases:
        got, data = request(server, method, path, body, token, {"Content-Type": "application/json"})
        assert got == status, (path, got, data)
        if code:
            assert assert_error_shape(data)["code"] == code


def test_too_large_upload_is_refused(server: KbatchServer) -> None:
    body = b'{"spec": {"script": "' + b"x" * (5 * 1024 * 1024) + b'"}}'
    status, data = request(server, "POST", "/api/v1/jobs", body, server.token)
    assert status == 413
    assert assert_error_shape(data)["code"] == "too_large"
    assert server.client().list(include_finished=True) == []


def test_retried_submission_runs_once(server: KbatchServer, workdir: Path) -> None:
    spec = JobSpec(script="#!/bin/sh\necho once >> count\n", workdir=str(workdir))
    with server.client() as client:
        first = client.submit(spec, idempotency_key="retry-key-1")
        again = client.submit(spec, idempotency_key="retry-key-1")
        other = client.submit(spec, idempotency_key="retry-key-2")
    assert first.id == again.id != other.id
    server.wait_state(first.id)
    server.wait_state(other.id)
    assert (workdir / "count").read_text() == "once\nonce\n"


def test_client_retries_across_a_server_restart(server: KbatchServer, workdir: Path) -> None:
    spec = JobSpec(script="#!/bin/sh\ntrue\n", workdir=str(workdir))
    client = Client(server.url, server.token, retry_for=30)
    server.stop()
    import threading

    restarted = threading.Thread(target=server.start)
    restarted.start()
    try:
        job = client.submit(spec)  # waits through the restart: the server keeps its port
    finally:
        restarted.join()
    assert job.id == "1"


def test_token_file_is_private(server: KbatchServer) -> None:
    for name in ("token", "tokens.json", "jobs.sqlite", "server.json"):
        assert (server.state_dir / name).stat().st_mode & 0o077 == 0, name
    assert server.token not in server.log()
    assert server.token not in (server.state_dir / "tokens.json").read_text()


def test_server_log_never_holds_a_token(server: KbatchServer) -> None:
    request(server, "GET", "/api/v1/jobs?token=leaky-secret", None, "also-secret")
    # The access line is written once the response has gone out, so it may follow it.
    wait_for(lambda: "GET /api/v1/jobs 401" in server.log(), timeout=10, what="the access line")
    log = server.log()
    assert "leaky-secret" not in log and "also-secret" not in log


def test_spec_round_trips() -> None:
    spec = JobSpec(script="#!/bin/sh\n", cpus=2, memory=10, environment={"A": "b"})
    assert msgspec.json.decode(msgspec.json.encode(spec), type=JobSpec) == spec
