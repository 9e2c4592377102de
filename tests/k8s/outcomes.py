"""How a test picks what a job's pod does on the kwok test cluster, without a job template.

kwok (tests/support/kwok_stages.yaml) reads markers in the container's command
and args; the Kubernetes backend puts ``JobSpec.args`` there, after the
entrypoint and the script.  On a real cluster the script just gets them as
arguments.  (The pod label ``kwok.x-k8s.io/test-outcome``, set through
``KubernetesConfig.job_template``, still works and wins over a marker.)

What a job prints is one text for every pod of the cluster:
``K8sCluster.write_pod_log(text)`` (the ``pod_log`` fixture restores it).
"""

from __future__ import annotations

__all__ = ["outcome_args"]

OUTCOMES = ("succeed", "fail", "oom", "running")


def outcome_args(
    outcome: str = "succeed", *, exit_code: int | None = None, duration: str | None = None
) -> list[str]:
    """``JobSpec.args`` that make the pod end so.

    ``succeed``: exit 0 (also with no marker at all); ``fail``: exit 1, or
    ``exit_code``; ``oom``: OOMKilled, exit 137; ``running``: Running until the
    pod is deleted (a cancel, a time limit).  ``duration`` (a Go duration such as
    ``"3s"``) keeps the pod Running that long before it ends.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; one of {', '.join(OUTCOMES)}")
    args = [f"kbatch-test-outcome={outcome}"]
    if exit_code is not None:
        args.append(f"kbatch-test-exit-code={exit_code}")
    if duration is not None:
        args.append(f"kbatch-test-duration={duration}")
    return args
