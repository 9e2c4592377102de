"""Where kbatch keeps its files.  Read when called, never at import time."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["config_dir", "state_dir", "write_private"]


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The standalone server's state: ``$KBATCH_STATE_DIR`` or ``$XDG_STATE_HOME/kbatch``."""
    env = os.environ if environ is None else environ
    if env.get("KBATCH_STATE_DIR"):
        return Path(env["KBATCH_STATE_DIR"])
    base = env.get("XDG_STATE_HOME") or str(
        Path(env.get("HOME", "~")).expanduser() / ".local" / "state"
    )
    return Path(base) / "kbatch"


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The client's config: ``$KBATCH_CONFIG_DIR`` or ``$XDG_CONFIG_HOME/kbatch``."""
    env = os.environ if environ is None else environ
    if env.get("KBATCH_CONFIG_DIR"):
        return Path(env["KBATCH_CONFIG_DIR"])
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "kbatch"


def write_private(path: Path, data: str) -> None:
    """Write a file readable only by its owner (mode 0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
