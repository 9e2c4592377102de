"""The chart gives the server a volume for uploads and tells it how job pods reach it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbatch.backends.kubernetes.backend import KubernetesConfig
from kbatch.server.config import load_config
from tests.k8s.conftest import SYSTEM_NS, render_chart

pytestmark = pytest.mark.kubernetes


def test_uploads_get_a_volume_and_pods_a_way_to_the_server(
    helm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render_chart(helm, "up", "--set", "uploads.maxBytes=2G")
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "up-uploads"
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "uploads", "persistentVolumeClaim": {"claimName": "up-uploads"}} in pod[
        "volumes"
    ]
    (server,) = pod["containers"]
    assert {"name": "uploads", "mountPath": "/var/run/kbatch/uploads"} in server["volumeMounts"]
    toml = tmp_path / "kbatch.toml"
    toml.write_text(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["kbatch.toml"])
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "from-the-secret")
    config = load_config(toml, state_dir=str(tmp_path))
    assert (config.policy.max_upload_bytes, config.policy.max_upload_files) == (2 * 1024**3, 100000)
    k8s = KubernetesConfig.from_dict(config.extra["kubernetes"])
    assert k8s.transfer_url == f"http://up.{SYSTEM_NS}.svc:8000/services/kbatch"
    assert k8s.transfer_image == server["image"]  # the movers run the server's own image


def test_uploads_can_be_turned_off_or_use_an_existing_claim(helm: Path) -> None:
    off = render_chart(helm, "up", "--set", "uploads.enabled=false")
    assert not [d for d in off if d["kind"] == "PersistentVolumeClaim"]
    assert (
        "transfer_url"
        not in next(d for d in off if d["kind"] == "ConfigMap")["data"]["kbatch.toml"]
    )
    mine = render_chart(helm, "up", "--set", "uploads.existingClaim=shared-rwx")
    assert not [d for d in mine if d["kind"] == "PersistentVolumeClaim"]
    pod = next(d for d in mine if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {"name": "uploads", "persistentVolumeClaim": {"claimName": "shared-rwx"}} in pod[
        "volumes"
    ]
