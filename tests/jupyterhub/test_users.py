"""Hub users and admins: nobody touches another user's jobs, except admins who ask to."""

from __future__ import annotations

import json
from collections.abc import Callable

from kbatch.models import JobState
from tests.support.jupyterhub import ADMIN_GROUP, USERS_GROUP, Hub

ROUTES = (
    ("GET", "/jobs/{id}"),
    ("GET", "/jobs/{id}/logs"),
    ("GET", "/jobs/{id}/logs?follow=true"),
    ("POST", "/jobs/{id}/cancel"),
)


def _submit(hub: Hub, env: dict[str, str], command: str) -> str:
    result = hub.notebook_cli(env, "submit", "--parsable", "--wrap", command)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_one_user_cannot_touch_another_users_job(hub: Hub, username: Callable[[str], str]) -> None:
    alice = hub.create_user(username("alice"), groups=(USERS_GROUP,))
    bob = hub.create_user(username("bob"), groups=(USERS_GROUP,))
    alice_env, bob_env = hub.spawn(alice), hub.spawn(bob)
    job_id = _submit(hub, alice_env, "echo secret-output; sleep 60")
    bob_token = bob_env["JUPYTERHUB_API_TOKEN"]

    # The CLI: as if the job did not exist.
    for args in (["show", job_id], ["logs", job_id], ["logs", "-f", job_id], ["cancel", job_id]):
        result = hub.notebook_cli(bob_env, *args)
        assert result.returncode == 1, args
        assert f"no job {job_id}" in result.stderr and "secret-output" not in result.stdout
    assert json.loads(hub.notebook_cli(bob_env, "kqueue", "--all", "--json").stdout) == []
    denied = hub.notebook_cli(bob_env, "kqueue", "--all-users")
    assert denied.returncode == 1 and "only admins" in denied.stderr

    # The HTTP API, through the proxy and straight to the service: 404, the same as no job.
    direct = f"http://127.0.0.1:{hub.service_port}/services/kbatch"
    for base in (hub.service_url, direct):
        for method, route in ROUTES:
            for job in (job_id, "999999"):
                response = hub.service(method, route.format(id=job), token=bob_token, base=base)
                assert response.status_code == 404, (method, route, response.text)
                assert response.json()["error"]["message"] == f"no job {job}"
        everyone = hub.service("GET", "/jobs?all_users=true", token=bob_token, base=base)
        assert everyone.status_code == 403
        assert hub.service("GET", "/jobs?all=true", token=bob_token, base=base).json() == {
            "jobs": []
        }

    alice_token = alice_env["JUPYTERHUB_API_TOKEN"]
    assert hub.kbatch is not None
    assert hub.kbatch.wait_job(alice_token, job_id, JobState.RUNNING).user == alice
    assert hub.notebook_cli(alice_env, "cancel", job_id).returncode == 0
    assert hub.kbatch.wait_job(alice_token, job_id).state is JobState.CANCELLED


def test_hub_admins_and_the_admin_group_manage_every_job(
    hub: Hub, username: Callable[[str], str]
) -> None:
    carol = hub.create_user(username("carol"), groups=(USERS_GROUP,))
    root = hub.create_user(username("hubadmin"), admin=True)  # a hub admin, in no group
    ops = hub.create_user(username("ops"), groups=(USERS_GROUP, ADMIN_GROUP))
    carol_env, root_env, ops_env = hub.spawn(carol), hub.spawn(root), hub.spawn(ops)

    for admin, env in ((root, root_env), (ops, ops_env)):
        assert hub.notebook_cli(env, "whoami").stdout.strip() == f"{admin} (admin)"
    first = _submit(hub, carol_env, "echo carol-was-here; sleep 60")
    second = _submit(hub, carol_env, "sleep 60")
    assert hub.kbatch is not None
    hub.kbatch.wait_job(carol_env["JUPYTERHUB_API_TOKEN"], first, JobState.RUNNING)

    for env in (root_env, ops_env):
        # Only with the explicit flag do admins see other users' jobs.
        assert json.loads(hub.notebook_cli(env, "kqueue", "--json").stdout) == []
        listing = hub.notebook_cli(env, "kqueue", "--all-users")
        assert listing.returncode == 0, listing.stderr
        assert "USER" in listing.stdout and carol in listing.stdout
        jobs = json.loads(hub.notebook_cli(env, "kqueue", "--all-users", "--json").stdout)
        assert {first, second} <= {j["id"] for j in jobs}
        assert json.loads(hub.notebook_cli(env, "show", "--json", first).stdout)["user"] == carol
    logs = hub.notebook_cli(ops_env, "logs", first)
    assert logs.stdout.strip() == "carol-was-here"

    # Cancelling: the hub admin by the CLI, the group member by the HTTP API.
    assert hub.notebook_cli(root_env, "cancel", first).returncode == 0
    response = hub.service("POST", f"/jobs/{second}/cancel", token=ops_env["JUPYTERHUB_API_TOKEN"])
    assert response.status_code == 200, response.text
    for job_id in (first, second):
        job = hub.kbatch.wait_job(carol_env["JUPYTERHUB_API_TOKEN"], job_id)
        assert job.state is JobState.CANCELLED


def test_admin_status_follows_the_hub(hub: Hub, username: Callable[[str], str]) -> None:
    """Taking a user out of the admin group takes effect once the short cache has expired."""
    user = hub.create_user(username("demoted"), groups=(USERS_GROUP, ADMIN_GROUP))
    token = hub.token(user)
    assert hub.service("GET", "/whoami", token=token).json()["admin"] is True
    hub.api_ok("DELETE", f"/groups/{ADMIN_GROUP}/users", json_body={"users": [user]})
    fresh = hub.token(user)  # a token the service has not cached
    response = hub.service("GET", "/jobs?all_users=true", token=fresh)
    assert response.status_code == 403
