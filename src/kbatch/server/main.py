"""Running the server: in the foreground, in the background, and stopping it.

The standalone server writes ``server.json`` (its URL and pid) and a token
readable only by its owner into the state directory; the client finds both
there without configuration.  One server per state directory, enforced with a
lock file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette

from kbatch.backends.base import BACKENDS, Backend, backend_class
from kbatch.client.config import SERVER_FILE, TOKEN_FILE
from kbatch.errors import ConfigError
from kbatch.hardening import make_undumpable, scrub_environment
from kbatch.paths import write_private
from kbatch.server.app import create_app
from kbatch.server.auth.base import Authenticator
from kbatch.server.auth.tokens import TokenFileAuthenticator, add_token, hash_token
from kbatch.server.blobs import BlobStore
from kbatch.server.config import ServerConfig
from kbatch.server.connections import (
    ConnectionLimits,
    bounded_protocol,
    fast_http_available,
    quiet_exception_handler,
    raise_file_limit,
)

if TYPE_CHECKING:
    import uvicorn

    from kbatch.server.hub import HubClient

__all__ = [
    "build_app",
    "process_start_time",
    "running_server",
    "serve",
    "start_background",
    "stop_server",
]

log = logging.getLogger("kbatch.server")
TOKENS_FILE = "tokens.json"
UPLOADS_DIR = "uploads"  # the store of uploaded files (kbatch.server.blobs)
LAST_URL_FILE = "server.last-url"  # the URL of the last server, once it has stopped


def build_backend(config: ServerConfig) -> Backend:
    """The configured backend, from its own ``[name]`` section; only it knows the keys."""
    cls = backend_class(config.backend)  # a ConfigError names what is wrong
    for name in config.extra:
        if name != cls.name and name not in BACKENDS:
            log.warning("config section [%s] is not used by the %s backend", name, cls.name)
    return cls.from_config(config.backend_section(cls.name), state_dir=config.state_dir)


def build_authenticator(config: ServerConfig, hub: HubClient | None = None) -> Authenticator:
    if config.auth == "token":
        return TokenFileAuthenticator(config.state_dir / TOKENS_FILE)
    from kbatch.server.auth.jupyterhub import JupyterHubAuthenticator

    settings = config.jupyterhub
    return JupyterHubAuthenticator(
        hub or build_hub_client(config),
        service_name=settings.service_name,
        admin_groups=(*settings.admin_groups, *config.policy.admin_groups),
        cache_seconds=settings.cache_seconds,
    )


def build_hub_client(config: ServerConfig) -> HubClient:
    from kbatch.server.hub import HubClient

    settings = config.jupyterhub
    return HubClient(settings.api_url, settings.api_token, timeout=settings.timeout)


def build_app(config: ServerConfig) -> Starlette:
    backend = build_backend(config)
    if config.auth != "jupyterhub":
        return _with_dashboard(config, backend, build_authenticator(config))
    # One hub client for both; the authenticator opens and closes it around the backend.
    hub = build_hub_client(config)
    settings = config.jupyterhub
    if settings.job_token_scopes:
        from kbatch.server.job_tokens import JobTokens

        backend.hooks = JobTokens(
            hub,
            service_name=settings.service_name,
            scopes=settings.job_token_scopes,
            default_expiry=settings.job_token_expiry,
            margin=settings.job_token_margin,
        )
    return _with_dashboard(config, backend, build_authenticator(config, hub), hub)


def _with_dashboard(
    config: ServerConfig, backend: Backend, auth: Authenticator, hub: HubClient | None = None
) -> Starlette:
    """The API, and the web dashboard at the server's root (kbatch.server.dashboard)."""
    from kbatch.server.dashboard import (
        Dashboard,
        DashboardAuthenticator,
        SecurityHeaders,
        hub_oauth_settings,
    )
    from kbatch.server.dashboard.sessions import Sessions

    dashboard_auth = DashboardAuthenticator(auth, Sessions())
    oauth = None
    if hub is not None:
        oauth = hub_oauth_settings(
            os.environ,
            service_name=config.jupyterhub.service_name,
            prefix=config.prefix,
            admin_groups=config.jupyterhub.admin_groups,
            contact=config.jupyterhub.contact,
        )
    dashboard = Dashboard(backend, dashboard_auth, prefix=config.prefix, oauth=oauth, hub=hub)
    app = create_app(
        backend,
        dashboard_auth,
        config.policy,
        prefix=config.prefix,
        extra_routes=dashboard.routes(),
        uploads=BlobStore(config.state_dir / UPLOADS_DIR),
    )
    app.add_middleware(SecurityHeaders, sessions=dashboard_auth.sessions)
    return app


