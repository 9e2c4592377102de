"""The server's configuration: typed dataclasses, read from a TOML file and flags.

Example ``kbatch.toml``::

    host = "127.0.0.1"
    port = 8765
    header_timeout = 10        # seconds a client may take to send a request's headers
    max_connections = 1000     # open connections at most; more are answered 503
    http = "auto"              # httptools + uvloop when installed (they are by default), else "h11"
    backend = "local"          # or "kubernetes", or an import path "mypkg.backend:MyBackend"
    auth = "token"             # or "jupyterhub"

    [local]                    # the backend's own section, named after it; the backend
    cpus = 8                   # decodes it (Backend.from_config), the server never reads it
    memory = "32G"
    kill_grace = 10
    # with auth = "jupyterhub": a server running as root runs each job as its user's
    # Unix account (see docs/tljh.md) ...
    run_as_user = true
    user_template = "jupyter-{username}"
    # ... or, not root, every hub user's job runs as this server's account, if you accept it:
    # jobs_share_server_account = true

    [policy]
    max_cpus = 4
    max_memory = "16G"
    max_time = "1-00:00:00"
    allowed_images = ["quay.io/jupyter/*"]
    # per user, at once (local backend): beyond these a job waits, PENDING with Slurm's
    # reason (QOSMaxJobsPerUserLimit, QOSMaxCpuPerUserLimit, ...); beyond
    # max_submitted_jobs_per_user a submission is refused
    max_running_jobs_per_user = 8
    max_submitted_jobs_per_user = 1000
    max_cpus_per_user = 16
    max_memory_per_user = "64G"
    max_gpus_per_user = 1
    # kbatch submit --code: the most one upload (and one job's results) may hold
    max_upload_bytes = "1G"
    max_upload_files = 100000

    [jupyterhub]               # with auth = "jupyterhub"; see docs/jupyterhub.md
    # api_url, api_token and service_name default to the JUPYTERHUB_API_URL,
    # JUPYTERHUB_API_TOKEN and JUPYTERHUB_SERVICE_NAME a hub gives its services.
    admin_groups = ["kbatch-admins"]
    cache_seconds = 30
    # per-job hub tokens: backend = "kubernetes" only (refused with the local backend)
    # job_token_scopes = ["access:services!service=dask-gateway"]
    # job_token_expiry = "1-00:00:00"   # for jobs without a time limit
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kbatch.errors import ConfigError, SpecError
from kbatch.paths import state_dir
from kbatch.server.policy import Policy
from kbatch.units import parse_memory, parse_time_limit

__all__ = [
    "BACKEND_OPTIONS",
    "JupyterHubConfig",
    "ServerConfig",
    "check_shared_account",
    "load_config",
]

# Command-line options of `kbatch server` that belong to the backend: passed raw into
# its section (ServerConfig.backend_overrides); the backend decodes and checks them.
BACKEND_OPTIONS = frozenset({"cpus", "memory", "gpus", "kill_grace", "memory_limiter"})


@dataclass(frozen=True)
class JupyterHubConfig:
    """How the server talks to JupyterHub (``auth = "jupyterhub"``)."""

    api_url: str = ""  # default $JUPYTERHUB_API_URL, e.g. http://127.0.0.1:8081/hub/api
    api_token: str = field(default="", repr=False)  # default $JUPYTERHUB_API_TOKEN
    service_name: str = "kbatch"  # default $JUPYTERHUB_SERVICE_NAME
    admin_groups: tuple[str, ...] = ()  # members are kbatch admins, as hub admins are
    cache_seconds: float = 30.0  # how long a token's check is reused
    timeout: float = 5.0  # seconds before an unanswered hub request fails with 503
    job_token_scopes: tuple[str, ...] = ()  # empty: jobs get no hub token
    job_token_expiry: int = 86400  # seconds, for jobs without a time limit
    job_token_margin: int = 300  # seconds added to a job's time limit
    # Who a user without access should ask (a name, a team, an address), shown as text
    # on the dashboard's "no access" page; empty: the hub's administrators.
    contact: str = ""


@dataclass
class ServerConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port, written to <state_dir>/server.json
    prefix: str = ""  # URL prefix, e.g. /services/kbatch behind JupyterHub
    backend: str = "local"
    auth: str = "token"
    log_level: str = "info"
    # Slow or idle clients: seconds to send a request's headers, seconds an idle
    # keep-alive connection is kept, and open connections at most (the rest get a 503).
    header_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    max_connections: int = 1000
    # The HTTP parser and event loop: "httptools" (C; with uvloop), "h11" (pure Python),
    # or "auto", httptools when it and uvloop are installed (a third of the time per request).
    http: str = "auto"
    policy: Policy = field(default_factory=Policy)
    jupyterhub: JupyterHubConfig = field(default_factory=JupyterHubConfig)
    # Every other [section] of the file, raw, by name: a backend's own configuration,
    # passed untouched to Backend.from_config (the server knows none of their keys).
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Command-line options meant for the backend (--cpus, --memory), raw, over its section.
    backend_overrides: dict[str, Any] = field(default_factory=dict)

    def backend_section(self, name: str) -> dict[str, Any]:
        """The raw ``[name]`` section for the backend called ``name``, with the overrides."""
        return {**self.extra.get(name, {}), **self.backend_overrides}


def _size(value: object, key: str) -> int:
    if isinstance(value, int):
        return value
    try:
        return parse_memory(str(value), option=key)
    except SpecError as exc:
        raise ConfigError(f"config: {exc}") from exc


def _duration(value: object, key: str) -> int | None:
    if isinstance(value, int):
        return value
    try:
        return parse_time_limit(str(value), option=key)
    except SpecError as exc:
        raise ConfigError(f"config: {exc}") from exc


def _known(section: dict[str, Any], cls: type, name: str) -> None:
    allowed = {f.name for f in fields(cls)}
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(
            f"config [{name}]: unknown key(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(allowed))}"
        )


def _jupyterhub(section: dict[str, Any], env: Mapping[str, str]) -> JupyterHubConfig:
    _known(section, JupyterHubConfig, "jupyterhub")
    values = dict(section)
    values.setdefault("api_url", env.get("JUPYTERHUB_API_URL", ""))
    values.setdefault("api_token", env.get("JUPYTERHUB_API_TOKEN", ""))
    values.setdefault("service_name", env.get("JUPYTERHUB_SERVICE_NAME") or "kbatch")
    for key in ("admin_groups", "job_token_scopes"):
        value = values.get(key, ())
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config [jupyterhub]: {key} must be a list of strings")
        values[key] = tuple(value)
    for key in ("job_token_expiry", "job_token_margin"):
        if key in values:
            values[key] = _duration(values[key], f"jupyterhub.{key}")
    for key in ("cache_seconds", "timeout"):
        if key in values and not isinstance(values[key], int | float):
            raise ConfigError(f"config [jupyterhub]: {key} must be a number of seconds")
    for key in ("api_url", "api_token", "service_name", "contact"):
        if not isinstance(values.get(key, ""), str):
            raise ConfigError(f"config [jupyterhub]: {key} must be a string")
    contact = values.get("contact", "")
    if len(contact) > 500 or any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in contact):
        raise ConfigError(
            "config [jupyterhub]: contact must be one line of at most 500 characters "
            "(who users without access should ask, e.g. a team and its address)"
        )
    return JupyterHubConfig(**values)


def _check_jupyterhub(hub: JupyterHubConfig) -> None:
    if not hub.api_url:
        raise ConfigError(
            "auth = jupyterhub needs the hub's API URL: run the server as a hub service "
            "(which sets JUPYTERHUB_API_URL), set JUPYTERHUB_API_URL, or api_url in [jupyterhub]"
        )
    if not hub.api_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"config [jupyterhub]: api_url {hub.api_url!r} must start with http:// or https://"
        )
    if not hub.api_token:
        raise ConfigError(
            "auth = jupyterhub needs the service's API token: give the service entry an "
            "api_token in jupyterhub_config.py and pass it as JUPYTERHUB_API_TOKEN"
        )


def _service_address(env: Mapping[str, str]) -> tuple[str | None, int | None]:
    """Host and port of $JUPYTERHUB_SERVICE_URL, the service entry's ``url``."""
    from urllib.parse import urlsplit

    url = env.get("JUPYTERHUB_SERVICE_URL")
    if not url:
        return None, None
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"JUPYTERHUB_SERVICE_URL {url!r} is not a URL") from exc
    if host is None or host == "localhost":
        return host, port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0", port  # a name others resolve to this machine: listen on every address
    return host, port


