"""What the docs and messages tell hub admins and users (issue 10, items 13 to 17)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
from importlib.metadata import distribution
from pathlib import Path

import pytest
from traitlets.config import Config

from kbatch.client import Client
from kbatch.client.config import ClientConfig, service_url_from_hub, service_url_from_model
from kbatch.errors import ConfigError, PermissionDenied, TransportError
from kbatch.server.auth.jupyterhub import decide
from kbatch.server.hub import HubUser
from tests.support.jupyterhub import DOCS, docs_block

REPO = Path(__file__).resolve().parents[2]


def test_the_distribution_does_not_collide_with_pypis_kbatch() -> None:
    # "kbatch" on PyPI is kbatch-dev's 0.4.2: installing by that name gets another project.
    name = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    assert name == "jupyterhub-kbatch"
    files = [str(f) for f in distribution(name).files or []]
    scripts = {ep.name for ep in distribution(name).entry_points}
    assert {"kbatch", "kqueue"} <= scripts
    assert any(f.startswith("kbatch") or "jupyterhub_kbatch" in f for f in files)


def test_the_docs_install_from_the_checkout_not_pypi() -> None:
    text = DOCS.read_text()
    assert "pip install 'kbatch[server]'" not in text
    assert "`pip install kbatch`" not in text.replace("**`pip install kbatch` installs", "")
    assert "pip install '/path/to/kbatch[server]'" in text


def test_the_service_command_needs_no_path() -> None:
    c = Config()
    exec(docs_block("jupyterhub_config.py"), {"c": c})
    (service,) = c.JupyterHub.services
    command = service["command"]
    assert os.path.isabs(command[0]), command
    assert command[1:4] == ["-m", "kbatch", "server"]
    # python -m kbatch is the kbatch command, with an empty PATH.
    result = subprocess.run(
        [sys.executable, "-m", "kbatch", "--version"],
        env={"PATH": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("kbatch "), result.stderr


def test_the_docs_do_not_ask_for_a_hub_restart_after_adding_users() -> None:
    text = DOCS.read_text()
    assert "restart the hub" not in text
    assert "No hub restart is needed" in text
    assert "must exist on the hub first" in text


def test_a_user_without_the_scope_is_told_the_scope_and_who_grants_it() -> None:
    user = HubUser(name="alice", scopes=("read:users!user=alice",))
    with pytest.raises(PermissionDenied) as refused:
        decide(user, service_name="batch", admin_groups=())
    message = refused.value.message
    assert "access:services!service=batch" in message
    assert "hub admin" in message and "no hub restart" in message
    # The CLI, when the hub will not even say where the service is (no scope at all).
    with pytest.raises(ConfigError) as cli:
        service_url_from_model(403, b"{}", service="batch", api_url="http://hub/hub/api")
    text = str(cli.value)
    assert "access:services!service=batch" in text and "hub admin" in text
    assert "does not help" in text  # KBATCH_URL alone only gets a second 403


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_with_the_hub_down_a_hub_user_is_told_so_and_fast() -> None:
    down = _refused_url()
    # The hub API is down: the CLI cannot find the service.
    with pytest.raises(TransportError) as lookup:
        service_url_from_hub(down + "/hub/api", "t", "kbatch")
    assert "JupyterHub is not answering" in str(lookup.value)
    assert "--background" not in str(lookup.value)
    # The service (started by the hub, so down with it) refuses connections.
    config = ClientConfig(url=down + "/services/kbatch", token="t", source="hub", via_hub=True)
    started = time.monotonic()
    with Client.from_config(config) as client, pytest.raises(TransportError) as refused:
        client.whoami()
    assert time.monotonic() - started < 4
    text = str(refused.value)
    assert "JupyterHub is not running" in text or "service of your JupyterHub" in text
    assert "kbatch server --background" not in text
    # Outside a hub, the hint to start one's own server stays.
    with (
        Client(down, "t", retry_for=0) as plain,
        pytest.raises(TransportError, match="--background"),
    ):
        plain.whoami()
