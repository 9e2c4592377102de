"""A SIGKILL in the middle of a burst of submissions loses and doubles nothing (issue 17).

Several client processes submit as fast as they can (no pause between
submissions, each with its own keep-alive connection), so the server is
killed while requests are being parsed, inserted, committed and answered.
Each client records every job it was acknowledged (its 201) and retries the
others with the same idempotency key across the restart, as the CLI does.
Afterwards every acknowledged job is in the store exactly once, each
submission made exactly one job (its name is unique), and a retried
submission was answered the job its first attempt had made.

The server has one CPU, taken by a job that sleeps, so the burst waits
behind it (reason ``Priority``, the path a burst takes) and nothing needs to
drain; ``test_crash_under_load.py`` checks that jobs then run exactly once.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbatch.models import JobSpec, JobState
from tests.support.polling import wait_for
from tests.support.servers import KbatchServer

CLIENTS = 4
PER_CLIENT = 400
KILLS = 2

CLIENT = """
import sys
from kbatch.client import Client
from kbatch.models import JobSpec

url, token, workdir, acked, tag, count = sys.argv[1:7]
script = '#!/bin/sh\\ntrue\\n'
with Client(url, token, retry_for=60, timeout=10) as client, open(acked, "a") as out:
    for n in range(int(count)):
        spec = JobSpec(script=script, workdir=workdir, name=f"{tag}-{n}")
        job = client.submit(spec)  # one idempotency key for every retry of this submission
        out.write(f"{job.id} {tag}-{n}\\n")
        out.flush()
"""


@pytest.fixture
def burst_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KbatchServer]:
    state = tmp_path_factory.mktemp("kb") / "s"
    config = state.parent / "kbatch.toml"
    config.write_text("[local]\ncpus = 1\nkill_grace = 1\n")
    server = KbatchServer(state, args=["--config", str(config)], log_level="info")
    yield server
    server.stop()


def _acked(paths: list[Path]) -> list[tuple[str, str]]:
    pairs = []
    for path in paths:
        text = path.read_text() if path.exists() else ""
        pairs += [(line.split()[0], line.split()[1]) for line in text.splitlines() if " " in line]
    return pairs


def test_sigkill_during_a_burst_keeps_every_acknowledged_job_once(
    burst_server: KbatchServer, workdir: Path
) -> None:
    server = burst_server
    server.start()
    with server.client() as client:
        holder = client.submit(
            JobSpec(script="#!/bin/sh\nsleep 600\n", workdir=str(workdir), name="holder")
        )
        server.wait_state(holder.id, JobState.RUNNING)
    url, token, count = server.url, server.token, str(PER_CLIENT)
    acked = [workdir.parent / f"acked-{i}" for i in range(CLIENTS)]
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, url, token, str(workdir), str(path), f"c{i}", count],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, path in enumerate(acked)
    ]
    total = CLIENTS * PER_CLIENT
    try:
        for kill in range(KILLS):
            # Kill once a share of the burst has been acknowledged: mid-burst, whatever
            # the machine's speed.
            wanted = total * (kill + 1) // (KILLS + 2)

            def enough(wanted: int = wanted) -> bool:
                return len(_acked(acked)) >= wanted

            wait_for(
                enough,
                timeout=120,
                interval=0.01,
                what=f"{wanted} acknowledged submissions",
            )
            server.kill9()
            server.start()
            assert server.url == url  # the same port: clients keep their URL
        for proc in clients:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    acknowledged = _acked(acked)
    assert len(acknowledged) == total  # every client finished, retrying through the kills
    ids = Counter(job_id for job_id, _ in acknowledged)
    assert all(n == 1 for n in ids.values()), "two submissions were answered the same job"
    with server.client(retry_for=30) as client:
        jobs = client.list(include_finished=True)
        client.cancel(holder.id)
    listed = Counter(job.id for job in jobs)
    names = Counter(job.name for job in jobs)
    assert all(listed[job_id] == 1 for job_id in ids), "an acknowledged job is missing or doubled"
    by_id = {job.id: job for job in jobs}
    assert all(by_id[job_id].name == name for job_id, name in acknowledged)
    # One job per submission, however many times a kill made its client retry it.
    assert all(names[name] == 1 for _, name in acknowledged), [
        name for name, n in names.items() if n > 1
    ][:5]
    assert len(jobs) == total + 1  # and nothing else: the holder and the burst
