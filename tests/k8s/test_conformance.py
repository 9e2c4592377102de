"""The conformance suite (tests/conformance) run on the Kubernetes backend and the real
control plane, with a harness that picks each pod's outcome by an argument."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from kbatch.backends.base import Backend
from kbatch.models import JobSpec
from tests.conformance.harness import Harness
from tests.conformance.test_arrays import *  # noqa: F403
from tests.conformance.test_contract import *  # noqa: F403 - the suite, run here once more
from tests.conformance.test_pipelines import *  # noqa: F403
from tests.k8s.conftest import Installed
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

    def __init__(self, cluster: K8sCluster, installed: Installed) -> None:
        self.cluster = cluster
        self.installed = installed
        self.instance = f"cf-{uuid.uuid4().hex[:8]}"

    @contextlib.asynccontextmanager
    async def backend(self) -> AsyncIterator[Backend]:
        async with started(self.installed, instance=self.instance) as backend:
            yield backend

    def spec(self, outcome: str, *, text: str = "hello", **fields: Any) -> JobSpec:
        # kwok serves one log text for every pod: what this job "prints"
        self.cluster.write_pod_log(f"{text}\n")
        script = f"#!/bin/sh\necho {text}\n"
        return JobSpec(script=script, workdir="/home/jovyan", args=_OUTCOME[outcome], **fields)


@pytest.fixture
def harness(cluster: K8sCluster, shared: Installed) -> Iterator[Harness]:
    yield KubernetesHarness(cluster, shared)
    cluster.write_pod_log(DEFAULT_POD_LOG)
