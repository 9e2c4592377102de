from kbatch.backends.local.scheduler import Capacity, Demand, schedule

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
