"""The per-job supervisor: ``python -m kbatch.backends.local.supervisor JOB_DIR LOCK_FD``.

The server starts one per job in a new session: forked by the pre-started
launcher (``--launcher FD``, :mod:`kbatch.backends.local.launcher`), or as a
new interpreter when there is none.  It forks once so that neither is its
parent (the server may die; the job must not), and then, detached from every
terminal:

1. puts a memory limit in place (:mod:`kbatch.backends.local.limits`);
2. starts the script in a process group of its own, stdout and stderr going to
   the job's output files, so that ``tail -f`` shows them as they come.  With
   ``run_as`` (``[local] run_as_user``) the forked child becomes the job's
   account (groups, gid, uid) as its last step before exec, and only then
   opens the output files and enters the working directory, so it can reach
   only what that account may; the supervisor itself stays root, out of the
   job's reach, to enforce limits and write the result;
3. every tick: checks the time limit, the memory limit and a cancel request;
   to stop the job it sends SIGTERM to the whole process group, then SIGKILL
   after the grace period;
4. when the script ends, kills what it left behind in its group, writes
   ``result.json`` (state, exit code, reason) and pokes the server's socket.

It holds the job directory's ``lock`` until it exits, so the server knows it
lives.  It imports nothing from the server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

import msgspec

from kbatch.backends.local.jobdir import Account, JobDir, LaunchSpec, Result, Started
from kbatch.backends.local.limits import MemoryLimiter, memory_limiter, process_group_members
from kbatch.hardening import make_undumpable
from kbatch.models import JobState

REASON_FILE_ENV = "KBATCH_REASON_FILE"  # as kbatch.notebook_runner reads it

__all__ = ["detach_and_supervise", "main", "outcome", "supervise", "warm_up", "write_result"]

TICK = 0.1  # seconds between checks of time, memory and cancellation


def outcome(
    status: int, *, cancelled: bool, timed_out: bool, oom: bool
) -> tuple[JobState, int | None, str | None]:
    """State, exit code and reason from a wait status and why the job was stopped."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        exit_code = 128 + signum
        try:
            signame = signal.Signals(signum).name
        except ValueError:
            signame = f"signal {signum}"
        reason: str | None = f"Signal {signum} ({signame})"
    else:
        exit_code = os.WEXITSTATUS(status)
        reason = None if exit_code == 0 else "NonZeroExitCode"
    if oom:
        return JobState.OUT_OF_MEMORY, exit_code, "OutOfMemory: the job went over its --mem limit"
    if timed_out:
        return JobState.TIMEOUT, exit_code, "TimeLimit"
    if cancelled:
        return JobState.CANCELLED, exit_code, "CancelledByUser"
    if exit_code == 0:
        return JobState.COMPLETED, 0, None
    return JobState.FAILED, exit_code, reason