def ensure_owner_token(state_dir: Path) -> None:
    """The token of the account running the server, where the client looks for it."""
    token_path = state_dir / TOKEN_FILE
    tokens_path = state_dir / TOKENS_FILE
    with contextlib.suppress(OSError, ValueError):
        token = token_path.read_text().strip()
        if hash_token(token) in json.loads(tokens_path.read_text()):
            return
    token = add_token(tokens_path, getpass.getuser(), admin=True)
    write_private(token_path, token + "\n")


def _lock(state_dir: Path, wait: float = 2.0) -> int:
    """Hold ``server.lock`` for the server's lifetime: one server per state directory.

    Held, it is also how ``status`` and ``stop`` tell a live server from a stale
    ``server.json``; they take it shared for an instant, so a start that meets
    one of them waits ``wait`` seconds before concluding another server runs.
    """
    fd = os.open(state_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
        os.close(fd)
        info = read_server_file(state_dir)
        where = f" at {info.get('url')} (pid {info.get('pid')})" if info else ""
        raise ConfigError(
            f"a kbatch server is already running for {state_dir}{where}; "
            "stop it with 'kbatch server stop' or use another --state-dir"
        )


def _lock_held(state_dir: Path) -> bool:
    """Whether a server holds this state directory's lock (without disturbing it)."""
    try:
        fd = os.open(state_dir / "server.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases a lock taken above
    return False


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None.

    A pid is reused; a pid with its start time names one process for the life of
    the machine.  None when the process does not exist or has exited (or there
    is no /proc).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[:1] in (["Z"], ["X"]):
        return None  # it has exited; only its parent has not reaped it yet
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def running_server(state_dir: Path) -> dict[str, object] | None:
    """``server.json`` of the server running for this state directory, or None.

    It is that server only if the lock is held and the recorded pid is alive with
    the recorded start time (where /proc exists): a leftover file, or a pid now
    used by another process, is not a running server.  A leftover file is removed.
    """
    info = read_server_file(state_dir)
    pid = info.get("pid")
    if not _lock_held(state_dir):
        if info:
            _remove_server_file(state_dir, info)
        return None
    if not isinstance(pid, int):
        return None  # starting: it has the lock but has not written the file yet
    started = info.get("started")
    proc = Path("/proc/self/stat").exists()
    if proc and (started is None or process_start_time(pid) != started):
        return None
    return info


def _remove_server_file(state_dir: Path, info: dict[str, object]) -> None:
    """Remove ``server.json`` if it is still the one described by ``info``."""
    if read_server_file(state_dir) == info:
        with contextlib.suppress(FileNotFoundError):
            (state_dir / SERVER_FILE).unlink()


def read_server_file(state_dir: Path) -> dict[str, object]:
    try:
        data = json.loads((state_dir / SERVER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per hub request is noise; the wire-level trace is never wanted.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # lightkube's client is built on httpx2 (a fork of httpx), which logs every request
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def _previous_port(state_dir: Path) -> int | None:
    """The port the last server of this state directory used (clients may still hold its URL)."""
    from urllib.parse import urlsplit

    url = read_server_file(state_dir).get("url")
    if url is None:
        with contextlib.suppress(OSError):
            url = (state_dir / LAST_URL_FILE).read_text().strip()
    try:
        return urlsplit(url).port if isinstance(url, str) else None
    except ValueError:
        return None


def _listen(host: str, port: int, previous: int | None) -> socket.socket:
    """A listening socket; with port 0, the previous port if it is free, else any."""
    candidates = [port] if port else [p for p in (previous, 0) if p is not None]
    for index, candidate in enumerate(candidates):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this.  asyncio sets it only on sockets made with
        # proto=IPPROTO_TCP; without it each response (headers, then body) waited ~40 ms
        # for the client's delayed ACK (Nagle's algorithm): every request took 44 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            if index + 1 < len(candidates):
                continue
            raise ConfigError(
                f"cannot listen on {host}:{candidate}: {exc.strerror}; choose another --port"
            ) from exc
        sock.listen(1024)
        return sock
    raise AssertionError("unreachable")


def serve(config: ServerConfig) -> int:
    """Run in the foreground until SIGINT or SIGTERM."""
    import uvicorn

    _configure_logging(config.log_level)
    # Jobs of the local backend run under this account: hide our environment and memory
    # from them, and keep the hub's token (already in config) out of every child's.
    if not make_undumpable() and sys.platform.startswith("linux"):
        log.warning("cannot make the server non-dumpable: its jobs may read its environment")
    scrub_environment()
    if (
        config.backend == "local"
        and config.auth == "jupyterhub"
        and os.geteuid() == 0
        and config.backend_section("local").get("run_as_user") is not True
    ):
        log.warning(
            "jobs_share_server_account: this server runs as root, so every hub user's job "
            "does too; run it as an unprivileged account of its own"
        )
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = _lock(config.state_dir)
    if config.auth == "token":
        ensure_owner_token(config.state_dir)
    app = build_app(config)
    sock = _listen(config.host, config.port, _previous_port(config.state_dir))
    sock.set_inheritable(False)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}{config.prefix}"
    limits = ConnectionLimits(
        header_timeout=config.header_timeout,
        max_connections=raise_file_limit(config.max_connections),
    )
    fast = config.http == "httptools" or (config.http == "auto" and fast_http_available())
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            http=bounded_protocol(limits, fast=fast),
            timeout_keep_alive=max(1, round(config.keepalive_timeout)),
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=3,
        )
    )
    info: dict[str, object] = {
        "url": url,
        "pid": os.getpid(),
        # With the pid, names this process and no later one that reuses the pid.
        "started": process_start_time(os.getpid()),
        "backend": config.backend,
    }
    # uvicorn ends a SIGTERM/SIGINT by restoring the handlers it found and raising the
    # signal again: with the default handler the process died there, before the
    # ``finally`` below, and left server.json behind.  These handlers turn that second
    # signal (or one that arrives before uvicorn listens) into a normal exit.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    write_private(config.state_dir / SERVER_FILE, json.dumps(info) + "\n")
    log.info(
        "kbatch server listening on %s (state in %s; HTTP on %s)",
        url,
        config.state_dir,
        "httptools and uvloop" if fast else "h11 and asyncio",
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory(fast)) as runner:
            runner.run(_serve(server, sock, limits))
    except _Stopped:
        pass
    finally:
        with contextlib.suppress(OSError):  # for the next server's port (see _previous_port)
            write_private(config.state_dir / LAST_URL_FILE, url + "\n")
        _remove_server_file(config.state_dir, info)
        os.close(lock_fd)
    return 0


def _loop_factory(fast: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop with the fast HTTP stack (its transports write with less
    Python per call), else asyncio's own."""
    if not fast:
        return None
    import uvloop

    return uvloop.new_event_loop


async def _serve(server: uvicorn.Server, sock: socket.socket, limits: ConnectionLimits) -> None:
    asyncio.get_running_loop().set_exception_handler(quiet_exception_handler(limits))
    try:
        await server.serve(sockets=[sock])
    finally:
        limits.summarize()


class _Stopped(BaseException):
    """Raised by the signal handlers below to leave ``serve`` through its ``finally``."""


def _exit_on_signal(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def _healthy(url: str) -> bool:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=1)
        conn.request("GET", parts.path.rstrip("/") + "/api/v1/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def start_background(args: list[str], state_dir: Path, timeout: float = 30.0) -> str:
    """Start ``kbatch server ARGS`` detached; return its URL once it answers."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = state_dir / "server.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kbatch.cli.main", "server", *args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            env={**os.environ, "KBATCH_STATE_DIR": str(state_dir)},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_server_file(state_dir)
        if info.get("pid") == proc.pid and _healthy(str(info.get("url"))):
            return str(info["url"])
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise ConfigError(f"the server did not start: {tail[0]} (log: {log_path})")
        time.sleep(0.05)
    proc.terminate()
    raise ConfigError(f"the server did not answer within {timeout:.0f} s (log: {log_path})")


def stop_server(state_dir: Path, timeout: float = 15.0) -> int | None:
    """SIGTERM the server of this state directory and wait for it; its pid, or None.

    Only a process that is that server is signalled (see :func:`running_server`):
    never a pid that a stale ``server.json`` names.  On Linux the process is
    pinned with a pidfd before it is checked, so the pid cannot be reused
    between the check and the signal.
    """
    info = running_server(state_dir)
    if info is None:
        return None
    pid = info["pid"]
    assert isinstance(pid, int)
    pidfd: int | None = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)
    try:
        if running_server(state_dir) != info:  # checked again after pinning the process
            return None
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return None
    finally:
        if pidfd is not None:
            os.close(pidfd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = info.get("started")
        gone = started is None or process_start_time(pid) != started
        if gone and not _lock_held(state_dir):
            _remove_server_file(state_dir, info)  # if it could not (SIGKILL meanwhile)
            return pid
        time.sleep(0.05)
    raise ConfigError(f"the server (pid {pid}) did not stop within {timeout:.0f} s")
