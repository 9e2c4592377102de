"""docs/tljh.md on a real JupyterHub, with hub users mapped to real Unix accounts.

As on The Littlest JupyterHub: the hub user ``kbt1a2b3c`` is the Unix account
``jupyter-kbt1a2b3c`` (made here with ``useradd -m``; CI runs as root, as TLJH's
kbatch service does).  The kbatch server is started the way the documented
systemd unit says (its ``Environment`` lines and ``ExecStart`` arguments, with
this test's paths and port), with the documented ``kbatch.toml``; the hub loads
the documented ``jupyterhub_config.d`` file.  Jobs are submitted with the CLI
in each user's notebook environment, through the hub's proxy, and must run
as the user's account.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from kbatch.models import JobState
from tests.support.accounts import reachable_dir, unix_account
from tests.support.jupyterhub import (
    Hub,
    HubKbatchServer,
    _get,
    assert_no_secrets,
    docs_block,
    install_proxy,
)
from tests.support.polling import wait_for
from tests.support.servers import REPO

TLJH_DOCS = REPO / "docs" / "tljh.md"


def _unit() -> tuple[dict[str, str], list[str], dict[str, str]]:
    """The documented unit's Environment, ExecStart argv, and other [Service] keys."""
    env: dict[str, str] = {}
    argv: list[str] = []
    keys: dict[str, str] = {}
    for line in docs_block("tljh systemd unit", TLJH_DOCS).splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
        elif key == "ExecStart":
            argv = shlex.split(value)
        elif key and not key.startswith(("#", "[")) and value:
            keys[key] = value
    return env, argv, keys


class TljhHub(Hub):
    """The hub with the documented jupyterhub_config.d file; kbatch as the unit runs it."""

    def kbatch_config(self) -> str:
        documented = (
            docs_block("tljh jupyterhub_config.d", TLJH_DOCS)
            .replace("/etc/kbatch/hub.env", str(self.root / "hub.env"))
            .replace("http://127.0.0.1:10101", f"http://127.0.0.1:{self.service_port}")
        )
        test_admin = {"name": "test-admin", "api_token": self.admin_token, "admin": True}
        return documented + f"\nc.JupyterHub.services.append({test_admin!r})\n"

    def start_service(self, **settings: object) -> HubKbatchServer:
        (self.root / "hub.env").write_text(f"JUPYTERHUB_API_TOKEN={self.service_token}\n")
        config = self.root / "kbatch.toml"
        config.write_text(docs_block("tljh kbatch.toml", TLJH_DOCS))
        env, argv, _ = _unit()
        assert argv[1] == "server", argv
        args = [
            arg.replace("--port=10101", f"--port={self.service_port}").replace(
                "/etc/kbatch/kbatch.toml", str(config)
            )
            for arg in argv[2:]
        ]
        state = self.root / "kb" / "s"
        assert env.pop("KBATCH_STATE_DIR") == "/var/lib/kbatch"  # the test's own instead
        env["JUPYTERHUB_API_URL"] = env["JUPYTERHUB_API_URL"].replace(
            "http://127.0.0.1:15001/hub/api", self.api_url
        )
        env["JUPYTERHUB_API_TOKEN"] = self.service_token  # what EnvironmentFile gives it
        server = HubKbatchServer(state, args=args)
        server.hub_env = env
        server.start()
        self.kbatch = server
        return server


@pytest.fixture(scope="module")
def tljh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TljhHub]:
    with ExitStack() as stack:
        world = stack.enter_context(reachable_dir("kbtljh-"))
        hub = TljhHub(
            root=tmp_path_factory.mktemp("tljh", numbered=True),
            proxy_exe=install_proxy(),
            homes_dir=world / "homes",
        )
        try:
            hub.start_proxy()
            wait_for(
                lambda: _get(f"http://127.0.0.1:{hub.proxy_api_port}/api/routes") is not None,
                timeout=30,
                what="configurable-http-proxy",
            )
            started = hub.launch_hub()
            hub.start_service()
            hub.wait_hub(started)
            yield hub
        finally:
            hub.stop()


