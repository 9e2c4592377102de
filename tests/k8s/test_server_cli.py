"""The real server process on the Kubernetes backend, driven by the real CLI."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.manifests import TIME_LIMIT_GRACE
from tests.k8s.conftest import SHARED_NS, Installed, shared_namespace_server
from tests.support.k8s_cluster import K8sCluster
from tests.support.polling import wait_for
from tests.support.servers import KbatchServer

pytestmark = pytest.mark.kubernetes


@pytest.fixture
def k8s_server(
    tmp_path_factory: pytest.TempPathFactory, shared: Installed
) -> Iterator[KbatchServer]:
    extra = '[policy]\nmax_cpus = 2\nmax_time = "1:00:00"\n'
    with shared_namespace_server(tmp_path_factory.mktemp("k8s-srv"), shared, extra) as server:
        yield server


def jobs_in(cluster: K8sCluster) -> int:
    return len(cluster.kubectl_json("get", "jobs", "-n", SHARED_NS)["items"])


def test_submit_queue_show_logs_cancel(
    cluster: K8sCluster, k8s_server: KbatchServer, tmp_path: Path, pod_log: Callable[[str], None]
) -> None:
    pod_log("hello from the pod\n")
    result = k8s_server.cli("submit", "-J", "k8s-demo", "--wrap", "echo hi", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[-1]
    job = cluster.kubectl_json("get", "job", names.job_object_name(job_id), "-n", SHARED_NS)
    # the policy's max_time applies by default (the Job's own deadline a little later)
    assert job["spec"]["activeDeadlineSeconds"] == 3600 + TIME_LIMIT_GRACE

    def completed() -> bool:
        shown = json.loads(k8s_server.cli("show", job_id, "--json").stdout)
        return shown["state"] == "COMPLETED"

    wait_for(completed, timeout=60, what="the job to complete")
    listed = json.loads(k8s_server.cli("queue", "--all", "--json").stdout)
    assert [j["name"] for j in listed if j["id"] == job_id] == ["k8s-demo"]
    assert k8s_server.cli("logs", job_id).stdout == "hello from the pod\n"


def test_policy_refusal_creates_nothing(
    cluster: K8sCluster, k8s_server: KbatchServer, tmp_path: Path
) -> None:
    before = jobs_in(cluster)
    result = k8s_server.cli("submit", "-c", "8", "--wrap", "true", cwd=tmp_path)
    assert result.returncode == 1
    assert "limit (policy max_cpus) is 2" in result.stderr and "Traceback" not in result.stderr
    result = k8s_server.cli("submit", "-t", "2:00:00", "--wrap", "true", cwd=tmp_path)
    assert "max_time" in result.stderr
    assert jobs_in(cluster) == before


def test_other_users_jobs_are_invisible(
    cluster: K8sCluster, k8s_server: KbatchServer, tmp_path: Path
) -> None:
    alice = k8s_server.add_token("alice")
    bob = k8s_server.add_token("bob")
    job_id = k8s_server.cli(
        "submit", "--parsable", "--wrap", "true", cwd=tmp_path, env={"KBATCH_TOKEN": alice}
    ).stdout.strip()
    assert job_id
    for args in (["show", job_id], ["cancel", job_id], ["logs", job_id]):
        result = k8s_server.cli(*args, env={"KBATCH_TOKEN": bob})
        assert result.returncode != 0 and f"no job {job_id}" in result.stderr
    assert (
        json.loads(k8s_server.cli("queue", "-a", "--json", env={"KBATCH_TOKEN": bob}).stdout) == []
    )
