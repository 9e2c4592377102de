"""A hub user's job cannot steal the service's hub token (the escalation of issue 9).

Reproduced as it was found: the kbatch service runs the local backend with
``auth = "jupyterhub"`` under an ordinary, non-root Unix account of its own
(made by the test), and the hub grants the service the ``tokens`` scope, as
docs/jupyterhub.md used to; with that scope the service's token mints a token
for a hub admin.  A hub user submits, through the hub's proxy, a job that tries
every route to a token: its own environment, ``/proc/<pid>/environ`` (and
``cmdline``) of the server, of its supervisor and of every process it can see,
and every file of the server's state directory; then it tries each token-like
string it found against the hub, including ``POST /hub/api/users/<admin>/tokens``.

How the server runs as that account: the test venv's interpreter lives under
``/root`` (mode 0700, NOTES.md), so :func:`tests.support.accounts.account_python`
makes a venv from the system's Python of the same version in a directory every
account can reach, whose ``site-packages`` adds the test venv's.  The users'
homes and the service's state directory are in such a directory too; the hub's
own files (config with the test-admin token, database) stay in pytest's tmp
directory, root's alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbatch.models import JobState
from tests.support.accounts import account_python, reachable_dir, unix_account
from tests.support.jupyterhub import (
    ACCESS_SCOPES,
    SERVICE,
    USERS_GROUP,
    Hub,
    HubKbatchServer,
    _get,
    install_proxy,
)
from tests.support.polling import wait_for

MARKER = "kbatch-escalation-probe-ran"

# The job: argv = state dir, hub API URL (through the proxy), admin's name.
PROBE = (
    r'''
import json, os, re, sys, urllib.error, urllib.request
state_dir, api_url, admin = sys.argv[1:4]
TOKEN = re.compile(rb"(?<![0-9A-Za-z])[0-9a-f]{32,64}(?![0-9A-Za-z])")
candidates = {}  # token -> where it was found
report = {"routes": {}}

def found(data, where):
    for match in TOKEN.findall(data):
        candidates.setdefault(match.decode(), where)

def read(path, label):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        report["routes"][label] = type(exc).__name__
        return
    report["routes"][label] = "read"
    found(data, label)

# 1. our own environment
for key, value in os.environ.items():
    found(value.encode(), "env:" + key)
    if "TOKEN" in key.upper():
        candidates.setdefault(value, "env:" + key)
report["env_keys"] = sorted(os.environ)

# 2. the server, found by its server.json, and our supervisor (our parent)
with open(os.path.join(state_dir, "server.json")) as handle:
    server_pid = json.load(handle)["pid"]
with open("/proc/self/stat") as handle:
    supervisor_pid = int(handle.read().rsplit(")", 1)[1].split()[1])
report["server_pid"], report["supervisor_pid"] = server_pid, supervisor_pid
with open(f"/proc/{supervisor_pid}/cmdline", "rb") as handle:
    report["supervisor_cmdline"] = handle.read().decode(errors="replace").split("\0")
for label, pid in (("server", server_pid), ("supervisor", supervisor_pid)):
    for name in ("environ", "cmdline", "mem"):
        if name == "mem":
            try:
                open(f"/proc/{pid}/mem", "rb").close()
                report["routes"][f"{label}:mem"] = "opened"
            except OSError as exc:
                report["routes"][f"{label}:mem"] = type(exc).__name__
        else:
            read(f"/proc/{pid}/{name}", f"{label}:{name}")

# 3. every process we can see
readable = []
for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        readable.append(int(entry))
        found(data, f"proc:{entry}:environ")
report["readable_environs"] = readable

# 4. every file of the server's state directory
files = {}
for root, dirs, names in os.walk(state_dir):
    for name in names:
        path = os.path.join(root, name)
        rel = os.path.relpath(path, state_dir)
        if not os.path.isfile(path):  # a FIFO (a supervisor's wake-up) would block a read
            files[rel] = "not a regular file"
            continue
        try:
            with open(path, "rb") as handle:
                found(handle.read(), "file:" + rel)
            files[rel] = "read"
        except OSError as exc:
            files[rel] = type(exc).__name__
report["state_files"] = files

# 5. each candidate against the hub: who is it, and may it make a token for the admin?
def call(method, path, token, body=None):
    request = urllib.request.Request(
        api_url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "token " + token, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, None

import hashlib
usable, minted = [], []
for token, where in sorted(candidates.items())[:300]:
    status, model = call("GET", "/user", token)
    if status == 200:
        usable.append({"where": where, "sha256": hashlib.sha256(token.encode()).hexdigest(),
                       "owner": (model or {}).get("name")})
    status, _ = call("POST", f"/users/{admin}/tokens", token, {"note": "stolen", "expires_in": 60})
    minted.append(status)
report["candidates"] = len(candidates)
report["usable"] = usable
report["admin_token_statuses"] = sorted(set(minted))
print(json.dumps(report), flush=True)
print("'''
    + MARKER
    + r"""", flush=True)
