"""A job's own hub token: made for the job's user with the admin's scopes, revoked at its end."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from kbatch.models import JobState
from tests.support.jupyterhub import JOB_TOKEN_SCOPES, LIMITED_GROUP, SERVICE, USERS_GROUP, Hub
from tests.support.polling import wait_for, wait_for_file

KBATCH = Path(sys.executable).with_name("kbatch")
MARGIN = 60  # job_token_margin in the test service's config

# Reports what the job's token is and may do, keeps the token (privately) for the
# log check, then waits for the test to let it finish.
JOB = f"""#!{sys.executable}
import hashlib, json, os, pathlib, subprocess, time, urllib.request

token = os.environ["JUPYTERHUB_API_TOKEN"]
request = urllib.request.Request(
    os.environ["JUPYTERHUB_API_URL"] + "/user", headers={{"Authorization": "token " + token}}
)
model = json.load(urllib.request.urlopen(request))
whoami = subprocess.run([{str(KBATCH)!r}, "whoami"], capture_output=True, text=True)
fd = os.open("job-token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, token.encode())
os.close(fd)
report = {{
    "user": model["name"],
    "token_id": model["token_id"],
    "scopes": model["scopes"],
    "sha256": hashlib.sha256(token.encode()).hexdigest(),
    "env_user": os.environ.get("JUPYTERHUB_USER"),
    "api_url": os.environ.get("JUPYTERHUB_API_URL"),
    "whoami": whoami.stdout.strip() + whoami.stderr.strip(),
}}
print(json.dumps(report), flush=True)
while not pathlib.Path("go").exists():
    time.sleep(0.1)
"""


def _entry(hub: Hub, user: str, token_id: str) -> dict[str, Any] | None:
    return next((t for t in hub.tokens(user) if t["id"] == token_id), None)


def _job_tokens(hub: Hub, user: str, job_id: str) -> list[dict[str, Any]]:
    note = f"kbatch job {job_id} (service {SERVICE})"
    return [t for t in hub.tokens(user) if t["note"] == note]


def _lifetime(entry: dict[str, Any]) -> float:
    created = datetime.fromisoformat(entry["created"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00"))
    return (expires - created).total_seconds()


def test_a_job_gets_its_own_token_with_the_admins_scopes(
    hub: Hub, username: Callable[[str], str]
) -> None:
    user = hub.create_user(username("jobtok"), groups=(USERS_GROUP,))
    env = hub.spawn(user)
    workdir = Path(env["HOME"]) / "run1"
    workdir.mkdir()
    (workdir / "job.py").write_text(JOB)
    submitted = hub.notebook_cli(env, "submit", "--parsable", "-t", "5", "job.py", cwd=workdir)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    report = json.loads(wait_for_file(workdir / f"kbatch-{job_id}.out").splitlines()[0])
    job_token = (workdir / "job-token").read_text()
    hub.secrets_seen.add(job_token)
    # The job's token is the user's, is not the notebook's, and carries only the configured
    # scopes: enough here to use kbatch itself from inside the job with no configuration.
    notebook_token = env["JUPYTERHUB_API_TOKEN"]
    assert report["user"] == report["env_user"] == user
    assert report["api_url"] == hub.api_url
    assert report["sha256"] != hashlib.sha256(notebook_token.encode()).hexdigest()
    identify = {f"read:users:name!user={user}", f"read:users:groups!user={user}"}  # any token's
    assert set(report["scopes"]) - identify == set(JOB_TOKEN_SCOPES)
    assert report["whoami"] == user

    entry = _entry(hub, user, report["token_id"])
    assert entry is not None
    assert entry["note"] == f"kbatch job {job_id} (service {SERVICE})"
    assert abs(_lifetime(entry) - (5 * 60 + MARGIN)) < 5  # the time limit plus the margin

    (workdir / "go").touch()
    assert hub.kbatch is not None
    assert hub.kbatch.wait_job(notebook_token, job_id).state is JobState.COMPLETED
    wait_for(
        lambda: _entry(hub, user, report["token_id"]) is None,
        timeout=15,
        what="the job's token to be revoked",
    )
    assert hub.api("GET", "/user", token=job_token).status_code == 403
    assert _entry(hub, user, entry["id"]) is None and notebook_token  # the notebook's stays
    assert hub.api("GET", "/user", token=notebook_token).status_code == 200


def test_a_cancelled_jobs_token_is_revoked(hub: Hub, username: Callable[[str], str]) -> None:
    user = hub.create_user(username("canceltok"), groups=(USERS_GROUP,))
    env = hub.spawn(user)
    job_id = hub.notebook_cli(env, "submit", "--parsable", "--wrap", "sleep 60").stdout.strip()
    assert hub.kbatch is not None
    hub.kbatch.wait_job(env["JUPYTERHUB_API_TOKEN"], job_id, JobState.RUNNING)
    (entry,) = _job_tokens(hub, user, job_id)
    assert abs(_lifetime(entry) - 86400) < 5  # no time limit: the configured default
    assert hub.notebook_cli(env, "cancel", job_id).returncode == 0
    wait_for(lambda: not _job_tokens(hub, user, job_id), timeout=15, what="revocation")


def test_a_token_the_hub_refuses_fails_the_job(hub: Hub, username: Callable[[str], str]) -> None:
    # The user may use kbatch but does not hold every scope the admin gives jobs:
    # the hub will never make that token, so the job fails, saying why, and never runs.
    user = hub.create_user(username("limited"), groups=(LIMITED_GROUP,))
    env = hub.spawn(user)
    job_id = hub.notebook_cli(env, "submit", "--parsable", "--wrap", "true").stdout.strip()
    assert hub.kbatch is not None
    job = hub.kbatch.wait_job(env["JUPYTERHUB_API_TOKEN"], job_id)
    assert job.state is JobState.FAILED
    assert job.reason is not None and job.reason.startswith("JobSetupFailed: ")
    assert f"refused to create a token for {user}" in job.reason
    assert job.started is None
