"""A stand-in for ``jupyterhub-singleuser``, spawned by the test hub's real spawner.

It writes the environment the hub gave it (exactly what a notebook terminal
inherits) to ``$HOME/singleuser-env.json``, its pid beside it, and answers HTTP on
``$JUPYTERHUB_SERVICE_URL`` so that the hub sees the server come up.  Only the
standard library: it runs with whatever the spawner's environment has.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

ENV_FILE = "singleuser-env.json"
PID_FILE = "singleuser.pid"


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"singleuser": "stand-in"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def main() -> int:
    home = Path(os.environ["HOME"])
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / (ENV_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the token
    with os.fdopen(fd, "w") as handle:
        json.dump(dict(os.environ), handle)
    os.replace(tmp, home / ENV_FILE)
    (home / PID_FILE).write_text(str(os.getpid()))  # for the tests' last-resort cleanup
    url = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
    server = http.server.ThreadingHTTPServer((url.hostname or "127.0.0.1", url.port or 8888), _Ok)
    with contextlib.suppress(KeyboardInterrupt):  # the hub stops servers with SIGINT first
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
