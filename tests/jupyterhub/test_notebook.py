"""Zero configuration in a notebook: the CLI with exactly the environment a hub gives a server.

Each user's server is started by the hub's real spawner; the CLI then runs
with that server's environment and nothing else, as in a fresh terminal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from kbatch.models import JobState
from tests.support.jupyterhub import SERVICE, USERS_GROUP, Hub
from tests.support.polling import wait_for_file


def test_submit_in_a_fresh_notebook_terminal(hub: Hub, username: Callable[[str], str]) -> None:
    user = hub.create_user(username("nb"), groups=(USERS_GROUP,))
    env = hub.spawn(user)
    # What the hub gives a server: no kbatch setting at all, no config file, no login.
    assert not [k for k in env if k.startswith("KBATCH_")]
    home = Path(env["HOME"])
    assert not (home / ".config" / "kbatch").exists()

    shown = hub.notebook_cli(env, "configure", "--show")
    assert shown.returncode == 0, shown.stderr
    assert f"url:    {hub.service_url}" in shown.stdout  # through the hub's proxy
    assert "JupyterHub environment" in shown.stdout

    assert hub.notebook_cli(env, "whoami").stdout.strip() == user
    empty = hub.notebook_cli(env, "kqueue")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.split() == ["JOBID", "NAME", "STATE", "TIME", "REASON"]
    script = home / "hello.sh"
    script.write_text("#!/bin/sh\n#SBATCH --job-name=hello\necho hello from $JUPYTERHUB_USER\n")
    submitted = hub.notebook_cli(env, "submit", "--parsable", "hello.sh")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    assert hub.kbatch is not None
    job = hub.kbatch.wait_job(env["JUPYTERHUB_API_TOKEN"], job_id)
    assert (job.state, job.user, job.name) == (JobState.COMPLETED, user, "hello")
    assert wait_for_file(home / f"kbatch-{job_id}.out") == f"hello from {user}"

    queue = hub.notebook_cli(env, "kqueue", "--all", "--json")
    assert [j["id"] for j in json.loads(queue.stdout)] == [job_id]
    logs = hub.notebook_cli(env, "logs", job_id)
    assert logs.stdout.strip() == f"hello from {user}"
    waited = hub.notebook_cli(env, "submit", "-W", "--wrap", "exit 3")
    assert waited.returncode == 3, waited.stderr


def test_without_a_public_url_the_hub_api_says_where_the_service_is(
    hub: Hub, username: Callable[[str], str]
) -> None:
    user = hub.create_user(username("nopublic"), groups=(USERS_GROUP,))
    env = hub.spawn(user)
    # A hub without c.JupyterHub.public_url gives its servers empty public URLs.
    env = {**env, "JUPYTERHUB_PUBLIC_HUB_URL": "", "JUPYTERHUB_PUBLIC_URL": ""}
    shown = hub.notebook_cli(env, "configure", "--show")
    assert shown.returncode == 0, shown.stderr
    assert f"url:    http://127.0.0.1:{hub.service_port}/services/{SERVICE}" in shown.stdout
    assert "hub API" in shown.stdout
    submitted = hub.notebook_cli(env, "submit", "--parsable", "--wrap", "true")
    assert submitted.returncode == 0, submitted.stderr

    # Without read:services for the service, the CLI says what the admin must grant.
    outsider = hub.create_user(username("noread"))
    outsider_env = {**hub.spawn(outsider), "JUPYTERHUB_PUBLIC_HUB_URL": ""}
    failed = hub.notebook_cli(outsider_env, "kqueue")
    assert failed.returncode == 1
    assert f"lacks read:services!service={SERVICE}" in failed.stderr
    assert "docs/jupyterhub.md" in failed.stderr and "KBATCH_URL" in failed.stderr

    # A service name the hub does not know.
    wrong = hub.notebook_cli({**env, "KBATCH_SERVICE_NAME": "nope"}, "kqueue")
    assert wrong.returncode == 1 and "nope" in wrong.stderr
    assert env["JUPYTERHUB_API_TOKEN"] not in wrong.stderr + failed.stderr


def test_a_notebook_whose_token_lacks_the_scope(hub: Hub, username: Callable[[str], str]) -> None:
    user = hub.create_user(username("noscope"))  # in no group the admin granted kbatch to
    env = hub.spawn(user)
    result = hub.notebook_cli(env, "submit", "--wrap", "true")
    assert result.returncode == 1
    assert f"lacks the scope access:services!service={SERVICE}" in result.stderr
    assert "server_token_scopes" in result.stderr
    assert env["JUPYTERHUB_API_TOKEN"] not in result.stderr


def test_kbatch_url_and_the_config_file_come_first(
    hub: Hub, username: Callable[[str], str]
) -> None:
    user = hub.create_user(username("override"), groups=(USERS_GROUP,))
    env = hub.spawn(user)
    direct = f"http://127.0.0.1:{hub.service_port}/services/{SERVICE}"

    by_env = hub.notebook_cli({**env, "KBATCH_URL": direct}, "configure", "--show")
    assert f"url:    {direct}" in by_env.stdout and "source: environment" in by_env.stdout
    assert hub.notebook_cli({**env, "KBATCH_URL": direct}, "whoami").stdout.strip() == user

    other = hub.token(user, note="configured")
    configured = hub.notebook_cli(env, "configure", "--url", direct, "--token", other)
    assert configured.returncode == 0, configured.stderr
    assert f"knows you as {user}" in configured.stdout
    shown = hub.notebook_cli(env, "configure", "--show")
    assert f"url:    {direct}" in shown.stdout and "config.json" in shown.stdout
    assert other not in shown.stdout
