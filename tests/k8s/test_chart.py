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
    "per-user-admin": [
        "--set",
        "kubernetes.namespaceMode=per-user",
        "--set-json",
        'kubernetes.namespaceLabels={"pod-security.kubernetes.io/enforce":"restricted"}',
        "--set-json",
        'kubernetes.namespaceQuota={"requests.cpu":"8","count/jobs.batch":"100"}',
        "--set-json",
        'kubernetes.securityContext={"runAsNonRoot":true,"runAsUser":1000}',
        "--set-json",
        'kubernetes.jobTemplate={"spec":{"template":{"spec":{"priorityClassName":"batch"}}}}',
        "--set",
        "kubernetes.forbidRoot=true",
    ],
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
    assert k8s.namespace_mode == ("per-user" if mode.startswith("per-user") else "shared")
    if mode == "per-user-admin":
        assert k8s.namespace_labels == {"pod-security.kubernetes.io/enforce": "restricted"}
        assert k8s.namespace_quota == {"requests.cpu": "8", "count/jobs.batch": "100"}
        assert k8s.security_context == {"runAsNonRoot": True, "runAsUser": 1000}
        assert k8s.job_template["spec"]["template"]["spec"]["priorityClassName"] == "batch"
        assert k8s.forbid_root is True
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
        assert ("events", "list") in granted and ("events", "watch") not in granted
        kinds = {d["kind"] for d in roles}
        assert kinds == ({"ClusterRole"} if mode == "per-user" else {"Role"})


def test_renders_without_an_api_token(helm: Path, tmp_path: Path) -> None:
    """No jupyterhub.apiToken: the chart makes one (issue 11) rather than refusing to render."""
    import subprocess

    from tests.k8s.conftest import CHART

    out = subprocess.run(
        [str(helm), "template", "bare", str(CHART), "--namespace", SYSTEM_NS],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    import yaml

    secret = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Secret")
    assert len(secret["stringData"]["api-token"]) == 64


def test_per_user_quota_and_labels_are_made_with_the_namespace(helm: Path) -> None:
    docs = render_chart(helm, "rbac-q", *MODES["per-user-admin"])
    rules = [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"]]
    assert {"resources": ["resourcequotas"], "verbs": ["create"], "apiGroups": [""]} in rules
