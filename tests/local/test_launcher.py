"""The supervisor launcher: supervisors forked by a pre-started process keep every guarantee.

Real servers, launchers, supervisors and jobs.  The supervisor a launcher forks
is detached (its own session, nobody's child), inherits nothing of the server
(environment, descriptors), and outlives the server; a launcher that dies or
stops answering costs no job, and none runs twice.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbatch.backends.local import launcher as launcher_module
from kbatch.backends.local.backend import LocalBackend, LocalConfig
from kbatch.backends.local.launcher import reclaim_lock
from kbatch.models import JobSpec, JobState
from tests.support.polling import wait_for, wait_for_file
from tests.support.servers import KbatchServer

SECRET = "launcher-test-secret-value"


def _stat(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return {"ppid": int(fields[1]), "pgrp": int(fields[2]), "sid": int(fields[3])}


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


def _launchers(parent: int) -> list[int]:
    """Live launcher processes whose parent is ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            ours = b"--launcher" in cmdline and _stat(int(entry))["ppid"] == parent
            if ours and _alive(int(entry)):
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def _descriptors(pid: int) -> dict[int, str]:
    directory = f"/proc/{pid}/fd"
    targets = {}
    for fd in os.listdir(directory):
        try:
            targets[int(fd)] = os.readlink(f"{directory}/{fd}")
        except OSError:
            continue
    return targets


@pytest.fixture
def secret_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KbatchServer]:
    """A server with a secret in its environment, as a hub service has its token."""
    state = tmp_path_factory.mktemp("kb", numbered=True) / "s"
    config = state.parent / "kbatch.toml"
    config.write_text("[local]\nkill_grace = 1\ntick = 0.5\n")
    srv = KbatchServer(
        state,
        args=["--cpus", "2", "--config", str(config)],
        extra_env={"KBATCH_TEST_SECRET": SECRET},
    )
    srv.start()
    yield srv
    srv.stop()


def _submit(server: KbatchServer, workdir: Path, body: str) -> str:
    script = workdir / "job.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    result = server.cli("submit", "--parsable", str(script), cwd=workdir)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_launched_supervisor_is_detached_and_inherits_nothing(
    secret_server: KbatchServer, workdir: Path
) -> None:
    server = secret_server
    assert server.proc is not None
    (launcher,) = wait_for(lambda: _launchers(server.proc.pid), what="the launcher")
    assert SECRET.encode() not in Path(f"/proc/{launcher}/environ").read_bytes()

    job_id = _submit(server, workdir, "echo $$ > pid; exec sleep 30")
    job_pid = int(wait_for_file(workdir / "pid"))
    supervisor = _stat(job_pid)["ppid"]
    info = _stat(supervisor)
    # Its own session, and never the server's child (the launcher's, which only reaps it).
    assert info["sid"] not in (_stat(server.proc.pid)["sid"], _stat(launcher)["sid"])
    assert info["ppid"] != server.proc.pid
    # Nothing of the server's environment (the hub token would be there) ...
    environ = Path(f"/proc/{supervisor}/environ").read_bytes()
    assert SECRET.encode() not in environ
    assert b"KBATCH_STATE_DIR" not in environ
    # ... nor of its descriptors: its stdio, its job's files and its pidfd, no socket.
    descriptors = _descriptors(supervisor)
    jobdir = str(server.state_dir / "jobs" / job_id)
    for fd, target in descriptors.items():
        assert fd <= 2 or target.startswith((jobdir, "anon_inode:", "/memfd:kbatch-reason")), (
            descriptors
        )
        assert not target.startswith("socket:"), descriptors
    assert any(t == f"{jobdir}/lock" for t in descriptors.values()), descriptors
    server.cli("cancel", job_id)
    assert server.wait_state(job_id).state is JobState.CANCELLED


