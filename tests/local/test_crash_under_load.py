"""SIGKILLs of the server under load lose, duplicate and re-run nothing (issue 10).

Several client processes submit jobs as fast as they can while the server is
killed (SIGKILL) at random moments and restarted each time.  Every job's
script appends its id to one ledger.  Afterwards every acknowledged job (the
client got its 201) is listed exactly once and ran exactly once.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.polling import wait_for
from tests.support.servers import KbatchServer

CLIENTS = 4
KILLS = 3
LOAD_SECONDS = 15.0

CLIENT = """
import os, sys, time
from kbatch.client import Client
from kbatch.models import JobSpec

url, token, workdir, acked, seconds = sys.argv[1:6]
script = '#!/bin/sh\\necho "$KBATCH_JOB_ID" >> ledger\\n'
deadline = time.monotonic() + float(seconds)
with Client(url, token, retry_for=60, timeout=10) as client, open(acked, "a") as out:
    n = 0
    while time.monotonic() < deadline:
        spec = JobSpec(script=script, workdir=workdir, name=f"{os.getpid()}-{n}")
        job = client.submit(spec)  # one key for every retry of this submission
        out.write(job.id + "\\n")
        out.flush()
        n += 1
        time.sleep(0.1)  # a busy user, not a flood: the jobs must be able to drain
"""


@pytest.fixture
def crash_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KbatchServer]:
    state = tmp_path_factory.mktemp("kb") / "s"
    config = state.parent / "kbatch.toml"
    config.write_text("[local]\ncpus = 4\nkill_grace = 1\ntick = 0.2\n")
    server = KbatchServer(state, args=["--config", str(config)], log_level="info")
    yield server
    server.stop()


def test_sigkills_under_load_lose_and_repeat_nothing(
    crash_server: KbatchServer, workdir: Path
) -> None:
    server = crash_server
    server.start()
    url, token = server.url, server.token
    acked = [workdir.parent / f"acked-{i}" for i in range(CLIENTS)]
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, url, token, str(workdir), str(path), str(LOAD_SECONDS)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in acked
    ]
    rng = random.Random()
    try:
        start = time.monotonic()
        for kill in range(KILLS):
            # Spread the kills over the load: each at a random moment in its share of it.
            share = LOAD_SECONDS / KILLS
            moment = start + kill * share + rng.uniform(0.5, share - 1.5)
            time.sleep(max(0.0, moment - time.monotonic()))
            server.kill9()
            server.start()
            assert server.url == url  # the same port: clients keep their URL
        for proc in clients:
            _, err = proc.communicate(timeout=LOAD_SECONDS + 90)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    acknowledged = [line for path in acked for line in path.read_text().split()]
    assert len(acknowledged) >= 20, "too little load to mean anything"
    print(f"{len(acknowledged)} acknowledged submissions across {KILLS} SIGKILLs")
    assert len(set(acknowledged)) == len(acknowledged), "two submissions got the same job"

    with server.client(retry_for=30) as client:

        def all_ended() -> list[str] | str:
            jobs = client.list(include_finished=True)
            waiting = Counter(job.state.value for job in jobs if not job.state.is_terminal)
            if waiting:
                return ""  # falsy; the counts below tell a timeout's story
            return [job.id for job in jobs]

        try:
            listed = wait_for(all_ended, timeout=90, interval=0.5, what="every job to end")
        except AssertionError:
            jobs = client.list(include_finished=True)
            left = Counter((job.state.value, job.reason) for job in jobs)
            raise AssertionError(f"{len(acknowledged)} acknowledged; jobs: {left}") from None
        states = Counter(client.get(job_id).state.value for job_id in acknowledged)
    assert listed is not None
    listed_counts = Counter(listed)
    assert all(listed_counts[job_id] == 1 for job_id in acknowledged), "a job listed twice or lost"
    assert states == Counter({"COMPLETED": len(acknowledged)}), states
    ran = Counter((workdir / "ledger").read_text().split())
    assert {job_id: ran[job_id] for job_id in acknowledged} == dict.fromkeys(acknowledged, 1)
    # No job ran that was never submitted; an unacknowledged one (its answer lost in
    # a kill) ran at most once too.
    assert set(ran) <= set(listed) and max(ran.values()) == 1
