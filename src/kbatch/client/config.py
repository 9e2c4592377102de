"""Finding the server and the token without asking the user.

In order, the first that gives a URL wins:

1. ``KBATCH_URL`` (with ``KBATCH_TOKEN``) in the environment;
2. the config file written by ``kbatch configure`` (``~/.config/kbatch/config.json``);
3. a JupyterHub singleuser environment (``JUPYTERHUB_API_URL`` and
   ``JUPYTERHUB_API_TOKEN``), see :func:`_from_jupyterhub`: the service is
   ``KBATCH_SERVICE_NAME`` (default ``kbatch``), reached through the hub's proxy
   at its public URL when the hub has one, else where the hub API says it is;
4. the standalone server's discovery file in the state directory, with the
   owner-only token file beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from kbatch.errors import ConfigError, TransportError
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
    # Found through JupyterHub: the service (or the hub's proxy) not answering means the
    # hub's side is down, which the client says at once instead of retrying for long.
    via_hub: bool = False

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


def _public_service_url(env: Mapping[str, str], service: str) -> str | None:
    """The service behind the hub's proxy, if the hub has a public URL (``JupyterHub.public_url``).

    A singleuser server's ``JUPYTERHUB_PUBLIC_HUB_URL`` is then e.g.
    ``https://hub.example.org/prefix/hub/``; services live at ``/prefix/services/<name>``.
    """
    public_hub = env.get("JUPYTERHUB_PUBLIC_HUB_URL", "").rstrip("/")
    if not public_hub.endswith("/hub") or "://" not in public_hub:
        return None
    return f"{public_hub.removesuffix('/hub')}/services/{quote(service, safe='')}"


def service_url_from_model(status: int, body: bytes, *, service: str, api_url: str) -> str:
    """The service's URL from the hub's answer to ``GET services/<name>``.  Pure."""
    fix = (
        "ask your hub admin to set it up as docs/jupyterhub.md says, "
        "or set KBATCH_URL to the kbatch service's URL"
    )
    if status == 404:
        raise ConfigError(
            f"the hub at {api_url} has no service named {service!r}; set KBATCH_SERVICE_NAME "
            "to its name, or KBATCH_URL to its URL"
        )
    if status in (401, 403):
        # Users without kbatch usually lack both scopes; naming only read:services (or
        # KBATCH_URL) led them to a second refusal.  Name what they need to use it.
        raise ConfigError(
            f"your hub token may not use the {service} service (HTTP {status}: it lacks "
            f"read:services!service={service}, and probably access:services!service={service} "
            f"too).  A hub admin grants both, with a role for your user or group "
            f"(c.JupyterHub.load_roles) and in c.Spawner.server_token_scopes "
            f"(docs/jupyterhub.md); then restart your notebook server.  Setting KBATCH_URL "
            f"does not help without access:services!service={service}"
        )
    if status >= 400:
        raise ConfigError(
            f"the hub at {api_url} answered HTTP {status} about the {service} service"
        )
    try:
        model = json.loads(body)
    except ValueError as exc:
        raise ConfigError(f"the hub at {api_url} sent an unreadable answer: {exc}") from exc
    url = model.get("url") if isinstance(model, dict) else None
    prefix = model.get("prefix") if isinstance(model, dict) else None
    if not isinstance(url, str) or not url:
        raise ConfigError(f"the hub at {api_url} knows no URL for the {service} service; {fix}")
    if not isinstance(prefix, str):
        prefix = f"/services/{service}/"
    return url.rstrip("/") + "/" + prefix.strip("/")


def service_url_from_hub(api_url: str, token: str, service: str, timeout: float = 10.0) -> str:
    """Ask the hub API (``GET {api_url}/services/<name>``) where the service listens."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(api_url)
    conn_type = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    path = parts.path.rstrip("/") + "/services/" + quote(service, safe="")
    try:
        conn = conn_type(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
        try:
            conn.request(
                "GET",
                path,
                headers={"Authorization": f"token {token}", "Accept": "application/json"},
            )
            response = conn.getresponse()
            status, body = response.status, response.read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise TransportError(
            f"JupyterHub is not answering at {api_url} ({reason}): the hub is down or "
            f"restarting, and kbatch needs it to find the {service} service.  Try again in a "
            "minute; if it lasts, tell your hub admin.  (Do not start a kbatch server of "
            "your own: its jobs would not be the hub's.)"
        ) from exc
    return service_url_from_model(status, body, service=service, api_url=api_url)


ServiceLocator = Callable[[str, str, str], str]


def _from_jupyterhub(
    env: Mapping[str, str], locate: ServiceLocator = service_url_from_hub
) -> ClientConfig | None:
    """Inside a singleuser server: its own token, and the kbatch service of its hub.

    The service is reached through the hub's proxy at the hub's public URL when
    the singleuser environment has one (``JUPYTERHUB_PUBLIC_HUB_URL``, set when
    the admin sets ``c.JupyterHub.public_url``); otherwise the hub API is asked
    for the service's URL (the token needs ``read:services!service=<name>``).
    """
    api_url = env.get("JUPYTERHUB_API_URL")
    token = env.get("KBATCH_TOKEN") or env.get("JUPYTERHUB_API_TOKEN")
    if not api_url or not token:
        return None
    service = env.get("KBATCH_SERVICE_NAME") or "kbatch"
    url = _public_service_url(env, service)
    if url is not None:
        return ClientConfig(
            url=url, token=token, source="JupyterHub environment (public URL)", via_hub=True
        )
    return ClientConfig(
        url=locate(api_url.rstrip("/"), token, service),
        token=token,
        source=f"JupyterHub environment (the hub API's URL for service {service})",
        via_hub=True,
    )


def discover_config(environ: Mapping[str, str] | None = None) -> ClientConfig:
    env = os.environ if environ is None else environ
    # Inside a hub, a URL set by hand still goes with the notebook's own token.
    hub_token = env.get("JUPYTERHUB_API_TOKEN") or None
    if env.get("KBATCH_URL"):
        return ClientConfig(
            url=env["KBATCH_URL"].rstrip("/"),
            token=env.get("KBATCH_TOKEN") or hub_token,
            source="environment",
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
            token=env.get("KBATCH_TOKEN") or (token if isinstance(token, str) else hub_token),
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
