"""Arrays and sweeps (issue 12) as part of the backend contract (docs/core.md, "Arrays in
the contract"): every backend answers the same way for ``ID``, ``ID_INDEX`` and
``ID_[1-5,9]``, starts tasks within the throttle, and aggregates an array's tasks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Collection
from datetime import timedelta

import httpx
import pytest

from kbatch.backends.base import Backend
from kbatch.errors import Conflict, NotFound
from kbatch.models import ACTIVE_STATES, API_PREFIX, Identity, Job, JobState, SweepParams
from kbatch.server.app import create_app
from kbatch.server.auth.base import Authenticator, Credentials
from kbatch.server.policy import Policy
from tests.conformance.harness import Harness
from tests.conformance.test_contract import Recorder, _true, ended, state_of, until

pytestmark = pytest.mark.anyio


async def rows_of(
    backend: Backend, array_id: str, states: Collection[JobState] | None = ACTIVE_STATES
) -> list[Job]:
    """The rows ``list`` gives for one array (active ones by default): its started tasks
    by index, then its groups of tasks not started (the contract leaves their order to
    the backend)."""
    page = await backend.list(user=None, states=states)
    rows = [j for j in page.jobs if (j.array_job_id or j.id) == array_id]
    return sorted(rows, key=lambda j: (j.array_task_id is None, j.array_task_id or 0))


def counts(job: Job) -> dict[str, int]:
    """An array's tasks per state, states with no task left out (a backend may list them)."""
    assert job.array_counts is not None, f"job {job.id} has no array_counts"
    return {state: n for state, n in job.array_counts.items() if n}


async def task_state(backend: Backend, task_id: str, *states: JobState, within: float) -> Job:
    return await state_of(backend, task_id, *states, within=within)


async def cancel_all(backend: Backend, *job_ids: str) -> None:
    for job_id in job_ids:
        await backend.cancel(job_id, by="test")
    for job_id in job_ids:
        await ended(backend, job_id)


