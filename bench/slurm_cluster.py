"""A single-node Slurm of our own: installed from Debian, configured in a scratch directory.

Nothing under /etc is used or changed: ``slurm.conf``, ``cgroup.conf``, a
munge key and every state, spool, log and pid file live in one directory,
and the daemons (``munged``, ``slurmctld``, ``slurmd``) are started here and
stopped at the end.  Client commands find the cluster through ``SLURM_CONF``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench.apt import AptError, apt_install
from bench.context import wait_until

__all__ = [
    "Hardware",
    "SlurmCluster",
    "SlurmUnavailable",
    "cgroup_conf",
    "ensure_slurm",
    "parse_hardware",
    "slurm_conf",
]

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message says why."""


def ensure_slurm(install: bool, log: Callable[[str], None]) -> str:
    """Slurm's version, installing ``slurm-wlm`` and ``munge`` from Debian if needed."""
    missing = [name for name in DAEMONS if _which(name) is None]
    if missing and install:
        try:
            apt_install(PACKAGES, log)
        except AptError as exc:
            raise SlurmUnavailable(str(exc)) from exc
        missing = [name for name in DAEMONS if _which(name) is None]
    if missing:
        hint = "" if install else " (installing is off: --no-install)"
        raise SlurmUnavailable(f"{', '.join(missing)} not installed{hint}")
    slurmctld = _which("slurmctld")
    assert slurmctld is not None
    out = subprocess.run([slurmctld, "-V"], capture_output=True, text=True, check=False)
    return out.stdout.strip().removeprefix("slurm-wlm ").removeprefix("slurm ") or "unknown"


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


@dataclass(frozen=True)
class Hardware:
    """What ``slurmd -C`` reports for this machine."""

    cpus: int
    boards: int
    sockets_per_board: int
    cores_per_socket: int
    threads_per_core: int
    real_memory_mb: int


def parse_hardware(text: str) -> Hardware:
    """Parse ``slurmd -C`` (``NodeName=x CPUs=2 Boards=1 ... RealMemory=24000``)."""
    fields: dict[str, str] = dict(re.findall(r"(\w+)=(\S+)", text))
    try:
        return Hardware(
            cpus=int(fields["CPUs"]),
            boards=int(fields.get("Boards", "1")),
            sockets_per_board=int(fields.get("SocketsPerBoard", "1")),
            cores_per_socket=int(fields.get("CoresPerSocket", fields["CPUs"])),
            threads_per_core=int(fields.get("ThreadsPerCore", "1")),
            real_memory_mb=int(fields["RealMemory"]),
        )
    except (KeyError, ValueError) as exc:
        raise SlurmUnavailable(f"cannot read slurmd -C output {text.strip()!r}") from exc


@dataclass(frozen=True)
class Layout:
    """Where the cluster keeps its files, all under ``root``."""

    root: Path

    conf = property(lambda self: self.root / "etc" / "slurm.conf")
    cgroup_conf = property(lambda self: self.root / "etc" / "cgroup.conf")
    munge_key = property(lambda self: self.root / "munge" / "munge.key")
    munge_socket = property(lambda self: self.root / "munge" / "munge.socket")
    state = property(lambda self: self.root / "state")
    spool = property(lambda self: self.root / "spool")
    logs = property(lambda self: self.root / "log")
    run = property(lambda self: self.root / "run")
    jobcomp = property(lambda self: self.root / "log" / "jobcomp.txt")


def cgroups_v1(base: Path = Path("/sys/fs/cgroup")) -> bool:
    return all((base / name).is_dir() for name in ("memory", "cpuset", "freezer"))


