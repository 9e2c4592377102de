"""The hub goes down and comes back: fast 503s naming the hub, then recovery by itself.

The proxy and the kbatch service stay up while the hub is stopped, as in a
Kubernetes deployment where they are separate pods.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kbatch.models import JobState
from tests.support.jupyterhub import SERVICE, USERS_GROUP, Hub
from tests.support.polling import wait_for


def _job_tokens(hub: Hub, user: str, job_id: str) -> list[str]:
    note = f"kbatch job {job_id} (service {SERVICE})"
    return [t["id"] for t in hub.tokens(user) if t["note"] == note]


def test_the_hub_going_down_and_coming_back(hub: Hub, username: Callable[[str], str]) -> None:
    assert hub.kbatch is not None
    kbatch = hub.kbatch
    user = hub.create_user(username("outage"), groups=(USERS_GROUP,))
    env = hub.spawn(user)
    recent = hub.token(user)
    assert hub.service("GET", "/whoami", token=recent).status_code == 200  # now cached
    fresh = hub.token(user)  # never shown to the service yet

    # A job that is running when the hub goes down, and ends during the outage.
    workdir = Path(env["HOME"]) / "outage"
    workdir.mkdir()
    command = "while [ ! -f go ]; do sleep 0.1; done"
    submitted = hub.notebook_cli(env, "submit", "--parsable", "--wrap", command, cwd=workdir)
    job_id = submitted.stdout.strip()
    kbatch.wait_job(recent, job_id, JobState.RUNNING)
    assert len(_job_tokens(hub, user, job_id)) == 1

    hub.stop_hub()
    try:
        # The notebook's CLI (with a token the service has not seen) retries briefly,
        # then says which hub is down.
        cli = subprocess.Popen(
            [str(Path(sys.executable).with_name("kqueue"))],
            env={**env, "JUPYTERHUB_API_TOKEN": fresh},
            cwd=env["HOME"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started = time.monotonic()
        response = hub.service("GET", "/jobs", token=fresh)
        assert time.monotonic() - started < 2  # fails fast
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "hub_unavailable"
        assert f"JupyterHub is not reachable at {hub.api_url}" in error["message"]
        assert fresh not in response.text
        # A token checked moments ago is still known: answers are cached briefly.
        assert hub.service("GET", "/whoami", token=recent).status_code == 200

        (workdir / "go").touch()
        assert kbatch.wait_job(recent, job_id).state is JobState.COMPLETED
        wait_for(
            lambda: "cannot revoke the hub token" in kbatch.log(),
            timeout=15,
            what="the failed revocation in the log",
        )
        _, stderr = cli.communicate(timeout=60)
        assert cli.returncode == 1
        assert f"JupyterHub is not reachable at {hub.api_url}" in stderr, stderr
    finally:
        hub.start_hub()

    # Back by itself: no restart of the service, no new token.
    wait_for(
        lambda: hub.service("GET", "/whoami", token=fresh).status_code == 200,
        timeout=10,
        what="the service to use the hub again",
    )
    queue = hub.notebook_cli(env, "kqueue", "--all")
    assert queue.returncode == 0 and job_id in queue.stdout
    # The token of the job that ended during the outage is revoked at the next chance.
    assert len(_job_tokens(hub, user, job_id)) == 1
    again = hub.notebook_cli(env, "submit", "--parsable", "--wrap", "true").stdout.strip()
    kbatch.wait_job(recent, again)
    wait_for(
        lambda: not _job_tokens(hub, user, job_id) and not _job_tokens(hub, user, again),
        timeout=15,
        what="both jobs' tokens to be revoked",
    )
