"""The shape of a Kubernetes job with uploaded files (--code): pure, no cluster."""

from __future__ import annotations

import pytest

from kbatch.backends.kubernetes.manifests import (
    CODE_DIR,
    CodeTransfer,
    JobContext,
    build_manifests,
)
from kbatch.errors import SpecError
from kbatch.models import JobSpec

CODE = "c" * 64
TRANSFER = CodeTransfer(
    url="http://kbatch.kbatch-system.svc:8765", image="kbatch/kbatch-server:1", token="kbj1.t"
)


def ctx(**overrides: object) -> JobContext:
    values: dict[str, object] = {
        "job_id": "abc12345",
        "user": "alice",
        "namespace": "kbatch-alice",
        "default_image": "busybox",
    }
    values.update(overrides)
    return JobContext(**values)  # type: ignore[arg-type]


def test_the_pod_downloads_before_and_hands_back_after_in_kbatchs_image() -> None:
    spec = JobSpec(script="#!/bin/sh\n./run.sh\n", workdir="/home/jovyan", code=CODE)
    made = build_manifests(spec, ctx(transfer=TRANSFER))
    pod = made.job["spec"]["template"]["spec"]
    download, sidecar = pod["initContainers"]
    (job,) = pod["containers"]
    assert job["image"] == "busybox" and job["workingDir"] == CODE_DIR
    assert {"name": "kbatch-code", "mountPath": CODE_DIR} in job["volumeMounts"]
    assert download["command"] == ["python", "-m", "kbatch.uploads.pod", "download", CODE_DIR]
    assert "restartPolicy" not in download  # an ordinary init container: the job waits for it
    assert sidecar["command"][-2:] == ["sidecar", CODE_DIR]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: told when the job ends
    for mover in (download, sidecar):
        assert mover["image"] == TRANSFER.image
        assert mover["securityContext"] == job["securityContext"]  # the files are the job's
        assert mover["envFrom"] == job["envFrom"]
    assert {"name": "kbatch-code", "emptyDir": {}} in pod["volumes"]
    env = made.secret["stringData"]
    assert env["KBATCH_CODE_DIR"] == CODE_DIR and env["KBATCH_TRANSFER_TOKEN"] == "kbj1.t"
    assert env["KBATCH_TRANSFER_URL"] == TRANSFER.url and env["KBATCH_JOB_ID"] == "abc12345"


def test_a_job_without_code_has_no_movers_and_one_with_code_needs_a_way() -> None:
    plain = build_manifests(JobSpec(script="#!/bin/sh\ntrue\n"), ctx(transfer=TRANSFER))
    pod = plain.job["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert "KBATCH_TRANSFER_TOKEN" not in plain.secret["stringData"]
    with pytest.raises(SpecError, match="cannot send uploaded files"):
        build_manifests(JobSpec(script="#!/bin/sh\ntrue\n", code=CODE), ctx())


def test_root_is_refused_in_the_movers_too() -> None:
    spec = JobSpec(script="#!/bin/sh\ntrue\n", code=CODE)
    context = ctx(transfer=TRANSFER, forbid_root=True, security_context={"runAsUser": 0})
    with pytest.raises(SpecError, match="may not run as root"):
        build_manifests(spec, context)
