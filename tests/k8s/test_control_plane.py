"""Smoke tests of the loopback Kubernetes control plane (tests/support/k8s_cluster.py).

The first run builds the binaries with tools/k8s/build.sh (tens of minutes
cold; cached afterwards). Set KBATCH_K8S_BIN_DIR to use prebuilt binaries.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.k8s_cluster import (
    DEFAULT_POD_LOG,
    DURATION_ANNOTATION,
    EXIT_CODE_ANNOTATION,
    OUTCOME_LABEL,
    REASON_ANNOTATION,
    K8sCluster,
    KubectlError,
)

pytestmark = pytest.mark.kubernetes

K8S_VERSION = "v1.33.13"


@pytest.fixture
def namespace(cluster: K8sCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    cluster.wait_for_default_service_account(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def job_manifest(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    backoff_limit: int = 0,
    ttl_seconds: int = 600,
) -> str:
    return json.dumps(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {
                "backoffLimit": backoff_limit,
                "ttlSecondsAfterFinished": ttl_seconds,
                "template": {
                    "metadata": {"labels": labels or {}, "annotations": annotations or {}},
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "main",
                                "image": "busybox:1.36",
                                "command": ["sh", "-c", "echo hello; exit 0"],
                                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                            }
                        ],
                    },
                },
            },
        }
    )


def create_job(cluster: K8sCluster, namespace: str, name: str, **kwargs: Any) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=job_manifest(name, **kwargs))


def wait_job(
    cluster: K8sCluster, namespace: str, name: str, condition: str, timeout: int = 60
) -> dict[str, Any]:
    cluster.kubectl(
        "wait",
        "-n",
        namespace,
        f"--for=condition={condition}",
        f"job/{name}",
        f"--timeout={timeout}s",
        timeout=timeout + 30,
    )
    job: dict[str, Any] = cluster.kubectl_json("get", "-n", namespace, f"job/{name}")
    return job


def job_pod(cluster: K8sCluster, namespace: str, name: str) -> dict[str, Any]:
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"job-name={name}")["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod: dict[str, Any] = pods[0]
    return pod


def test_versions(cluster: K8sCluster) -> None:
    version = cluster.kubectl_json("version")
    assert version["clientVersion"]["gitVersion"] == K8S_VERSION
    assert version["serverVersion"]["gitVersion"] == K8S_VERSION
    nodes = cluster.kubectl_json("get", "nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == cluster.node_names
    for node in nodes:
        assert {"type": "InternalIP", "address": "127.0.0.1"} in node["status"]["addresses"]
        assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == cluster.ports["kwok"]


def test_job_completes(cluster: K8sCluster, namespace: str) -> None:
    create_job(cluster, namespace, "ok")
    job = wait_job(cluster, namespace, "ok", "Complete")
    assert job["status"]["succeeded"] == 1
    pod = job_pod(cluster, namespace, "ok")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["spec"]["nodeName"] in cluster.node_names
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")


@pytest.mark.parametrize(
    ("outcome", "annotations", "exit_code", "reason"),
    [
        ("oom", {}, 137, "OOMKilled"),
        ("oom", {EXIT_CODE_ANNOTATION: "42"}, 42, "OOMKilled"),
        ("fail", {EXIT_CODE_ANNOTATION: "3", REASON_ANNOTATION: "Error"}, 3, "Error"),
    ],
)
def test_job_fails(
    cluster: K8sCluster,
    namespace: str,
    outcome: str,
    annotations: dict[str, str],
    exit_code: int,
    reason: str,
) -> None:
    create_job(cluster, namespace, "bad", labels={OUTCOME_LABEL: outcome}, annotations=annotations)
    job = wait_job(cluster, namespace, "bad", "Failed")
    failed = [c for c in job["status"]["conditions"] if c["type"] == "Failed"]
    assert failed[0]["reason"] == "BackoffLimitExceeded"
    assert job["status"]["failed"] == 1
    pod = job_pod(cluster, namespace, "bad")
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (exit_code, reason)


def test_run_duration(cluster: K8sCluster, namespace: str) -> None:
    start = time.monotonic()
    create_job(cluster, namespace, "slow", annotations={DURATION_ANNOTATION: "3s"})
    cluster.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=jsonpath={.status.phase}=Running",
        "pod",
        "-l",
        "job-name=slow",
        "--timeout=30s",
    )
    assert cluster.kubectl_json("get", "-n", namespace, "job/slow")["status"].get("active") == 1
    wait_job(cluster, namespace, "slow", "Complete")
    assert time.monotonic() - start >= 3


def test_ttl_after_finished(cluster: K8sCluster, namespace: str) -> None:
    create_job(cluster, namespace, "ttl", ttl_seconds=0)
    cluster.kubectl("wait", "-n", namespace, "--for=delete", "job/ttl", "--timeout=60s")


def test_other_outcome_keeps_running(cluster: K8sCluster, namespace: str) -> None:
    create_job(cluster, namespace, "forever", labels={OUTCOME_LABEL: "running"})
    cluster.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=jsonpath={.status.phase}=Running",
        "pod",
        "-l",
        "job-name=forever",
        "--timeout=30s",
    )
    # Nothing ends it; deleting the Job (as scancel would) removes its pod.
    cluster.kubectl(
        "delete", "-n", namespace, "job/forever", "--cascade=foreground", "--timeout=60s"
    )
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=forever")["items"]
    assert pods == []


def test_pod_logs(cluster: K8sCluster, namespace: str) -> None:
    create_job(cluster, namespace, "logs")
    wait_job(cluster, namespace, "logs", "Complete")
    # kwok serves the ClusterLogs file for every container; not the command's output.
    assert cluster.kubectl("logs", "-n", namespace, "job/logs").stdout == DEFAULT_POD_LOG
    cluster.write_pod_log("line one\nline two\n")
    try:
        assert cluster.kubectl("logs", "-n", namespace, "job/logs").stdout == "line one\nline two\n"
        assert (
            cluster.kubectl("logs", "-n", namespace, "job/logs", "--tail=1").stdout == "line two\n"
        )
    finally:
        cluster.write_pod_log(DEFAULT_POD_LOG)


def test_service_account_rbac(cluster: K8sCluster, namespace: str) -> None:
    other = f"{namespace}-other"
    cluster.kubectl("create", "namespace", other)
    try:
        sa_kubeconfig = cluster.service_account_kubeconfig("submitter", namespace)
        cluster.kubectl(
            "create",
            "role",
            "jobs",
            "-n",
            namespace,
            "--verb=get,list,watch,create,delete",
            "--resource=jobs",
        )
        cluster.kubectl(
            "create",
            "rolebinding",
            "jobs",
            "-n",
            namespace,
            "--role=jobs",
            f"--serviceaccount={namespace}:submitter",
        )
        who = cluster.kubectl_json("auth", "whoami", kubeconfig=sa_kubeconfig)
        assert (
            who["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:submitter"
        )

        # allowed inside the Role's namespace (the kubeconfig's default namespace)
        cluster.kubectl("create", "-f", "-", input=job_manifest("sa-job"), kubeconfig=sa_kubeconfig)
        listed = cluster.kubectl_json("get", "jobs", kubeconfig=sa_kubeconfig)
        assert [j["metadata"]["name"] for j in listed["items"]] == ["sa-job"]

        # forbidden outside it
        denied = [
            cluster.kubectl("get", "jobs", "-n", other, kubeconfig=sa_kubeconfig, check=False),
            cluster.kubectl("get", "pods", kubeconfig=sa_kubeconfig, check=False),
            cluster.kubectl("get", "nodes", kubeconfig=sa_kubeconfig, check=False),
        ]
        for proc in denied:
            assert proc.returncode != 0
            assert "forbidden" in proc.stderr.lower(), proc.stderr
        can_i = cluster.kubectl(
            "auth", "can-i", "create", "jobs", "-n", other, kubeconfig=sa_kubeconfig, check=False
        )
        assert can_i.stdout.strip() == "no"
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_kubectl_failure_is_reported(cluster: K8sCluster) -> None:
    with pytest.raises(KubectlError) as info:
        cluster.kubectl("get", "job", "does-not-exist", "-n", "default")
    assert isinstance(info.value, subprocess.CalledProcessError)
    assert "NotFound" in info.value.stderr
    assert "NotFound" in str(info.value)