"""
)


class SharedAccountHub(Hub):
    """The hub with the kbatch service run as ``account``, jobs sharing that account.

    The hub grants the service the ``tokens`` scope, as the old docs did, so that its
    token is worth stealing: the test shows it would mint an admin's token.
    """

    account: str = ""
    python: Path = Path()
    world: Path = Path()

    def kbatch_config(self) -> str:
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
    }},
    {{"name": "test-admin", "api_token": {self.admin_token!r}, "admin": True}},
]
c.JupyterHub.load_roles = [
    {{"name": "kbatch-service", "services": [{SERVICE!r}], "scopes": ["tokens"]}},
    {{"name": "kbatch-users", "groups": [{USERS_GROUP!r}], "scopes": {ACCESS_SCOPES!r}}},
]
"""

    def start_service(self, **settings: object) -> HubKbatchServer:
        service_dir = self.world / "kb"  # short: the local backend makes a Unix socket there
        service_dir.mkdir(mode=0o755)
        state = service_dir / "s"
        state.mkdir(mode=0o700)
        shutil.chown(state, self.account, self.account)
        config = service_dir / "kbatch.toml"  # holds no secret: the token comes in the env
        config.write_text(
            "[local]\nkill_grace = 1\ntick = 0.5\njobs_share_server_account = true\n"
            '\n[jupyterhub]\nadmin_groups = ["kbatch-admins"]\n'
        )
        config.chmod(0o644)
        server = HubKbatchServer(
            state,
            args=[
                "--auth=jupyterhub",
                "--cpus=2",
                f"--port={self.service_port}",
                f"--config={config}",
            ],
            python=str(self.python),
            user=self.account,
            log_dir=self.root,  # root's: the job must not read even the server's log
        )
        server.hub_env = {
            "JUPYTERHUB_API_URL": self.api_url,
            "JUPYTERHUB_API_TOKEN": self.service_token,
            "JUPYTERHUB_SERVICE_NAME": SERVICE,
            "HOME": str(state),
        }
        server.start()
        self.kbatch = server
        return server


@pytest.fixture
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedAccountHub]:
    with reachable_dir("kbatch-esc-") as world, unix_account("kbsvc") as account:
        python = account_python(account, world)
        hub = SharedAccountHub(
            root=tmp_path_factory.mktemp("esc", numbered=True),
            proxy_exe=install_proxy(),
            homes_dir=world / "homes",
        )
        hub.account, hub.python, hub.world = account, python, world
        try:
            hub.start_proxy()
            wait_for(
                lambda: _get(f"http://127.0.0.1:{hub.proxy_api_port}/api/routes") is not None,
                timeout=30,
                what="configurable-http-proxy",
            )
            hub.start_service()
            hub.start_hub()
            yield hub
        finally:
            hub.stop()


def test_a_job_cannot_reach_the_services_hub_token(shared_hub: SharedAccountHub) -> None:
    hub = shared_hub
    assert hub.kbatch is not None and hub.kbatch.proc is not None
    server_pid = hub.kbatch.proc.pid
    assert os.stat(f"/proc/{server_pid}/environ").st_uid == 0  # root's: it is non-dumpable
    status = Path(f"/proc/{server_pid}/status").read_text()
    server_uid = int(
        next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]
    )
    assert server_uid != 0  # the server really runs as the non-root account

    boss = hub.create_user("boss", admin=True)
    # What the stolen token would be worth: the service's token mints the admin's.
    minted = hub.api("POST", f"/users/{boss}/tokens", token=hub.service_token, json_body={})
    assert minted.status_code == 201, minted.text
    hub.secrets_seen.add(minted.json()["token"])

    mallory = hub.create_user("mallory", groups=(USERS_GROUP,))
    home = hub.homes / mallory
    home.mkdir(parents=True)
    shutil.chown(home, hub.account, hub.account)  # the job (the service's account) writes here
    env = hub.spawn(mallory)
    assert env["JUPYTERHUB_API_TOKEN"]

    probe = home / "probe.py"
    probe.write_text(f"#!{hub.python}\n{PROBE}")
    probe.chmod(0o755)
    state = str(hub.kbatch.state_dir)
    api = f"{hub.public_url}/hub/api"
    submitted = hub.notebook_cli(
        env, "submit", "--parsable", "-t", "5", "probe.py", state, api, boss
    )
    assert submitted.returncode == 0, submitted.stderr + hub.logs()[-3000:]
    job_id = submitted.stdout.strip()
    job = hub.kbatch.wait_job(env["JUPYTERHUB_API_TOKEN"], job_id, timeout=60)
    output = (home / f"kbatch-{job_id}.out").read_text()
    assert job.state is JobState.COMPLETED, f"{job}\n{output}\n{hub.logs()[-3000:]}"
    assert output.splitlines()[-1] == MARKER  # the probe really ran to its end
    report = json.loads(output.splitlines()[0])
    print(json.dumps(report, indent=1))  # shown with -s: what the job tried and saw

    # The job ran as the service's account, and saw neither the server's environment nor
    # its supervisor's: non-dumpable, their /proc files are root's.
    routes = report["routes"]
    assert report["server_pid"] == server_pid
    assert "kbatch.backends.local.supervisor" in report["supervisor_cmdline"]
    for label in ("server", "supervisor"):
        assert routes[f"{label}:environ"] == "PermissionError", routes
        assert routes[f"{label}:mem"] == "PermissionError", routes
    # Its environment: what the user's notebook exported (never a token) and the job's
    # own variables; nothing of the server's (which alone has JUPYTERHUB_SERVICE_NAME).
    keys = set(report["env_keys"])
    assert "KBATCH_JOB_ID" in keys and "JUPYTERHUB_USER" in keys
    assert not keys & {"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_SERVICE_NAME"}, keys
    # It could read the state directory (same account: no secret may be kept there) ...
    assert report["state_files"].get("server.json") == "read"
    # ... but found no token the hub accepts, and could not make an admin's token.
    assert report["usable"] == [], report["usable"]
    assert 201 not in report["admin_token_statuses"], report
    service_sha = hashlib.sha256(hub.service_token.encode()).hexdigest()
    assert service_sha not in json.dumps(report)
    # The hub made no token for the admin beyond the test's own.
    assert [t["note"] for t in hub.tokens(boss) if t["note"] == "stolen"] == []