async def test_submit_returns_the_whole_array(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit(
            "alice", harness.array_spec("1-7:2%2", hold=True), idempotency_key=None
        )
        assert job.state is JobState.PENDING
        assert (job.array_job_id, job.array_tasks, job.array_throttle) == (job.id, "1-7:2", 2)
        assert job.array_task_id is None
        again = await backend.get(job.id)
        assert (again.id, again.array_tasks, counts(again)) == (
            job.id,
            "1-7:2",
            {"PENDING": 4},
        )
        kept = await backend.spec(job.id)
        assert kept is not None and kept.array == "1-7:2%2"
        task = await backend.get(f"{job.id}_5")
        assert (task.id, task.array_job_id, task.array_task_id) == (f"{job.id}_5", job.id, 5)
        assert task.state is JobState.PENDING
        for missing in (f"{job.id}_2", f"{job.id}_9", f"{job.id}_[2,4]"):
            with pytest.raises(NotFound):
                await backend.get(missing)
        await cancel_all(backend, job.id)


async def test_each_task_runs_with_its_variables_and_its_row(harness: Harness) -> None:
    params = SweepParams(
        columns=["alpha", "label"],
        rows=[[f"0.{n}", f"row {n}"] for n in range(6)],
    )
    async with harness.backend() as backend:
        hooks = Recorder()
        backend.hooks = hooks
        spec = harness.array_spec("1-5:2", text="sweep-42", params=params)
        job = await backend.submit("alice", spec, idempotency_key=None)
        done = await ended(backend, job.id, within=90)
        tasks = [f"{job.id}_{i}" for i in (1, 3, 5)]
        assert sorted(hooks.started) == tasks  # each task is a job: its own start hook
        await until(
            lambda: _true(sorted(hooks.ended) == tasks), within=10, what="each task's end hook"
        )
        assert (done.state, done.exit_code, counts(done)) == (
            JobState.COMPLETED,
            0,
            {"COMPLETED": 3},
        )
        for index in (1, 3, 5):
            task = await backend.get(f"{job.id}_{index}")
            assert (task.state, task.array_task_id) == (JobState.COMPLETED, index)
            assert task.output == f"{spec.workdir}/kbatch-{job.id}_{index}.out"  # %A_%a
            env = await harness.task_environment(backend, task.id)
            for prefix in ("SLURM", "KBATCH"):
                assert env[f"{prefix}_ARRAY_JOB_ID"] == job.id
                assert env[f"{prefix}_ARRAY_TASK_ID"] == str(index)
                assert env[f"{prefix}_ARRAY_TASK_COUNT"] == "3"
                assert env[f"{prefix}_ARRAY_TASK_MIN"] == "1"
                assert env[f"{prefix}_ARRAY_TASK_MAX"] == "5"
                assert env[f"{prefix}_ARRAY_TASK_STEP"] == "2"
            assert (env["alpha"], env["label"]) == (f"0.{index}", f"row {index}")  # row i
            text = b"".join([c async for c in backend.logs(task.id, follow=True)])
            assert b"sweep-42" in text


async def test_the_throttle_bounds_the_tasks_running(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit(
            "alice", harness.array_spec("0-3%1", "brief"), idempotency_key=None
        )
        most = 0
        limited = False
        deadline = time.monotonic() + 90
        while True:
            rows = await rows_of(backend, job.id, states=None)
            running = [r for r in rows if r.state is JobState.RUNNING]
            most = max(most, len(running))
            waiting = [r for r in rows if r.array_tasks is not None and not r.state.is_terminal]
            if running and waiting:
                limited = limited or waiting[0].reason == "JobArrayTaskLimit"
            if (await backend.get(job.id)).state.is_terminal:
                break
            assert time.monotonic() < deadline, "the array did not end"
            await asyncio.sleep(0.05)
        assert most == 1
        assert limited  # the tasks held back said why
        done = await backend.get(job.id)
        assert (done.state, counts(done)) == (JobState.COMPLETED, {"COMPLETED": 4})
        tasks = [await backend.get(f"{job.id}_{i}") for i in range(4)]
        for before, after in itertools.pairwise(tasks):
            assert before.finished is not None and after.started is not None
            assert after.started >= before.finished - timedelta(seconds=0.5)  # in index order


async def test_list_shows_the_tasks_not_started_as_one_row(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit(
            "alice", harness.array_spec("0-9999%1", "run"), idempotency_key=None
        )
        await task_state(backend, f"{job.id}_0", JobState.RUNNING, within=harness.start_within)

        async def grouped() -> list[Job] | None:
            rows = await rows_of(backend, job.id)
            return rows if rows[-1].reason == "JobArrayTaskLimit" else None

        rows = await until(grouped, within=20, what="the group to wait on the throttle")
        assert [(r.id, r.state, r.array_tasks) for r in rows] == [
            (f"{job.id}_0", JobState.RUNNING, None),
            (job.id, JobState.PENDING, "1-9999"),
        ]
        assert rows[1].array_throttle == 1
        await backend.cancel(job.id, by="alice")
        done = await ended(backend, job.id)
        assert (done.state, counts(done)) == (JobState.CANCELLED, {"CANCELLED": 10000})
        cancelled = await rows_of(backend, job.id, states={JobState.CANCELLED})
        assert [(r.id, r.array_tasks) for r in cancelled] == [
            (f"{job.id}_0", None),
            (job.id, "1-9999"),  # cancelled before they started: still one row
        ]
        assert await rows_of(backend, job.id) == []  # nothing active is left


async def test_cancel_one_task_a_range_and_all(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit("alice", harness.array_spec("0-5", "run"), idempotency_key=None)
        first = f"{job.id}_0"
        await task_state(backend, first, JobState.RUNNING, within=harness.start_within)
        await backend.cancel(first, by="alice")
        gone = await ended(backend, first)
        assert (gone.state, gone.cancelled_by) == (JobState.CANCELLED, "alice")
        await backend.cancel(f"{job.id}_[3-4]", by="alice")
        for index in (3, 4):
            task = await ended(backend, f"{job.id}_{index}")
            assert (task.state, task.started) == (JobState.CANCELLED, None)
        # the others go on: task 2 takes the room task 0 left
        await task_state(backend, f"{job.id}_2", JobState.RUNNING, within=harness.start_within)
        assert (await backend.get(f"{job.id}_1")).state is JobState.RUNNING
        part = await backend.get(f"{job.id}_[0-4]")
        assert counts(part) == {"CANCELLED": 3, "RUNNING": 2}
        await backend.cancel(job.id, by="alice")
        done = await ended(backend, job.id)
        assert (done.state, counts(done)) == (JobState.CANCELLED, {"CANCELLED": 6})
        again = await backend.cancel(f"{job.id}_1", by="bob")  # an ended task: no change
        assert (again.state, again.cancelled_by) == (JobState.CANCELLED, "alice")


async def test_hold_and_release_a_whole_array(harness: Harness) -> None:
    async with harness.backend() as backend:
        held = await backend.submit(
            "alice", harness.array_spec("0-2", hold=True), idempotency_key=None
        )
        await asyncio.sleep(1.0)  # time enough to have started, were it not held
        waiting = await backend.get(held.id)
        assert (waiting.state, waiting.reason, counts(waiting)) == (
            JobState.PENDING,
            "JobHeldUser",
            {"PENDING": 3},
        )
        await backend.release(held.id)
        assert counts(await ended(backend, held.id)) == {"COMPLETED": 3}

        job = await backend.submit(
            "alice", harness.array_spec("0-3%1", "run"), idempotency_key=None
        )
        await task_state(backend, f"{job.id}_0", JobState.RUNNING, within=harness.start_within)
        await backend.hold(job.id)  # the tasks not started; task 0 runs on
        rows = await rows_of(backend, job.id)
        assert [(r.id, r.state, r.array_tasks) for r in rows] == [
            (f"{job.id}_0", JobState.RUNNING, None),
            (job.id, JobState.PENDING, "1-3"),
        ]
        assert rows[1].reason == "JobHeldUser"
        with pytest.raises(Conflict, match="only pending jobs"):
            await backend.hold(f"{job.id}_0")
        await backend.cancel(f"{job.id}_0", by="alice")
        await ended(backend, f"{job.id}_0")
        await asyncio.sleep(1.0)
        assert (await backend.get(f"{job.id}_1")).state is JobState.PENDING  # still held
        await backend.release(job.id)
        await task_state(backend, f"{job.id}_1", JobState.RUNNING, within=harness.start_within)
        await cancel_all(backend, job.id)


async def test_release_some_tasks_of_a_held_array(harness: Harness) -> None:
    """As ``scontrol release 123_[1-2]``: those tasks may start, the others stay held."""
    async with harness.backend() as backend:
        job = await backend.submit(
            "alice", harness.array_spec("0-3", "run", hold=True), idempotency_key=None
        )
        await backend.release(f"{job.id}_[1-2]")
        for index in (1, 2):
            await task_state(
                backend, f"{job.id}_{index}", JobState.RUNNING, within=harness.start_within
            )
        for index in (0, 3):
            held = await backend.get(f"{job.id}_{index}")
            assert (held.state, held.reason) == (JobState.PENDING, "JobHeldUser")
        await backend.hold(f"{job.id}_3")  # holding a held task again changes nothing
        await backend.cancel(f"{job.id}_1", by="alice")  # room for one more (2 CPUs)
        await ended(backend, f"{job.id}_1")
        await backend.release(f"{job.id}_0")
        await task_state(backend, f"{job.id}_0", JobState.RUNNING, within=harness.start_within)
        assert (await backend.get(f"{job.id}_3")).reason == "JobHeldUser"
        await cancel_all(backend, job.id)


async def test_set_throttle_lets_more_tasks_run(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit(
            "alice", harness.array_spec("0-5%1", "run"), idempotency_key=None
        )
        await task_state(backend, f"{job.id}_0", JobState.RUNNING, within=harness.start_within)
        await asyncio.sleep(1.0)
        assert (await backend.get(f"{job.id}_1")).state is JobState.PENDING
        changed = await backend.set_throttle(job.id, 2)
        assert changed.array_throttle == 2
        await task_state(backend, f"{job.id}_1", JobState.RUNNING, within=harness.start_within)
        assert (await backend.get(job.id)).array_throttle == 2
        assert (await backend.set_throttle(job.id, None)).array_throttle is None
        single = await backend.submit("alice", harness.spec("succeed"), idempotency_key=None)
        with pytest.raises(Conflict):
            await backend.set_throttle(single.id, 3)
        with pytest.raises(NotFound):
            await backend.set_throttle("424242", 3)
        await cancel_all(backend, job.id, single.id)


async def test_the_array_aggregates_its_tasks(harness: Harness) -> None:
    async with harness.backend() as backend:
        job = await backend.submit(
            "alice", harness.array_spec("0-3", tasks={1: "fail", 3: "fail"}), idempotency_key=None
        )
        done = await ended(backend, job.id, within=90)
        assert (done.state, done.exit_code) == (JobState.FAILED, 3)
        assert counts(done) == {"COMPLETED": 2, "FAILED": 2}
        assert done.started is not None and done.finished is not None
        failed = await backend.get(f"{job.id}_[1,3]")
        assert (failed.state, counts(failed)) == (JobState.FAILED, {"FAILED": 2})
        good = await backend.get(f"{job.id}_[0,2]")
        assert (good.state, good.exit_code) == (JobState.COMPLETED, 0)
        one = await backend.get(f"{job.id}_1")
        assert (one.state, one.exit_code, one.array_job_id, one.array_task_id) == (
            JobState.FAILED,
            3,
            job.id,
            1,
        )
        with pytest.raises(NotFound):
            await backend.get(f"{job.id}_[7-9]")


async def test_afterok_on_an_array_waits_for_all_its_tasks(harness: Harness) -> None:
    async with harness.backend() as backend:
        array = await backend.submit(
            "ann", harness.array_spec("0-2%1", "brief"), idempotency_key=None
        )
        after = await backend.submit(
            "ann", harness.spec("succeed", dependency=f"afterok:{array.id}"), idempotency_key=None
        )
        await task_state(backend, f"{array.id}_1", JobState.RUNNING, within=60)
        waits = await backend.get(after.id)
        assert (waits.state, waits.reason) == (JobState.PENDING, "Dependency")
        done = await ended(backend, after.id, within=90)
        assert done.state is JobState.COMPLETED
        last = await backend.get(f"{array.id}_2")
        assert last.finished is not None and done.started is not None
        assert done.started >= last.finished - timedelta(seconds=1)

        bad = await backend.submit(
            "ann", harness.array_spec("0-1", tasks={1: "fail"}), idempotency_key=None
        )
        never = await backend.submit(
            "ann", harness.spec("succeed", dependency=f"afterok:{bad.id}"), idempotency_key=None
        )
        assert (await ended(backend, bad.id)).state is JobState.FAILED

        async def stuck() -> Job | None:
            job = await backend.get(never.id)
            return job if job.reason == "DependencyNeverSatisfied" else None

        assert (await until(stuck, within=20, what="the dependency to fail")).state is (
            JobState.PENDING
        )
        await cancel_all(backend, never.id)


# -- through the API: another user's array is not even confirmed to exist ------------------


class _ByToken(Authenticator):
    async def authenticate(self, credentials: Credentials) -> Identity:
        return Identity(name=credentials.token or "nobody")


@contextlib.asynccontextmanager
async def api(backend: Backend) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(backend, _ByToken(), Policy())  # on the started backend: no lifespan
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://kbatch") as client:
        yield client


async def test_another_users_array_and_tasks_are_not_found(harness: Harness) -> None:
    async with harness.backend() as backend, api(backend) as http:
        job = await backend.submit(
            "alice", harness.array_spec("0-3", hold=True), idempotency_key=None
        )
        bob = {"Authorization": "Bearer bob"}
        for ref in (job.id, f"{job.id}_1", f"{job.id}_[1-2]"):
            for method, path in (
                ("GET", ""),
                ("GET", "/spec"),
                ("POST", "/cancel"),
                ("POST", "/hold"),
                ("POST", "/release"),
                ("GET", "/logs"),
            ):
                response = await http.request(method, f"{API_PREFIX}/jobs/{ref}{path}", headers=bob)
                assert response.status_code == 404, (method, ref, path)
                assert response.json()["error"]["message"] == f"no job {ref}"
        response = await http.post(
            f"{API_PREFIX}/jobs/{job.id}/update", json={"throttle": 1}, headers=bob
        )
        assert response.status_code == 404
        still = await backend.get(job.id)
        assert (still.state, counts(still), still.array_throttle) == (
            JobState.PENDING,
            {"PENDING": 4},
            None,
        )
        alice = {"Authorization": "Bearer alice"}
        spec = (await http.get(f"{API_PREFIX}/jobs/{job.id}_2/spec", headers=alice)).json()
        assert spec["array"] == "0-3"
        response = await http.post(
            f"{API_PREFIX}/jobs/{job.id}/update", json={"throttle": 2}, headers=alice
        )
        assert (response.status_code, response.json()["array_throttle"]) == (200, 2)
        response = await http.post(f"{API_PREFIX}/jobs/{job.id}_[0-1]/cancel", headers=alice)
        assert response.status_code == 200, response.text
        shown = response.json()["array_counts"]
        assert {k: v for k, v in shown.items() if v} == {"CANCELLED": 2}
        await cancel_all(backend, job.id)
