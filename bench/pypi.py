"""The ``kbatch`` CLI published on PyPI, in a throwaway virtual environment of its own.

It lives outside the repository (``~/.cache/kbatch/bench/pypi-kbatch-<version>``)
and is reused when present.  ``pip install kbatch`` pulls in the
``kubernetes`` package: that import is what its users wait for.

PyPI's ``kbatch`` is another project (kbatch-dev's, 0.4.2); ours is the
distribution ``jupyterhub-kbatch``, so the two never replace each other, and
this one is kept in a virtual environment of its own anyway.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PypiKbatch", "PypiUnavailable", "cache_dir", "pypi_kbatch"]

_MARKER = ".kbatch-bench-complete"
_WHEEL = re.compile(r"^kbatch-([0-9][^-]*)-")


class PypiUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class PypiKbatch:
    version: str
    venv: Path

    @property
    def kbatch(self) -> str:
        return str(self.venv / "bin" / "kbatch")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kbatch" / "bench"


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.name.removeprefix("pypi-kbatch-")))


def _cached(cache: Path) -> PypiKbatch | None:
    found = [p.parent for p in cache.glob(f"pypi-kbatch-*/{_MARKER}")]
    if not found:
        return None
    venv = max(found, key=_version_key)
    return PypiKbatch(venv.name.removeprefix("pypi-kbatch-"), venv)


def _run(argv: list[str], log: Callable[[str], None]) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(argv))
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900)


def _latest_version(log: Callable[[str], None]) -> str:
    with tempfile.TemporaryDirectory(prefix="kbatch-bench-pypi-") as tmp:
        result = _run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "kbatch"], log
        )
        if result.returncode != 0:
            raise PypiUnavailable(f"pip download kbatch failed: {result.stderr.strip()[-300:]}")
        for name in os.listdir(tmp):
            if match := _WHEEL.match(name):
                return match.group(1)
    raise PypiUnavailable("pip download kbatch gave no wheel to read the version from")


def pypi_kbatch(cache: Path, *, install: bool, log: Callable[[str], None]) -> PypiKbatch:
    """The cached environment, or a new one with the latest ``kbatch`` from PyPI."""
    cached = _cached(cache)
    if cached is not None:
        log(f"reusing PyPI kbatch {cached.version} in {cached.venv}")
        return cached
    if not install:
        raise PypiUnavailable(f"no PyPI kbatch in {cache} and installing is off (--no-install)")
    version = _latest_version(log)
    venv = cache / f"pypi-kbatch-{version}"
    if venv.exists():
        shutil.rmtree(venv)  # an earlier attempt that did not finish
    cache.mkdir(parents=True, exist_ok=True)
    for argv in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"kbatch=={version}"],
    ):
        result = _run(argv, log)
        if result.returncode != 0:
            raise PypiUnavailable(f"{' '.join(argv[:4])} failed: {result.stderr.strip()[-300:]}")
    (venv / _MARKER).write_text(version + "\n")
    return PypiKbatch(version, venv)
