"""Headless Chromium from Debian, driven by playwright's Python API.

``tools/browser/install.sh`` installs Debian's ``chromium`` when it is missing
(``make test`` runs it first); playwright's own browser download is never used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

from tests.support.tools import installed

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS = Path(__file__).resolve().parents[2] / "docs"


def chromium() -> Path:
    return installed("browser/install.sh", timeout=600)


@contextlib.contextmanager
def launched() -> Iterator[Browser]:
    exe = chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(exe), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def watch_page(page: Page) -> list[str]:
    """Record what must never happen on a page: dialogs other than confirms, requests
    outside the server, script errors.  Confirms are accepted (the user says yes)."""
    problems: list[str] = []

    def on_dialog(dialog: object) -> None:
        kind = dialog.type  # type: ignore[attr-defined]
        if kind != "confirm":
            problems.append(f"unexpected {kind} dialog: {dialog.message}")  # type: ignore[attr-defined]
            dialog.dismiss()  # type: ignore[attr-defined]
        else:
            dialog.accept()  # type: ignore[attr-defined]

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console: {message.text}")
            if message.type == "error" and "Content Security Policy" in message.text
            else None
        ),
    )
    return problems


def screenshot(page: Page, name: str) -> None:
    """A screenshot of a main view; with ``KBATCH_SCREENSHOTS=1`` it replaces the docs' own
    (docs/dashboard-NAME.png), else it goes to the test's temporary directory only."""
    if os.environ.get("KBATCH_SCREENSHOTS") == "1":
        page.screenshot(path=str(DOCS / f"dashboard-{name}.png"))
    else:
        page.screenshot()  # still proves the page renders
