"""The launcher: one pre-started process that forks a job's supervisor on request.

Starting a supervisor as ``python -m kbatch.backends.local.supervisor`` costs an
interpreter start and the supervisor's imports, about 80 ms of CPU per job, far
more than everything else a job's start does.  The server therefore starts
this launcher once (:class:`Launcher`): the same interpreter and module
(``python -m kbatch.backends.local.supervisor --launcher FD``), started with
:func:`kbatch.hardening.supervisor_environment` as its whole environment, in a
session of its own, with no descriptor of the server's but its end of a
socket pair.  It imports the supervisor once and then, for each request (a
job directory, and the job's ``lock`` descriptor passed with ``SCM_RIGHTS``),
forks: the child closes every descriptor but the lock (the launcher's socket
first), calls ``setsid`` and supervises the job (:func:`supervisor.supervise`),
exactly as a supervisor started as a new interpreter does once it has forked
away from the server.  A start costs one fork of a small process.

So a supervisor started this way is what the old one was: detached in its own
session, never the server's child, with the environment of
``supervisor_environment`` and no descriptor of the server's, the server's own
Unix account (root with ``run_as_user``, the job becoming its account only in
its own last step), in the server's cgroup (where its memory limit is made).
It is the launcher's child, which only reaps it, until the launcher exits;
then init's.

The launcher exits when the server's end of the socket closes (the server
stopped, or died: the kernel closes it), and never signals or waits on the
jobs it started.  If it dies or stops answering, :class:`Launcher` says so
(:class:`LauncherUnavailable`) and the backend falls back to starting the
supervisor itself, after making sure that no supervisor for the job was
started after all (see :func:`reclaim_lock`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import gc
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["Launcher", "LauncherUnavailable", "reclaim_lock", "serve"]

REAP_INTERVAL = 1.0  # seconds between looks for ended supervisors when no request comes
REPLY_TIMEOUT = 10.0  # seconds the server waits for a fork; the launcher answers in ~1 ms
MAX_REQUEST = 4096


class LauncherUnavailable(Exception):
    """The launcher is gone or did not answer: whether it started the supervisor is unknown."""


# -- the launcher process -----------------------------------------------------


def _receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One request: the job directory and the descriptors sent with it (None at end-of-file)."""
    fds = array.array("i")
    while True:
        try:
            data, ancillary, flags, _ = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * 4))
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, but be sure
            continue
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data and not fds:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        return b"", []
    return data, list(fds)


def _reap() -> None:
    """Collect the supervisors that have ended (they are our children until we exit)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _supervise_in_child(sock_fd: int, jobdir: str, lock_fd: int) -> None:
    """In the forked child: never returns."""
    status = 1
    try:
        # Nothing of the launcher's may reach the job: its socket (and, with it, every
        # request still queued) first, then anything else but the job's lock.
        os.close(sock_fd)
        os.closerange(3, lock_fd)
        os.closerange(lock_fd + 1, max(os.sysconf("SC_OPEN_MAX"), lock_fd + 1))
        os.setsid()
        from kbatch.backends.local import supervisor

        supervisor.supervise(Path(jobdir), lock_fd)
        status = 0
    except BaseException:  # noqa: BLE001 - the forked child must never return into the loop
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc()
    finally:
        os._exit(status)


def serve(sock_fd: int) -> int:
    """The launcher's loop (``python -m kbatch.backends.local.supervisor --launcher FD``)."""
    from kbatch.backends.local import supervisor  # imported once here: the point of it all
    from kbatch.hardening import make_undumpable

    make_undumpable()  # the forks inherit it
    supervisor.warm_up()
    # Objects made so far are never collected, so a fork's garbage collector never walks
    # (and so never copies) the pages they live in: each fork stays cheap.
    gc.collect()
    gc.freeze()
    sock = socket.socket(fileno=sock_fd)
    os.set_inheritable(sock_fd, False)
    while True:
        _reap()
        ready, _, _ = select.select([sock], [], [], REAP_INTERVAL)
        if not ready:
            continue
        try:
            request = _receive(sock)
        except OSError:
            return 1
        if request is None:
            return 0  # the server's end closed: it stopped or died
        data, fds = request
        if len(fds) != 1 or not data:
            for fd in fds:
                os.close(fd)
            sock.send(b"err %d bad request" % errno.EINVAL)
            continue
        (lock_fd,) = fds
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(lock_fd)
            sock.send(b"err %d %s" % (exc.errno or 0, (exc.strerror or "fork").encode()))
            continue
        if pid == 0:
            _supervise_in_child(sock_fd, os.fsdecode(data), lock_fd)
        os.close(lock_fd)
        sock.send(b"ok %d" % pid)


