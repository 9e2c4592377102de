"""The conformance suite (tests/conformance) run on the Kubernetes backend and the real
control plane, with a harness that picks each pod's outcome by an argument."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from subprocess import PIPE
from typing import Any

import msgspec
import pytest

from kbatch.backends.base import Backend
from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.arrays import task_order
from kbatch.models import JobSpec
from tests.conformance.harness import Harness
from tests.conformance.test_arrays import *  # noqa: F403
from tests.conformance.test_contract import *  # noqa: F403 - the suite, run here once more
from tests.conformance.test_pipelines import *  # noqa: F403
from tests.k8s.conftest import SHARED_NS, Installed
from tests.k8s.outcomes import outcome_args
from tests.k8s.test_backend import started
from tests.support.k8s_cluster import DEFAULT_POD_LOG, K8sCluster

pytestmark = [pytest.mark.kubernetes, pytest.mark.anyio]  # type: ignore[assignment]

_OUTCOME = {
    "succeed": outcome_args("succeed"),
    "fail": outcome_args("fail", exit_code=3),
    "run": outcome_args("running"),
}


class KubernetesHarness(Harness):
    """A backend of its own instance (so tests never see each other's jobs) in the
    chart's shared namespace; kwok plays the pods, told by ``JobSpec.args``."""

    name = "kubernetes"
    start_within = 30.0
    hooks_per_task = False
    holds_per_task = False

    def __init__(self, cluster: K8sCluster, installed: Installed) -> None:
        self.cluster = cluster
        self.installed = installed
        self.instance = f"cf-{uuid.uuid4().hex[:8]}"

    @contextlib.asynccontextmanager
    async def backend(self) -> AsyncIterator[Backend]:
        async with started(self.installed, instance=self.instance) as backend:
            yield backend

    # kwok plays an array's tasks too, told per completion index (tests/support/kwok_stages.yaml)
    _TASK = {
        "succeed": ("succeed", None, None),
        "fail": ("fail", "3", None),
        "run": ("running", None, None),
        "brief": ("succeed", None, "1s"),
    }

    def array_spec(
        self,
        array: str,
        default: str = "succeed",
        *,
        tasks: Mapping[int, str] | None = None,
        text: str = "hello",
        **fields: Any,
    ) -> JobSpec:
        """An array whose task ``i`` ends as ``tasks.get(i, default)``.  Each task asks
        for a whole kwok node (16 CPUs): two run at once, as on the local harness's
        two-CPU machine."""
        self.cluster.write_pod_log(f"{text}\n")
        outcome, code, duration = self._TASK[default]
        args = [f"kbatch-test-outcome={outcome}"]
        if code:
            args.append(f"kbatch-test-exit-code={code}")
        if duration:
            args.append(f"kbatch-test-duration={duration}")
        position = task_order(array)[1]
        for index, task in (tasks or {}).items():
            outcome, code, duration = self._TASK[task]
            k = position[index]
            args.append(f"kbatch-test-index-{k}={outcome}")
            if code:
                args.append(f"kbatch-test-exit-code-{k}={code}")
            if duration:
                args.append(f"kbatch-test-duration-{k}={duration}")
        fields.setdefault("cpus", 16)
        script = f"#!/bin/sh\necho {text}\nenv\n"
        return JobSpec(script=script, workdir="/home/jovyan", array=array, args=args, **fields)

    async def task_environment(self, backend: Backend, task_id: str) -> dict[str, str]:
        """What task ``task_id``'s script sees, its pod being kwok's: the job's entrypoint
        run by /bin/sh with its ConfigMap, its Secret's variables and its completion index."""
        array_id, _, index = task_id.partition("_")
        name = names.job_object_name(array_id)
        job = self.cluster.kubectl_json("get", "job", name, "-n", SHARED_NS)
        spec = msgspec.json.decode(job["metadata"]["annotations"][names.ANNOTATION_SPEC])
        position = task_order(spec["array"])[1][int(index)]
        data = self.cluster.kubectl_json("get", "configmap", name, "-n", SHARED_NS)["data"]
        secret = self.cluster.kubectl_json("get", "secret", name, "-n", SHARED_NS)["data"]
        with tempfile.TemporaryDirectory() as tmp:
            for key in ("entrypoint", "tasks", "array", "script"):
                (Path(tmp) / key).write_text(data[key])
            (Path(tmp) / "script").chmod(0o755)
            env = {k: base64.b64decode(v).decode() for k, v in secret.items()}
            env.update(PATH=os.environ["PATH"], JOB_COMPLETION_INDEX=str(position))
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", f"{tmp}/entrypoint", f"{tmp}/script", env=env, stdout=PIPE
            )
            output, _ = await proc.communicate()
            assert proc.returncode == 0, output
        found = (line.split("=", 1) for line in output.decode().splitlines() if "=" in line)
        return {name: value for name, value in found}

    def spec(self, outcome: str, *, text: str = "hello", **fields: Any) -> JobSpec:
        # kwok serves one log text for every pod: what this job "prints"
        self.cluster.write_pod_log(f"{text}\n")
        script = f"#!/bin/sh\necho {text}\n"
        return JobSpec(script=script, workdir="/home/jovyan", args=_OUTCOME[outcome], **fields)


@pytest.fixture
def harness(cluster: K8sCluster, shared: Installed) -> Iterator[Harness]:
    yield KubernetesHarness(cluster, shared)
    cluster.write_pod_log(DEFAULT_POD_LOG)
