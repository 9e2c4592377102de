"""What the real server on the Kubernetes backend makes of a job: the spec the dashboard
reads back (script view, resubmit) and the Job of a notebook, on the real control plane.

The server runs as the Helm chart's ServiceAccount (its RBAC, not the cluster admin's);
the objects are read with the admin's kubectl.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from kbatch import notebook_runner
from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.manifests import ENTRYPOINT
from kbatch.models import JobSpec
from tests.k8s.conftest import SHARED_NS, Installed
from tests.support.k8s_cluster import K8sCluster
from tests.support.servers import KbatchServer

pytestmark = pytest.mark.kubernetes

SECRET_VALUE = "hunter2-not-for-the-api"
SCRIPT = '#!/bin/sh\n#SBATCH --job-name=viewed\n#SBATCH --time=10:00\necho "args: $*"\n'


@pytest.fixture
def k8s_server(
    tmp_path_factory: pytest.TempPathFactory, shared: Installed
) -> Iterator[KbatchServer]:
    root = tmp_path_factory.mktemp("k8s-views")
    config = root / "kbatch.toml"
    config.write_text(
        'backend = "kubernetes"\n'
        "[kubernetes]\n"
        f'kubeconfig = "{shared.kubeconfig}"\n'
        'namespace_mode = "shared"\n'
        f'namespace = "{SHARED_NS}"\n'
        'image = "busybox:stable"\n'
    )
    server = KbatchServer(root / "s", args=["--config", str(config)])
    server.start()
    yield server
    server.stop()


def _get_spec(server: KbatchServer, job_id: str, token: str) -> httpx.Response:
    return httpx.get(
        f"{server.url.rstrip('/')}/dashboard/jobs/{job_id}/spec",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def _objects(cluster: K8sCluster, job_id: str) -> tuple[Any, Any, dict[str, str]]:
    """The Job, its ConfigMap and its Secret's decoded data, as the cluster admin reads them."""
    name = names.job_object_name(job_id)
    job = cluster.kubectl_json("get", "job", name, "-n", SHARED_NS)
    config_map = cluster.kubectl_json("get", "configmap", name, "-n", SHARED_NS)
    secret = cluster.kubectl_json("get", "secret", name, "-n", SHARED_NS)
    env = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return job, config_map, env


def test_spec_is_read_back_for_its_owner_only_and_resubmits(
    cluster: K8sCluster, k8s_server: KbatchServer, tmp_path: Path
) -> None:
    alice = k8s_server.add_token("alice")
    bob = k8s_server.add_token("bob")
    root = k8s_server.add_token("root", admin=True)
    script = tmp_path / "viewed.sh"
    script.write_text(SCRIPT)
    submitted = k8s_server.cli(
        "submit",
        "--parsable",
        "-c",
        "2",
        str(script),
        "one",
        "two words",
        cwd=tmp_path,
        env={"KBATCH_TOKEN": alice, "MY_SECRET": SECRET_VALUE},
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    # the environment did reach the job (its Secret), so leaving it out below is a choice
    assert _objects(cluster, job_id)[2]["MY_SECRET"] == SECRET_VALUE

    own = _get_spec(k8s_server, job_id, alice)
    assert own.status_code == 200, own.text
    spec = msgspec.json.decode(own.content, type=JobSpec)
    assert spec.script == SCRIPT  # from the ConfigMap, whole
    assert spec.args == ["one", "two words"]
    assert (spec.name, spec.cpus, spec.time_limit, spec.workdir) == (
        "viewed",
        2,
        600,
        str(tmp_path),
    )
    # the environment lives only in the Secret, which the server never reads back
    assert spec.environment == {} and SECRET_VALUE not in own.text

    # another user: the same 404 as for a job that does not exist, on the spec and the API
    for path in (f"dashboard/jobs/{job_id}/spec", f"api/v1/jobs/{job_id}"):
        other = httpx.get(
            f"{k8s_server.url.rstrip('/')}/{path}",
            headers={"Authorization": f"Bearer {bob}"},
            timeout=30,
        )
        assert other.status_code == 404, (path, other.text)
        assert SCRIPT not in other.text
    assert _get_spec(k8s_server, "zzzzzzzz", alice).status_code == 404
    admin = _get_spec(k8s_server, job_id, root)
    assert admin.status_code == 200 and admin.json()["script"] == SCRIPT
    assert SECRET_VALUE not in admin.text

    # resubmit: the spec read back is a valid submission, and makes the same Job
    with k8s_server.client(alice) as client:
        again = client.submit(spec)
    assert again.id != job_id and again.name == "viewed" and again.user == "alice"
    job, config_map, env = _objects(cluster, again.id)
    assert config_map["data"]["script"] == SCRIPT
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-2:] == ["one", "two words"]
    assert container["resources"]["requests"]["cpu"] == "2"
    assert "MY_SECRET" not in env


