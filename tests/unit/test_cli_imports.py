"""The CLI must start fast: it never imports the server, a web framework or Kubernetes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

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


def _refusing_server() -> tuple[socket.socket, threading.Thread]:
    """A listener that answers every request with a 400: the CLI gets as far as sending."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_submitting_a_script_loads_no_notebook_machinery(tmp_path: Path) -> None:
    """`kbatch submit script.sh`: what it needs, not what a notebook would (reading the
    runner with importlib.resources costs more than the rest of kbatch's own modules)."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    code = (
        "import sys, contextlib, io\n"
        "from kbatch.cli.main import main\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"
        f"    main(['submit', '--parsable', {str(script)!r}])\n"
        "import json; print(json.dumps(sorted(sys.modules)))"
    )
    listener, _ = _refusing_server()
    env = {
        **os.environ,
        "KBATCH_URL": f"http://127.0.0.1:{listener.getsockname()[1]}",
        "KBATCH_CONFIG_DIR": str(tmp_path / "config"),
        "KBATCH_STATE_DIR": str(tmp_path / "state"),
    }
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        ).stdout
    finally:
        listener.close()
    modules = set(json.loads(out.splitlines()[-1]))
    assert "http.client" in modules  # it did get as far as sending
    assert not modules & {"importlib.resources", "argparse"}, modules
