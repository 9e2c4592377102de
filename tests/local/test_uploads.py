"""Code upload and result fetch end to end: a real server, real job processes, the real CLI.

Every refusal of issue #14 over HTTP: a path that escapes, limits (bytes and
files), a hash that does not match, an upload cut off (and resumed), another
user's upload or results.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest

from kbatch.client import Client
from kbatch.client import requests as rq
from kbatch.errors import Conflict, InvalidRequest, NotFound
from kbatch.models import JobSpec, JobState
from kbatch.uploads.manifest import UploadAnswer
from kbatch.uploads.tree import manifest_of, walk
from tests.support.polling import wait_for
from tests.support.servers import KbatchServer

MAX_BYTES = 300_000
MAX_FILES = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KbatchServer]:
    """A local server whose policy limits uploads to 300 kB and 40 files."""
    base = tmp_path_factory.mktemp("kbu", numbered=True)
    config = base / "kbatch.toml"
    config.write_text(
        "[local]\nkill_grace = 1\ntick = 0.5\n"
        f"[policy]\nmax_upload_bytes = {MAX_BYTES}\nmax_upload_files = {MAX_FILES}\n"
    )
    srv = KbatchServer(base / "s", args=["--cpus", "2", "--config", str(config)])
    srv.start()
    yield srv
    srv.stop()


def project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "run.sh").write_text("#!/bin/sh\necho ran run.sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "data.txt").write_text("input\n")
    (root / "lib").mkdir()
    (root / "lib" / "util.py").write_text("X = 1\n")
    (root / ".gitignore").write_text("*.log\n")
    (root / "debug.log").write_text("not sent\n")
    (root / "salt.txt").write_text(os.urandom(8).hex())  # content no other test has sent
    return root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw(server: KbatchServer, method: str, path: str, body: bytes, token: str | None = None):
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=30)
    try:
        conn.request(method, path, body, {"Authorization": f"Bearer {token or server.token}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def store_dirs(server: KbatchServer) -> tuple[Path, Path]:
    uploads = server.state_dir / "uploads"
    return uploads / "tmp", uploads / "blobs"


def blob_exists(server: KbatchServer, digest: str) -> bool:
    return (store_dirs(server)[1] / digest[:2] / digest).exists()


def test_submit_code_runs_in_a_fresh_copy_and_fetch_gets_what_is_new_or_changed(
    server: KbatchServer, workdir: Path
) -> None:
    proj = project(workdir / "proj")
    script = workdir / "job.sh"
    script.write_text(
        "#!/bin/sh\n#KBATCH --code proj\n"
        'test "$PWD" = "$KBATCH_CODE_DIR" && echo "in the copy"\n'
        "./run.sh\n"
        "test -e debug.log || echo 'ignored file not sent'\n"
        "cat lib/util.py\n"
        "echo changed >> data.txt\n"
        "mkdir -p out && echo 42 > out/answer.csv && echo note > note.txt\n"
    )
    result = server.cli("submit", "--parsable", "job.sh", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar without a terminal, nothing else
    job_id = result.stdout.strip()
    job = server.wait_state(job_id)
    assert job.state is JobState.COMPLETED, (server.cli("logs", job_id).stdout, job)
    assert (workdir / f"kbatch-{job_id}.out").read_text() == (
        "in the copy\nran run.sh\nignored file not sent\nX = 1\n"
    )
    assert (proj / "data.txt").read_text() == "input\n"  # the user's own files are untouched
    assert not (server.state_dir / "code" / job_id).exists()  # the copy is gone, results kept

    fetched = server.cli("fetch", job_id, cwd=workdir)
    assert fetched.returncode == 0, fetched.stderr
    dest = workdir / f"kbatch-{job_id}"
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "data.txt",
        "note.txt",
        "out/answer.csv",
    ]
    assert (dest / "data.txt").read_text() == "input\nchanged\n"
    assert (dest / "out" / "answer.csv").read_text() == "42\n"

    quiet = server.cli("fetch", "--parsable", job_id, "again", cwd=workdir)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    assert (workdir / "again" / "note.txt").read_text() == "note\n"
    only = server.cli("fetch", job_id, "csvs", "--results", "*.csv", cwd=workdir)
    assert only.returncode == 0, only.stderr
    assert only.stdout.split() == ["csvs/out/answer.csv"]
    rest = server.cli("fetch", job_id, "rest", "--ignore", "out/", "--ignore", "data.txt")
    assert rest.returncode == 0 and rest.stdout.split() == [str(Path("rest/note.txt"))]


def test_test_only_hashes_but_sends_and_submits_nothing(
    server: KbatchServer, workdir: Path
) -> None:
    proj = project(workdir / "dry")
    token = server.add_token("dry-runner")
    result = server.cli(
        "submit", "--test-only", "--code", "dry", "--wrap", "true", cwd=workdir,
        env={"KBATCH_TOKEN": token, "KBATCH_URL": server.url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "--code" in result.stderr and "5 files" in result.stderr and "not uploaded" in result.stderr
    )
    with Client(server.url, token) as client:
        plans: list[tuple[int, int]] = []
        client.upload(proj, on_plan=lambda n, size: plans.append((n, size)))
        assert plans and plans[0][0] == 5  # nothing of it had been sent
        assert client.list(include_finished=True) == []


def test_a_sweep_shares_one_upload_and_a_resubmit_sends_only_what_changed(
    server: KbatchServer, workdir: Path
) -> None:
    proj = project(workdir / "sweep")
    plans: list[tuple[int, int]] = []
    with Client(server.url, server.add_token("sweeper")) as client:  # has sent nothing yet
        first = client.upload(proj, on_plan=lambda n, size: plans.append((n, size)))
        assert first.complete and first.files == 5
        assert plans == [(5, first.bytes)]
        again = client.upload(proj, on_plan=lambda n, size: plans.append((n, size)))
        assert again.id == first.id and plans == [(5, first.bytes)]  # nothing sent again
        (proj / "data.txt").write_text("other input\n")
        third = client.upload(proj, on_plan=lambda n, size: plans.append((n, size)))
        assert third.id != first.id and plans[-1] == (1, len("other input\n"))

        jobs = [
            client.submit(
                JobSpec(
                    script=f"#!/bin/sh\necho task {i} > result-{i}.txt\n",
                    workdir=str(workdir),
                    code=first.id,
                )
            )
            for i in range(3)
        ]
        for job in jobs:
            assert client.wait(job.id, poll=0.1, timeout=30).state is JobState.COMPLETED
        for i, job in enumerate(jobs):
            written = client.fetch(job.id, workdir / "results" / job.id)
            assert [p.name for p in written] == [f"result-{i}.txt"]
            assert written[0].read_text() == f"task {i}\n"


def test_another_user_learns_nothing_and_reaches_nothing(
    server: KbatchServer, workdir: Path
) -> None:
    proj = project(workdir / "mine")
    bob_token = server.add_token("bob-upload")
    with server.client() as alice, Client(server.url, bob_token) as bob:
        upload = alice.upload(proj)
        job = alice.submit(
            JobSpec(script="#!/bin/sh\necho secret > s.txt\n", workdir=str(workdir), code=upload.id)
        )
        alice.wait(job.id, poll=0.1, timeout=30)
        (secret,) = alice.results(job.id).files

        # The same content: bob must send all of it, as if nobody had.
        plans: list[tuple[int, int]] = []
        bob_upload = bob.upload(proj, on_plan=lambda n, size: plans.append((n, size)))
        assert plans == [(5, bob_upload.bytes)] and bob_upload.id == upload.id
        status, body = raw(
            server, "POST", "/api/v1/uploads", msgspec.json.encode(alice.results(job.id)), bob_token
        )
        assert (status, body["missing"]) == (200, [secret.sha256])  # alice's result: not his

        # Alice's upload id is no key for bob: his own same upload is his, a made-up one is not.
        with pytest.raises(InvalidRequest, match="no complete upload") as refused:
            bob.submit(JobSpec(script="#!/bin/sh\ntrue\n", workdir=str(workdir), code="f" * 64))
        assert refused.value.field == "code"
        with pytest.raises(NotFound):
            bob.results(job.id)
        status, _ = raw(server, "GET", f"/api/v1/jobs/{job.id}/results/{secret.sha256}", b"",
                        bob_token)  # fmt: skip
        assert status == 404
        with pytest.raises(NotFound):
            bob.fetch(job.id, workdir / "stolen")
        assert not (workdir / "stolen").exists()


def test_bad_uploads_are_refused_and_leave_nothing(server: KbatchServer, workdir: Path) -> None:
    data = b"the real bytes"
    status, body = raw(server, "PUT", f"/api/v1/blobs/{sha(b'other bytes')}", data)
    assert (status, body["error"]["code"]) == (422, "digest_mismatch")
    assert "changed while it was sent" in body["error"]["message"]
    big = os.urandom(MAX_BYTES + 1)
    status, body = raw(server, "PUT", f"/api/v1/blobs/{sha(big)}", big)
    assert status == 413 and "max_upload_bytes" in body["error"]["message"]
    status, body = raw(server, "PUT", "/api/v1/blobs/not-a-digest", data)
    assert status == 422
    tmp, _ = store_dirs(server)
    assert list(tmp.iterdir()) == []
    assert not blob_exists(server, sha(big)) and not blob_exists(server, sha(b"other bytes"))

    def manifest(*paths: str, size: int = 1) -> bytes:
        return json.dumps({"files": [[p, sha(p.encode()), size, False] for p in paths]}).encode()

    for path, says in [
        ("../escape.py", "escapes"),
        ("/etc/cron.d/x", "absolute"),
        ("a/../../b", "escapes"),
    ]:
        status, body = raw(server, "POST", "/api/v1/uploads", manifest("ok.py", path))
        assert status == 422 and says in body["error"]["message"], body
    many = manifest(*(f"f{i}" for i in range(MAX_FILES + 1)))
    status, body = raw(server, "POST", "/api/v1/uploads", many)
    assert status == 422 and "max_upload_files" in body["error"]["message"]
    status, body = raw(server, "POST", "/api/v1/uploads", manifest("a", "b", size=MAX_BYTES))
    assert status == 422 and "max_upload_bytes" in body["error"]["message"]

    # The CLI says the same before anything is stored, and submits nothing.
    proj = project(workdir / "toobig")
    (proj / "big.bin").write_bytes(big)
    result = server.cli("submit", "--code", "toobig", "--wrap", "true", cwd=workdir)
    assert result.returncode == 1 and "max_upload_bytes" in result.stderr
    assert "leave large files out with a .kbatchignore file" in result.stderr
    with server.client() as client:
        assert client.list(include_finished=True, states=["PENDING"]) == []
    os.mkfifo(proj / "pipe")
    result = server.cli("submit", "--code", "toobig", "--wrap", "true", cwd=workdir)
    assert result.returncode == 1 and "pipe is a FIFO" in result.stderr
    assert not blob_exists(server, sha(big))


def test_an_upload_cut_off_leaves_nothing_and_a_retry_sends_only_the_rest(
    server: KbatchServer, workdir: Path
) -> None:
    proj = workdir / "cut"
    proj.mkdir()
    first, second = os.urandom(50_000), os.urandom(60_000)
    (proj / "a.bin").write_bytes(first)
    (proj / "b.bin").write_bytes(second)
    files = walk(proj)
    manifest = manifest_of(files)
    parts = urlsplit(server.url)
    with server.client() as client:
        client._put_file(rq.put_blob(sha(first), len(first)), proj / "a.bin", None)
        # b.bin: the connection drops halfway through its body.
        conn = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=30)
        conn.putrequest("PUT", f"/api/v1/blobs/{sha(second)}")
        conn.putheader("Authorization", f"Bearer {server.token}")
        conn.putheader("Content-Length", str(len(second)))
        conn.endheaders()
        conn.send(second[:30_000])
        conn.close()
        tmp, _ = store_dirs(server)
        wait_for(lambda: list(tmp.iterdir()) == [], what="the cut upload's temp file to go")
        assert not blob_exists(server, sha(second))
        status, body = raw(server, "POST", "/api/v1/uploads", msgspec.json.encode(manifest))
        answer = msgspec.convert(body, UploadAnswer)
        assert status == 200 and not answer.complete and answer.missing == [sha(second)]
        plans: list[tuple[int, int]] = []
        done = client.upload_files(files, manifest, on_plan=lambda n, s: plans.append((n, s)))
        assert done.complete and plans == [(1, len(second))]


def test_a_hostile_job_gets_no_trap_into_its_results(server: KbatchServer, workdir: Path) -> None:
    proj = project(workdir / "trap")
    with server.client() as client:
        upload = client.upload(proj)
        job = client.submit(
            JobSpec(
                script="#!/bin/sh\nln -s /etc/passwd leak\nln -s /etc etc\nmkfifo pipe\n"
                "echo ok > real.txt\nsleep 1\n",
                workdir=str(workdir),
                code=upload.id,
            )
        )
        with pytest.raises(Conflict, match="results are collected when it ends"):
            client.results(job.id)
        assert client.wait(job.id, poll=0.1, timeout=30).state is JobState.COMPLETED
        assert [f.path for f in client.results(job.id).files] == ["real.txt"]
        plain = client.submit(JobSpec(script="#!/bin/sh\ntrue\n", workdir=str(workdir)))
        client.wait(plain.id, poll=0.1, timeout=30)
        with pytest.raises(Conflict, match="not submitted with --code"):
            client.fetch(plain.id, workdir / "none")


def test_the_readme_sweep_runs_as_written(server: KbatchServer, workdir: Path) -> None:
    import subprocess
    import sys

    from tests.support.jupyterhub import docs_block

    block = docs_block("upload-sweep", Path(__file__).resolve().parents[2] / "README.md")
    (workdir / "sweep").mkdir()
    (workdir / "sweep" / "train.py").write_text("import sys\nprint('alpha', sys.argv[1])\n")
    job = "".join(
        line.removeprefix("#   ") + "\n" for line in block.splitlines() if line.startswith("#   ")
    )
    assert job.startswith("#!/bin/sh\n#KBATCH --code sweep\n")
    (workdir / "run.sh").write_text(job)
    env = server.env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(
        ["bash", "-euc", block], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    ids = (workdir / "jobs.txt").read_text().split()
    assert len(ids) == 3
    for job_id, alpha in zip(ids, ["0.1", "0.2", "0.5"], strict=True):
        found = sorted(p.name for p in (workdir / "results" / job_id).iterdir())
        assert found == [f"result-{alpha}.txt"]
        assert (workdir / "results" / job_id / found[0]).read_text() == f"alpha {alpha}\n"


def test_a_batch_of_small_files_is_checked_file_by_file(server: KbatchServer) -> None:
    good, bad = os.urandom(1000), b"not what its frame says"

    def frame(digest: str, data: bytes, size: int | None = None) -> bytes:
        return f"{digest} {len(data) if size is None else size:016x}\n".encode() + data

    status, body = raw(server, "POST", "/api/v1/blobs", frame(sha(good), good))
    assert (status, body["stored"]) == (201, [{"sha256": sha(good), "size": 1000}])
    assert blob_exists(server, sha(good))
    other = os.urandom(10)
    status, body = raw(
        server, "POST", "/api/v1/blobs", frame(sha(other), other) + frame(sha(b"x"), bad)
    )
    assert (status, body["error"]["code"]) == (422, "digest_mismatch")
    assert blob_exists(server, sha(other))  # a file before the refused one stays stored
    status, body = raw(server, "POST", "/api/v1/blobs", b"garbage\n" * 20)
    assert (status, body["error"]["code"]) == (400, "bad_batch")
    status, body = raw(server, "POST", "/api/v1/blobs", frame(sha(good), good, size=5000))
    assert (status, body["error"]["code"]) == (400, "bad_batch")  # ends inside the file
    huge = f"{sha(b'')} {MAX_BYTES + 1:016x}\n".encode()
    status, body = raw(server, "POST", "/api/v1/blobs", huge)
    assert status == 413 and "max_upload_bytes" in body["error"]["message"]
    tmp, _ = store_dirs(server)
    assert list(tmp.iterdir()) == []


def test_an_array_shares_one_upload_and_fetches_into_a_folder_per_task(
    server: KbatchServer, workdir: Path
) -> None:
    proj = project(workdir / "arr")
    with server.client() as client:
        upload = client.upload(proj)
        array = client.submit(
            JobSpec(
                script='#!/bin/sh\necho "task $SLURM_ARRAY_TASK_ID" > "out-$SLURM_ARRAY_TASK_ID.txt"\n'
                "cat data.txt >> out-$SLURM_ARRAY_TASK_ID.txt\n",
                workdir=str(workdir),
                code=upload.id,
                array="0-2",
            )
        )
        assert client.wait(array.id, poll=0.1, timeout=60).state is JobState.COMPLETED
        written = client.fetch(array.id, workdir / "sweep-results")
        assert sorted(str(p.relative_to(workdir / "sweep-results")) for p in written) == [
            "0/out-0.txt",
            "1/out-1.txt",
            "2/out-2.txt",
        ]
        assert (workdir / "sweep-results" / "2" / "out-2.txt").read_text() == "task 2\ninput\n"
        one = client.fetch(f"{array.id}_1", workdir / "one")  # a task alone, by its own id
        assert [p.name for p in one] == ["out-1.txt"]
        some = client.fetch(f"{array.id}_[0-1]", workdir / "some")  # some tasks
        assert sorted(str(p.relative_to(workdir / "some")) for p in some) == [
            "0/out-0.txt",
            "1/out-1.txt",
        ]


def test_an_upload_whose_answers_are_cut_off_is_retried_and_completes(
    server: KbatchServer, workdir: Path
) -> None:
    from tests.support.cutproxy import CutProxy

    proj = project(workdir / "flaky")
    (proj / "big.bin").write_bytes(os.urandom(200_000))
    proxy = CutProxy(server.url)
    try:
        with Client(proxy.url, server.add_token("flaky-net")) as client:
            proxy.cut_next = 3  # three answers never arrive: manifest, batch, manifest again
            answer = client.upload(proj)
            assert answer.complete and proxy.cuts == 3
            plans: list[tuple[int, int]] = []
            again = client.upload(proj, on_plan=lambda n, size: plans.append((n, size)))
            assert again.id == answer.id and plans == []  # everything arrived once
    finally:
        proxy.close()
