"""Per-user limits in Slurm's spirit (its QOS ``MaxJobsPerUser``, ``MaxTRESPerUser``...).

The admin's policy sets them (``[policy]`` of ``kbatch.toml``,
:meth:`kbatch.server.policy.Policy.user_limits`); the server hands them to the
backend as :attr:`kbatch.backends.base.Backend.limits`, as it hands it hooks.
A job that one of them holds back stays PENDING with Slurm's reason for it and
starts when the user's running jobs free enough.  Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REASONS", "Usage", "UserLimits", "held_by"]

# Slurm's pending reasons, by the limit that holds a job back.
REASONS = {
    "max_running_jobs_per_user": "QOSMaxJobsPerUserLimit",
    "max_cpus_per_user": "QOSMaxCpuPerUserLimit",
    "max_memory_per_user": "QOSMaxMemoryPerUserLimit",
    "max_gpus_per_user": "QOSMaxGRESPerUser",
}


@dataclass(frozen=True)
class UserLimits:
    """What one user may have at once; ``None`` is no limit."""

    max_running_jobs_per_user: int | None = None
    max_submitted_jobs_per_user: int | None = None  # pending + running; refused at submit
    max_cpus_per_user: int | None = None
    max_memory_per_user: int | None = None  # bytes
    max_gpus_per_user: int | None = None

    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in self.__dataclass_fields__)


@dataclass(frozen=True)
class Usage:
    """What a user's running jobs hold."""

    jobs: int = 0
    cpus: int = 0
    memory: int = 0  # bytes
    gpus: int = 0

    def plus(self, cpus: int, memory: int, gpus: int) -> Usage:
        return Usage(self.jobs + 1, self.cpus + cpus, self.memory + memory, self.gpus + gpus)


def held_by(limits: UserLimits, usage: Usage, cpus: int, memory: int, gpus: int) -> str | None:
    """The reason a job asking for ``cpus``/``memory``/``gpus`` may not start now, or None."""
    checks = (
        ("max_running_jobs_per_user", usage.jobs + 1),
        ("max_cpus_per_user", usage.cpus + cpus),
        ("max_memory_per_user", usage.memory + memory),
        ("max_gpus_per_user", usage.gpus + gpus),
    )
    for name, wanted in checks:
        limit = getattr(limits, name)
        if limit is not None and wanted > limit:
            return REASONS[name]
    return None
