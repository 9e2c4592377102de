"""Waiting for things in tests: poll with a deadline, never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = predicate()
    while last is None or not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(interval)
        last = predicate()
    return last


def wait_for_file(path: Path, *, timeout: float = 30.0) -> str:
    """The stripped text of ``path`` once it exists and is not empty."""
    text = wait_for(lambda: file_text(path), timeout=timeout, what=f"{path} to be written")
    assert text is not None
    return text


def file_text(path: Path) -> str | None:
    """The file's stripped text once it exists and is not empty."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None
