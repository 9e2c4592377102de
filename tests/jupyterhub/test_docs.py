"""docs/jupyterhub.md, followed to the letter, gives users zero-configuration kbatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from tests.jupyterhub.test_dashboard import hub_login
from tests.support.jupyterhub import DocsHub, assert_no_secrets, install_proxy
from tests.support.polling import wait_for


def test_a_hub_set_up_as_the_docs_say(
    tmp_path_factory: pytest.TempPathFactory, browser: Browser
) -> None:
    hub = DocsHub(root=tmp_path_factory.mktemp("docs", numbered=True), proxy_exe=install_proxy())
    try:
        hub.start_hub()
        alice = hub.create_user("alice", groups=("kbatch-users",))
        boss = hub.create_user("boss", groups=("kbatch-users", "kbatch-admins"))
        env = hub.spawn(alice)
        assert env["JUPYTERHUB_PUBLIC_HUB_URL"] == ""  # the docs set no public URL

        home = Path(env["HOME"])
        # The documented local backend gives jobs no hub token (per-job tokens need
        # Kubernetes), and the service's own never reaches a job's environment.
        (home / "train.sh").write_text(
            '#!/bin/sh\necho "${JUPYTERHUB_API_TOKEN:-no-hub-token}"\necho trained\n'
        )
        submitted = hub.notebook_cli(env, "submit", "--parsable", "-t", "10", "train.sh")
        assert submitted.returncode == 0, submitted.stderr + hub.hub_log()[-3000:]
        job_id = submitted.stdout.strip()

        def finished() -> dict[str, str] | None:
            job: dict[str, str] = json.loads(hub.notebook_cli(env, "show", "--json", job_id).stdout)
            return job if job["state"] not in ("PENDING", "RUNNING") else None

        job = wait_for(finished, timeout=30, what=f"job {job_id} to end")
        assert job is not None and (job["state"], job["user"]) == ("COMPLETED", "alice")
        assert (home / f"kbatch-{job_id}.out").read_text().split() == ["no-hub-token", "trained"]

        boss_env = hub.spawn(boss)
        everyone = hub.notebook_cli(boss_env, "kqueue", "--all", "--all-users", "--json")
        assert [(j["id"], j["user"]) for j in json.loads(everyone.stdout)] == [(job_id, "alice")]

        # The web dashboard: alice logs in through the hub's OAuth and sees her job.
        context = browser.new_context()
        try:
            page, problems = hub_login(hub, context, alice)
            page.click("#tab-finished")
            expect(page.locator(f'#job-rows tr[data-id="{job_id}"] .state')).to_have_text(
                "COMPLETED"
            )
            assert problems == []
        finally:
            context.close()
        assert_no_secrets(hub)
    finally:
        hub.stop()
