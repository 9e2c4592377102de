"""The parts of a Kubernetes job's pod that move its files, as real processes against a
real server: ``python -m kbatch.uploads.pod`` with a transfer token good for one job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kbatch.client import Client
from kbatch.client import requests as rq
from kbatch.errors import PermissionDenied
from kbatch.models import JobSpec, JobState
from kbatch.server.blobs import BlobStore
from tests.support.servers import KbatchServer


def pod(action: str, where: Path, server: KbatchServer, job_id: str, token: str, **kw: object):
    env = {
        "PATH": os.environ["PATH"],
        "KBATCH_TRANSFER_URL": server.url,
        "KBATCH_JOB_ID": job_id,
        "KBATCH_TRANSFER_TOKEN": token,
    }
    argv = [sys.executable, "-m", "kbatch.uploads.pod", action, str(where)]
    if kw.get("background"):
        return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def held_job(client: Client, proj: Path, workdir: Path) -> str:
    upload = client.upload(proj)
    spec = JobSpec(script="#!/bin/sh\ntrue\n", workdir=str(workdir), code=upload.id, hold=True)
    return client.submit(spec).id


def tokens(server: KbatchServer) -> BlobStore:
    return BlobStore(server.state_dir / "uploads")  # the server's key, read from its store


def test_the_pod_gets_its_files_and_hands_back_what_changed(
    server: KbatchServer, workdir: Path
) -> None:
    proj = workdir / "proj"
    (proj / "lib").mkdir(parents=True)
    (proj / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (proj / "run.sh").chmod(0o755)
    (proj / "lib" / "in.txt").write_text("input\n")
    with server.client() as client:
        job_id = held_job(client, proj, workdir)
        token = tokens(server).transfer_token(job_id, time.time() + 600)
        code = workdir / "code"
        done = pod("download", code, server, job_id, token)
        assert done.returncode == 0, done.stderr
        assert (code / "lib" / "in.txt").read_text() == "input\n"
        assert os.access(code / "run.sh", os.X_OK)
        assert not os.access(code / "lib" / "in.txt", os.X_OK)

        (code / "lib" / "in.txt").write_text("changed\n")
        (code / "out.csv").write_text("1,2\n")
        (code / "leak").symlink_to("/etc/passwd")
        client.cancel(job_id)  # ended: its results may be handed back and fetched
        assert client.wait(job_id, poll=0.1, timeout=30).state is JobState.CANCELLED
        done = pod("results", code, server, job_id, token)
        assert done.returncode == 0, done.stderr
        assert [f.path for f in client.results(job_id).files] == ["lib/in.txt", "out.csv"]
        back = client.fetch(job_id, workdir / "back")
        assert sorted(p.read_text() for p in back) == ["1,2\n", "changed\n"]

        # The owner's own token cannot pose as the job's pod.
        with pytest.raises(PermissionDenied, match="only the job's own pod"):
            client._call(rq.post_results(job_id, b'{"files": []}'), dict)


def test_the_sidecar_hands_back_when_it_is_told_the_job_ended(
    server: KbatchServer, workdir: Path
) -> None:
    proj = workdir / "p"
    proj.mkdir()
    (proj / "a.txt").write_text("a\n")
    with server.client() as client:
        job_id = held_job(client, proj, workdir)
        token = tokens(server).transfer_token(job_id, time.time() + 600)
        code = workdir / "code"
        assert pod("download", code, server, job_id, token).returncode == 0
        sidecar = pod("sidecar", code, server, job_id, token, background=True)
        assert isinstance(sidecar, subprocess.Popen)
        try:
            assert sidecar.stderr is not None
            assert "waiting for the job to end" in sidecar.stderr.readline()
            (code / "result.txt").write_text("done\n")
            client.cancel(job_id)
            sidecar.send_signal(signal.SIGTERM)  # what the kubelet does once the job has ended
            assert sidecar.wait(timeout=60) == 0
        finally:
            if sidecar.poll() is None:
                sidecar.kill()
        assert [f.path for f in client.results(job_id).files] == ["result.txt"]


def test_a_token_is_good_for_its_own_job_only_and_until_it_expires(
    server: KbatchServer, workdir: Path
) -> None:
    proj = workdir / "q"
    proj.mkdir()
    (proj / "secret.txt").write_text("mine\n")
    with server.client() as client:
        mine = held_job(client, proj, workdir)
        other = held_job(client, proj, workdir)
        store = tokens(server)
        for_other = store.transfer_token(other, time.time() + 600)
        stolen = pod("download", workdir / "x", server, mine, for_other)
        assert stolen.returncode == 1 and f"no job {mine}" in stolen.stderr
        expired = pod("download", workdir / "y", server, mine, store.transfer_token(mine, 1))
        assert expired.returncode == 1 and "not valid (expired?)" in expired.stderr
        forged = store.transfer_token(mine, time.time() + 600)[:-4] + "0000"
        assert pod("download", workdir / "z", server, mine, forged).returncode == 1
        assert not any((workdir / d).exists() for d in ("x/secret.txt", "y", "z/secret.txt"))
        client.cancel(mine)
        client.cancel(other)
