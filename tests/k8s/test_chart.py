"""The Helm chart: rendered by real helm, every object accepted by the real API server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kbatch.server.config import load_config
from tests.k8s.conftest import SYSTEM_NS, render_chart
from tests.support.k8s_cluster import K8sCluster

pytestmark = pytest.mark.kubernetes

MODES = {
    "shared": ["--set", "kubernetes.namespace=kbatch-jobs"],
    "per-user": ["--set", "kubernetes.namespaceMode=per-user"],
    "policy": [
        "--set",
        "policy.maxCpus=4",
        "--set",
        "policy.maxMemory=16G",
        "--set",
        "policy.maxTime=1-00:00:00",
        "--set",
        "policy.allowedImages={quay.io/jupyter/*}",
        "--set",
        "jupyterhub.adminGroups={hpc-admins}",
    ],
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_object_is_accepted_by_the_api_server(
    cluster: K8sCluster, helm: Path, mode: str
) -> None:
    docs = render_chart(helm, f"dry-{mode}", *MODES[mode])
    kinds = sorted(str(d["kind"]) for d in docs)
    for needed in ("ConfigMap", "Deployment", "Secret", "Service", "ServiceAccount"):
        assert needed in kinds
    cluster.kubectl("create", "namespace", SYSTEM_NS, check=False)
    cluster.kubectl("create", "namespace", "kbatch-jobs", check=False)
    result = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
    )
    assert result.stdout.count("(server dry run)") == len(docs)


def _config_of(docs: list[dict[str, Any]], tmp_path: Path) -> Path:
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    path = tmp_path / "kbatch.toml"
    path.write_text(config_map["data"]["kbatch.toml"])
    return path


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rendered_config_is_what_the_server_reads(
    helm: Path, tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "from-the-secret")  # as the Deployment passes it
    config = load_config(
        _config_of(render_chart(helm, "cfg", *MODES[mode]), tmp_path), state_dir=str(tmp_path)
    )
    assert (config.backend, config.auth, config.prefix) == (
        "kubernetes",
        "jupyterhub",
        "/services/kbatch",
    )
    from kbatch.backends.kubernetes.backend import KubernetesConfig

    k8s = KubernetesConfig.from_dict(config.extra["kubernetes"])
    assert k8s.namespace_mode == ("per-user" if mode == "per-user" else "shared")
    assert k8s.instance == "cfg"  # the release name: two releases never share jobs
    if mode == "policy":
        assert (config.policy.max_cpus, config.policy.max_memory) == (4, 16 * 1024**3)
        assert config.policy.max_time == 86400 and config.policy.allowed_images == (
            "quay.io/jupyter/*",
        )


def test_rbac_is_least_privilege(helm: Path) -> None:
    for mode in ("shared", "per-user"):
        docs = render_chart(helm, "rbac", *MODES[mode])
        roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
        rules: list[Any] = [rule for role in roles for rule in role["rules"]]
        granted = {
            (res, verb) for rule in rules for res in rule["resources"] for verb in rule["verbs"]
        }
        assert ("secrets", "get") not in granted and ("secrets", "list") not in granted
        assert not any("*" in (res, verb) for res, verb in granted)
        assert (("namespaces", "create") in granted) == (mode == "per-user")
        kinds = {d["kind"] for d in roles}
        assert kinds == ({"ClusterRole"} if mode == "per-user" else {"Role"})
