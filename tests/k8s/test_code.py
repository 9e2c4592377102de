"""A job with uploaded files (--code), as the real control plane keeps and runs it: the
init container and native sidecar that move its files are accepted as built, and the
job still runs to its end with them (kwok plays the kubelet)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.manifests import CODE_DIR
from kbatch.models import JobState
from kbatch.server.blobs import BlobStore
from kbatch.uploads.manifest import FileEntry, Manifest
from tests.k8s.conftest import SHARED_NS, Installed
from tests.k8s.test_backend import anyio_backend, final, spec, started
from tests.support.k8s_cluster import K8sCluster

pytestmark = [pytest.mark.kubernetes, pytest.mark.anyio]
__all__ = ["anyio_backend"]  # the fixture, imported for this module's tests


async def test_a_job_with_code_gets_movers_and_a_token_for_itself(
    cluster: K8sCluster, shared: Installed, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "uploads")
    store.open()
    try:
        data = b"print(1)\n"
        digest = hashlib.sha256(data).hexdigest()
        await store.receive("alice", digest, _one(data), max_bytes=100)
        upload = store.commit(
            "alice", Manifest(files=[FileEntry(path="a.py", sha256=digest, size=len(data))])
        )
        assert upload.complete
        async with started(
            shared,
            transfer_url="http://kbatch.kbatch-system.svc:8765",
            transfer_image="kbatch/kbatch-server:test",
        ) as backend:
            backend.uploads = store
            assert backend.supports_code
            job = await backend.submit("alice", spec(code=upload.id), idempotency_key=None)
            kept = cluster.kubectl_json(
                "get", "job", names.job_object_name(job.id), "-n", SHARED_NS
            )
            pod = kept["spec"]["template"]["spec"]
            download, sidecar = pod["initContainers"]
            assert (download["name"], sidecar["name"]) == ("kbatch-code-in", "kbatch-results-out")
            assert sidecar["restartPolicy"] == "Always"  # the API server kept it a sidecar
            assert pod["containers"][0]["workingDir"] == CODE_DIR
            secret = cluster.kubectl_json(
                "get", "secret", names.job_object_name(job.id), "-n", SHARED_NS
            )
            token = base64.b64decode(secret["data"]["KBATCH_TRANSFER_TOKEN"]).decode()
            assert store.transfer_job(token) == job.id  # good for this job, and no other
            assert store.job_manifest(job.id) is not None  # attached before its pod asks
            done = await final(backend, job.id)
            assert done.state is JobState.COMPLETED
    finally:
        store.close()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