def _hub_user(hub: Hub, stack: ExitStack) -> tuple[str, pwd.struct_passwd]:
    """A hub user and its TLJH-style Unix account ``jupyter-<name>``, its home the server's."""
    account = stack.enter_context(unix_account("jupyter-kbt"))
    name = account.removeprefix("jupyter-")
    hub.create_user(name)
    entry = pwd.getpwnam(account)
    home = hub.homes / name  # where the hub's spawner starts the user's server
    home.mkdir(parents=True, mode=0o700)
    shutil.chown(home, entry.pw_uid, entry.pw_gid)
    # The home stays until the hub stops: Hub.stop finds the user's server by its pid file there.
    return name, entry


def test_jobs_run_as_the_hub_users_unix_accounts(tljh: TljhHub) -> None:
    hub = tljh
    _, _, keys = _unit()
    assert keys.get("User") == "root" and keys.get("KillMode") == "process"
    with ExitStack() as stack:
        users = [_hub_user(hub, stack) for _ in range(2)]
        submitted = {}
        for name, entry in users:
            env = hub.spawn(name)
            result = hub.notebook_cli(env, "submit", "--parsable", "--wrap", "id -u; id -un; pwd")
            assert result.returncode == 0, result.stderr + hub.logs()[-3000:]
            submitted[name] = (env, result.stdout.strip(), entry)
        for name, (env, job_id, entry) in submitted.items():

            def ended(env: dict[str, str] = env, job_id: str = job_id) -> dict[str, str] | None:
                job: dict[str, str] = json.loads(
                    hub.notebook_cli(env, "show", "--json", job_id).stdout
                )
                return job if job["state"] not in ("PENDING", "RUNNING") else None

            job = wait_for(ended, timeout=30, what=f"job {job_id} of {name}")
            assert job is not None
            assert (job["state"], job["user"]) == (JobState.COMPLETED.value, name), job
            out = Path(env["HOME"]) / f"kbatch-{job_id}.out"
            assert out.read_text().split() == [str(entry.pw_uid), entry.pw_name, env["HOME"]]
            assert (out.stat().st_uid, out.stat().st_gid) == (entry.pw_uid, entry.pw_gid)
        assert_no_secrets(hub)


def test_a_hub_user_without_an_account_is_refused(tljh: TljhHub) -> None:
    hub = tljh
    name = f"nobody{os.urandom(3).hex()}"
    hub.create_user(name)
    env = hub.spawn(name)
    result = hub.notebook_cli(env, "submit", "--wrap", "true")
    assert result.returncode != 0
    assert f"no Unix account 'jupyter-{name}'" in result.stderr, result.stderr
    listed = hub.notebook_cli(env, "kqueue", "--all", "--json")
    assert json.loads(listed.stdout) == []


def test_a_job_reaches_nothing_of_the_services(tljh: TljhHub) -> None:
    """The job runs as the user's account: the root server's environment (with the
    service's hub token), its state directory and its token file are closed to it.

    (Both files sit in pytest's directory, root's 0700, here; that the state
    directory's own modes keep a job out is shown in tests/local/test_run_as_user.py.)"""
    hub = tljh
    assert hub.kbatch is not None and hub.kbatch.proc is not None
    server_pid = hub.kbatch.proc.pid
    targets = {
        "environ": f"/proc/{server_pid}/environ",
        "state": str(hub.kbatch.state_dir / "jobs.sqlite"),
        "token-file": str(hub.root / "hub.env"),
    }
    script = "; ".join(
        f'if cat {path} >/dev/null 2>&1; then echo "{label} read"; else echo "{label} denied"; fi'
        for label, path in targets.items()
    )
    with ExitStack() as stack:
        name, entry = _hub_user(hub, stack)
        env = hub.spawn(name)
        result = hub.notebook_cli(
            env, "submit", "--parsable", "--wrap", script + "; env; cat /proc/$PPID/environ"
        )
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip()
        out = Path(env["HOME"]) / f"kbatch-{job_id}.out"
        wait_for(lambda: "token-file" in (out.read_text() if out.exists() else ""), timeout=30)
        lines = out.read_text().splitlines()
        assert lines[:3] == ["environ denied", "state denied", "token-file denied"], lines
        assert hub.service_token not in out.read_text()
        assert out.stat().st_uid == entry.pw_uid