def test_the_launcher_goes_with_a_killed_server_and_the_job_does_not(
    server: KbatchServer, workdir: Path
) -> None:
    assert server.proc is not None
    (launcher,) = wait_for(lambda: _launchers(server.proc.pid), what="the launcher")
    go = workdir / "go"
    job_id = _submit(server, workdir, "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done")
    job_pid = int(wait_for_file(workdir / "pid"))
    server.kill9()
    wait_for(lambda: not _alive(launcher), what="the launcher to exit with its server")
    assert _alive(job_pid)
    go.write_text("")
    wait_for(lambda: not _alive(job_pid), what="the job to end")
    server.start()
    job = server.wait_state(job_id)
    assert job.state is JobState.COMPLETED, job


def test_a_killed_launcher_costs_no_job_and_is_replaced(
    server: KbatchServer, workdir: Path
) -> None:
    assert server.proc is not None
    (first,) = wait_for(lambda: _launchers(server.proc.pid), what="the launcher")
    os.kill(first, signal.SIGKILL)
    # The next jobs start anyway: a new interpreter each until a new launcher runs.
    for i in range(3):
        job_id = _submit(server, workdir, f"echo {i} > out-{i}")
        assert server.wait_state(job_id).state is JobState.COMPLETED
        assert (workdir / f"out-{i}").read_text() == f"{i}\n"

    def replaced() -> list[int]:
        job_id = _submit(server, workdir, "true")
        assert server.wait_state(job_id).state is JobState.COMPLETED
        return [pid for pid in _launchers(server.proc.pid) if pid != first]

    wait_for(replaced, timeout=30, interval=0.5, what="a new launcher")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_silent_launcher_is_killed_and_the_job_runs_once(
    tmp_path_factory: pytest.TempPathFactory,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A launcher stopped mid-request: the server gives up on it and starts the job itself,
    having made sure the launcher had not (its copy of the job's lock is gone with it)."""
    monkeypatch.setattr(launcher_module, "REPLY_TIMEOUT", 0.5)
    state = tmp_path_factory.mktemp("kb", numbered=True) / "s"
    backend = LocalBackend(LocalConfig(state_dir=state, cpus=2, tick=0.2, kill_grace=1))
    await backend.start()
    try:
        assert backend._launcher is not None and backend._launcher.pid is not None
        stopped = backend._launcher.pid
        os.kill(stopped, signal.SIGSTOP)
        body = "echo ran >> runs; sleep 0.2"
        job = await backend.submit(
            "u", JobSpec(script=f"#!/bin/sh\n{body}\n", workdir=str(workdir)), idempotency_key=None
        )
        async with asyncio.timeout(30):
            while not (current := await backend.get(job.id)).state.is_terminal:
                await asyncio.sleep(0.05)
        assert current.state is JobState.COMPLETED, current
        assert (workdir / "runs").read_text() == "ran\n"  # once, not once per way of starting
        assert not _alive(stopped)
    finally:
        await backend.stop()


@pytest.mark.anyio
async def test_without_the_launcher_supervisors_are_started_one_by_one(
    tmp_path_factory: pytest.TempPathFactory, workdir: Path
) -> None:
    state = tmp_path_factory.mktemp("kb", numbered=True) / "s"
    backend = LocalBackend(LocalConfig(state_dir=state, cpus=2, tick=0.2, launcher=False))
    await backend.start()
    try:
        assert backend._launcher is None
        job = await backend.submit(
            "u", JobSpec(script="#!/bin/sh\necho hi\n", workdir=str(workdir)), idempotency_key=None
        )
        async with asyncio.timeout(30):
            while not (current := await backend.get(job.id)).state.is_terminal:
                await asyncio.sleep(0.05)
        assert current.state is JobState.COMPLETED, current
    finally:
        await backend.stop()


def test_reclaiming_the_lock_finds_a_supervisor_that_holds_a_copy(tmp_path: Path) -> None:
    """The server's probe after a launcher failed: a forked holder of the lock counts."""
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    read, write = os.pipe()
    holder = os.fork()
    if holder == 0:  # a "supervisor": keeps its inherited copy until told to go
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        assert not reclaim_lock(lock, fd)  # the holder has it: a supervisor runs
    finally:
        os.close(write)
        os.waitpid(holder, 0)
    assert reclaim_lock(lock, fd)  # nobody has it now: fd is locked again, ours
    probe = os.open(lock, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)
    os.close(fd)