def _notebook(path: Path) -> None:
    cells = [
        {
            "cell_type": "code",
            "metadata": {"tags": ["parameters"]},
            "source": "alpha = 1\nlabel = 'x'\n",
            "outputs": [],
            "execution_count": None,
        },
        {
            "cell_type": "code",
            "metadata": {},
            "source": "print(label * alpha)\n",
            "outputs": [],
            "execution_count": None,
        },
    ]
    meta = {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}}
    path.write_text(
        json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": meta, "cells": cells})
    )


def _payload(script: str) -> dict[str, Any]:
    encoded = script.split('KBATCH_PAYLOAD = """')[1].split('"""')[0]
    payload: dict[str, Any] = notebook_runner.decode_payload(encoded)
    return payload


def test_notebook_job_shape_on_the_control_plane(
    cluster: K8sCluster, k8s_server: KbatchServer, tmp_path: Path
) -> None:
    alice = k8s_server.add_token("alice")
    work = tmp_path / "analysis"
    work.mkdir()
    _notebook(work / "nb.ipynb")
    submitted = k8s_server.cli(
        "submit",
        "--parsable",
        "nb.ipynb",
        "-p",
        "alpha",
        "3",
        "-p",
        "label",
        "ab",
        "--kernel",
        "python3-custom",
        cwd=work,
        env={"KBATCH_TOKEN": alice},
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    job, config_map, env = _objects(cluster, job_id)

    # the container runs the entrypoint on the script, which is the notebook runner
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "/kbatch/entrypoint", "/kbatch/script"]
    assert container["workingDir"] == str(work)
    assert {"name": "kbatch-script", "mountPath": "/kbatch", "readOnly": True} in container[
        "volumeMounts"
    ]
    script = config_map["data"]["script"]
    assert config_map["data"]["entrypoint"] == ENTRYPOINT
    assert script.startswith("#!/usr/bin/env python3\n")
    runner = Path(notebook_runner.__file__).read_text().rstrip()
    assert runner in script and script.rstrip().endswith("sys.exit(main(KBATCH_PAYLOAD))")

    # what the runner is told: the notebook, its kernel, its parameters, where it writes
    payload = _payload(script)
    assert payload["name"] == "nb.ipynb"
    assert payload["kernel"] == "python3-custom"
    assert payload["parameters"] == {"alpha": 3, "label": "ab"}
    assert payload["output"] == f"{work}/nb-%j.ipynb"  # beside the notebook
    sources = ["".join(c["source"]) for c in payload["notebook"]["cells"]]
    assert "print(label * alpha)\n" in sources
    # the runner expands %j from the job's environment (its Secret) to the job's id
    assert env["SLURM_JOB_ID"] == job_id
    assert notebook_runner.expand_output(payload["output"], env) == f"{work}/nb-{job_id}.ipynb"

    # the record on the Job, and what the server says of it
    recorded = json.loads(job["metadata"]["annotations"][names.ANNOTATION_SPEC])
    assert recorded["name"] == "nb.ipynb" and recorded["script"] == "-"
    shown = json.loads(k8s_server.cli("show", job_id, "--json", env={"KBATCH_TOKEN": alice}).stdout)
    assert shown["name"] == "nb.ipynb" and shown["workdir"] == str(work)
    spec = _get_spec(k8s_server, job_id, alice)
    assert spec.status_code == 200 and spec.json()["script"] == script
