"""Real Unix accounts for tests, and a Python such an account can run kbatch with.

Accounts are made with ``useradd`` (the tests run as root here and in CI) and
removed with ``userdel -r`` afterwards.  The venv's interpreter lives under
``/root`` (pyenv, mode 0700) on these machines, so another account cannot
exec it: :func:`account_python` makes a small venv in a directory everyone
may read, from a system Python of the same version (``/usr/bin/python3.11``
here), whose ``site-packages`` adds the test venv's own with ``site.addsitedir``
(so the editable install of kbatch and every dependency import as they do for
root).  Tests skip, saying why, where that is impossible.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["account_python", "reachable_dir", "run_as", "unix_account"]


@contextlib.contextmanager
def unix_account(prefix: str = "kbt") -> Iterator[str]:
    """A fresh Unix account with a home directory, removed (with its files) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create Unix accounts")
    if shutil.which("useradd") is None:
        pytest.skip("needs useradd")
    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        # Its processes first (all started by the test): userdel refuses an account in use.
        _kill_processes_of(pwd.getpwnam(name).pw_uid)
        subprocess.run(["userdel", "-r", name], check=False, capture_output=True)


def _kill_processes_of(uid: int) -> None:
    """SIGKILL each process whose real uid is ``uid`` (by pid: /proc's owner may be root's)."""
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            if not entry.isdigit():
                continue
            lines = Path(f"/proc/{entry}/status").read_text().splitlines()
            real_uid = int(next(line for line in lines if line.startswith("Uid:")).split()[1])
            if real_uid == uid:
                os.kill(int(entry), signal.SIGKILL)


def run_as(user: str, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``user`` (uid, gid, no supplementary groups), text output captured."""
    return subprocess.run(  # type: ignore[call-overload]
        argv, user=user, group=user, extra_groups=[], capture_output=True, text=True, **kwargs
    )


@contextlib.contextmanager
def reachable_dir(prefix: str = "kbatch-test-") -> Iterator[Path]:
    """A fresh directory every account may traverse (pytest's own tmp dirs are root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _runs(user: str, exe: str, version: str) -> bool:
    check = "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"
    try:
        return run_as(user, [exe, "-c", check], cwd="/", env={}).stdout.strip() == version
    except OSError:  # e.g. PermissionError: an interpreter under /root
        return False


def _candidates() -> list[str]:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    names = [
        os.path.realpath(sys.executable),
        f"/usr/bin/python{version}",
        f"/usr/local/bin/python{version}",
        shutil.which(f"python{version}") or "",
    ]
    return list(dict.fromkeys(n for n in names if n))


def account_python(user: str, where: Path) -> Path:
    """A Python that ``user`` can run and that imports kbatch and its dependencies.

    ``where`` must be a directory ``user`` can reach; the venv is made in it.
    """
    site_packages = Path(sysconfig.get_paths()["purelib"])
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = next((exe for exe in _candidates() if _runs(user, exe, version)), None)
    if base is None:
        pytest.skip(f"no Python {version} that the account {user} may run")
    venv = where / "venv"
    subprocess.run(
        [base, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True
    )
    (venv / "lib" / f"python{version}" / "site-packages" / "kbatch-tests.pth").write_text(
        f"import site; site.addsitedir({str(site_packages)!r})\n"
    )
    python = venv / "bin" / "python"
    probe = run_as(user, [str(python), "-c", "import kbatch.server.main, uvicorn"], cwd="/", env={})
    if probe.returncode != 0:
        pytest.skip(
            f"the account {user} cannot import kbatch from {site_packages} "
            f"(is the repository readable by others?): {probe.stderr.strip()[-300:]}"
        )
    return python
