"""A real kbatch server process for tests, with a CLI runner bound to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kbatch.client import Client
from kbatch.models import Job, JobState
from kbatch.server.main import read_server_file
from tests.support.polling import wait_for

REPO = Path(__file__).resolve().parents[2]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class KbatchServer:
    """``kbatch server`` in its own process; ``start``/``kill``/``restart`` like a real one."""

    state_dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    log_level: str | None = "debug"  # None: the server's default, as a user runs it
    start_timeout: float = 30.0
    # How it is run: the interpreter and module (``kbatch server`` by default), the Unix
    # account (None: ours), and where its log goes (default: in its state directory).
    python: str = sys.executable
    module: str = "kbatch.cli.main"
    user: str | None = None
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # for the server process only

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KBATCH_", "JUPYTERHUB_"))}
        env["KBATCH_STATE_DIR"] = str(self.state_dir)
        env["KBATCH_CONFIG_DIR"] = str(self.state_dir / "client-config")
        env.update(extra)
        return env

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = (self.log_dir or self.state_dir) / "test-server.log"
        old = self._info().get("pid")
        as_user: dict[str, object] = {}
        if self.user is not None:
            as_user = {"user": self.user, "group": self.user, "extra_groups": [], "cwd": "/"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # type: ignore[call-overload]
                [
                    self.python,
                    "-m",
                    self.module,
                    "server",
                    *(["--log-level", self.log_level] if self.log_level else []),
                    *self.args,
                ],
                env=self.env(**self.extra_env),
                stdout=log,
                stderr=log,
                start_new_session=True,
                **as_user,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            info = self._info()
            if info.get("pid") != proc.pid or info.get("pid") == old:
                return False
            return self.answers()

        try:
            wait_for(ready, timeout=self.start_timeout, what="the kbatch server to answer")
        except BaseException:
            self.stop()
            raise

    def answers(self) -> bool:
        """Whether the started server answers an authenticated request."""
        try:
            with self.client(retry_for=0) as client:
                client.whoami()
        except Exception:
            return False
        return True

    def _info(self) -> dict[str, object]:
        return read_server_file(self.state_dir)

    @property
    def url(self) -> str:
        return str(self._info()["url"])

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    def client(self, token: str | None = None, **kwargs: float) -> Client:
        return Client(self.url, token or self.token, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def add_token(self, user: str, admin: bool = False) -> str:
        result = self.cli("server", "add-token", user, *(["--admin"] if admin else []))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def cli(
        self,
        *args: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
        program: str = "kbatch",
    ) -> CliResult:
        """Run the installed CLI as a user would."""
        exe = Path(sys.executable).with_name(program)
        proc = subprocess.run(
            [str(exe), *args],
            cwd=cwd or self.state_dir,
            env=self.env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    def wait_state(self, job_id: str, *states: JobState, timeout: float = 30.0) -> Job:
        """Poll until the job is in one of ``states`` (default: any terminal state)."""
        wanted = set(states) or {s for s in JobState if s.is_terminal}

        def reached() -> Job | None:
            job = client.get(job_id)
            return job if job.state in wanted else None

        with self.client() as client:
            job = wait_for(reached, timeout=timeout, what=f"job {job_id} to reach {sorted(wanted)}")
        assert job is not None
        return job
