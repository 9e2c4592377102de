"""A real JupyterHub for tests: the hub from PyPI, its real proxy from npm, kbatch as a service.

Started in the order that keeps it fast (JupyterHub 6 waits up to the
service's ``timeout`` for its URL before routing it, see NOTES.md):

1. configurable-http-proxy, run by us (``should_start = False``) so that it and
   the service stay up while the hub is stopped, as in a Kubernetes deployment;
2. the kbatch server, an external service with ``auth = "jupyterhub"``; it does
   not need the hub to start;
3. the hub, which finds the service up at once and routes ``/services/kbatch/``.

Users, groups, tokens and servers are made through the hub's REST API with the
token of a ``test-admin`` service.  Users' servers are spawned by the hub's
real ``SimpleLocalProcessSpawner`` running :mod:`tests.support.singleuser`,
which records the environment a notebook terminal would have.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kbatch.client import Client
from kbatch.models import Job, JobState
from tests.support.polling import file_text, wait_for
from tests.support.servers import REPO, CliResult, KbatchServer
from tests.support.tools import installed

SERVICE = "kbatch"
ADMIN_GROUP = "kbatch-admins"
USERS_GROUP = "kbatch-users"
LIMITED_GROUP = "kbatch-limited"  # may use kbatch, but not hold every scope of a job's token
# What the admin docs tell admins to grant: users may reach the service and ask the
# hub where it is; jobs get their own token with these scopes only.
ACCESS_SCOPES = [f"access:services!service={SERVICE}", f"read:services!service={SERVICE}"]
# Who users without access should ask: markup and an ampersand, which must show as text.
CONTACT = "Research <b>Computing</b> & Data, rc@example.org"
JOB_TOKEN_SCOPES = [f"access:services!service={SERVICE}", "access:services!service=dask-gateway"]
HUB_START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def install_proxy() -> Path:
    """configurable-http-proxy from npm, cached outside the repo (tools/jupyterhub/install-proxy.sh)."""
    return installed("jupyterhub/install-proxy.sh", timeout=300)


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _get(url: str, **kwargs: Any) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5, **kwargs)
    except httpx.TransportError:
        return None


class HubKbatchServer(KbatchServer):
    """The kbatch server as an external JupyterHub service (auth = "jupyterhub")."""

    hub_env: dict[str, str]

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(**{**self.hub_env, **extra})

    def answers(self) -> bool:
        response = _get(self.url + "/api/v1/health")
        return response is not None and response.status_code == 200

    @property
    def token(self) -> str:
        raise AssertionError("a hub service has no token of its own for users: pass one")

    def client(self, token: str | None = None, **kwargs: float) -> Client:
        assert token is not None, "pass a hub token"
        return Client(self.url, token, **kwargs)

    def cli(self, *args: str, **kwargs: Any) -> CliResult:
        raise AssertionError("use Hub.notebook_cli: the CLI must run in a notebook's environment")

    def wait_job(self, token: str, job_id: str, *states: JobState, timeout: float = 30) -> Job:
        wanted = set(states) or {s for s in JobState if s.is_terminal}
        with self.client(token) as client:

            def reached() -> Job | None:
                job = client.get(job_id)
                return job if job.state in wanted else None

            job = wait_for(reached, timeout=timeout, what=f"job {job_id} to reach {wanted}")
        assert job is not None
        return job


@dataclass
class Hub:
    """A JupyterHub, its proxy and the kbatch service, in ``root``."""

    root: Path
    proxy_exe: Path
    proxy_port: int = field(default_factory=free_port)
    proxy_api_port: int = field(default_factory=free_port)
    hub_port: int = field(default_factory=free_port)
    service_port: int = field(default_factory=free_port)
    proxy_token: str = field(default_factory=lambda: secrets.token_hex(16))
    service_token: str = field(default_factory=lambda: secrets.token_hex(16))
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    hub_proc: subprocess.Popen[bytes] | None = None
    proxy_proc: subprocess.Popen[bytes] | None = None
    kbatch: HubKbatchServer | None = None
    start_seconds: list[float] = field(default_factory=list)
    # every token a test has handled, to check that none reaches a log or a response
    secrets_seen: set[str] = field(default_factory=set)
    homes_dir: Path | None = None  # the users' home directories; default <root>/homes

    @property
    def homes(self) -> Path:
        return self.homes_dir or self.root / "homes"

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def api_url(self) -> str:
        """The hub's API as the service and the notebooks reach it (not through the proxy)."""
        return f"http://127.0.0.1:{self.hub_port}/hub/api"

    @property
    def service_url(self) -> str:
        """The kbatch service through the hub's proxy."""
        return f"{self.public_url}/services/{SERVICE}"

    # -- processes --------------------------------------------------------------

    def start_proxy(self) -> None:
        log = open(self.root / "proxy.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proxy_proc = subprocess.Popen(
            [
                str(self.proxy_exe),
                "--ip=127.0.0.1",
                f"--port={self.proxy_port}",
                "--api-ip=127.0.0.1",
                f"--api-port={self.proxy_api_port}",
                f"--error-target=http://127.0.0.1:{self.hub_port}/hub/error",
                "--log-level=warn",
            ],
            env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": self.proxy_token},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.secrets_seen |= {self.proxy_token, self.service_token, self.admin_token}

    def start_service(self, **settings: object) -> HubKbatchServer:
        state = self.root / "kb" / "s"  # short: the local backend makes a Unix socket there
        config = self.root / "kbatch.toml"
        lines = ["[local]", "kill_grace = 1", "tick = 0.5", "jobs_share_server_account = true"]
        lines += ["", "[jupyterhub]"]
        values: dict[str, object] = {
            "admin_groups": [ADMIN_GROUP],
            "job_token_scopes": JOB_TOKEN_SCOPES,
            "job_token_margin": 60,
            "contact": CONTACT,
            **settings,
        }
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        config.write_text("\n".join(lines) + "\n")
        server = HubKbatchServer(
            state,
            args=[
                "--auth=jupyterhub",
                "--cpus=2",
                f"--port={self.service_port}",
                f"--config={config}",
            ],
            # job_token_scopes on the local backend, which kbatch server refuses: see there
            module="tests.support.job_token_server",
        )
        server.hub_env = {
            "JUPYTERHUB_API_URL": self.api_url,
            "JUPYTERHUB_API_TOKEN": self.service_token,
            "JUPYTERHUB_SERVICE_NAME": SERVICE,
            "PYTHONPATH": str(REPO),
        }
        server.start()
        self.kbatch = server
        return server

    def write_config(self) -> Path:
        path = self.root / "jupyterhub_config.py"
        path.write_text(self.base_config() + self.proxy_config() + self.kbatch_config())
        return path

    def base_config(self) -> str:
        """A hub on loopback ports with test users and stand-in servers: no kbatch yet."""
        homes = self.homes
        homes.mkdir(exist_ok=True)
        return f"""
import sys
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {self.proxy_port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {self.hub_port}
c.JupyterHub.db_url = {"sqlite:///" + str(self.root / "jupyterhub.sqlite")!r}
c.JupyterHub.cookie_secret_file = {str(self.root / "cookie_secret")!r}
c.JupyterHub.pid_file = {str(self.root / "jupyterhub.pid")!r}
c.JupyterHub.cleanup_servers = False  # users' servers outlive a hub restart, as in production
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {str(homes) + "/{username}"!r}
c.Spawner.cmd = [sys.executable, {str(REPO / "tests" / "support" / "singleuser.py")!r}]
c.Spawner.start_timeout = 30
c.Spawner.http_timeout = 30
c.Spawner.default_url = "/lab"
"""

    def proxy_config(self) -> str:
        """Our own proxy, which stays up while the hub is down."""
        return f"""
c.JupyterHub.public_url = {self.public_url + "/"!r}
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"
c.ConfigurableHTTPProxy.auth_token = {self.proxy_token!r}
"""

    def kbatch_config(self) -> str:
        """kbatch as an external service, set up as docs/jupyterhub.md says."""
        return f"""
c.Spawner.server_token_scopes = [
    "access:servers!server",
    "users:activity!user",
    *{ACCESS_SCOPES!r},
]
c.JupyterHub.services = [
    {{
        "name": {SERVICE!r},
        "url": "http://127.0.0.1:{self.service_port}",
        "api_token": {self.service_token!r},
        "timeout": 5,
        "display": False,
        # the web dashboard logs users in through the hub (OAuth), without a consent page
        "oauth_no_confirm": True,
    }},
    {{"name": "dask-gateway"}},
    # the tests' own hand on the hub: an admin, as only admins may make admins
    {{"name": "test-admin", "api_token": {self.admin_token!r}, "admin": True}},
]
c.JupyterHub.load_roles = [
    {{"name": "kbatch-service", "services": [{SERVICE!r}], "scopes": ["tokens"]}},
    {{
        "name": "kbatch-users",
        "groups": [{USERS_GROUP!r}],
        "scopes": [*{ACCESS_SCOPES!r}, "access:services!service=dask-gateway"],
    }},
    {{"name": "kbatch-limited", "groups": [{LIMITED_GROUP!r}], "scopes": {ACCESS_SCOPES!r}}},
]
# the hub's "no permission" page for kbatch says who to ask
from kbatch.server.hub_templates import TEMPLATES
c.JupyterHub.template_paths = [TEMPLATES]
c.JupyterHub.template_vars = {{"kbatch_contact": {CONTACT!r}}}
"""

    def hub_environment(self) -> dict[str, str]:
        """The test's environment, with the installed ``kbatch`` on PATH as an admin has it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "KBATCH_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start_hub(self) -> float:
        """Start the hub; seconds until its API and the service answer through the proxy."""
        started = self.launch_hub()
        return self.wait_hub(started)

    def launch_hub(self) -> float:
        """Start the hub's process; when it started (it takes seconds to import and set up)."""
        config = self.write_config()
        log = open(self.root / "jupyterhub.log", "ab")  # noqa: SIM115 - the child keeps it
        started = time.monotonic()
        self.hub_proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=self.root,
            env=self.hub_environment(),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        return started

    def wait_hub(self, started: float) -> float:
        proc = self.hub_proc
        assert proc is not None

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the hub exited early:\n{self.hub_log()[-3000:]}")
            api = _get(f"{self.public_url}/hub/api/")
            service = _get(f"{self.service_url}/api/v1/health")
            return bool(api and api.status_code == 200 and service and service.status_code == 200)

        wait_for(up, timeout=HUB_START_TIMEOUT, interval=0.1, what="the hub and its proxy")
        seconds = time.monotonic() - started
        self.start_seconds.append(seconds)
        return seconds

    def stop_hub(self) -> None:
        _terminate(self.hub_proc)
        self.hub_proc = None

    def stop(self) -> None:
        self.stop_hub()
        # The hub leaves users' servers running (cleanup_servers = False): stop the stand-ins.
        for home in self.homes.glob("*"):
            pid = file_text(home / "singleuser.pid")
            with contextlib.suppress(OSError, ValueError):
                if pid and b"singleuser.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGTERM)
        if self.kbatch is not None:
            self.kbatch.stop()
        _terminate(self.proxy_proc)

    def logs(self) -> str:
        """What the kbatch service logged."""
        assert self.kbatch is not None
        return self.kbatch.log()

    def hub_log(self) -> str:
        path = self.root / "jupyterhub.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the hub's REST API, as the test-admin service -------------------------------

    def api(
        self, method: str, path: str, *, json_body: object = None, token: str | None = None
    ) -> httpx.Response:
        response = httpx.request(
            method,
            f"{self.public_url}/hub/api{path}",
            json=json_body,
            headers={"Authorization": f"token {token or self.admin_token}"},
            timeout=30,
        )
        return response

    def api_ok(self, method: str, path: str, *, json_body: object = None) -> Any:
        response = self.api(method, path, json_body=json_body)
        assert response.status_code < 300, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json() if response.content else None

    def service(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        scheme: str = "token",
        base: str | None = None,
        json_body: object = None,
    ) -> httpx.Response:
        """The kbatch HTTP API, through the hub's proxy unless ``base`` says otherwise."""
        headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
        return httpx.request(
            method,
            f"{base or self.service_url}/api/v1{path}",
            json=json_body,
            headers=headers,
            timeout=30,
        )

    def create_user(self, name: str, *, admin: bool = False, groups: tuple[str, ...] = ()) -> str:
        self.api_ok("POST", f"/users/{name}", json_body={"admin": admin})
        for group in groups:
            if self.api("GET", f"/groups/{group}").status_code == 404:
                self.api_ok("POST", f"/groups/{group}")
            self.api_ok("POST", f"/groups/{group}/users", json_body={"users": [name]})
        return name

    def token(self, user: str, *, scopes: list[str] | None = None, note: str = "test") -> str:
        body: dict[str, object] = {"note": note}
        if scopes is not None:
            body["scopes"] = scopes
        token: str = self.api_ok("POST", f"/users/{user}/tokens", json_body=body)["token"]
        self.secrets_seen.add(token)
        return token

    def tokens(self, user: str) -> list[dict[str, Any]]:
        tokens: list[dict[str, Any]] = self.api_ok("GET", f"/users/{user}/tokens")["api_tokens"]
        return tokens

    def spawn(self, user: str) -> dict[str, str]:
        """Start the user's server through the hub; the environment its terminals have."""
        home = self.homes / user
        env_file = home / "singleuser-env.json"
        response = self.api("POST", f"/users/{user}/server")
        assert response.status_code in (201, 202), response.text

        def ready() -> dict[str, str] | None:
            model = self.api_ok("GET", f"/users/{user}")
            server = model.get("servers", {}).get("", {})
            if not (server.get("ready") and env_file.exists()):
                return None
            env: dict[str, str] = json.loads(env_file.read_text())
            return env

        env = wait_for(ready, timeout=30, interval=0.1, what=f"the server of {user}")
        assert env is not None
        self.secrets_seen.add(env["JUPYTERHUB_API_TOKEN"])
        return env

    # -- running the CLI as in a notebook terminal -----------------------------------

    def notebook_cli(
        self, env: Mapping[str, str], *args: str, cwd: Path | None = None, timeout: float = 60
    ) -> CliResult:
        """``kbatch ARGS`` with exactly the environment of the user's server."""
        exe = Path(sys.executable).with_name(args[0] if args[0] == "kqueue" else "kbatch")
        words = list(args[1:]) if args[0] == "kqueue" else list(args)
        proc = subprocess.run(
            [str(exe), *words],
            cwd=cwd or env["HOME"],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)


DOCS = REPO / "docs" / "jupyterhub.md"


def docs_block(name: str, docs: Path = DOCS) -> str:
    """The code block marked ``<!-- kbatch-docs-test: NAME -->`` in ``docs`` (docs/jupyterhub.md)."""
    text = docs.read_text()
    marker = f"<!-- kbatch-docs-test: {name} -->"
    assert marker in text, f"{docs} lost its {name} block"
    fenced = text.split(marker, 1)[1].split("```", 2)[1]
    return fenced.split("\n", 1)[1]


class DocsHub(Hub):
    """A hub set up exactly as docs/jupyterhub.md says: it starts the proxy and the service.

    Only the paths and the port of the documented blocks are replaced.
    """

    def proxy_config(self) -> str:
        return f"""
c.ConfigurableHTTPProxy.command = [{str(self.proxy_exe)!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"
"""

    def kbatch_config(self) -> str:
        toml = self.root / "kbatch.toml"
        toml.write_text(docs_block("kbatch.toml"))
        state = self.root / "kb" / "s"  # short: the local backend makes a Unix socket there
        documented = (
            docs_block("jupyterhub_config.py")
            .replace("http://127.0.0.1:10101", f"http://127.0.0.1:{self.service_port}")
            .replace("/etc/kbatch/kbatch.toml", str(toml))
            .replace("/var/lib/kbatch", str(state))
        )
        test_admin = {"name": "test-admin", "api_token": self.admin_token, "admin": True}
        self.secrets_seen.add(self.admin_token)
        return documented + f"\nc.JupyterHub.services.append({test_admin!r})\n"

    def logs(self) -> str:
        return self.hub_log()  # the managed service writes to the hub's output


@contextlib.contextmanager
def running_hub(root: Path) -> Iterator[Hub]:
    hub = Hub(root=root, proxy_exe=install_proxy())
    try:
        # The proxy first: the hub adds its routes at start-up.  The service while the
        # hub imports (seconds): up before the hub checks it, so the hub need not wait.
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


def assert_no_secrets(hub: Hub) -> None:
    """No token a test handled appears in the kbatch server's log."""
    log = hub.logs()
    assert log, "the kbatch server wrote no log"
    leaked = sorted(s[:4] + "..." for s in hub.secrets_seen if s and s in log)
    assert not leaked, f"tokens in the kbatch server's log: {leaked}"
