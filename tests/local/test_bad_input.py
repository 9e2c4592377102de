"""Every bad input a user can give: one clear line on stderr, non-zero exit, nothing created."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.servers import CliResult, KbatchServer


def assert_clean_error(result: CliResult, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kbatch: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_created(server: KbatchServer) -> None:
    assert json.loads(server.cli("queue", "--all", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--frobnicate", "--wrap", "true"], ["unknown option --frobnicate", "--ignore-unknown"]),
        (["--mem=12Q", "--wrap", "true"], ["--mem='12Q' is not a memory size", "2G"]),
        (["--time=1h", "--wrap", "true"], ["not a time limit", "HH:MM:SS"]),
        (["-c", "many", "--wrap", "true"], ["whole number"]),
        (["missing.sh"], ["no such script: missing.sh"]),
        ([], ["no script given"]),
        (["--input=x", "--wrap", "true"], ["--input=x", "not supported by kbatch yet"]),
        # Arrays (issue 12).
        (["--array=3-1", "--wrap", "true"], ["--array=3-1", "goes backwards"]),
        (["--array=0-9%0", "--wrap", "true"], ["throttle", "at least 1"]),
        (["--array=0-200000", "--wrap", "true"], ["more than 100000 tasks", "max_array_tasks"]),
        (["-c", "64", "--wrap", "true"], ["asks for 64 CPUs but this server has 2"]),
        (["--mem=100T", "--wrap", "true"], ["of memory but this server has"]),
        (["--gpus=1", "--wrap", "true"], ["GPUs but this server has 0"]),
        (["-D", "/nonexistent/dir", "--wrap", "true"], ["/nonexistent/dir does not exist"]),
        (["-o", "nodir/%j.out", "--wrap", "true"], ["nodir", "does not exist"]),
        (["-o", "%q.out", "--wrap", "true"], ["%q is not known"]),
        (["--image=python:3", "--wrap", "true"], ["--image is for the Kubernetes backend"]),
        (["--nodes=3", "--wrap", "true"], ["one node"]),
        (["-J", "a/b", "--wrap", "true"], ["job name"]),
        # The server's own files: pointing -o at tokens.json once made every request fail.
        (["-o", "{state}/tokens.json", "--wrap", "true"], ["inside the kbatch server's state"]),
        (["-e", "{state}/jobs/x.err", "--wrap", "true"], ["inside the kbatch server's state"]),
        (["-D", "{state}", "--wrap", "true"], ["inside the kbatch server's state"]),
        # Dependencies and start times (issue 13).
        (["-d", "afterok", "--wrap", "true"], ["afterok needs job ids"]),
        (["-d", "afterwards:1", "--wrap", "true"], ["not a dependency type"]),
        (["-d", "afterok:1,afterany:2?after:3", "--wrap", "true"], ["not both"]),
        (["-d", "afterok:424242", "--wrap", "true"], ["there is no job 424242"]),
        (["--begin", "2020-01-01T08:00", "--wrap", "true"], ["in the past"]),
        (["--begin", "whenever", "--wrap", "true"], ["is not a time", "now+1hour"]),
        (["--kill-on-invalid-dep=maybe", "--wrap", "true"], ["use yes or no"]),
    ],
)
def test_bad_submit(
    server: KbatchServer, workdir: Path, args: list[str], fragments: list[str]
) -> None:
    args = [a.replace("{state}", str(server.state_dir)) for a in args]
    assert_clean_error(server.cli("submit", *args, cwd=workdir), *fragments)
    assert_nothing_created(server)
    assert "tokens.json" not in {p.name for p in server.state_dir.glob("jobs/*")}


def test_script_without_interpreter_line(server: KbatchServer, workdir: Path) -> None:
    (workdir / "plain.sh").write_text("echo hi\n")
    assert_clean_error(server.cli("submit", "plain.sh", cwd=workdir), "#!/bin/bash")
    assert_nothing_created(server)


def test_binary_and_directory_scripts(server: KbatchServer, workdir: Path) -> None:
    (workdir / "bin.sh").write_bytes(b"#!/bin/sh\n\xff\xfe\x00")
    assert_clean_error(server.cli("submit", "bin.sh", cwd=workdir), "not a text script")
    assert_clean_error(server.cli("submit", ".", cwd=workdir), "is a directory")
    assert_nothing_created(server)


def test_directive_errors_name_the_line(server: KbatchServer, workdir: Path) -> None:
    (workdir / "bad.sh").write_text("#!/bin/sh\n#SBATCH -J ok\n#SBATCH --mem=lots\necho\n")
    assert_clean_error(server.cli("submit", "bad.sh", cwd=workdir), "--mem='lots'")
    assert_nothing_created(server)


def test_ignore_unknown_submits_with_a_warning(server: KbatchServer, workdir: Path) -> None:
    result = server.cli("submit", "--ignore-unknown", "--frobnicate", "--wrap", "true", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "warning: ignoring unknown option --frobnicate" in result.stderr


def test_test_only_creates_nothing(server: KbatchServer, workdir: Path) -> None:
    result = server.cli("submit", "--test-only", "-c", "2", "--wrap", "true", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "CPUs: 2" in result.stdout
    assert_nothing_created(server)


def test_unreachable_server(server: KbatchServer, workdir: Path) -> None:
    result = server.cli("queue", env={"KBATCH_URL": "http://127.0.0.1:9", "KBATCH_TOKEN": "x"})
    assert_clean_error(result, "cannot reach the kbatch server at http://127.0.0.1:9")


def test_rejected_token(server: KbatchServer, workdir: Path) -> None:
    result = server.cli(
        "submit", "--wrap", "true", env={"KBATCH_TOKEN": "not-a-token"}, cwd=workdir
    )
    assert_clean_error(result, "token was not accepted")
    assert "not-a-token" not in result.stderr
    assert_nothing_created(server)


def test_no_server_configured(tmp_path: Path) -> None:
    lonely = KbatchServer(tmp_path / "nothing-here")
    lonely.state_dir.mkdir()
    assert_clean_error(
        lonely.cli("queue"), "no kbatch server configured", "kbatch server --background"
    )


def test_unknown_job(server: KbatchServer) -> None:
    assert_clean_error(server.cli("show", "999"), "no job 999")
    assert_clean_error(server.cli("logs", "abc"), "no job")
    result = server.cli("cancel", "999")
    assert result.returncode == 1 and "no job 999" in result.stderr


def test_bad_queue_state(server: KbatchServer) -> None:
    assert_clean_error(server.cli("queue", "-t", "DONE"), "DONE is not a state")


def test_second_server_on_same_state_dir_is_refused(server: KbatchServer) -> None:
    result = server.cli("server", "--state-dir", str(server.state_dir))
    assert_clean_error(result, "already running")
