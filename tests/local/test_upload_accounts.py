"""Uploaded files with ``run_as_user``: each job runs as its user's Unix account, in a copy
made of hard links to the store's read-only, root-owned blobs.  The job can read them and
replace them, never change them (which would change every other job's copy), and no
other account can look into its folder.  Real accounts, made by the fixture (as root)."""

from __future__ import annotations

import hashlib
import pwd
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from kbatch.client import Client
from kbatch.models import JobSpec, JobState
from tests.support.accounts import reachable_dir, run_as, unix_account
from tests.support.polling import wait_for
from tests.support.servers import KbatchServer


@dataclass
class Setup:
    server: KbatchServer
    alice: str
    bob: str
    token: str


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    with ExitStack() as stack:
        world = stack.enter_context(reachable_dir("kbup-"))
        alice = stack.enter_context(unix_account("kbu"))
        bob = stack.enter_context(unix_account("kbu"))
        config = world / "kbatch.toml"
        config.write_text(
            '[local]\nkill_grace = 1\ntick = 0.5\nrun_as_user = true\nuser_template = "{username}"\n'
        )
        server = KbatchServer(world / "s", args=["--cpus", "2", "--config", str(config)])
        server.start()
        stack.callback(server.stop)
        yield Setup(server, alice, bob, server.add_token(alice))


def test_a_job_of_another_account_reads_its_copy_and_cannot_change_the_store(
    setup: Setup, tmp_path: Path
) -> None:
    home = Path(pwd.getpwnam(setup.alice).pw_dir)
    uid = pwd.getpwnam(setup.alice).pw_uid
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "in.txt").write_text("input\n")
    (proj / "run.sh").write_text("#!/bin/sh\necho ran as $(id -u)\n")
    (proj / "run.sh").chmod(0o755)
    go = home / "go"
    script = (
        "#!/bin/sh\n./run.sh\ncat in.txt\n"
        "(echo more >> in.txt) 2>/dev/null || echo cannot change in.txt\n"
        "(chmod u+w in.txt) 2>/dev/null || echo cannot chmod in.txt\n"
        'echo "dir $KBATCH_CODE_DIR"\n'
        "rm in.txt && echo replaced > in.txt\n"
        "echo new > out.txt\n"
        f"while [ ! -e {go} ]; do sleep 0.05; done\n"
    )
    with Client(setup.server.url, setup.token) as client:
        upload = client.upload(proj)
        job = client.submit(JobSpec(script=script, workdir=str(home), code=upload.id))
        out = home / f"kbatch-{job.id}.out"
        said = wait_for(lambda: _code_dir(out), what="the job to print its folder")
        assert said is not None
        code = said
        # While it runs: its folder is its own, and nobody else's to list or read.
        info = Path(code).stat()
        assert info.st_uid == uid and oct(info.st_mode & 0o777) == "0o700"
        assert run_as(setup.bob, ["cat", f"{code}/run.sh"]).returncode != 0
        assert run_as(setup.bob, ["ls", str(Path(code).parent)]).returncode != 0
        go.touch()
        done = client.wait(job.id, poll=0.1, timeout=30)
        assert done.state is JobState.COMPLETED, out.read_text()
        lines = out.read_text().splitlines()
        assert lines[:4] == [
            f"ran as {uid}",
            "input",
            "cannot change in.txt",
            "cannot chmod in.txt",
        ]
        assert lines[4] == f"dir {code}"
        results = {f.path: f for f in client.results(job.id).files}
        assert sorted(results) == ["in.txt", "out.txt"]  # replaced, and new; run.sh unchanged
        fetched = client.fetch(job.id, tmp_path / "back")
        assert sorted(p.read_text() for p in fetched) == ["new\n", "replaced\n"]
    blob = hashlib.sha256(b"input\n").hexdigest()
    stored = setup.server.state_dir / "uploads" / "blobs" / blob[:2] / blob
    assert stored.read_text() == "input\n" and stored.stat().st_uid == 0
    assert not Path(code).exists()  # the copy is removed once its results are kept


def _code_dir(out: Path) -> str | None:
    """The folder the job says it runs in, once it has said so."""
    try:
        lines = out.read_text().splitlines()
    except FileNotFoundError:
        return None
    return next((line[4:] for line in lines if line.startswith("dir ")), None)


def test_a_code_dir_other_accounts_cannot_reach_fails_the_job_saying_what_to_set(
    tmp_path: Path,
) -> None:
    with ExitStack() as stack:
        world = stack.enter_context(reachable_dir("kbup2-"))
        user = stack.enter_context(unix_account("kbu"))
        closed = world / "closed"
        closed.mkdir(mode=0o700)
        config = world / "kbatch.toml"
        config.write_text(
            '[local]\nkill_grace = 1\ntick = 0.5\nrun_as_user = true\nuser_template = "{username}"\n'
            f'code_dir = "{closed / "code"}"\n'
        )
        server = KbatchServer(world / "s", args=["--cpus", "1", "--config", str(config)])
        server.start()
        stack.callback(server.stop)
        proj = tmp_path / "p"
        proj.mkdir()
        (proj / "a.txt").write_text("a\n")
        home = Path(pwd.getpwnam(user).pw_dir)
        with Client(server.url, server.add_token(user)) as client:
            upload = client.upload(proj)
            job = client.submit(
                JobSpec(script="#!/bin/sh\ntrue\n", workdir=str(home), code=upload.id)
            )
            done = client.wait(job.id, poll=0.1, timeout=30)
        assert done.state is JobState.FAILED
        assert done.reason is not None and "closed to other accounts" in done.reason
        assert "[local] code_dir" in done.reason