class Supervisor:
    def __init__(self, jobdir: JobDir, spec: LaunchSpec) -> None:
        self.jobdir = jobdir
        self.spec = spec
        self.cancel_signalled = False
        self.limiter: MemoryLimiter = MemoryLimiter()
        self.reason_fd = -1
        self.failed_read = -1  # the child's word on why it could not start the job
        self.launch_error: str | None = None

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.cancel_signalled = True

    def _open_output(self, path: str) -> int:
        flags = (
            os.O_WRONLY
            | os.O_CREAT
            | os.O_NOCTTY
            | (os.O_APPEND if self.spec.open_mode == "append" else os.O_TRUNC)
        )
        return os.open(path, flags, 0o644)

    def _become(self, account: Account) -> None:
        """In the forked child: become ``account`` for good (groups, gid, then uid)."""
        os.setgroups(account.groups)
        os.setgid(account.gid)
        os.setuid(account.uid)  # as root: real, effective and saved uid all change
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise RuntimeError("the job could become root again")
        if os.getuid() != account.uid or os.geteuid() != account.uid or os.getegid() != account.gid:
            raise RuntimeError(f"could not become the account {account.name}")

    def _exec_job(self, go_read: int, null_fd: int) -> None:
        """The forked child: wait for the word to go, become the job's account, run it."""
        spec = self.spec
        os.setpgid(0, 0)
        self.limiter.enter(os.getpid())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        if os.read(go_read, 1) != b"1":
            os._exit(127)  # the supervisor died before recording the start
        os.close(go_read)
        program = spec.argv[0]
        account = spec.run_as
        env = spec.environment
        if self.reason_fd >= 0:
            # A line the job may leave to say why it failed (a notebook's failing cell):
            # a file of the job's own, reached only through this descriptor.
            os.set_inheritable(self.reason_fd, True)
            env = {**env, REASON_FILE_ENV: f"/dev/fd/{self.reason_fd}"}
        if account is not None:
            # The script lies in the server's private job directory.  Opened now, as root,
            # and run through this descriptor once we are the account: the account needs
            # only to read the script itself (it owns it), nothing of the directory.
            script_fd = os.open(program, os.O_PATH)
            os.set_inheritable(script_fd, True)  # the interpreter opens the script by it
            program = f"/proc/self/fd/{script_fd}"
            self._become(account)
            env = {**env, "HOME": account.home, "USER": account.name, "LOGNAME": account.name}
        # Only now, as the job's own account: a path it may not write is refused to it.
        try:
            out_fd = self._open_output(spec.output)
            err_fd = self._open_output(spec.error) if spec.error else out_fd
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {exc.filename}: {exc.strerror}") from None
        os.dup2(null_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        try:
            os.chdir(spec.workdir)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot enter {spec.workdir}: {exc.strerror}") from None
        try:
            os.execve(program, [program, *spec.argv[1:]], env)  # noqa: S606
        except OSError as exc:
            raise OSError(exc.errno, f"cannot run the script: {exc.strerror}") from None

    def _start_job(self, started: float) -> int:
        """Fork the job; it runs the script only once ``started.json`` is on disk.

        The child waits on a pipe for the word of its parent, written after
        ``started.json``: if the supervisor dies before that, the child reads
        end-of-file and exits without running anything.  So a job without
        ``started.json`` never ran, and the server may safely start it again.
        If the child cannot start the job (its output file cannot be opened, its
        program not run), it says why on a second pipe, closed on exec.
        """
        null_fd = os.open(os.devnull, os.O_RDONLY)
        # An anonymous file (no inode to make on disk, nothing left behind), the job's own.
        self.reason_fd = os.memfd_create("kbatch-reason", os.MFD_CLOEXEC)
        os.fchmod(self.reason_fd, 0o600)
        if self.spec.run_as is not None:
            os.fchown(self.reason_fd, self.spec.run_as.uid, self.spec.run_as.gid)
        go_read, go_write = os.pipe()
        self.failed_read, failed_write = os.pipe()  # close-on-exec: silent when exec works
        pid = os.fork()
        if pid == 0:  # the job
            try:
                os.close(go_write)
                os.close(self.failed_read)
                self._exec_job(go_read, null_fd)
            except BaseException as exc:  # noqa: BLE001 - the forked child must never return
                with contextlib.suppress(Exception):
                    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    os.write(failed_write, str(message).encode()[:1000])
                os._exit(127)
            os._exit(127)
        os.close(go_read)
        os.close(null_fd)
        os.close(failed_write)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.setpgid(pid, pid)  # also from the parent: no race with the first signal
        self.jobdir.write(
            self.jobdir.started,
            Started(pid=pid, pgid=pid, started=started, limiter=self.limiter.kind),
        )
        os.write(go_write, b"1")
        os.close(go_write)
        return pid

    def _signal_group(self, pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def run(self) -> Result:
        spec = self.spec
        self.limiter = memory_limiter(spec.memory, f"kbatch-job-{spec.job_id}", spec.memory_limiter)
        started = time.time()
        pid = self._start_job(started)
        pgid = pid
        notify(spec.notify_socket, spec.job_id)
        pidfd = os.pidfd_open(pid)
        wake = self._open_wake()
        deadline = None if spec.time_limit is None else time.monotonic() + spec.time_limit
        stop_reason: str | None = None  # "cancel", "timeout" or "oom"
        kill_at: float | None = None
        status = 0
        while True:
            watched = [fd for fd in (pidfd, self.failed_read, wake) if fd >= 0]
            timeout = TICK
            for moment in (deadline if stop_reason is None else None, kill_at):
                if moment is not None:  # wake at the time limit itself, not a tick after
                    timeout = max(0.0, min(timeout, moment - time.monotonic()))
            ready, _, _ = select.select(watched, [], [], timeout)
            if self.failed_read in ready:
                self._read_launch_error()
            if wake in ready:
                with contextlib.suppress(OSError):
                    os.read(wake, 4096)
            if pidfd in ready:
                _, status = os.waitpid(pid, 0)
                break
            now = time.monotonic()
            if stop_reason is None:
                if self.cancel_signalled or self.jobdir.cancel.exists():
                    stop_reason = "cancel"
                elif deadline is not None and now >= deadline:
                    stop_reason = "timeout"
                elif self.limiter.check(pgid):
                    stop_reason = "oom"
                if stop_reason == "oom":
                    self._signal_group(pgid, signal.SIGKILL)
                elif stop_reason is not None:
                    self._signal_group(pgid, signal.SIGTERM)
                    kill_at = now + spec.kill_grace
            elif kill_at is not None and now >= kill_at:
                self._signal_group(pgid, signal.SIGKILL)
                self.limiter.kill_all()
                kill_at = None
        os.close(pidfd)
        if wake >= 0:
            os.close(wake)
        if self.failed_read >= 0:
            self._read_launch_error()
        # Like Slurm, the job ends when its script does: nothing it started outlives it.
        self._signal_group(pgid, signal.SIGKILL)
        self.limiter.kill_all()
        self._reap_group(pgid)
        state, exit_code, reason = outcome(
            status,
            cancelled=stop_reason == "cancel",
            timed_out=stop_reason == "timeout",
            oom=stop_reason == "oom" or self.limiter.oom_killed(),
        )
        # The cgroup's removal (milliseconds) waits until the server knows: see main().
        if self.launch_error is not None:
            state, reason = JobState.FAILED, f"LaunchFailed: {self.launch_error}"
        elif state is JobState.FAILED and (said := self._reason_given()):
            reason = f"{reason}: {said}"
        return Result(
            state=state, exit_code=exit_code, reason=reason, started=started, finished=time.time()
        )

    def _open_wake(self) -> int:
        """The job directory's wake-up FIFO (see JobDir.poke), opened to read; -1 if not.

        Opened read-write so that it never reads end-of-file between two writers."""
        try:
            os.mkfifo(self.jobdir.wake, 0o600)
            return os.open(self.jobdir.wake, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return -1

    def _reason_given(self) -> str | None:
        """The first line the job left in its reason file, made safe to show, or None."""
        if self.reason_fd < 0:
            return None
        try:
            data = os.pread(self.reason_fd, 1000, 0)
        except OSError:
            return None
        line = data.decode(errors="replace").strip().splitlines()[:1]
        text = "".join(c if c.isprintable() else "?" for c in (line[0] if line else ""))
        return text[:300] or None

    def _read_launch_error(self) -> None:
        """The child's message (it could not start the job), or end-of-file (exec worked)."""
        data = os.read(self.failed_read, 4096)
        os.close(self.failed_read)
        self.failed_read = -1
        if data:
            self.launch_error = data.decode(errors="replace")

    def _reap_group(self, pgid: int, timeout: float = 5.0) -> None:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return  # nothing left in the group, not even a zombie: no need to read all of /proc
        except PermissionError:
            pass
        deadline = time.monotonic() + timeout
        delay = 0.001  # killed processes are mostly gone within a millisecond or two
        while not _group_gone(pgid) and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.02)


def _group_gone(pgid: int) -> bool:
    """Whether no live process is left in the group: one signal 0 says so when the group
    is empty (the usual case); a scan of /proc (milliseconds) only when it is not, as
    its zombies count for the signal and not for us."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a member of another account: look at /proc
    return not process_group_members(pgid)


def notify(socket_path: str | None, job_id: str) -> None:
    """Wake the server (best effort: it also finds results by itself)."""
    if not socket_path:
        return
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(job_id.encode(), socket_path)


def _daemonize() -> None:
    """Fork so that the server's child exits at once and the supervisor is nobody's child."""
    if os.fork() > 0:
        os._exit(0)


def warm_up() -> None:
    """Do once, in the launcher, what every supervisor it forks would do first: msgspec
    builds its decoders and encoders on first use (milliseconds, in every fork)."""
    spec = LaunchSpec(job_id="0", argv=["true"], environment={}, workdir="/", output="", error=None)
    msgspec.json.decode(msgspec.json.encode(spec), type=LaunchSpec)
    msgspec.json.encode(Started(pid=0, pgid=0, started=0.0, limiter="none"))
    msgspec.json.encode(
        Result(state=JobState.COMPLETED, exit_code=0, reason=None, started=None, finished=0.0)
    )


def _log(jobdir: JobDir, text: str) -> None:
    """Add to the job's ``supervisor.log`` (made only when there is something to say)."""
    with contextlib.suppress(OSError):
        fd = os.open(jobdir.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, text.encode(errors="replace"))
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    make_undumpable()  # the job runs under our uid: keep it out of our /proc files
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--launcher"]:  # the pre-started launcher (kbatch.backends.local.launcher)
        from kbatch.backends.local.launcher import serve

        return serve(int(args[1]))
    return detach_and_supervise(Path(args[0]), int(args[1]))


def detach_and_supervise(path: Path, lock_fd: int) -> int:
    """Fork away from our parent (the server), then supervise the job."""
    _daemonize()
    return supervise(path, lock_fd)


def supervise(path: Path, lock_fd: int) -> int:
    """Supervise the job in ``path`` to its end, holding ``lock_fd`` (in a session of our own)."""
    jobdir = JobDir(path)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.set_inheritable(lock_fd, False)  # the job must not keep the lock alive
    spec = jobdir.read_launch()
    supervisor = Supervisor(jobdir, spec)
    signal.signal(signal.SIGTERM, supervisor._on_sigterm)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = supervisor.run()
    except Exception as exc:  # noqa: BLE001 - any failure must still leave a result
        import traceback

        _log(jobdir, traceback.format_exc())
        result = Result(
            state=JobState.FAILED,
            exit_code=None,
            reason=f"LaunchFailed: {exc}",
            started=None,
            finished=time.time(),
        )
    # The server reads the result as soon as it is told: tell it before the fsync (a few
    # milliseconds of a cancel's or a time limit's visibility), then make it durable.
    write_result(jobdir, result, durable=False)
    notify(spec.notify_socket, spec.job_id)
    jobdir.sync(jobdir.result)
    supervisor.limiter.cleanup()  # what is left of the job was killed in run(): bookkeeping
    return 0


def write_result(
    jobdir: JobDir, result: Result, *, max_delay: float = 5.0, durable: bool = True
) -> None:
    """Write ``result.json``, waiting for space as long as it takes.

    The supervisor keeps its lock meanwhile, so the server sees the job as
    still running rather than as a lost supervisor (NODE_FAIL); once the disk
    has room again the job ends in its real state.  Only a full disk or quota
    is waited for: any other error (the job's directory removed) gives up.
    """
    delay = 0.1
    while True:
        try:
            jobdir.write(jobdir.result, result, durable=durable)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            _log(jobdir, f"kbatch: cannot write the job's result ({exc}); retrying\n")
            time.sleep(delay)
            delay = min(delay * 2, max_delay)


if __name__ == "__main__":
    sys.exit(main())