# -- the server's end ---------------------------------------------------------


class Launcher:
    """The server's handle on its launcher process: start it, ask it for supervisors, stop it.

    One request at a time (the launcher is one thread); :meth:`spawn` raises
    :class:`OSError` when the fork itself failed (no supervisor was started)
    and :class:`LauncherUnavailable` when the launcher is gone or silent.
    """

    def __init__(self, python: str, *, environment: dict[str, str]) -> None:
        self.python = python
        self.environment = environment
        self.process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self._sock is not None

    def start(self) -> None:
        """Start the launcher process (it imports the supervisor before its first answer)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "kbatch.backends.local.supervisor",
                    "--launcher",
                    str(theirs.fileno()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                cwd="/",
                env=self.environment,  # never the server's own: it holds the hub's token
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours

    async def spawn(self, jobdir: Path, lock_fd: int) -> int:
        """Fork a supervisor for ``jobdir`` holding ``lock_fd``; the pid of the forked child."""
        async with self._lock:
            sock = self._sock
            if sock is None or not self.alive():
                raise LauncherUnavailable("the launcher is not running")
            loop = asyncio.get_running_loop()
            try:
                sock.sendmsg(
                    [os.fsencode(jobdir)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [lock_fd]))],
                )
                async with asyncio.timeout(REPLY_TIMEOUT):
                    reply = await loop.sock_recv(sock, 4096)
            except (OSError, TimeoutError) as exc:
                raise LauncherUnavailable(f"the launcher did not answer: {exc!r}") from exc
            if not reply:
                raise LauncherUnavailable("the launcher exited")
            word, _, rest = reply.decode(errors="replace").partition(" ")
            if word == "ok":
                return int(rest)
            code, _, message = rest.partition(" ")
            raise OSError(int(code) if code.isdigit() else 0, message)

    def kill(self) -> None:
        """Stop it now and reap it: afterwards it starts nothing (used when it misbehaves)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()
            self.process = None

    async def stop(self, grace: float = 5.0) -> None:
        """Close our end; it exits by itself (supervisors it started go on)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        process, self.process = self.process, None
        if process is None:
            return
        try:
            await asyncio.to_thread(process.wait, grace)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


def reclaim_lock(lock_path: Path, lock_fd: int) -> bool:
    """After a launcher failed mid-request: whether no supervisor holds the job's lock.

    ``lock_fd`` is the server's locked descriptor; the launcher got a copy of it
    (the same open file, so the same ``flock``), and a supervisor it forked
    keeps that copy.  With the launcher dead and reaped, only such a supervisor
    can hold it: the server lets go of its own copy (``lock_fd`` then refers
    to ``/dev/null``, still open for the caller to close) and tries to lock the
    file afresh.  True: nobody had it, and ``lock_fd`` is again a locked
    descriptor of the lock file, ready to hand to a supervisor started another
    way.  False: a supervisor runs; leave it to the reconciler.
    """
    import fcntl

    placeholder = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(placeholder, lock_fd, inheritable=False)  # drops our copy of the old lock
        fresh = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fresh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fresh)
            return False
        os.dup2(fresh, lock_fd, inheritable=False)
        os.close(fresh)
        return True
    finally:
        os.close(placeholder)
