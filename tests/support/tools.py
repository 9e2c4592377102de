"""The repository's install scripts (tools/): each prints the path of what it installed last."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

__all__ = ["REPO", "installed"]


def installed(script: str, *, timeout: float | None = 1800) -> Path:
    """Run ``tools/<script>`` (cached after the first run) and return the path it prints."""
    out = subprocess.run(
        ["bash", str(REPO / "tools" / script)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"tools/{script} failed:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])
