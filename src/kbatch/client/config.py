"""Finding the server and the token without asking the user.

In order, the first that gives a URL wins:

1. ``KBATCH_URL`` (with ``KBATCH_TOKEN``) in the environment;
2. the config file written by ``kbatch configure`` (``~/.config/kbatch/config.json``);
3. a JupyterHub singleuser environment: ``JUPYTERHUB_SERVICE_NAME``... see
   :func:`_from_jupyterhub` (the service is reached through the hub's proxy);
4. the standalone server's discovery file in the state directory, with the
   owner-only token file beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kbatch.errors import ConfigError
from kbatch.paths import config_dir, state_dir, write_private

__all__ = ["ClientConfig", "discover_config", "save_config"]

CONFIG_FILE = "config.json"
SERVER_FILE = "server.json"
TOKEN_FILE = "token"  # noqa: S105 - a file name, not a secret


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str | None
    source: str  # where it came from, for `kbatch configure --show`

    def __repr__(self) -> str:  # never show the token
        return f"ClientConfig(url={self.url!r}, token={'***' if self.token else None}, source={self.source!r})"


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object; fix or delete it")
    return data


def _read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from exc


def _from_jupyterhub(env: Mapping[str, str]) -> ClientConfig | None:
    """Inside a singleuser server: the kbatch service behind the hub's proxy."""
    api_url = env.get("JUPYTERHUB_API_URL")
    token = env.get("JUPYTERHUB_API_TOKEN")
    if not api_url or not token:
        return None
    service = env.get("KBATCH_SERVICE_NAME", "kbatch")
    # JUPYTERHUB_API_URL is http://hub:8081/hub/api; services live at /services/<name>/
    # on the public proxy, which singleuser servers reach through the hub's host too.
    base = env.get("KBATCH_HUB_URL") or api_url.rstrip("/").removesuffix("/hub/api")
    return ClientConfig(
        url=f"{base}/services/{service}", token=token, source="JupyterHub environment"
    )


def discover_config(environ: Mapping[str, str] | None = None) -> ClientConfig:
    env = os.environ if environ is None else environ
    if env.get("KBATCH_URL"):
        return ClientConfig(
            url=env["KBATCH_URL"].rstrip("/"), token=env.get("KBATCH_TOKEN"), source="environment"
        )
    config_path = config_dir(env) / CONFIG_FILE
    if config_path.exists():
        data = _read_json(config_path)
        url = data.get("url")
        token = data.get("token")
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{config_path} has no 'url'; run kbatch configure --url URL")
        return ClientConfig(
            url=url.rstrip("/"),
            token=env.get("KBATCH_TOKEN") or (token if isinstance(token, str) else None),
            source=str(config_path),
        )
    hub = _from_jupyterhub(env)
    if hub is not None:
        return hub
    server_path = state_dir(env) / SERVER_FILE
    if server_path.exists():
        data = _read_json(server_path)
        url = data.get("url")
        if not isinstance(url, str):
            raise ConfigError(f"{server_path} has no 'url'; restart the server (kbatch server)")
        token = env.get("KBATCH_TOKEN") or _read_token(state_dir(env) / TOKEN_FILE)
        return ClientConfig(url=url, token=token, source=str(server_path))
    raise ConfigError(
        "no kbatch server configured: start one with 'kbatch server --background', "
        "or point at one with 'kbatch configure --url URL --token TOKEN' (or KBATCH_URL)"
    )


def save_config(url: str, token: str | None, environ: Mapping[str, str] | None = None) -> Path:
    path = config_dir(environ) / CONFIG_FILE
    payload: dict[str, str] = {"url": url.rstrip("/")}
    if token:
        payload["token"] = token
    write_private(path, json.dumps(payload, indent=2) + "\n")
    return path
