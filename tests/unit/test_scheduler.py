import pytest

from kbatch.backends.local.scheduler import Capacity, Demand, schedule
from kbatch.backends.userlimits import UserLimits

G = 1024**3


def test_fifo_starts_what_fits_in_order() -> None:
    decision = schedule(Capacity(4, 8 * G), [], [Demand(1, 2, G), Demand(2, 2, G), Demand(3, 1, 0)])
    assert decision.start == [1, 2]
    assert decision.waiting == {3: "Resources"}


def test_no_backfill_past_a_waiting_job() -> None:
    decision = schedule(Capacity(2, 8 * G), [Demand(1, 1, 0)], [Demand(2, 2, 0), Demand(3, 1, 0)])
    assert decision.start == []
    assert decision.waiting == {2: "Resources", 3: "Priority"}


def test_memory_and_gpus_count() -> None:
    decision = schedule(Capacity(8, 4 * G, gpus=1), [Demand(1, 1, 3 * G)], [Demand(2, 1, 2 * G)])
    assert decision.waiting == {2: "Resources"}
    decision = schedule(
        Capacity(8, 4 * G, gpus=1), [], [Demand(2, 1, 0, gpus=1), Demand(3, 1, 0, gpus=1)]
    )
    assert decision.start == [2] and decision.waiting == {3: "Resources"}


# -- fair share across users, per-user limits ------------------------------------------


def _d(job_id: int, user: str, cpus: int = 1, memory: int = 0, gpus: int = 0) -> Demand:
    return Demand(job_id, cpus, memory, gpus, user)


def test_a_long_queue_cannot_starve_another_users_single_job() -> None:
    # a holds both CPUs; 200 of a's jobs wait, then b's one: b's goes in the next free slot
    pending = [_d(i, "a") for i in range(3, 203)] + [_d(203, "b")]
    full = schedule(Capacity(2, 8 * G), [_d(1, "a"), _d(2, "a")], pending)
    assert full.start == [] and full.waiting[203] == "Resources"
    one_free = schedule(Capacity(2, 8 * G), [_d(1, "a")], pending)
    assert one_free.start == [203]
    # one CPU: both use nothing when a slot frees; b, who has not started a job, goes first
    alone = schedule(Capacity(1, 8 * G), [], pending, last_started={"a": 100.0})
    assert alone.start == [203]
    # ... and then a, whose job started longer ago than b's
    after = schedule(
        Capacity(1, 8 * G), [], [*pending[:-1], _d(204, "b")], last_started={"a": 100.0, "b": 200.0}
    )
    assert after.start == [3]


def test_users_take_turns_by_what_they_use() -> None:
    pending = [_d(10, "a"), _d(11, "a"), _d(12, "a"), _d(20, "b"), _d(21, "b"), _d(30, "c")]
    decision = schedule(Capacity(4, 8 * G), [_d(1, "c", cpus=2)], pending)
    # a and b use nothing: a (the older job), then b; then a and b use 1 CPU, c 2: a's turn
    # (its start is the older), and its next job finds the machine full
    assert decision.start == [10, 20]
    assert decision.waiting == {11: "Resources", 12: "Priority", 21: "Priority", 30: "Priority"}


def test_within_a_user_submission_order_holds() -> None:
    decision = schedule(Capacity(8, 8 * G), [], [_d(5, "a", cpus=4), _d(6, "a", cpus=1)])
    assert decision.start == [5, 6]
    big_first = schedule(Capacity(2, 8 * G), [], [_d(5, "a", cpus=4), _d(6, "a", cpus=1)])
    assert big_first.start == [] and big_first.waiting == {5: "Resources", 6: "Priority"}


@pytest.mark.parametrize(
    ("limits", "running", "job", "reason"),
    [
        (UserLimits(max_running_jobs_per_user=1), _d(1, "a"), _d(2, "a"), "QOSMaxJobsPerUserLimit"),
        (UserLimits(max_cpus_per_user=2), _d(1, "a", cpus=2), _d(2, "a"), "QOSMaxCpuPerUserLimit"),
        (
            UserLimits(max_memory_per_user=2 * G),
            _d(1, "a", memory=G),
            _d(2, "a", memory=2 * G),
            "QOSMaxMemoryPerUserLimit",
        ),
        (
            UserLimits(max_gpus_per_user=1),
            _d(1, "a", gpus=1),
            _d(2, "a", gpus=1),
            "QOSMaxGRESPerUser",
        ),
    ],
)
def test_each_per_user_limit_holds_a_job_with_its_reason(
    limits: UserLimits, running: Demand, job: Demand, reason: str
) -> None:
    capacity = Capacity(8, 8 * G, gpus=4)
    later = _d(3, "a")
    held = schedule(capacity, [running], [job, later], limits=limits)
    assert held.start == [] and held.waiting == {2: reason, 3: reason}
    # another user is not held by it, nor kept waiting behind it
    other = schedule(capacity, [running], [job, later, _d(4, "b")], limits=limits)
    assert other.start == [4]
    # the limit frees when the running job ends
    freed = schedule(capacity, [], [job, later], limits=limits)
    assert 2 in freed.start


def test_a_held_user_does_not_block_but_a_job_that_does_not_fit_does() -> None:
    limits = UserLimits(max_running_jobs_per_user=1)
    decision = schedule(
        Capacity(2, 8 * G),
        [_d(1, "a")],
        [_d(2, "a"), _d(3, "b", cpus=2), _d(4, "c")],
        limits=limits,
    )
    # b's job (2 CPUs) does not fit in the one free CPU: c's waits behind it, no backfill
    assert decision.start == []
    assert decision.waiting == {2: "QOSMaxJobsPerUserLimit", 3: "Resources", 4: "Priority"}
