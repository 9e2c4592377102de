"""One user can never see, follow or cancel another user's jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbatch.client import Client
from kbatch.errors import NotFound, PermissionDenied
from kbatch.models import JobState
from tests.support.servers import KbatchServer


def test_users_are_isolated(server: KbatchServer, workdir: Path) -> None:
    alice_token = server.add_token("alice")
    bob_token = server.add_token("bob")
    alice = server.cli(
        "submit", "--parsable", "--wrap", "sleep 30", cwd=workdir, env={"KBATCH_TOKEN": alice_token}
    )
    job_id = alice.stdout.strip()
    assert alice.returncode == 0, alice.stderr

    bob_env = {"KBATCH_TOKEN": bob_token}
    assert server.cli("queue", "--all", "--json", env=bob_env).stdout.strip() == "[]"
    for args in (
        ["show", job_id],
        ["logs", job_id],
        ["cancel", job_id],
        ["hold", job_id],
        ["release", job_id],
    ):
        result = server.cli(*args, env=bob_env)
        assert result.returncode != 0
        assert f"no job {job_id}" in result.stderr
    # A dependency on another user's job is the same 404: it confirms nothing.
    chained = server.cli(
        "submit", "-d", f"afterok:{job_id}", "--wrap", "true", cwd=workdir, env=bob_env
    )
    assert chained.returncode != 0 and f"there is no job {job_id}" in chained.stderr
    assert server.cli("queue", "--all", "--json", env=bob_env).stdout.strip() == "[]"
    denied = server.cli("queue", "--all-users", env=bob_env)
    assert denied.returncode != 0 and "only admins" in denied.stderr

    with Client(server.url, bob_token) as bob:
        with pytest.raises(NotFound):
            bob.get(job_id)
        with pytest.raises(NotFound):
            list(bob.logs(job_id))
        with pytest.raises(NotFound):
            bob.cancel(job_id)
        with pytest.raises(PermissionDenied):
            bob.list(all_users=True)
    with Client(server.url, alice_token) as client:
        assert client.get(job_id).state is JobState.RUNNING  # bob's cancel did nothing
        assert client.whoami().name == "alice"

    # the server's owner is an admin: sees everyone with an explicit flag, and may cancel
    everyone = server.cli("queue", "--all-users").stdout
    assert "alice" in everyone and "USER" in everyone
    assert server.cli("queue", "--json").stdout.strip() == "[]"  # not without the flag
    assert server.cli("cancel", job_id).returncode == 0
    assert server.wait_state(job_id).state is JobState.CANCELLED
