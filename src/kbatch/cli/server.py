"""``kbatch server``: run, stop and inspect the server.  Imports it only here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kbatch.errors import ConfigError
from kbatch.paths import state_dir

__all__ = ["server"]


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else state_dir()


def _run_args(argv: list[str]) -> list[str]:
    """The command line of the detached server: the same minus --background."""
    return [w for w in argv if w not in ("--background", "-b")]


def server(args: argparse.Namespace) -> int:
    from kbatch.server import main as server_main

    directory = _state_dir(args)
    if args.action == "stop":
        pid = server_main.stop_server(directory)
        print(f"stopped the server (pid {pid})" if pid else "no server was running")
        return 0
    if args.action == "status":
        info = server_main.running_server(directory)
        if info is None:
            print(f"no server running for {directory}")
            return 3
        print(f"running: {info.get('url')} (pid {info.get('pid')}, backend {info.get('backend')})")
        return 0
    if args.action == "add-token":
        if not args.user:
            raise ConfigError("add-token needs a user: kbatch server add-token USER [--admin]")
        from kbatch.server.auth.tokens import add_token

        print(add_token(directory / server_main.TOKENS_FILE, args.user, admin=args.admin))
        return 0
    if args.user:
        raise ConfigError(f"unexpected argument {args.user!r}")
    if args.background:
        words = sys.argv[sys.argv.index("server") + 1 :] if "server" in sys.argv else []
        url = server_main.start_background(_run_args(words), directory)
        print(f"kbatch server running at {url} (log: {directory / 'server.log'})")
        return 0
    from kbatch.server.config import load_config

    config = load_config(
        Path(args.config) if args.config else None,
        state_dir=str(directory) if args.state_dir else None,
        host=args.host,
        port=args.port,
        backend=args.backend,
        auth=args.auth,
        log_level=args.log_level,
        cpus=args.cpus,
        memory=args.memory,
    )
    return server_main.serve(config)
