"""Arrays on the Kubernetes backend (issue 12): one Indexed Job per array, on the real
control plane; kwok plays each index's pod, told by ``kbatch-test-index-<K>=<outcome>``
(see tests/support/kwok_stages.yaml; K is the completion index, 0..n-1)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.backend import KubernetesBackend
from kbatch.errors import Conflict, NotFound
from kbatch.models import Job, JobState, SweepParams
from tests.k8s.conftest import SHARED_NS, Installed
from tests.k8s.test_backend import spec, started, until
from tests.support.k8s_cluster import K8sCluster

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
    for key in ("entrypoint", "tasks"):
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
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        lines = config_map(cluster, job.id)["tasks"].splitlines()
        assert len(lines) == 4 and f"SLURM_JOB_ID='{job.id}_3'" in lines[3]

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
            return (status.get("completedIndexes"), status.get("failedIndexes")) == ("0,3", "1-2")

        await until(counted, what="the Job's completed and failed indexes")
