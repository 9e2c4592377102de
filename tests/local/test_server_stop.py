"""``kbatch server stop`` and ``status`` with real server processes (issue 10, item 10).

``server.json`` used to stay behind after a stop (uvicorn re-raises SIGTERM, so
the cleanup never ran); ``status`` then said running, and a second ``stop``
signalled whatever process had reused the pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbatch.server.main import process_start_time
from tests.support.polling import wait_for
from tests.support.servers import KbatchServer


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process of ours, the kind that reuses a dead server's pid."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def fake_server_file(state_dir: Path, pid: int, started: int | None) -> None:
    info = {"url": "http://127.0.0.1:9", "pid": pid, "started": started, "backend": "local"}
    (state_dir / "server.json").write_text(json.dumps(info) + "\n")


def test_stop_removes_server_json_and_status_then_says_not_running(server: KbatchServer) -> None:
    assert server.proc is not None
    proc = server.proc
    status = server.cli("server", "status")
    assert status.returncode == 0 and "running" in status.stdout
    stop = server.cli("server", "stop")
    assert stop.returncode == 0, stop.stderr
    assert f"pid {proc.pid}" in stop.stdout
    assert proc.wait(timeout=15) == 0  # a clean exit, not death by the re-raised SIGTERM
    assert not (server.state_dir / "server.json").exists()
    status = server.cli("server", "status")
    assert status.returncode == 3 and "no server running" in status.stdout
    server.proc = None


def test_background_server_stops_cleanly(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = KbatchServer(tmp_path_factory.mktemp("kb") / "s")
    srv.state_dir.mkdir()
    started = srv.cli("server", "--background", "--cpus", "1")
    assert started.returncode == 0, started.stderr
    pid = json.loads((srv.state_dir / "server.json").read_text())["pid"]
    assert srv.cli("server", "stop").returncode == 0
    assert not (srv.state_dir / "server.json").exists()
    wait_for(lambda: process_start_time(pid) is None, what="the server to exit")
    # A new server takes the port of the last one (clients may still hold its URL).
    again = srv.cli("server", "--background", "--cpus", "1")
    assert again.returncode == 0, again.stderr
    assert srv.cli("server", "stop").returncode == 0


def test_a_killed_servers_file_names_a_pid_now_used_by_another_process(
    server: KbatchServer, bystander: subprocess.Popen[bytes]
) -> None:
    server.kill9()  # server.json stays behind, as after a crash
    assert (server.state_dir / "server.json").exists()
    # The pid is reused by an unrelated process (with its own start time, even).
    fake_server_file(server.state_dir, bystander.pid, process_start_time(bystander.pid))
    status = server.cli("server", "status")
    assert status.returncode == 3, status.stdout
    stop = server.cli("server", "stop")
    assert stop.returncode == 0 and "no server was running" in stop.stdout
    assert bystander.poll() is None  # not signalled
    assert not (server.state_dir / "server.json").exists()  # the stale file is cleaned up


def test_a_pid_with_another_start_time_is_never_signalled(
    server: KbatchServer, bystander: subprocess.Popen[bytes]
) -> None:
    server.kill9()
    # Even with the lock held (by us, standing in for a server that is starting), a
    # pid whose start time is not the recorded one is not the server.
    fd = os.open(server.state_dir / "server.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        started = process_start_time(bystander.pid)
        assert started is not None
        fake_server_file(server.state_dir, bystander.pid, started - 1)
        assert server.cli("server", "status").returncode == 3
        stop = server.cli("server", "stop")
        assert stop.returncode == 0 and "no server was running" in stop.stdout
        assert bystander.poll() is None
    finally:
        os.close(fd)
