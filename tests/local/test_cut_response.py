"""A response cut off mid-body makes no second job (issue 10, item 8).

A tiny proxy in front of a real server lets each request through and cuts the
answer after its headers and three bytes of body: the server has made the job,
the client has not heard of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbatch.client import Client
from kbatch.models import JobSpec
from tests.support.cutproxy import CutProxy
from tests.support.servers import KbatchServer


@pytest.fixture
def proxy(server: KbatchServer) -> Iterator[CutProxy]:
    cut = CutProxy(server.url)
    yield cut
    cut.close()


def all_jobs(server: KbatchServer) -> list[str]:
    with server.client() as client:
        return [job.id for job in client.list(include_finished=True)]


def test_the_client_retries_a_cut_body_with_the_same_key(
    server: KbatchServer, proxy: CutProxy, workdir: Path
) -> None:
    proxy.cut_next = 2  # the first two answers are cut
    spec = JobSpec(script="#!/bin/sh\ntrue\n", workdir=str(workdir))
    with server.client() as direct, Client(proxy.url, server.token, retry_for=10) as client:
        job = client.submit(spec)
        assert proxy.cuts == 2
        assert [j.id for j in direct.list(include_finished=True)] == [job.id]
        # Every other call is retried the same way.
        proxy.cut_next = 1
        assert client.get(job.id).id == job.id


def test_rerunning_kbatch_submit_after_a_cut_answer_makes_no_second_job(
    server: KbatchServer, proxy: CutProxy, workdir: Path
) -> None:
    script = workdir / "job.sh"
    script.write_text("#!/bin/sh\n#SBATCH --job-name=once\ntrue\n")
    env = {"KBATCH_URL": proxy.url, "KBATCH_TOKEN": server.token}
    proxy.cut = True  # every answer is cut: the CLI gives up (after its retries)
    failed = server.cli("submit", "--parsable", str(script), cwd=workdir, env=env)
    assert failed.returncode != 0
    assert "kbatch server" in failed.stderr or "connection" in failed.stderr, failed.stderr
    assert proxy.cuts >= 1
    made = all_jobs(server)
    assert len(made) == 1  # the server did make it
    proxy.cut = False
    again = server.cli("submit", "--parsable", str(script), cwd=workdir, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == made[0]  # the rerun is the same submission
    assert all_jobs(server) == made
    # Acknowledged, a deliberate second submission of the same script is a second job.
    second = server.cli("submit", "--parsable", str(script), cwd=workdir, env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() != made[0]
    assert len(all_jobs(server)) == 2
    assert not list((server.state_dir / "submissions").iterdir())


def test_simultaneous_identical_submissions_are_separate_jobs(
    server: KbatchServer, workdir: Path
) -> None:
    script = workdir / "job.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    exe = Path(sys.executable).with_name("kbatch")
    procs = [
        subprocess.Popen(
            [str(exe), "submit", "--parsable", str(script)],
            cwd=workdir,
            env=server.env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    ids = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(ids)) == 4, json.dumps(ids)
