"""Jobs run as their users' own Unix accounts (``[local] run_as_user``), with real accounts.

The server runs as root (as the tests do, here and in CI) with
``user_template = "{username}"``: a kbatch user ``kbt1a2b3c`` is the Unix
account of that name, made by the fixture with ``useradd -m``.  Its state
directory sits in a directory every account may traverse, so that what keeps
a job out of it is the state directory's own permissions, not pytest's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from kbatch.client import Client
from kbatch.errors import InvalidRequest, PermissionDenied
from kbatch.models import Job, JobSpec, JobState
from tests.support.accounts import account_python, reachable_dir, unix_account
from tests.support.polling import wait_for, wait_for_file
from tests.support.servers import KbatchServer


@dataclass
class Person:
    name: str
    uid: int
    gid: int
    home: Path
    token: str


@dataclass
class MultiUser:
    server: KbatchServer
    people: list[Person]

    def client(self, person: Person) -> Client:
        return self.server.client(person.token)


def _config(directory: Path, extra: str = "") -> Path:
    path = directory / "kbatch.toml"
    path.write_text(
        "[local]\nkill_grace = 1\ntick = 0.5\nrun_as_user = true\n"
        'user_template = "{username}"\nmin_uid = 1000\n' + extra
    )
    return path


@pytest.fixture(scope="module")
def multi() -> Iterator[MultiUser]:
    with ExitStack() as stack:
        world = stack.enter_context(reachable_dir("kbru-"))
        names = [stack.enter_context(unix_account("kbu")) for _ in range(3)]
        server = KbatchServer(
            world / "s", args=["--cpus", "2", "--config", str(_config(world))], log_dir=world
        )
        server.start()
        stack.callback(server.stop)
        people = []
        for name in names:
            entry = pwd.getpwnam(name)
            if entry.pw_uid < 1000:
                pytest.skip(f"useradd gave {name} uid {entry.pw_uid}, below 1000")
            people.append(
                Person(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), server.add_token(name))
            )
        yield MultiUser(server, people)


def _spec(person: Person, script: str, **fields: object) -> JobSpec:
    values: dict[str, object] = {
        "workdir": str(person.home),
        "environment": {"PATH": "/usr/bin:/bin", "HOME": "/root", "USER": "root"},
        **fields,
    }
    return JobSpec(script="#!/bin/sh\n" + script, **values)  # type: ignore[arg-type]


def _wait(client: Client, job_id: str, *states: JobState, timeout: float = 30) -> Job:
    wanted = set(states) or {s for s in JobState if s.is_terminal}

    def reached() -> Job | None:
        job = client.get(job_id)
        return job if job.state in wanted else None

    job = wait_for(reached, timeout=timeout, what=f"job {job_id} to reach {sorted(wanted)}")
    assert job is not None
    return job


@contextlib.contextmanager
def _machine_full(multi: MultiUser, person: Person) -> Iterator[None]:
    """Every CPU taken by a job of ``person`` until the block ends, then freed."""
    go = person.home / f"go-{os.urandom(4).hex()}"
    with multi.client(person) as client:
        blocker = client.submit(
            _spec(person, f"while [ ! -e {go} ]; do sleep 0.05; done\n", cpus=2)
        )
        _wait(client, blocker.id, JobState.RUNNING)
        try:
            yield
        finally:
            go.touch()
            _wait(client, blocker.id)


def test_each_job_runs_as_its_users_account(multi: MultiUser) -> None:
    script = 'id -u; id -g; id -G; echo "$HOME $USER $LOGNAME"; pwd; umask\n'
    jobs = {}
    for person in multi.people:
        with multi.client(person) as client:
            jobs[person.name] = client.submit(_spec(person, script)).id
    for person in multi.people:
        with multi.client(person) as client:
            job = client.get(jobs[person.name])
            job = _wait(client, job.id)
            assert job.state is JobState.COMPLETED, job
        out = person.home / f"kbatch-{jobs[person.name]}.out"
        uid, gid, groups, names, cwd, _umask = out.read_text().splitlines()
        assert (int(uid), int(gid)) == (person.uid, person.gid)
        assert set(map(int, groups.split())) == set(os.getgrouplist(person.name, person.gid))
        assert names == f"{person.home} {person.name} {person.name}"
        assert cwd == str(person.home)
        info = out.stat()
        assert (info.st_uid, info.st_gid) == (person.uid, person.gid)  # the user's own file


def test_a_job_cannot_reach_another_users_job_or_its_supervisor(multi: MultiUser) -> None:
    alice, bob = multi.people[0], multi.people[1]
    state = multi.server.state_dir
    with multi.client(bob) as client:
        victim = client.submit(_spec(bob, "echo bob-secret; exec sleep 300\n")).id
        _wait(client, victim, JobState.RUNNING)
    started = json.loads(wait_for_file(state / "jobs" / victim / "started.json"))
    victim_pid = started["pid"]
    probe = f"""
