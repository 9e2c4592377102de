"""The Kubernetes backend's pure parts: names, manifests, notebook defaults, status mapping."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kbatch.backends.kubernetes import names
from kbatch.backends.kubernetes.manifests import (
    ENTRYPOINT,
    TIME_LIMIT_GRACE,
    JobContext,
    build_manifests,
    check_pod_security,
    merge,
    owner_reference,
    spec_digest,
)
from kbatch.backends.kubernetes.notebook import notebook_defaults
from kbatch.backends.kubernetes.status import job_from_objects, parse_time, succeeded_unrecorded
from kbatch.errors import SpecError
from kbatch.lifecycle import check_transition
from kbatch.models import JobSpec, JobState
from tests.support.polling import wait_for

SCRIPT = "#!/bin/bash\necho hi\n"


# -- names -------------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice", "bob-2", "a" * 40])
def test_safe_names_are_kept(user: str) -> None:
    assert names.safe_slug(user) == user


@pytest.mark.parametrize(
    "user",
    ["Alice", "alice@example.org", "élodie", "-x", "a--b", "a" * 80, "", "1user", "über.user@Ex"],
)
def test_unsafe_names_become_dns_labels(user: str) -> None:
    slug = names.safe_slug(user)
    assert names.is_dns_label(slug) and len(slug) <= 40


def test_slugs_never_collide() -> None:
    users = ["Alice", "alice-", "ALICE", "alice@x", "alice@y", "a" * 80, "a" * 81]
    slugs = {names.safe_slug(u) for u in users}
    assert len(slugs) == len(users)
    assert names.safe_slug("alice") != names.safe_slug("Alice")


def test_namespace_template() -> None:
    assert names.namespace_for("Ana@uni.edu", "kbatch-{username}").startswith(
        "kbatch-ana-uni-edu---"
    )
    with pytest.raises(ValueError, match="invalid name"):
        names.namespace_for("ana", "Kbatch_{username}")


def test_job_ids() -> None:
    ids = {names.new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(names.is_dns_label(i) and i[0].isalpha() and len(i) == 8 for i in ids)


# -- manifests ---------------------------------------------------------------------


def ctx(**overrides: Any) -> JobContext:
    values: dict[str, Any] = {
        "job_id": "abc12345",
        "user": "Alice@x",
        "namespace": "kbatch-alice",
        "default_image": "python:3.11",
        "output": "/home/jovyan/kbatch-abc12345.out",
        "ttl_seconds": 3600,
    }
    values.update(overrides)
    return JobContext(**values)


def test_job_manifest() -> None:
    spec = JobSpec(
        script=SCRIPT,
        args=["--x", "1"],
        name="train",
        cpus=2,
        memory=2 * 1024**3,
        gpus=1,
        time_limit=600,
        workdir="/home/jovyan/p",
        environment={"A": "1"},
    )
    m = build_manifests(spec, ctx())
    job = m.job
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == "kbatch-abc12345"
    assert job["metadata"]["labels"][names.LABEL_JOB_ID] == "abc12345"
    assert job["metadata"]["annotations"][names.ANNOTATION_USER] == "Alice@x"
    assert names.is_dns_label(job["metadata"]["labels"][names.LABEL_USER])
    js = job["spec"]
    assert (
        js["backoffLimit"] == 0
        and js["activeDeadlineSeconds"] == 600 + TIME_LIMIT_GRACE
        and js["ttlSecondsAfterFinished"] == 3600
    )
    assert js["suspend"] is True
    assert js["podFailurePolicy"]["rules"][0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget"}],
    }
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    assert container["image"] == "python:3.11"
    assert container["command"][-2:] == ["--x", "1"]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": str(2 * 1024**3)},
        "limits": {"cpu": "2", "memory": str(2 * 1024**3), "nvidia.com/gpu": "1"},
    }
    assert container["workingDir"] == "/home/jovyan/p"
    assert m.config_map["data"]["script"] == SCRIPT
    env = m.secret["stringData"]
    assert (
        env["A"] == "1" and env["KBATCH_JOB_ID"] == "abc12345" and env["SLURM_JOB_NAME"] == "train"
    )
    assert env["KBATCH_OUTPUT"] == "/home/jovyan/kbatch-abc12345.out"
    # the script and the environment are not in the Job's annotations
    assert (
        "echo hi" not in str(job)
        and '"A"' not in job["metadata"]["annotations"][names.ANNOTATION_SPEC]
    )


def test_no_limits_no_deadline() -> None:
    job = build_manifests(JobSpec(script=SCRIPT), ctx(ttl_seconds=None)).job
    assert (
        "activeDeadlineSeconds" not in job["spec"] and "ttlSecondsAfterFinished" not in job["spec"]
    )
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "1"},
        "limits": {"cpu": "1"},
    }


def test_admin_template_is_merged() -> None:
    template = {
        "spec": {
            "template": {
                "spec": {
                    "priorityClassName": "batch",
                    "containers": [{"name": "job", "imagePullPolicy": "Always"}],
                }
            }
        }
    }
    pod = build_manifests(JobSpec(script=SCRIPT), ctx(template=template)).job["spec"]["template"][
        "spec"
    ]
    assert pod["priorityClassName"] == "batch"
    assert pod["containers"][0]["imagePullPolicy"] == "Always"
    assert pod["containers"][0]["image"] == "python:3.11"  # merged, not replaced


def test_merge() -> None:
    assert merge({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"c": 3}, "l": [2]}) == {
        "a": {"b": 1, "c": 3},
        "l": [2],
    }


def test_hook_environment_wins_and_bad_keys_are_dropped() -> None:
    spec = JobSpec(
        script=SCRIPT,
        environment={"JUPYTERHUB_API_TOKEN": "users-own", "BASH_FUNC_x%%": "() { :; }"},
    )
    env = build_manifests(spec, ctx(extra_environment={"JUPYTERHUB_API_TOKEN": "jobs-own"})).secret[
        "stringData"
    ]
    assert env["JUPYTERHUB_API_TOKEN"] == "jobs-own"
    assert "BASH_FUNC_x%%" not in env


def test_owner_reference() -> None:
    ref = owner_reference({"metadata": {"name": "kbatch-x", "uid": "u-1"}})
    assert ref["kind"] == "Job" and ref["uid"] == "u-1"


@pytest.mark.parametrize(
    ("pod", "message"),
    [
        ({"hostNetwork": True}, "host network"),
        ({"serviceAccountName": "admin"}, "service account"),
        ({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}, "host paths"),
        ({"containers": [{"name": "c", "securityContext": {"privileged": True}}]}, "privileged"),
        (
            {
                "containers": [
                    {"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}
                ]
            },
            "capabilities",
        ),
    ],
)
def test_forbidden_pod_fields(pod: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        check_pod_security(pod)


# -- the notebook as defaults --------------------------------------------------------

NOTEBOOK_POD: dict[str, Any] = {
    "metadata": {
        "name": "jupyter-alice",
        "namespace": "hub",
        "labels": {"component": "singleuser-server"},
        "annotations": {"hub.jupyter.org/username": "alice"},
    },
    "spec": {
        "containers": [
            {
                "name": "notebook",
                "image": "quay.io/jupyter/scipy-notebook:2025",
                "env": [
                    {"name": "JUPYTERHUB_API_TOKEN", "value": "secret"},
                    {"name": "MEM_LIMIT", "value": "1073741824"},
                    {
                        "name": "FROM_SECRET",
                        "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                    },
                ],
                "volumeMounts": [
                    {"name": "home", "mountPath": "/home/jovyan"},
                    {"name": "token", "mountPath": "/var/run/secrets"},
                    {"name": "shm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": "home", "persistentVolumeClaim": {"claimName": "claim-alice"}},
            {"name": "token", "secret": {"secretName": "x"}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
        "nodeSelector": {"pool": "user"},
        "tolerations": [{"key": "hub.jupyter.org/dedicated", "operator": "Equal", "value": "user"}],
        "securityContext": {"fsGroup": 100},
    },
}


def test_notebook_defaults_same_namespace() -> None:
    d = notebook_defaults(NOTEBOOK_POD, same_namespace=True)
    assert d.image == "quay.io/jupyter/scipy-notebook:2025"
    assert d.environment == {"MEM_LIMIT": "1073741824"}  # no token, no secret-backed values
    assert [v["name"] for v in d.volumes] == ["home", "shm"]
    assert [m["name"] for m in d.volume_mounts] == ["home", "shm"]
    assert d.node_selector == {"pool": "user"} and d.security_context == {"fsGroup": 100}
    job = build_manifests(JobSpec(script=SCRIPT), ctx(notebook=d)).job
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == d.image
    assert {"name": "home", "mountPath": "/home/jovyan"} in pod["containers"][0]["volumeMounts"]
    assert pod["tolerations"] == d.tolerations


def test_notebook_claims_are_not_mounted_across_namespaces() -> None:
    d = notebook_defaults(NOTEBOOK_POD, same_namespace=False)
    assert [v["name"] for v in d.volumes] == ["shm"]


def test_user_image_overrides_notebook() -> None:
    d = notebook_defaults(NOTEBOOK_POD, same_namespace=True)
    job = build_manifests(JobSpec(script=SCRIPT, image="python:3.12"), ctx(notebook=d)).job
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "python:3.12"


# -- status mapping -------------------------------------------------------------------

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z", "2026-01-01T00:01:00Z"


def k8s_job(
    conditions: list[dict[str, Any]] | None = None, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    job = build_manifests(JobSpec(script=SCRIPT, name="n", cpus=2, time_limit=60), ctx()).job
    job["metadata"]["creationTimestamp"] = T0
    job["metadata"]["annotations"].update(annotations or {})
    job["status"] = {"conditions": conditions or []}
    return job


def cond(kind: str, reason: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": T2}


def pod(
    phase: str,
    *,
    waiting: str | None = None,
    terminated: dict[str, Any] | None = None,
    unschedulable: bool = False,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state = {"waiting": {"reason": waiting}}
    elif terminated is not None:
        state = {"terminated": {"startedAt": T1, **terminated}}
    elif phase == "Running":
        state = {"running": {"startedAt": T1}}
    status: dict[str, Any] = {
        "phase": phase,
        "containerStatuses": [{"name": "job", "state": state}] if state else [],
    }
    if unschedulable:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
        ]
    return {"metadata": {"name": "p", "creationTimestamp": T0}, "status": status}


@pytest.mark.parametrize(
    ("job", "pods", "state", "reason", "exit_code"),
    [
        (k8s_job(), [], JobState.PENDING, "None", None),
        (k8s_job(), [pod("Pending", unschedulable=True)], JobState.PENDING, "Unschedulable", None),
        (
            k8s_job(),
            [pod("Pending", waiting="ImagePullBackOff")],
            JobState.PENDING,
            "ImagePullBackOff",
            None,
        ),
        (k8s_job(), [pod("Running")], JobState.RUNNING, None, None),
        (
            k8s_job([cond("Complete")]),
            [pod("Succeeded", terminated={"exitCode": 0})],
            JobState.COMPLETED,
            None,
            0,
        ),
        (
            k8s_job([cond("Failed", "PodFailurePolicy")]),
            [pod("Failed", terminated={"exitCode": 3, "reason": "Error"})],
            JobState.FAILED,
            "NonZeroExitCode",
            3,
        ),
        (
            k8s_job([cond("Failed", "BackoffLimitExceeded")]),
            [pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})],
            JobState.OUT_OF_MEMORY,
            "OutOfMemory: the job went over its --mem limit",
            137,
        ),
        (
            k8s_job([cond("Failed", "DeadlineExceeded")]),
            [pod("Running")],
            JobState.TIMEOUT,
            "TimeLimit",
            None,
        ),
        (
            k8s_job([cond("Failed", "DeadlineExceeded")], {names.ANNOTATION_CANCELLED: T1}),
            [],
            JobState.CANCELLED,
            "CancelledByUser",
            None,
        ),
        (
            k8s_job([], {names.ANNOTATION_CANCELLED: T1}),
            [pod("Running")],
            JobState.RUNNING,
            "Cancelling",
            None,
        ),
        (
            k8s_job([cond("Failed", "BackoffLimitExceeded")]),
            [],
            JobState.FAILED,
            "BackoffLimitExceeded",
            None,
        ),
    ],
)
def test_status_mapping(
    job: dict[str, Any],
    pods: list[dict[str, Any]],
    state: JobState,
    reason: str | None,
    exit_code: int | None,
) -> None:
    model = job_from_objects(job, pods)
    assert (model.state, model.reason, model.exit_code) == (state, reason, exit_code)
    assert (
        model.id == "abc12345" and model.user == "Alice@x" and model.name == "n" and model.cpus == 2
    )
    if state.is_terminal:
        assert model.finished is not None


# -- the entrypoint, run for real by /bin/sh ------------------------------------------------


def run_entrypoint(
    tmp_path: Path, script: str, env: dict[str, str], *args: str
) -> subprocess.Popen[str]:
    (tmp_path / "entrypoint").write_text(ENTRYPOINT)
    job_script = tmp_path / "script"
    job_script.write_text(script)
    job_script.chmod(0o755)
    return subprocess.Popen(
        ["/bin/sh", str(tmp_path / "entrypoint"), str(job_script), *args],
        env={"PATH": os.environ["PATH"], **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_entrypoint_copies_output_and_keeps_exit_code(tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    proc = run_entrypoint(
        tmp_path,
        "#!/bin/sh\necho out $1\necho err >&2\nexit 5\n",
        {"KBATCH_OUTPUT": str(out)},
        "arg",
    )
    stdout, _ = proc.communicate(timeout=10)
    assert proc.returncode == 5
    assert "out arg" in stdout
    assert sorted(out.read_text().splitlines()) == ["err", "out arg"]


def test_entrypoint_separate_error_file_and_append(tmp_path: Path) -> None:
    out, err = tmp_path / "o", tmp_path / "e"
    out.write_text("before\n")
    env = {"KBATCH_OUTPUT": str(out), "KBATCH_ERROR": str(err), "KBATCH_OPEN_MODE": "append"}
    proc = run_entrypoint(tmp_path, "#!/bin/sh\necho out\necho err >&2\n", env)
    stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert out.read_text() == "before\nout\n" and err.read_text() == "err\n"
    assert stdout == "out\n" and stderr == "err\n"


def test_entrypoint_without_output_directory_just_runs(tmp_path: Path) -> None:
    proc = run_entrypoint(
        tmp_path, "#!/bin/sh\necho only-log\n", {"KBATCH_OUTPUT": "/nonexistent/dir/x.out"}
    )
    stdout, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and stdout == "only-log\n"


def test_entrypoint_passes_sigterm_to_the_script(tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    script = (
        "#!/bin/sh\ntrap 'echo got TERM; exit 143' TERM\necho ready\nwhile :; do sleep 0.1; done\n"
    )
    proc = run_entrypoint(tmp_path, script, {"KBATCH_OUTPUT": str(out)})
    wait_for(lambda: out.exists() and "ready" in out.read_text(), what="the script to start")
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 143
    assert "got TERM" in out.read_text()
    assert time.monotonic() - start < 5


# -- API server errors to user-facing errors ---------------------------------------------------


def test_api_errors_become_clear_statuses() -> None:
    import httpx2
    from lightkube import ApiError
    from lightkube.models.meta_v1 import Status

    from kbatch.backends.kubernetes.backend import api_error

    def status(code: int, message: str) -> ApiError:
        return ApiError(status=Status(code=code, message=message))

    cases = [
        (status(403, 'secrets "x" is forbidden: exceeded quota: q'), 403, "quota_exceeded"),
        (status(403, "jobs.batch is forbidden: User cannot create"), 403, "forbidden"),
        (status(404, "not found"), 404, "not_found"),
        (status(409, "already exists"), 409, "conflict"),
        (status(422, "Job.batch is invalid"), 422, "invalid_spec"),
        (status(500, "etcd timeout"), 503, "kubernetes_unavailable"),
        (httpx2.ConnectError("connection refused"), 503, "kubernetes_unavailable"),
    ]
    for exc, code, kind in cases:
        error = api_error(exc, "create the job")
        assert (error.status, error.code) == (code, kind), exc
        assert "create the job" in error.message or code in (404, 422)


def test_a_replacement_pod_speaks_for_the_job() -> None:
    """A pod that ran and was lost (node loss) is replaced: PENDING, and saying why."""
    lost = pod("Failed", terminated={"exitCode": 137})
    lost["status"]["reason"] = "NodeLost"
    replacement = pod("Pending", waiting="ContainerCreating")
    for pods in ([lost, replacement], [replacement, lost]):
        model = job_from_objects(k8s_job(), pods)
        assert (model.state, model.reason) == (JobState.PENDING, "PodReplaced")


def disrupted(p: dict[str, Any]) -> dict[str, Any]:
    p["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True"}]
    return p


@pytest.mark.parametrize(
    "ended",
    [
        pod("Succeeded", terminated={"exitCode": 0, "reason": "Completed"}),
        pod("Failed", terminated={"exitCode": 3, "reason": "Error"}),
        pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"}),
    ],
)
def test_an_ended_pod_before_the_jobs_condition_is_still_running(ended: dict[str, Any]) -> None:
    """Issue 11, item 1: between a pod's end and the Job controller's condition (about a
    second) the job was shown PENDING, so states went PENDING, RUNNING, PENDING, COMPLETED."""
    running = job_from_objects(k8s_job(), [pod("Running")])
    after = job_from_objects(k8s_job(), [ended])
    assert (running.state, after.state) == (JobState.RUNNING, JobState.RUNNING)
    assert after.reason is None and after.started is not None


def test_only_a_replaced_pod_steps_back_to_pending() -> None:
    lost = disrupted(pod("Failed", terminated={"exitCode": 137}))
    model = job_from_objects(k8s_job(), [lost])
    assert (model.state, model.reason) == (JobState.PENDING, "PodReplaced")
    check_transition(JobState.RUNNING, model.state, model.reason)  # a step the lifecycle allows


def test_desired_states_on_the_job() -> None:
    held = k8s_job(annotations={names.ANNOTATION_DESIRED: "hold"})
    assert job_from_objects(held, []).reason == "JobHeldUser"
    waiting = k8s_job(annotations={names.ANNOTATION_SETUP_PENDING: "hub down"})
    assert (job_from_objects(waiting, []).state, job_from_objects(waiting, []).reason) == (
        JobState.PENDING,
        "JobSetupPending",
    )
    cancelled = k8s_job(
        annotations={
            names.ANNOTATION_DESIRED: "cancel",
            names.ANNOTATION_CANCELLED: T1,
            names.ANNOTATION_CANCELLED_BY: "admin",
        }
    )
    model = job_from_objects(cancelled, [])  # suspended, never started: ended at once
    assert (model.state, model.cancelled_by, model.finished) == (
        JobState.CANCELLED,
        "admin",
        parse_time(T1),
    )
    failed = k8s_job(
        annotations={
            names.ANNOTATION_SETUP_FAILED: "no token",
            names.ANNOTATION_SETUP_FAILED_AT: T1,
        }
    )
    model = job_from_objects(failed, [])
    assert (model.state, model.reason) == (JobState.FAILED, "JobSetupFailed: no token")
    assert model.finished is not None


def test_instance_label_everywhere() -> None:
    m = build_manifests(JobSpec(script=SCRIPT, hold=True), ctx(instance="blue"))
    for obj in (m.job, m.config_map, m.secret, m.job["spec"]["template"]):
        assert obj["metadata"]["labels"][names.LABEL_INSTANCE] == "blue"
        assert obj["metadata"]["labels"][names.LABEL_MANAGED] == "kbatch"
    assert m.job["metadata"]["annotations"][names.ANNOTATION_DESIRED] == "hold"
    assert m.job["spec"]["suspend"] is True


def test_keyed_job_ids_are_deterministic_and_scoped() -> None:
    a = names.keyed_job_id("kbatch", "alice", "k1")
    assert a == names.keyed_job_id("kbatch", "alice", "k1")
    others = {
        names.keyed_job_id("kbatch", "bob", "k1"),
        names.keyed_job_id("other", "alice", "k1"),
        names.keyed_job_id("kbatch", "alice", "k2"),
        names.keyed_job_id("kbatch", "alice\0k", "1"),
    }
    assert a not in others and len(others) == 4
    assert names.is_dns_label(a, 20) and a[0].isalpha()


def test_spec_digest_tells_specs_apart() -> None:
    one = JobSpec(script=SCRIPT, environment={"A": "1"})
    assert spec_digest(one) == spec_digest(JobSpec(script=SCRIPT, environment={"A": "1"}))
    assert spec_digest(one) != spec_digest(JobSpec(script=SCRIPT, environment={"A": "2"}))


def test_a_succeeded_pod_is_completed_for_dependents_before_the_jobs_condition() -> None:
    """Jobs waiting on a job need not wait the Job controller's second: its pod says."""
    done = pod("Succeeded", terminated={"exitCode": 0})
    job = k8s_job()
    assert job_from_objects(job, [done]).state is JobState.RUNNING  # what kqueue shows
    assert succeeded_unrecorded(job, [done])
    assert not succeeded_unrecorded(job, [pod("Running")])
    assert not succeeded_unrecorded(job, [pod("Failed", terminated={"exitCode": 1})])
    assert not succeeded_unrecorded(job, [])
    # once the Job has its condition that decides, whatever the pod says
    assert not succeeded_unrecorded(k8s_job([cond("Complete")]), [done])
    assert not succeeded_unrecorded(k8s_job([cond("Failed", "DeadlineExceeded")]), [done])
    disrupted = pod("Succeeded", terminated={"exitCode": 0})
    disrupted["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True"}]
    assert not succeeded_unrecorded(job, [disrupted])