def slurm_conf(
    layout: Layout, hardware: Hardware, *, ports: tuple[int, int], cgroup: bool, user: str
) -> str:
    """The ``slurm.conf`` of NOTES.md: one node, cons_tres, jobs start without delay."""
    memory = max(1000, int(hardware.real_memory_mb * 0.9))
    lines = [
        "# Written by kbatch's benchmark (bench/slurm_cluster.py) for one run.",
        "ClusterName=kbatchbench",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={layout.munge_socket}",
        f"StateSaveLocation={layout.state}",
        f"SlurmdSpoolDir={layout.spool}",
        f"SlurmctldPidFile={layout.run / 'slurmctld.pid'}",
        f"SlurmdPidFile={layout.run / 'slurmd.pid'}",
        f"SlurmctldLogFile={layout.logs / 'slurmctld.log'}",
        f"SlurmdLogFile={layout.logs / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"ProctrackType={'proctrack/cgroup' if cgroup else 'proctrack/linuxproc'}",
        f"TaskPlugin={'task/cgroup' if cgroup else 'task/none'}",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "DefMemPerCPU=1000",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=batch_sched_delay=0",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={layout.jobcomp}",
        "MaxJobCount=100000",
        "MaxArraySize=100001",
        "ReturnToService=2",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
        (
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={hardware.cpus} "
            f"Boards={hardware.boards} SocketsPerBoard={hardware.sockets_per_board} "
            f"CoresPerSocket={hardware.cores_per_socket} "
            f"ThreadsPerCore={hardware.threads_per_core} RealMemory={memory} State=UNKNOWN"
        ),
        "PartitionName=bench Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def cgroup_conf(cgroup: bool) -> str:
    if not cgroup:
        return "# cgroup v1 hierarchies not found: proctrack/linuxproc and task/none are used\n"
    return (
        "# Written by kbatch's benchmark for one run.\n"
        "CgroupPlugin=cgroup/v1\n"
        "CgroupMountpoint=/sys/fs/cgroup\n"
        "ConstrainCores=yes\n"
        "ConstrainRAMSpace=yes\n"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SlurmCluster:
    root: Path
    log: Callable[[str], None]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return Layout(self.root)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env["SLURM_CONF"] = str(self.layout.conf)
        return env

    def configure(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("running Slurm's daemons here needs root")
        layout = self.layout
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged checks that its socket's directory is reachable
        for directory in (
            layout.conf.parent,
            layout.munge_key.parent,
            layout.state,
            layout.spool,
            layout.logs,
            layout.run,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        layout.munge_key.parent.chmod(0o755)
        key = os.open(layout.munge_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        os.write(key, secrets.token_bytes(1024))
        os.close(key)
        slurmd = _which("slurmd")
        assert slurmd is not None
        probe = subprocess.run([slurmd, "-C"], capture_output=True, text=True, check=False)
        hardware = parse_hardware(probe.stdout)
        cgroup = cgroups_v1()
        conf = slurm_conf(
            layout,
            hardware,
            ports=(_free_port(), _free_port()),
            cgroup=cgroup,
            user="root",
        )
        layout.conf.write_text(conf)
        layout.cgroup_conf.write_text(cgroup_conf(cgroup))
        self.details["node"] = (
            f"{hardware.cpus} CPUs, RealMemory {int(hardware.real_memory_mb * 0.9)} MB"
        )
        self.details["plugins"] = (
            "select/cons_tres CR_Core_Memory, DefMemPerCPU=1000, "
            + ("proctrack/cgroup + task/cgroup (cgroup/v1)" if cgroup else "proctrack/linuxproc")
            + ", sched/backfill batch_sched_delay=0, accounting none, jobcomp/filetxt"
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_path = self.layout.logs / f"{name}.stdout"
        with open(log_path, "ab") as out:
            self.procs[name] = subprocess.Popen(
                argv,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd=self.root,
            )

    def _alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise SlurmUnavailable(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 4) -> str:
        texts = []
        for path in (self.layout.logs / f"{name}.stdout", self.layout.logs / f"{name}.log"):
            try:
                texts += path.read_text(errors="replace").strip().splitlines()
            except OSError:
                continue
        return " / ".join(texts[-lines:]) or "(no output)"

    def start(self, timeout: float = 90) -> None:
        layout = self.layout
        munged, slurmctld, slurmd = (_which(n) for n in ("munged", "slurmctld", "slurmd"))
        assert munged and slurmctld and slurmd
        self._spawn(
            "munged",
            [
                munged,
                "--foreground",
                "--force",
                f"--socket={layout.munge_socket}",
                f"--key-file={layout.munge_key}",
                f"--pid-file={layout.run / 'munged.pid'}",
                f"--log-file={layout.logs / 'munged.log'}",
                f"--seed-file={layout.run / 'munged.seed'}",
            ],
        )

        def munge_up() -> bool:
            self._alive("munged")
            return layout.munge_socket.exists()

        wait_until(munge_up, timeout=30, interval=0.05, what="munged's socket")
        self._spawn("slurmctld", [slurmctld, "-D", "-i", "-f", str(layout.conf)])
        self._spawn("slurmd", [slurmd, "-D", "-N", "localhost", "-f", str(layout.conf)])

        def node_idle() -> bool:
            for name in ("munged", "slurmctld", "slurmd"):
                self._alive(name)
            state = self.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], check=False)
            return state.returncode == 0 and state.stdout.strip() == "idle"

        wait_until(node_idle, timeout=timeout, interval=0.2, what="the Slurm node to be idle")

    def run(
        self, argv: list[str], *, check: bool = True, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            env={**self.env(), **(extra_env or {})},
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()[-300:]}"
            )
        return result

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def stop(self) -> None:
        """Cancel every job of this cluster, then stop the daemons we started."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run(["scancel", "--user", str(os.getuid())], check=False)
                wait_until(
                    lambda: (
                        self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip() == ""
                    ),
                    timeout=60,
                    interval=0.5,
                    what="Slurm's jobs to end",
                )
            except (TimeoutError, OSError, subprocess.SubprocessError) as exc:
                self.log(f"slurm: jobs did not all end before stopping: {exc}")
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