state={state}
try() {{ label=$1; shift; if "$@" >/dev/null 2>&1; then echo "$label ok"; else echo "$label denied"; fi; }}
own=$KBATCH_JOB_ID
supervisor=$(awk '{{print $4}}' /proc/$$/stat)
try list-state ls "$state"
try list-other-jobdir ls "$state/jobs/{victim}"
try read-other-launch cat "$state/jobs/{victim}/launch.json"
try read-other-script cat "$state/jobs/{victim}/script"
try read-database cat "$state/jobs.sqlite"
try write-own-result cp /dev/null "$state/jobs/$own/result.json"
try probe-other-job kill -0 {victim_pid}
try signal-other-job kill -TERM {victim_pid}
try signal-supervisor kill -TERM "$supervisor"
try read-other-environ cat /proc/{victim_pid}/environ
try become-root su -c true root
try setuid-0 /usr/bin/python3 -c 'import os; os.setuid(0)'
try setresuid-0 /usr/bin/python3 -c 'import os; os.setresuid(0, 0, 0)'
echo "supervisor $(tr '\\0' ' ' < /proc/$supervisor/cmdline)"
"""
    with multi.client(alice) as client:
        spy = client.submit(_spec(alice, probe)).id
        job = _wait(client, spy)
    if not Path("/usr/bin/python3").exists():
        pytest.skip("needs /usr/bin/python3 to try setuid(0) from the job")
    lines = (alice.home / f"kbatch-{spy}.out").read_text().splitlines()
    report = dict(line.split(" ", 1) for line in lines)
    print(report)
    assert "kbatch.backends.local.supervisor" in report.pop("supervisor")  # our real parent
    assert len(report) == 13 and set(report.values()) == {"denied"}, report
    assert job.state is JobState.COMPLETED
    # Bob's job was untouched, and the probe's own result was the supervisor's to write.
    with multi.client(bob) as client:
        assert client.get(victim).state is JobState.RUNNING
        client.cancel(victim)
        assert _wait(client, victim).state is JobState.CANCELLED
    jobdir = state / "jobs" / spy
    assert jobdir.stat().st_mode & 0o077 == 0 and jobdir.stat().st_uid == 0
    assert state.stat().st_mode & 0o077 == 0 and state.stat().st_uid == 0
    assert (jobdir / "script").stat().st_uid == alice.uid  # its own, reached only through an fd


def test_output_goes_only_where_the_user_may_write(multi: MultiUser) -> None:
    alice = multi.people[0]
    with multi.client(alice) as client:
        ok = client.submit(_spec(alice, "echo discarded\n", output="/dev/null")).id
        assert _wait(client, ok).state is JobState.COMPLETED
        # A file that turns unwritable between the submission and the start: the job,
        # already the user's account, cannot open it and fails saying so.
        target = alice.home / "late.out"
        with _machine_full(multi, alice):
            late = client.submit(_spec(alice, "echo never\n", output=str(target))).id
            target.write_text("root's now\n")
            target.chmod(0o644)
            assert client.get(late).state is JobState.PENDING
        job = _wait(client, late)
    assert job.state is JobState.FAILED, job
    assert "LaunchFailed" in (job.reason or "") and "Permission denied" in (job.reason or ""), job
    assert target.read_text() == "root's now\n"


def test_logs_show_only_the_users_own_file(multi: MultiUser) -> None:
    alice = multi.people[0]
    with multi.client(alice) as client:
        job_id = client.submit(_spec(alice, "echo mine\n")).id
        _wait(client, job_id)
        assert b"".join(client.logs(job_id)) == b"mine\n"
        out = alice.home / f"kbatch-{job_id}.out"
        out.unlink()
        out.symlink_to("/etc/shadow")  # what the user may do in their own home
        assert b"".join(client.logs(job_id)) == b""


@pytest.mark.parametrize(
    ("who", "fields", "error", "message"),
    [
        ("nosuchuser", {}, PermissionDenied, "there is no Unix account 'nosuchuser'"),
        ("daemon", {}, PermissionDenied, "only as accounts with a uid of 1000 or more"),
        ("root", {}, PermissionDenied, "never root"),
        ("alice", {"workdir": "/root"}, InvalidRequest, "the working directory /root"),
        ("alice", {"workdir": "OTHER"}, InvalidRequest, "is not one the account"),
        ("alice", {"output": "/etc/passwd"}, InvalidRequest, "cannot write the output file"),
        ("alice", {"error": "/etc/kbatch-%j.err"}, InvalidRequest, "cannot write the error file"),
        ("alice", {"output": "OTHER/x.out"}, InvalidRequest, "cannot write the output file"),
    ],
)
def test_refusals_create_nothing(
    multi: MultiUser, who: str, fields: dict[str, str], error: type[Exception], message: str
) -> None:
    alice, bob = multi.people[0], multi.people[1]
    bob.home.chmod(0o700)
    token = alice.token if who == "alice" else multi.server.add_token(who)
    values = {k: v.replace("OTHER", str(bob.home)) for k, v in fields.items()}
    spec = _spec(alice, "echo should-not-run > /tmp/kbatch-refused\n", **values)
    jobs_dir = multi.server.state_dir / "jobs"
    before = sorted(os.listdir(jobs_dir))
    with multi.server.client() as admin:
        count = len(admin.list(include_finished=True, all_users=True))
    with multi.server.client(token) as client, pytest.raises(error) as raised:
        client.submit(spec)
    assert message in str(raised.value), raised.value
    with multi.server.client() as admin:
        assert len(admin.list(include_finished=True, all_users=True)) == count
    assert sorted(os.listdir(jobs_dir)) == before
    assert not Path("/tmp/kbatch-refused").exists()


def test_the_launch_refuses_an_account_gone_since_the_submission(multi: MultiUser) -> None:
    with _machine_full(multi, multi.people[0]), unix_account("kbgone") as name:
        token = multi.server.add_token(name)
        home = Path(pwd.getpwnam(name).pw_dir)
        spec = JobSpec(script="#!/bin/sh\ntrue\n", workdir=str(home))
        with multi.server.client(token) as client:
            job_id = client.submit(spec).id
        shutil.rmtree(home, ignore_errors=True)
        # userdel has run: the account is gone when the job may start
    with multi.server.client(token) as client:
        job = _wait(client, job_id)
    assert job.state is JobState.FAILED
    assert "no Unix account" in (job.reason or "")


def test_output_files_wait_for_the_job_to_exist(multi: MultiUser) -> None:
    """The file is made by the job, as the user, when it starts: not by the server."""
    carol = multi.people[2]
    with multi.client(carol) as client:
        job_id = client.submit(_spec(carol, "id -un\n", output="%x-%j.log", name="who")).id
        _wait(client, job_id)
    path = carol.home / f"who-{job_id}.log"
    assert wait_for_file(path) == carol.name
    assert path.stat().st_uid == carol.uid


def test_a_name_with_the_job_id_is_checked_by_its_directory(multi: MultiUser) -> None:
    """kbatch-%j.out names a file not made yet: another file that the check's stand-in
    id happens to name (kbatch-1.out, root's) must not refuse the job."""
    alice = multi.people[0]
    stand_in = alice.home / "kbatch-1.out"
    stand_in.write_text("root's\n")
    try:
        with multi.client(alice) as client:
            job = _wait(client, client.submit(_spec(alice, "true\n")).id)
        assert job.state is JobState.COMPLETED
    finally:
        stand_in.unlink()


def test_limits_hold_for_a_job_of_another_account(multi: MultiUser) -> None:
    """The supervisor (root) still enforces --mem and --time on the account's processes."""
    carol = multi.people[2]
    with multi.client(carol) as client:
        # tail keeps a line without a newline in memory: it grows until the limit kills it
        hog = client.submit(
            _spec(carol, "head -c 400000000 /dev/zero | tail\n", memory=64 * 1024**2)
        ).id
        slow = client.submit(_spec(carol, "exec sleep 60\n", time_limit=1)).id
        assert _wait(client, hog).state is JobState.OUT_OF_MEMORY
        assert _wait(client, slow).state is JobState.TIMEOUT


def test_without_root_run_as_user_changes_nothing() -> None:
    """A server of an ordinary account (a laptop) runs every job as itself, as before."""
    with reachable_dir("kbnr-") as world, unix_account("kbnr") as account:
        python = account_python(account, world)
        entry = pwd.getpwnam(account)
        state = world / "s"
        state.mkdir(mode=0o700)
        shutil.chown(state, account, account)
        config = _config(world)
        config.chmod(0o644)
        work = world / "work"
        work.mkdir()
        shutil.chown(work, account, account)
        server = KbatchServer(
            state,
            args=["--cpus", "1", "--config", str(config)],
            python=str(python),
            user=account,
            log_dir=world,
        )
        server.start()
        try:
            with server.client() as client:  # the owner's token: the server's own account
                spec = JobSpec(script="#!/bin/sh\nid -u\n", workdir=str(work))
                job = _wait(client, client.submit(spec).id)
            assert job.state is JobState.COMPLETED
            assert (work / f"kbatch-{job.id}.out").read_text().strip() == str(entry.pw_uid)
            assert "run_as_user needs a server running as root" in server.log()
        finally:
            server.stop()
