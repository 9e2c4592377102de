"""A real control plane for the Kubernetes tests, and the kbatch chart's RBAC installed on it.

The backend under test authenticates as the ServiceAccount the Helm chart
creates, with exactly the RBAC the chart grants: never as the cluster admin.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.k8s_cluster import DEFAULT_POD_LOG, K8sCluster, k8s_cluster
from tests.support.servers import KbatchServer
from tests.support.tools import installed

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kbatch"
SYSTEM_NS = "kbatch-system"
SHARED_NS = "kbatch-jobs"
HUB_NS = "hub"


@pytest.fixture(scope="session")
def cluster() -> Iterator[K8sCluster]:
    with k8s_cluster(nodes=2) as c:
        yield c


@pytest.fixture
def pod_log(cluster: K8sCluster) -> Iterator[Callable[[str], None]]:
    """Set what every container's log says (kwok serves one text); restored afterwards."""
    yield cluster.write_pod_log
    cluster.write_pod_log(DEFAULT_POD_LOG)


@pytest.fixture(scope="session")
def helm() -> Path:
    return installed("helm/build.sh")


def render_chart(helm: Path, release: str, *values: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            str(helm),
            "template",
            release,
            str(CHART),
            "--namespace",
            SYSTEM_NS,
            "--set",
            "jupyterhub.apiToken=test-token",
            *values,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@dataclass
class Installed:
    release: str
    kubeconfig: Path
    documents: list[dict[str, Any]]


def _install(cluster: K8sCluster, helm: Path, release: str, *values: str) -> Installed:
    docs = render_chart(helm, release, *values)
    namespaces = {SYSTEM_NS, SHARED_NS, HUB_NS}
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                    for ns in sorted(namespaces)
                ],
            }
        )
    )
    # The chart's ServiceAccount and RBAC, for real; the rest is dry-run tested elsewhere.
    rbac = [
        d
        for d in docs
        if d["kind"]
        in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    cluster.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}))
    for ns in sorted(namespaces):
        cluster.wait_for_default_service_account(ns)
    kubeconfig = cluster.service_account_kubeconfig(
        release, SYSTEM_NS, create=False, duration="24h"
    )
    return Installed(release, kubeconfig, docs)


@pytest.fixture(scope="session")
def shared(cluster: K8sCluster, helm: Path) -> Installed:
    """The chart in shared mode: every job in SHARED_NS, notebooks looked up in HUB_NS."""
    return _install(
        cluster,
        helm,
        "kbatch",
        "--set",
        f"kubernetes.namespace={SHARED_NS}",
        "--set",
        f"kubernetes.notebookNamespace={HUB_NS}",
    )


@pytest.fixture(scope="session")
def per_user(cluster: K8sCluster, helm: Path) -> Installed:
    """The chart in per-user mode: a namespace per user, created on demand."""
    return _install(cluster, helm, "kbatch-pu", "--set", "kubernetes.namespaceMode=per-user")


@contextlib.contextmanager
def shared_namespace_server(
    root: Path, shared: Installed, extra: str = ""
) -> Iterator[KbatchServer]:
    """A real ``kbatch server`` on the kubernetes backend in the chart's shared namespace
    (``extra``: more of its kbatch.toml, e.g. a [policy] section), stopped afterwards."""
    config = root / "kbatch.toml"
    config.write_text(
        'backend = "kubernetes"\n'
        "[kubernetes]\n"
        f'kubeconfig = "{shared.kubeconfig}"\n'
        'namespace_mode = "shared"\n'
        f'namespace = "{SHARED_NS}"\n'
        'image = "busybox:stable"\n' + extra
    )
    server = KbatchServer(root / "s", args=["--config", str(config)])
    server.start()
    try:
        yield server
    finally:
        server.stop()
