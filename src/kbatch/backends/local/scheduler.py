"""Fair share across users, submission order within one: which pending jobs start now.

Pure, no I/O.  The rule (also in the README):

* Among users with jobs waiting, the one whose running jobs hold the fewest
  CPUs goes first; on a tie, the one whose last job started longest ago (a
  user who has not started a job yet comes first), then the one with the
  oldest waiting job.  So one user's long queue cannot keep another user's
  single job waiting beyond the next free slot.
* Within a user, jobs start in submission order; an array's tasks in index
  order, at the array's place.
* A job held back by a per-user limit (:mod:`kbatch.backends.userlimits`)
  waits with that limit's reason, and so do that user's later jobs; it
  keeps no one else waiting.
* The first job that does not fit the free CPUs, memory or GPUs waits with
  reason ``Resources`` and every job after it in this order with
  ``Priority``: nothing overtakes it (no backfill), so a big job is never
  starved by small ones.
* Nothing here touches a running job: the order only decides what starts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from kbatch.backends.userlimits import Usage, UserLimits, held_by

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
    user: str = ""
    # An array's tasks that have not started: up to this many starts of the same size,
    # each granted on its own turn (so fair share holds between them and others).
    count: int = 1


@dataclass(frozen=True)
class Decision:
    start: list[int]
    waiting: dict[int, str]  # job id -> Slurm reason: Resources, Priority, QOS...


def fits(demand: Demand, free: Capacity) -> bool:
    return demand.cpus <= free.cpus and demand.memory <= free.memory and demand.gpus <= free.gpus


def schedule(
    capacity: Capacity,
    running: Sequence[Demand],
    pending: Sequence[Demand],
    *,
    limits: UserLimits | None = None,
    last_started: Mapping[str, float] | None = None,
) -> Decision:
    """Which of ``pending`` (in submission order) start now, and why the others wait.

    ``running`` are the jobs holding resources (started, or granted a start);
    ``last_started`` is when each user's latest job started (for the tie-break).
    A demand with ``count`` n may be granted up to n times: its id is then in
    ``start`` once per grant.
    """
    limits = limits or UserLimits()
    free = Capacity(
        cpus=capacity.cpus - sum(d.cpus for d in running),
        memory=capacity.memory - sum(d.memory for d in running),
        gpus=capacity.gpus - sum(d.gpus for d in running),
    )
    usage: dict[str, Usage] = {}
    for d in running:
        usage[d.user] = usage.get(d.user, Usage()).plus(d.cpus, d.memory, d.gpus)
    queues: dict[str, deque[Demand]] = {}
    for d in pending:
        queues.setdefault(d.user, deque()).append(d)
    last = dict(last_started or {})
    clock = max(last.values(), default=0.0)  # grants of this pass count as the latest starts

    def turn(user: str) -> tuple[int, float, int]:
        return (
            usage.get(user, Usage()).cpus,
            last.get(user, float("-inf")),
            queues[user][0].job_id,
        )

    start: list[int] = []
    waiting: dict[int, str] = {}
    blocked = False  # a job did not fit: no one overtakes it
    while queues:
        user = min(queues, key=turn)
        queue = queues[user]
        head = queue[0]
        mine = usage.get(user, Usage())
        reason = held_by(limits, mine, head.cpus, head.memory, head.gpus)
        if reason is None and blocked:
            reason = "Priority"
        if reason is None and not fits(head, free):
            reason, blocked = "Resources", True
        if reason is not None:
            behind = reason if reason.startswith("QOS") else "Priority"
            waiting[head.job_id] = reason
            for demand in list(queue)[1:]:
                waiting[demand.job_id] = behind
            del queues[user]
            continue
        if head.count > 1:  # an array: its next task waits for its own turn
            queue[0] = replace(head, count=head.count - 1)
        else:
            queue.popleft()
        if not queue:
            del queues[user]
        start.append(head.job_id)
        usage[user] = mine.plus(head.cpus, head.memory, head.gpus)
        free = Capacity(free.cpus - head.cpus, free.memory - head.memory, free.gpus - head.gpus)
        clock += 1.0
        last[user] = clock
    return Decision(start=start, waiting=waiting)
