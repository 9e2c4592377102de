"""Hold, release, cancelled_by, events and odd ids on the real local backend."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from kbatch.errors import Conflict
from kbatch.models import JobSpec, JobState
from tests.support.servers import KbatchServer


def test_odd_ids_are_404_on_the_local_backend(server: KbatchServer) -> None:
    parts = urlsplit(server.url)
    for job_id in ("²", "1\n", "1" * 25, "9" * 30, "", "-1", "1_99999999999"):
        for method, action in (("GET", ""), ("POST", "/cancel"), ("POST", "/hold")):
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
            conn.request(
                method,
                f"/api/v1/jobs/{quote(job_id, safe='')}{action}",
                headers={"Authorization": f"Bearer {server.token}", "Content-Length": "0"},
            )
            response = conn.getresponse()
            body = json.loads(response.read())
            conn.close()
            assert response.status == 404, (job_id, action, body)
            assert body["error"]["code"] == "not_found"
    assert "Traceback" not in server.log()


def test_hold_release_on_the_local_backend(server: KbatchServer, workdir: Path) -> None:
    with server.client() as client:
        held = client.submit(
            JobSpec(script="#!/bin/sh\necho ran > held.txt\n", workdir=str(workdir), hold=True)
        )
        assert (held.state, held.reason) == (JobState.PENDING, "JobHeldUser")
        running = client.submit(JobSpec(script="#!/bin/sh\nsleep 30\n", workdir=str(workdir)))
        server.wait_state(running.id, JobState.RUNNING)
        with pytest.raises(Conflict):
            client.hold(running.id)
        assert client.get(held.id).reason == "JobHeldUser"
        assert not (workdir / "held.txt").exists()
        client.release(held.id)
        assert server.wait_state(held.id).state is JobState.COMPLETED
        assert (workdir / "held.txt").read_text() == "ran\n"
        cancelled = client.cancel(running.id)
        assert cancelled.cancelled_by == client.whoami().name


def test_cli_submit_hold_then_release_on_the_local_backend(
    server: KbatchServer, workdir: Path
) -> None:
    result = server.cli("submit", "--parsable", "-H", "--wrap", "echo hi", cwd=workdir)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert server.cli("show", job_id).stdout.count("JobHeldUser") == 1
    assert server.cli("release", job_id).stdout == f"job {job_id} released\n"
    assert server.wait_state(job_id).state is JobState.COMPLETED
