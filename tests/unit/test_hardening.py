"""A job running under the server's uid cannot read the server's or its supervisor's secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kbatch.hardening import make_undumpable, scrub_environment, supervisor_environment
from tests.support.accounts import account_python, reachable_dir, run_as, unix_account

# Sets a secret in its environment, optionally becomes non-dumpable, then lets a child of
# the same uid (a job, as the local backend starts one) try to read it: /proc environ,
# memory, and ptrace.
PROBE = textwrap.dedent(
    """
    import ctypes, json, os, subprocess, sys
    from kbatch.hardening import make_undumpable
    undumpable = make_undumpable() if sys.argv[1] == "off" else False
    child = '''
    import ctypes, json, sys
    pid = int(sys.argv[1])
    seen = {}
    for name in ("environ", "mem"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as handle:  # mem: opening is enough
                seen[name] = name == "mem" or "SECRET-VALUE" in handle.read().decode("latin-1")
        except OSError as exc:
            seen[name] = type(exc).__name__
    libc = ctypes.CDLL(None, use_errno=True)
    # PTRACE_SEIZE: attaches without stopping it; the kernel detaches when we exit.
    seen["ptrace"] = libc.ptrace(0x4206, pid, 0, 0) == 0
    print(json.dumps(seen))
    '''
    out = subprocess.run(
        [sys.executable, "-c", child, str(os.getpid())], capture_output=True, text=True
    )
    print(json.dumps({"undumpable": undumpable, "uid": os.getuid(), "child": json.loads(out.stdout)}))
    """
)


def test_the_supervisor_inherits_nothing_of_the_servers_environment() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "JUPYTERHUB_API_TOKEN": "service-secret",
        "JPY_API_TOKEN": "service-secret",
        "KBATCH_TOKEN": "t",
        "HOME": "/root",
        "AWS_SECRET_ACCESS_KEY": "x",
    }
    assert supervisor_environment(env) == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def test_scrub_environment_drops_the_hubs_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "service-secret")
    monkeypatch.setenv("JPY_API_TOKEN", "service-secret")
    scrub_environment()
    assert "JUPYTERHUB_API_TOKEN" not in os.environ and "JPY_API_TOKEN" not in os.environ


def test_make_undumpable_in_this_process_family() -> None:
    # In a child, so that the test process itself stays debuggable.
    code = "from kbatch.hardening import make_undumpable; print(make_undumpable())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = sys.platform.startswith("linux")
    assert out.stdout.strip() == str(expected)
    assert make_undumpable.__module__ == "kbatch.hardening"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_process_of_the_same_uid_cannot_read_a_non_dumpable_process() -> None:
    """The experiment behind the hardening: same non-root uid, dumpable or not."""
    with reachable_dir() as where, unix_account("kbd") as user:
        python = account_python(user, where)
        probe = where / "probe.py"
        probe.write_text(PROBE)
        probe.chmod(0o644)

        def run(mode: str) -> dict[str, object]:
            result = run_as(
                user,
                [str(python), str(probe), mode],
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "SECRET": "SECRET-VALUE"},
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
            report: dict[str, object] = json.loads(result.stdout)
            return report

        dumpable, hardened = run("on"), run("off")
    assert dumpable["uid"] == hardened["uid"] != 0
    # An ordinary process: its child of the same uid reads its environment and attaches to it.
    assert dumpable["child"] == {"environ": True, "mem": True, "ptrace": True}
    # Non-dumpable: /proc/<pid>/environ and mem are root's; ptrace is refused.
    assert hardened["undumpable"] is True
    assert hardened["child"] == {
        "environ": "PermissionError",
        "mem": "PermissionError",
        "ptrace": False,
    }
