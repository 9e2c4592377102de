"""A progress bar on stderr for uploads and fetches that take more than a moment.

Drawn only on a terminal, only once the transfer has lasted ``delay`` seconds,
at most ten times a second: a quick upload, a pipe or ``--parsable`` see
nothing.  No library: one line of text is all it draws.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressBar:
    def __init__(
        self, what: str, *, stream: TextIO | None = None, enabled: bool = True, delay: float = 0.5
    ) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.delay = delay
        self.total = 0
        self.files = 0
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._shown = False

    def plan(self, files: int, total: int) -> None:
        self.files, self.total, self.done = files, total, 0
        self.started = time.monotonic()

    def __call__(self, moved: int) -> None:
        self.done += moved
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.started < self.delay or now - self._drawn < 0.1:
            return
        self._drawn = now
        self._shown = True
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        width = 30
        bar = "#" * int(fraction * width)
        rate = self.done / max(now - self.started, 1e-6)
        self.stream.write(
            f"\r{self.what} [{bar:<{width}}] {fraction:4.0%} {_size(self.done)}/"
            f"{_size(self.total)} ({self.files} files) {_size(rate)}/s "
        )
        self.stream.flush()

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
