"""First come, first served: which pending jobs start now.  Pure, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Capacity", "Decision", "Demand", "schedule"]


@dataclass(frozen=True)
class Capacity:
    cpus: int
    memory: int  # bytes
    gpus: int = 0


@dataclass(frozen=True)
class Demand:
    job_id: int
    cpus: int
    memory: int  # bytes; 0 when the job set no limit
    gpus: int = 0


@dataclass(frozen=True)
class Decision:
    start: list[int]
    waiting: dict[int, str]  # job id -> Slurm reason: Resources or Priority


def fits(demand: Demand, free: Capacity) -> bool:
    return demand.cpus <= free.cpus and demand.memory <= free.memory and demand.gpus <= free.gpus


def schedule(capacity: Capacity, running: Sequence[Demand], pending: Sequence[Demand]) -> Decision:
    """Start pending jobs in submission order while they fit.

    The first job that does not fit waits with reason ``Resources`` and every
    job behind it with ``Priority``: a small job never overtakes a big one
    (no backfill), so the order users submitted in is the order jobs start.
    """
    free = Capacity(
        cpus=capacity.cpus - sum(d.cpus for d in running),
        memory=capacity.memory - sum(d.memory for d in running),
        gpus=capacity.gpus - sum(d.gpus for d in running),
    )
    start: list[int] = []
    waiting: dict[int, str] = {}
    for demand in pending:
        if waiting:
            waiting[demand.job_id] = "Priority"
        elif fits(demand, free):
            start.append(demand.job_id)
            free = Capacity(
                free.cpus - demand.cpus, free.memory - demand.memory, free.gpus - demand.gpus
            )
        else:
            waiting[demand.job_id] = "Resources"
    return Decision(start=start, waiting=waiting)
