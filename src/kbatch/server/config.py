"""The server's configuration: typed dataclasses, read from a TOML file and flags.

Example ``kbatch.toml``::

    host = "127.0.0.1"
    port = 8765
    backend = "local"          # or "kubernetes"
    auth = "token"             # or "jupyterhub"

    [local]
    cpus = 8
    memory = "32G"
    kill_grace = 10

    [policy]
    max_cpus = 4
    max_memory = "16G"
    max_time = "1-00:00:00"
    allowed_images = ["quay.io/jupyter/*"]
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kbatch.backends.local.backend import LocalConfig
from kbatch.errors import ConfigError, SpecError
from kbatch.paths import state_dir
from kbatch.server.policy import Policy
from kbatch.units import parse_memory, parse_time_limit

__all__ = ["ServerConfig", "load_config"]


@dataclass
class ServerConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port, written to <state_dir>/server.json
    prefix: str = ""  # URL prefix, e.g. /services/kbatch behind JupyterHub
    backend: str = "local"
    auth: str = "token"
    log_level: str = "info"
    policy: Policy = field(default_factory=Policy)
    local: LocalConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # backend/auth sections, passed through

    def local_config(self) -> LocalConfig:
        return self.local or LocalConfig(state_dir=self.state_dir)


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


def load_config(path: Path | None = None, **overrides: Any) -> ServerConfig:
    """Read the TOML file (if any), then apply command-line ``overrides`` that are not None."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    local_section = dict(data.pop("local", {}))
    policy_section = dict(data.pop("policy", {}))
    extra: dict[str, Any] = {k: data.pop(k) for k in ("kubernetes", "jupyterhub") if k in data}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("cpus", "memory", "gpus", "kill_grace", "memory_limiter"):
            local_section[key] = value
        else:
            data[key] = value
    sd = Path(data.pop("state_dir", None) or state_dir(os.environ))
    if "memory" in local_section:
        local_section["memory"] = _size(local_section["memory"], "local.memory")
    _known(local_section, LocalConfig, "local")
    local = LocalConfig(state_dir=sd, **local_section)
    for key in ("max_memory",):
        if key in policy_section:
            policy_section[key] = _size(policy_section[key], f"policy.{key}")
    for key in ("max_time", "default_time"):
        if key in policy_section:
            policy_section[key] = _duration(policy_section[key], f"policy.{key}")
    for key in ("allowed_images", "admin_groups"):
        if key in policy_section:
            policy_section[key] = tuple(policy_section[key])
    _known(policy_section, Policy, "policy")
    known_top = {f.name for f in fields(ServerConfig)} - {"policy", "local", "extra", "state_dir"}
    unknown = set(data) - known_top
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(sorted(unknown))}")
    config = ServerConfig(
        state_dir=sd, policy=Policy(**policy_section), local=local, extra=extra, **data
    )
    if config.backend not in ("local", "kubernetes"):
        raise ConfigError(
            f"config: backend {config.backend!r} is not known; use local or kubernetes"
        )
    if config.auth not in ("token", "jupyterhub"):
        raise ConfigError(f"config: auth {config.auth!r} is not known; use token or jupyterhub")
    config.prefix = "/" + config.prefix.strip("/") if config.prefix.strip("/") else ""
    return config
