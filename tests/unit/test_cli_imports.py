"""The CLI must start fast: it never imports the server, a web framework or Kubernetes."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = (
    "starlette",
    "uvicorn",
    "anyio",
    "lightkube",
    "kubernetes",
    "kubernetes_asyncio",
    "kbatch.server",
    "kbatch.backends",
    "httpx",
    "yaml",
)

CLI_MODULES = [
    "kbatch.cli.main",
    "kbatch.cli.submit",
    "kbatch.cli.queue",
    "kbatch.cli.jobs",
    "kbatch.cli.configure",
    "kbatch.cli.output",
    "kbatch.cli.tasks",
    "kbatch.client",
    "kbatch.notebooks",
    "kbatch.notebook_runner",
]


def imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out))


def _bad(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_cli_modules_import_no_server_code() -> None:
    modules = imported_after("\n".join(f"import {m}" for m in CLI_MODULES))
    assert _bad(modules) == []
    assert "kbatch.cli.submit" in modules  # the check saw the modules it means to check


def test_help_imports_almost_nothing() -> None:
    modules = imported_after(
        "import kbatch.cli.main as m, contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n    try:\n        m.main(['--help'])\n    except SystemExit:\n        pass"
    )
    assert _bad(modules) == []
    assert "msgspec" not in modules and "http.client" not in modules


def test_the_check_itself_can_fail() -> None:
    assert _bad(imported_after("import kbatch.server.app")) != []
