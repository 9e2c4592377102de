"""Arrays on the Kubernetes backend (issue 12): one Indexed Job per array, on the real
control plane; kwok plays each index's pod, told by ``kbatch-test-index-<K>=<outcome>``
(see tests/support/kwok_stages.yaml; K is the completion index, 0..n-1)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.backend import KubernetesBackend
from kbatch.backends.userlimits import UserLimits
from kbatch.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from kbatch.models import Job, JobState, SweepParams
from tests.k8s.conftest import SHARED_NS, Installed
from tests.k8s.test_backend import spec, started, until
from tests.support.k8s_cluster import K8sCluster
from tests.support.servers import KbatchServer

pytestmark = [pytest.mark.kubernetes, pytest.mark.anyio]

RUN = "kbatch-test-outcome=running"  # every index stays Running until its pod is deleted


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def instance() -> str:
    return f"arr-{uuid.uuid4().hex[:8]}"


def k8s_job(cluster: K8sCluster, job_id: str) -> dict[str, Any]:
    return dict(cluster.kubectl_json("get", "job", names.job_object_name(job_id), "-n", SHARED_NS))


def config_map(cluster: K8sCluster, job_id: str) -> dict[str, str]:
    found = cluster.kubectl_json("get", "configmap", names.job_object_name(job_id), "-n", SHARED_NS)
    return dict(found["data"])


async def ended(backend: KubernetesBackend, job_id: str, limit: float = 60.0) -> Job:
    async def done() -> Job | None:
        job = await backend.get(job_id)
        return job if job.state.is_terminal else None

    return await until(done, limit, f"{job_id} to end")


async def state_is(backend: KubernetesBackend, job_id: str, *states: JobState) -> bool:
    return (await backend.get(job_id)).state in states


def run_task(tmp_path: Path, data: dict[str, str], position: int) -> dict[str, str]:
    """Run the job's entrypoint as the pod of completion index ``position`` would, with
    /bin/sh, and return the environment its script sees."""
    for key in ("entrypoint", "tasks", "array"):
        (tmp_path / key).write_text(data[key])
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nenv -0\n")
    script.chmod(0o755)
    proc = subprocess.run(
        ["/bin/sh", str(tmp_path / "entrypoint"), str(script)],
        env={"PATH": os.environ["PATH"], "JOB_COMPLETION_INDEX": str(position)},
        capture_output=True,
        check=True,
    )
    pairs = (item.split(b"=", 1) for item in proc.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


async def test_an_array_is_one_indexed_job_with_a_state_per_task(
    cluster: K8sCluster, shared: Installed
) -> None:
    async with started(shared, instance=instance()) as backend:
        args = ["kbatch-test-index-1=fail", "kbatch-test-exit-code-1=7", "kbatch-test-index-2=oom"]
        job = await backend.submit("ann", spec(array="0-3", args=args), idempotency_key=None)
        assert (job.state, job.array_tasks, job.array_job_id) == (JobState.PENDING, "0-3", job.id)
        made = k8s_job(cluster, job.id)["spec"]
        assert made["completionMode"] == "Indexed"
        assert (made["completions"], made["parallelism"]) == (4, 4)
        assert (made["backoffLimitPerIndex"], made["maxFailedIndexes"]) == (0, 4)
        assert "activeDeadlineSeconds" not in made
        rules = made["podFailurePolicy"]["rules"]
        assert {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        } in rules
        lines = config_map(cluster, job.id)["tasks"].splitlines()
        assert lines == ["0", "1", "2", "3"]

        whole = await ended(backend, job.id)
        assert whole.state is JobState.FAILED  # the worst end of its tasks
        assert whole.exit_code == 137  # the highest
        assert whole.array_counts == {"COMPLETED": 2, "FAILED": 1, "OUT_OF_MEMORY": 1}
        one = await backend.get(f"{job.id}_1")
        assert (one.id, one.state, one.exit_code, one.array_task_id) == (
            f"{job.id}_1",
            JobState.FAILED,
            7,
            1,
        )
        assert (await backend.get(f"{job.id}_2")).state is JobState.OUT_OF_MEMORY
        zero = await backend.get(f"{job.id}_0")
        assert (zero.state, zero.exit_code) == (JobState.COMPLETED, 0)
        assert zero.output == f"/home/jovyan/kbatch-{job.id}_0.out"
        rows = (await backend.list(user="ann")).jobs
        assert [r.id for r in rows] == [f"{job.id}_{i}" for i in range(4)]
        some = await backend.get(f"{job.id}_[0,2-3]")
        assert some.state is JobState.OUT_OF_MEMORY
        assert some.array_counts == {"COMPLETED": 2, "OUT_OF_MEMORY": 1}

        async def counted() -> Any:  # the Job controller's record agrees
            status = k8s_job(cluster, job.id)["status"]
            return (status.get("completedIndexes"), status.get("failedIndexes")) == ("0,3", "1,2")

        await until(counted, what="the Job's completed and failed indexes")


async def test_sparse_and_stepped_indexes_map_onto_completion_indexes(
    cluster: K8sCluster, shared: Installed, tmp_path: Path
) -> None:
    async with started(shared, instance=instance()) as backend:
        args = ["kbatch-test-index-1=fail"]  # completion index 1: task 5
        job = await backend.submit("bea", spec(array="1,5,9", args=args), idempotency_key=None)
        assert k8s_job(cluster, job.id)["spec"]["completions"] == 3
        data = config_map(cluster, job.id)
        env = run_task(tmp_path, data, 1)
        assert env["SLURM_ARRAY_TASK_ID"] == env["KBATCH_ARRAY_TASK_ID"] == "5"
        assert (env["SLURM_ARRAY_TASK_MIN"], env["SLURM_ARRAY_TASK_MAX"]) == ("1", "9")
        assert (env["SLURM_ARRAY_TASK_COUNT"], env["SLURM_ARRAY_TASK_STEP"]) == ("3", "4")
        assert env["SLURM_ARRAY_JOB_ID"] == job.id
        assert env["SLURM_JOB_ID"] == env["KBATCH_JOB_ID"] == f"{job.id}_5"
        assert env["KBATCH_OUTPUT"] == f"/home/jovyan/kbatch-{job.id}_5.out"
        whole = await ended(backend, job.id)
        assert whole.array_counts == {"COMPLETED": 2, "FAILED": 1}
        assert [(t.id, t.state) for t in (await backend.list(user="bea")).jobs] == [
            (f"{job.id}_1", JobState.COMPLETED),
            (f"{job.id}_5", JobState.FAILED),
            (f"{job.id}_9", JobState.COMPLETED),
        ]
        with pytest.raises(NotFound):
            await backend.get(f"{job.id}_2")  # not one of its indexes

        stepped = await backend.submit(
            "bea", spec(array="0-99:3%5", hold=True), idempotency_key=None
        )
        made = k8s_job(cluster, stepped.id)["spec"]
        assert (made["completions"], made["parallelism"], made["suspend"]) == (34, 5, True)
        env = run_task(tmp_path, config_map(cluster, stepped.id), 33)
        assert (env["SLURM_ARRAY_TASK_ID"], env["SLURM_ARRAY_TASK_STEP"]) == ("99", "3")
        held = await backend.get(stepped.id)
        assert (held.state, held.reason, held.array_tasks, held.array_throttle) == (
            JobState.PENDING,
            "JobHeldUser",
            "0-99:3",
            5,
        )
        await backend.cancel(stepped.id, by="bea")
        gone = await ended(backend, stepped.id)
        assert gone.state is JobState.CANCELLED and gone.array_counts == {"CANCELLED": 34}


async def test_a_csv_sweep_gives_each_task_its_row(
    cluster: K8sCluster, shared: Installed, tmp_path: Path
) -> None:
    hostile = 'it\'s $HOME `id` "q"\nline two; exit 3'
    params = SweepParams(columns=["alpha", "name"], rows=[["0.1", "plain"], ["0.2", hostile]])
    async with started(shared, instance=instance()) as backend:
        job = await backend.submit("cy", spec(params=params, array="0-1"), idempotency_key=None)
        data = config_map(cluster, job.id)
        assert len(data["tasks"].splitlines()) == 2  # one line per task, newlines and all
        env = run_task(tmp_path, data, 1)
        assert (env["alpha"], env["name"]) == ("0.2", hostile)
        assert run_task(tmp_path, data, 0)["name"] == "plain"
        annotations = k8s_job(cluster, job.id)["metadata"]["annotations"]
        assert "plain" not in annotations[names.ANNOTATION_SPEC]  # the table is in the ConfigMap
        assert (await ended(backend, job.id)).state is JobState.COMPLETED
        again = await backend.spec(job.id)  # what resubmit reads: the table comes back
        assert again is not None and again.params == params and again.array == "0-1"


async def test_cancel_one_task_and_a_range_while_the_others_run(
    cluster: K8sCluster, shared: Installed
) -> None:
    async with started(shared, instance=instance()) as backend:
        job = await backend.submit("dan", spec(array="0-5", args=[RUN]), idempotency_key=None)

        async def all_running() -> bool:
            whole = await backend.get(job.id)
            return whole.array_counts == {"RUNNING": 6}

        await until(all_running, what="six tasks running")
        await backend.cancel(f"{job.id}_2", by="dan")
        await until(lambda: state_is(backend, f"{job.id}_2", JobState.CANCELLED), what="2 ends")
        await backend.cancel(f"{job.id}_[3-4]", by="dan")
        for task in (f"{job.id}_3", f"{job.id}_4"):
            await until(partial(state_is, backend, task, JobState.CANCELLED), what=task)
        cancelled = await backend.get(f"{job.id}_3")
        assert cancelled.cancelled_by == "dan" and cancelled.reason == "CancelledByUser"
        await asyncio.sleep(1.0)  # the others keep running, and no cancelled task comes back
        whole = await backend.get(job.id)
        assert whole.state is JobState.RUNNING
        assert whole.array_counts == {"CANCELLED": 3, "RUNNING": 3}

        async def counted() -> Any:  # the Job controller counts them failed, the rest active
            status = k8s_job(cluster, job.id)["status"]
            return (status.get("failedIndexes"), status.get("active")) == ("2-4", 3)

        await until(counted, limit=20, what="indexes 2-4 failed, 3 active")
        assert (
            names.ANNOTATION_CANCELLED_TASKS in k8s_job(cluster, job.id)["metadata"]["annotations"]
        )
        # cancelling them again, or a range with ended tasks, changes nothing
        again = await backend.cancel(f"{job.id}_[2-3]", by="dan")
        assert again.array_counts == {"CANCELLED": 2}
        await backend.cancel(job.id, by="dan")  # the rest
        whole = await ended(backend, job.id)
        assert whole.state is JobState.CANCELLED and whole.array_counts == {"CANCELLED": 6}


async def test_throttle_and_set_throttle(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared, instance=instance()) as backend:
        job = await backend.submit("eve", spec(array="0-5%2", args=[RUN]), idempotency_key=None)
        assert k8s_job(cluster, job.id)["spec"]["parallelism"] == 2

        async def shape() -> list[tuple[str, JobState, str | None, str | None]]:
            rows = (await backend.list(user="eve")).jobs
            return [(r.id, r.state, r.reason, r.array_tasks) for r in rows]

        async def two_running() -> bool:
            return await shape() == [
                (f"{job.id}_0", JobState.RUNNING, None, None),
                (f"{job.id}_1", JobState.RUNNING, None, None),
                (job.id, JobState.PENDING, "JobArrayTaskLimit", "2-5"),
            ]

        await until(two_running, what="two tasks running, four held by the throttle")
        waiting = (await backend.list(user="eve")).jobs[-1]
        assert waiting.array_throttle == 2
        raised = await backend.set_throttle(job.id, 4)
        assert raised.array_throttle == 4
        assert k8s_job(cluster, job.id)["spec"]["parallelism"] == 4

        async def four_running() -> bool:
            return (await backend.get(job.id)).array_counts == {"PENDING": 2, "RUNNING": 4}

        await until(four_running, what="four tasks running")
        lowered = await backend.set_throttle(job.id, 1)
        assert lowered.array_throttle == 1
        # tasks already running beyond a lowered throttle run on: parallelism stays 4
        assert k8s_job(cluster, job.id)["spec"]["parallelism"] == 4
        await asyncio.sleep(1.0)
        assert (await backend.get(job.id)).array_counts == {"PENDING": 2, "RUNNING": 4}
        await backend.cancel(f"{job.id}_[0-2]", by="eve")  # three end: now it may go to 1

        async def lowered_to_one() -> bool:
            return k8s_job(cluster, job.id)["spec"]["parallelism"] == 1

        await until(lowered_to_one, what="parallelism lowered as tasks end")

        async def one_running() -> bool:  # tasks started after the change wait again
            return (await backend.get(job.id)).array_counts == {
                "CANCELLED": 3,
                "PENDING": 2,
                "RUNNING": 1,
            }

        await until(one_running, what="task 3 running alone, 4-5 waiting")
        assert (await backend.get(f"{job.id}_3")).state is JobState.RUNNING
        assert (await backend.get(f"{job.id}_4")).state is JobState.PENDING
        with pytest.raises(Conflict):
            await backend.set_throttle(f"{job.id}_1", 3)
        plain = await backend.submit("eve", spec(), idempotency_key=None)
        with pytest.raises(Conflict):
            await backend.set_throttle(plain.id, 3)
        await backend.cancel(job.id, by="eve")
        assert (await ended(backend, job.id)).state is JobState.CANCELLED


async def test_hold_and_release_a_whole_array(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared, instance=instance()) as backend:
        job = await backend.submit("fay", spec(array="0-2", hold=True), idempotency_key=None)
        held = await backend.get(job.id)
        assert (held.state, held.reason) == (JobState.PENDING, "JobHeldUser")
        with pytest.raises(Conflict):
            await backend.release(f"{job.id}_1")
        released = await backend.release(job.id)
        assert released.state in (JobState.PENDING, JobState.RUNNING, JobState.COMPLETED)
        whole = await ended(backend, job.id)
        assert whole.state is JobState.COMPLETED and whole.array_counts == {"COMPLETED": 3}
        assert whole.exit_code == 0


async def test_a_task_past_its_time_limit_times_out_alone_and_keeps_its_log(
    cluster: K8sCluster, shared: Installed, pod_log: Any
) -> None:
    pod_log("working on it\n")
    async with started(shared, instance=instance()) as backend:
        args = ["kbatch-test-index-0=running", "kbatch-test-duration-1=1s"]
        job = await backend.submit(
            "gus", spec(array="0-1", args=args, time_limit=3), idempotency_key=None
        )
        template = k8s_job(cluster, job.id)["spec"]["template"]["spec"]
        assert template["activeDeadlineSeconds"] == 3 + 30  # the kubelet's, if kbatch is down
        whole = await ended(backend, job.id, limit=90)
        assert whole.array_counts == {"COMPLETED": 1, "TIMEOUT": 1}
        assert whole.state is JobState.TIMEOUT
        late = await backend.get(f"{job.id}_0")
        assert (late.state, late.reason) == (JobState.TIMEOUT, "TimeLimit")
        assert config_map(cluster, job.id).get("log-0") == "working on it\n"
        cluster.kubectl("delete", "pod", "-n", SHARED_NS, "-l", f"{names.LABEL_JOB_ID}={job.id}")
        text = b"".join([c async for c in backend.logs(f"{job.id}_0", follow=False)])
        assert text == b"working on it\n"


async def test_logs_of_a_task(cluster: K8sCluster, shared: Installed, pod_log: Any) -> None:
    pod_log("task says hi\n")
    async with started(shared, instance=instance()) as backend:
        job = await backend.submit("hal", spec(array="0-1"), idempotency_key=None)
        await ended(backend, job.id)
        text = b"".join([c async for c in backend.logs(f"{job.id}_1", follow=False)])
        assert text == b"task says hi\n"
        followed = b"".join([c async for c in backend.logs(f"{job.id}_0", follow=True)])
        assert followed == b"task says hi\n"
        with pytest.raises(InvalidRequest, match=f"name one task for its log, e.g. {job.id}_0"):
            _ = [c async for c in backend.logs(job.id, follow=False)]
        with pytest.raises(NotFound):
            _ = [c async for c in backend.logs(f"{job.id}_7", follow=False)]


async def test_crafted_references_are_not_found(shared: Installed) -> None:
    async with started(shared, instance=instance()) as backend:
        job = await backend.submit("ivy", spec(array="0-3", hold=True), idempotency_key=None)
        plain = await backend.submit("ivy", spec(hold=True), idempotency_key=None)
        for ref in (
            f"{job.id}_[",
            f"{job.id}_[1-999999999]",
            f"{job.id}_[7-9]",
            f"{job.id}_4",
            f"{plain.id}_0",
            f"{plain.id}_[0-1]",
            "zzzzzzzz_1",
            f"{job.id}_1\n",
        ):
            with pytest.raises(NotFound):
                await backend.get(ref)
            with pytest.raises(NotFound):
                await backend.cancel(ref, by="ivy")
        assert (await backend.get(f"{job.id}_[0-9999999]")).array_tasks == "0-3"
        await backend.cancel(job.id, by="ivy")
        await backend.cancel(plain.id, by="ivy")


async def test_ten_thousand_tasks_are_one_job_listed_from_the_cache(
    cluster: K8sCluster, shared: Installed
) -> None:
    async with started(shared, instance=instance()) as backend:
        job = await backend.submit("joe", spec(array="0-9999%50", hold=True), idempotency_key=None)
        made = k8s_job(cluster, job.id)
        assert (made["spec"]["completions"], made["spec"]["parallelism"]) == (10_000, 50)
        assert len(config_map(cluster, job.id)["tasks"].splitlines()) == 10_000
        jobs = cluster.kubectl_json(
            "get", "jobs", "-n", SHARED_NS, "-l", f"{names.LABEL_JOB_ID}={job.id}"
        )["items"]
        pods = cluster.kubectl_json(
            "get", "pods", "-n", SHARED_NS, "-l", f"{names.LABEL_JOB_ID}={job.id}"
        )["items"]
        assert (len(jobs), len(pods)) == (1, 0)
        begin = time.perf_counter()
        rows = (await backend.list(user="joe")).jobs
        elapsed = time.perf_counter() - begin
        assert [(r.id, r.state, r.array_tasks, r.array_throttle) for r in rows] == [
            (job.id, JobState.PENDING, "0-9999", 50)
        ]
        assert elapsed < 0.3
        task = await backend.get(f"{job.id}_9999")
        assert (task.state, task.reason, task.id) == (
            JobState.PENDING,
            "JobHeldUser",
            f"{job.id}_9999",
        )
        await backend.cancel(job.id, by="joe")
        whole = await ended(backend, job.id)
        assert whole.array_counts == {"CANCELLED": 10_000}


def test_another_users_array_and_tasks_are_not_found(
    cluster: K8sCluster, shared: Installed, tmp_path: Path
) -> None:
    """Through the real server: bob reaches none of alice's array, task by task or by
    range, and a crafted reference is a clear 404 for anyone."""
    config = tmp_path / "kbatch.toml"
    config.write_text(
        'backend = "kubernetes"\n[kubernetes]\n'
        f'kubeconfig = "{shared.kubeconfig}"\nnamespace_mode = "shared"\n'
        f'namespace = "{SHARED_NS}"\nimage = "busybox:stable"\ninstance = "{instance()}"\n'
    )
    server = KbatchServer(tmp_path / "s", args=["--config", str(config)])
    server.start()
    try:
        alice = server.client(server.add_token("alice"))
        bob = server.client(server.add_token("bob"))
        job = alice.submit(spec(array="0-3", args=[RUN]))
        assert alice.get(f"{job.id}_2").id == f"{job.id}_2"
        refs = [job.id, f"{job.id}_2", f"{job.id}_[1-2]", f"{job.id}_[0-9999999]"]
        for ref in refs:
            for call in (bob.get, bob.cancel, bob.hold, bob.release):
                with pytest.raises(NotFound):
                    call(ref)
            with pytest.raises(NotFound):
                list(bob.logs(ref))
        assert bob.list(include_finished=True) == []
        for ref in (f"{job.id}_[", f"{job.id}_[1-999999999]", f"{job.id}_9", f"{job.id}_[5-7]"):
            with pytest.raises(NotFound):
                alice.get(ref)
        assert all(t.state is not JobState.CANCELLED for t in alice.list())  # bob changed nothing
        assert alice.cancel(job.id).id == job.id
    finally:
        server.stop()


async def test_each_task_counts_toward_the_submit_limit(shared: Installed) -> None:
    async with started(shared, instance=instance()) as backend:
        backend.limits = UserLimits(max_submitted_jobs_per_user=3)
        job = await backend.submit("kim", spec(array="0-1", hold=True), idempotency_key=None)
        with pytest.raises(PermissionDenied, match=r"you have 2 jobs .* this submission adds 2"):
            await backend.submit("kim", spec(array="5-6", hold=True), idempotency_key=None)
        one = await backend.submit("kim", spec(hold=True), idempotency_key=None)
        await backend.cancel(f"{job.id}_1", by="kim")  # a cancelled task frees its place
        await until(partial(state_is, backend, f"{job.id}_1", JobState.CANCELLED))
        other = await backend.submit("kim", spec(hold=True), idempotency_key=None)
        for done in (job.id, one.id, other.id):
            await backend.cancel(done, by="kim")


async def test_hold_an_array_whose_tasks_run(cluster: K8sCluster, shared: Installed) -> None:
    async with started(shared, instance=instance()) as backend:
        job = await backend.submit("lou", spec(array="0-3%1", args=[RUN]), idempotency_key=None)
        await until(partial(state_is, backend, f"{job.id}_0", JobState.RUNNING), what="task 0")
        await backend.hold(job.id)  # the tasks not started; task 0 runs on
        rows = [
            (r.id, r.state, r.reason, r.array_tasks) for r in (await backend.list(user="lou")).jobs
        ]
        assert rows == [
            (f"{job.id}_0", JobState.RUNNING, None, None),
            (job.id, JobState.PENDING, "JobHeldUser", "1-3"),
        ]
        with pytest.raises(Conflict, match="only pending jobs"):
            await backend.hold(f"{job.id}_0")
        with pytest.raises(Conflict, match="single tasks of an array cannot be held"):
            await backend.hold(f"{job.id}_2")
        await backend.cancel(f"{job.id}_0", by="lou")
        await until(partial(state_is, backend, f"{job.id}_0", JobState.CANCELLED), what="0 ends")

        async def parked() -> bool:  # no pod runs: the Job's parallelism is 0
            status = k8s_job(cluster, job.id)
            return status["spec"]["parallelism"] == 0 and not status["status"].get("active")

        await until(parked, what="the held array to run nothing")
        await asyncio.sleep(1.0)
        one = await backend.get(f"{job.id}_1")
        assert (one.state, one.reason) == (JobState.PENDING, "JobHeldUser")
        await backend.release(job.id)
        await until(partial(state_is, backend, f"{job.id}_1", JobState.RUNNING), what="task 1")
        assert k8s_job(cluster, job.id)["spec"]["parallelism"] == 1  # its throttle again
        await backend.cancel(job.id, by="lou")
        done = await ended(backend, job.id)
        assert done.array_counts == {"CANCELLED": 4}


async def test_tasks_cancelled_before_they_start_never_start(
    cluster: K8sCluster, shared: Installed
) -> None:
    async with started(shared, instance=instance()) as backend:
        job = await backend.submit("max", spec(array="0-5%2", args=[RUN]), idempotency_key=None)
        await until(partial(state_is, backend, f"{job.id}_1", JobState.RUNNING), what="task 1")
        await backend.cancel(f"{job.id}_[3-4]", by="max")
        await backend.cancel(f"{job.id}_0", by="max")  # room: task 2 starts, not 3 or 4
        await until(partial(state_is, backend, f"{job.id}_2", JobState.RUNNING), what="task 2")
        await backend.cancel(f"{job.id}_1", by="max")
        await until(partial(state_is, backend, f"{job.id}_5", JobState.RUNNING), what="task 5")
        for index in (3, 4):
            task = await backend.get(f"{job.id}_{index}")
            assert (task.state, task.started, task.cancelled_by) == (
                JobState.CANCELLED,
                None,
                "max",
            )
        rows = (await backend.list(user="max", states={JobState.CANCELLED})).jobs
        assert [(r.id, r.array_tasks) for r in rows] == [
            (f"{job.id}_0", None),
            (f"{job.id}_1", None),
            (job.id, "3-4"),  # cancelled before they started: one row
        ]
        await backend.cancel(job.id, by="max")
        assert (await ended(backend, job.id)).array_counts == {"CANCELLED": 6}