def load_config(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None, **overrides: Any
) -> ServerConfig:
    """Read the TOML file (if any), then apply command-line ``overrides`` that are not None.

    Under ``auth = "jupyterhub"``, what is not set defaults to what a hub gives
    its services: the API URL and token, the service's name, its URL prefix
    (``$JUPYTERHUB_SERVICE_PREFIX``, else ``/services/<name>``) and the host and
    port of its ``url`` (``$JUPYTERHUB_SERVICE_URL``).
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    policy_section = dict(data.pop("policy", {}))
    hub_section = dict(data.pop("jupyterhub", {}))
    extra: dict[str, dict[str, Any]] = {
        k: data.pop(k) for k, v in list(data.items()) if isinstance(v, dict)
    }
    backend_overrides: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in BACKEND_OPTIONS:
            backend_overrides[key] = value
        else:
            data[key] = value
    sd = Path(data.pop("state_dir", None) or state_dir(env))
    for key in ("max_memory", "max_memory_per_user", "max_upload_bytes"):
        if key in policy_section:
            policy_section[key] = _size(policy_section[key], f"policy.{key}")
    for key in ("max_time", "default_time"):
        if key in policy_section:
            policy_section[key] = _duration(policy_section[key], f"policy.{key}")
    for key in ("allowed_images", "admin_groups"):
        if key in policy_section:
            policy_section[key] = tuple(policy_section[key])
    _known(policy_section, Policy, "policy")
    known_top = {f.name for f in fields(ServerConfig)} - {
        "policy",
        "jupyterhub",
        "extra",
        "backend_overrides",
        "state_dir",
    }
    unknown = set(data) - known_top
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(sorted(unknown))}")
    hub = _jupyterhub(hub_section, env)
    if data.get("auth") == "jupyterhub":
        if not data.get("prefix"):
            data["prefix"] = env.get("JUPYTERHUB_SERVICE_PREFIX") or f"/services/{hub.service_name}"
        host, port = _service_address(env)
        if host is not None and "host" not in data:
            data["host"] = host
        if port is not None and "port" not in data:
            data["port"] = port
    config = ServerConfig(
        state_dir=sd,
        policy=Policy(**policy_section),
        jupyterhub=hub,
        extra=extra,
        backend_overrides=backend_overrides,
        **data,
    )
    if not isinstance(config.backend, str) or not config.backend:
        raise ConfigError("config: backend must be a name (local, kubernetes) or an import path")
    for key in ("header_timeout", "keepalive_timeout", "max_connections"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"config: {key} must be a positive number")
    if config.http not in ("auto", "h11", "httptools"):
        raise ConfigError(f"config: http {config.http!r} is not known; use auto, h11 or httptools")
    if config.auth not in ("token", "jupyterhub"):
        raise ConfigError(f"config: auth {config.auth!r} is not known; use token or jupyterhub")
    if config.auth == "jupyterhub":
        _check_jupyterhub(config.jupyterhub)
    if config.backend not in ("local", "kubernetes") and config.policy.user_limits().any():
        raise ConfigError(
            "config [policy]: the per-user limits (max_*_per_user) are enforced by the local "
            f"and kubernetes backends, not by {config.backend!r}; remove them"
        )
    check_shared_account(config)
    config.prefix = "/" + config.prefix.strip("/") if config.prefix.strip("/") else ""
    return config


# -- jobs of hub users under the server's own account (until jobs run as their users) --------


def check_shared_account(config: ServerConfig) -> None:
    """Refuse hub users on the local backend unless jobs run as their own accounts
    (``run_as_user`` with a root server) or the admin accepts one shared account.

    Otherwise the local backend runs every job as the server's own Unix account.  With hub
    users that means any user's job can read and stop every other user's jobs
    and files, and use whatever that account may.  So it takes
    ``[local] jobs_share_server_account = true`` to start, and per-job hub tokens
    (which another user's job could read) are refused with it.
    """
    if config.backend != "local":
        return
    # The keys of a backend's section the server reads: a security decision that
    # combines [local] with [jupyterhub].  The local backend declares them too.
    section = config.backend_section("local")
    shared = section.get("jobs_share_server_account", False)
    run_as_user = section.get("run_as_user", False)
    if not isinstance(shared, bool):
        raise ConfigError("config [local]: jobs_share_server_account must be true or false")
    if not isinstance(run_as_user, bool):
        raise ConfigError("config [local]: run_as_user must be true or false")
    runs_as_users = run_as_user and os.geteuid() == 0  # as LocalConfig.runs_as_users
    if config.jupyterhub.job_token_scopes:
        raise ConfigError(
            "config [jupyterhub]: job_token_scopes needs the Kubernetes backend.  The local "
            "backend runs every user's job under the server's one Unix account, so any job "
            "could read another job's hub token (from its environment or /proc) and act as "
            'that user on the hub; remove job_token_scopes, or use backend = "kubernetes"'
        )
    if config.auth == "jupyterhub" and not shared and not runs_as_users:
        if run_as_user:
            raise ConfigError(
                "run_as_user = true needs a server running as root (it runs as uid "
                f"{os.geteuid()}): without root every hub user's job would run as this server's "
                "own account.  Run the server as root, or accept the shared account with "
                "'jobs_share_server_account = true' in the [local] section of the config file"
            )
        raise ConfigError(
            "auth = jupyterhub with the local backend runs every hub user's jobs under this "
            "server's own Unix account: any user's job can read, change and stop the other "
            "users' jobs and files, and do whatever this account may (everything, if it is "
            "root).  If the users trust each other, accept that with "
            "'jobs_share_server_account = true' in the [local] section of the config file; "
            "otherwise run the server as root with 'run_as_user = true' there (each job then "
            "runs as its user's Unix account), or use the Kubernetes backend"
        )
