"""A full disk under the server's state directory (a small tmpfs; CI runs as root).

A job that ends while its result cannot be written is not reported as a lost
supervisor (NODE_FAIL): it shows as running until the disk has room, then as
what really happened (issue 10, item 9).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kbatch.backends.local.backend import LocalBackend, LocalConfig
from kbatch.errors import ApiError
from kbatch.models import JobSpec, JobState

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path_factory.mktemp("df")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of the file system that holds ``directory``."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (65536, 1):  # then the last few bytes
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)
    return filler


@pytest.fixture
async def backend(small_disk: Path) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(LocalConfig(state_dir=small_disk / "s", cpus=2, tick=0.2, kill_grace=1))
    await local.start()
    yield local
    await local.stop()


async def state(backend: LocalBackend, job_id: str) -> JobState:
    return (await backend.get(job_id)).state


async def test_a_job_that_ends_while_the_disk_is_full_ends_in_its_real_state(
    backend: LocalBackend, small_disk: Path, tmp_path: Path
) -> None:
    spec = JobSpec(script="#!/bin/sh\nsleep 1\nexit 7\n", workdir=str(tmp_path))
    job = await backend.submit("u", spec, idempotency_key=None)
    started = backend.jobs_dir / job.id / "started.json"
    async with asyncio.timeout(20):
        # RUNNING is recorded just before the supervisor starts; the job has started (and
        # so may end while the disk is full) once the supervisor has written started.json.
        while await state(backend, job.id) is not JobState.RUNNING or not started.exists():
            await asyncio.sleep(0.05)
    filler = fill(small_disk)
    await asyncio.sleep(3)  # the job has ended; its result cannot be written
    assert await state(backend, job.id) is JobState.RUNNING  # not NODE_FAIL
    filler.unlink()
    async with asyncio.timeout(30):
        while not (done := await backend.get(job.id)).state.is_terminal:
            await asyncio.sleep(0.1)
    assert (done.state, done.exit_code) == (JobState.FAILED, 7), done.reason


async def test_a_submission_to_a_full_disk_is_refused_and_the_server_recovers(
    backend: LocalBackend, small_disk: Path, tmp_path: Path
) -> None:
    filler = fill(small_disk)
    spec = JobSpec(script="#!/bin/sh\ntrue\n", workdir=str(tmp_path))
    with pytest.raises(ApiError, match="disk is full") as refused:
        for _ in range(200):  # SQLite may fit a row or two in pages it already has
            await backend.submit("u", spec, idempotency_key=None)
    assert (refused.value.status, refused.value.code) == (507, "insufficient_storage")
    filler.unlink()
    job = await backend.submit("u", spec, idempotency_key=None)
    async with asyncio.timeout(30):
        while not (done := await backend.get(job.id)).state.is_terminal:
            await asyncio.sleep(0.1)
    assert done.state is JobState.COMPLETED
