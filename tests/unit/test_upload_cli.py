"""The CLI's side of uploads stays light, and its progress bar shows only where it should."""

from __future__ import annotations

import io

from kbatch.cli.progress import ProgressBar
from tests.unit.test_cli_imports import _bad, imported_after

UPLOAD_MODULES = [
    "kbatch.uploads.manifest",
    "kbatch.uploads.tree",
    "kbatch.uploads.results",
    "kbatch.uploads.pod",
    "kbatch.client.transfer",
    "kbatch.cli.fetch",
    "kbatch.cli.progress",
]


def test_upload_modules_import_no_server_code() -> None:
    modules = imported_after("\n".join(f"import {m}" for m in UPLOAD_MODULES))
    assert _bad(modules) == []
    assert "kbatch.uploads.tree" in modules


def test_a_plain_submit_does_not_import_the_ignore_rules() -> None:
    modules = imported_after("import kbatch.cli.submit, kbatch.cli.main, kbatch.client")
    assert "pathspec" not in modules and "kbatch.uploads.tree" not in modules


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_drawn_on_a_terminal_after_a_moment_only() -> None:
    screen = Terminal()
    bar = ProgressBar("uploading", stream=screen, delay=0.0)
    bar.plan(3, 3 * 1024 * 1024)
    bar(2 * 1024 * 1024)
    bar.close()
    assert screen.getvalue().startswith("\ruploading [")
    assert "67%" in screen.getvalue() and "2.0 MiB/3.0 MiB (3 files)" in screen.getvalue()
    assert screen.getvalue().endswith("\n")
    quick = Terminal()
    bar = ProgressBar("uploading", stream=quick, delay=60.0)  # done before it would show
    bar.plan(1, 10)
    bar(10)
    bar.close()
    assert quick.getvalue() == ""
    piped = io.StringIO()
    bar = ProgressBar("uploading", stream=piped, delay=0.0)
    bar.plan(1, 10)
    bar(10)
    bar.close()
    assert piped.getvalue() == ""
    silenced = Terminal()
    bar = ProgressBar("uploading", stream=silenced, enabled=False, delay=0.0)  # --parsable
    bar.plan(1, 10)
    bar(10)
    assert silenced.getvalue() == ""
