"""Installing Debian packages for a benchmark, without letting apt start their daemons."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["AptError", "apt_install", "no_daemon_starts"]

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


class AptError(RuntimeError):
    """A package could not be installed; the message says why."""


@contextmanager
def no_daemon_starts(path: Path = POLICY_RC_D) -> Iterator[None]:
    """A ``policy-rc.d`` that exits 101 (action forbidden), removed afterwards.

    An existing one is left as it is (someone else put it there).
    """
    if path.exists():
        yield
        return
    path.write_text(
        "#!/bin/sh\n# Written by kbatch's benchmark while it installs packages.\nexit 101\n"
    )
    path.chmod(0o755)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _run(argv: Sequence[str], log: Callable[[str], None]) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(argv))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        list(argv), capture_output=True, text=True, env=env, check=False, timeout=1200
    )


def apt_install(packages: Sequence[str], log: Callable[[str], None]) -> None:
    """``apt-get install -y PACKAGES`` (with ``apt-get update`` when the lists are stale)."""
    if shutil.which("apt-get") is None:
        raise AptError("apt-get is not available (not a Debian-based system)")
    if os.geteuid() != 0:
        raise AptError(f"installing {' '.join(packages)} needs root; install them by hand")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    with no_daemon_starts():
        result = _run(install, log)
        if result.returncode != 0:
            update = _run(["apt-get", "update", "-q"], log)
            if update.returncode != 0:
                raise AptError(f"apt-get update failed: {_tail(update.stderr)}")
            result = _run(install, log)
    if result.returncode != 0:
        raise AptError(f"apt-get install {' '.join(packages)} failed: {_tail(result.stderr)}")


def _tail(text: str, lines: int = 3) -> str:
    return " / ".join(text.strip().splitlines()[-lines:]) or "(no output)"
