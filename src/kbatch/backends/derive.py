"""What every backend derives from a spec: checks, defaults, output paths, the job's environment.

One module, so the local backend, the Kubernetes manifests and the store
cannot disagree about what ``%j`` becomes or which ``SLURM_*`` variables a job
sees.  Pure: no I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime

from kbatch.errors import SpecError
from kbatch.models import Job, JobSpec, JobState
from kbatch.patterns import check_pattern, resolve_output

__all__ = [
    "DEFAULT_NAME",
    "OutputPaths",
    "check_spec",
    "job_environment",
    "job_name",
    "output_paths",
    "pending_job",
]

DEFAULT_NAME = "job"


def check_spec(spec: JobSpec) -> None:
    """What every backend needs of a spec: an interpreter line, an absolute
    working directory, known ``%`` tokens in file patterns, no NUL bytes."""
    if not spec.script.startswith("#!"):
        raise SpecError(
            "the script has no interpreter line; make its first line one such as #!/bin/bash",
            field="script",
        )
    if spec.workdir is not None and not spec.workdir.startswith("/"):
        raise SpecError("the working directory must be an absolute path", field="workdir")
    for pattern in (spec.output, spec.error):
        if pattern is not None:
            check_pattern(pattern)


def job_name(spec: JobSpec) -> str:
    return spec.name or DEFAULT_NAME


class OutputPaths:
    """The absolute paths of a job's output and (when apart) error files."""

    __slots__ = ("error", "output")

    def __init__(self, output: str, error: str | None) -> None:
        self.output = output
        self.error = error


def output_paths(
    spec: JobSpec,
    *,
    job_id: str,
    user: str,
    array_id: str | None = None,
    task: int | None = None,
) -> OutputPaths:
    """``%j``, ``%x``, ``%u`` (and for task ``task`` of array ``array_id``, ``%A`` and
    ``%a``) resolved; relative patterns are under the working directory."""
    workdir = spec.workdir or "/"
    name = job_name(spec)

    def resolve(pattern: str | None) -> str:
        return resolve_output(
            pattern,
            workdir=workdir,
            job_id=job_id,
            name=name,
            user=user,
            array_id=array_id,
            task=task,
        )

    return OutputPaths(resolve(spec.output), None if spec.error is None else resolve(spec.error))


def job_environment(spec: JobSpec, *, job_id: str, name: str) -> dict[str, str]:
    """The variables kbatch sets in every job, Slurm's included so Slurm scripts find them.

    Backends add these on top of the user's own environment (which they cannot
    override) and their own (e.g. ``PATH`` locally, the output paths on Kubernetes).
    """
    env = {
        "KBATCH_JOB_ID": job_id,
        "KBATCH_JOB_NAME": name,
        "SLURM_JOB_ID": job_id,
        "SLURM_JOBID": job_id,
        "SLURM_JOB_NAME": name,
        "SLURM_CPUS_PER_TASK": str(spec.cpus),
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NUM_NODES": "1",
    }
    if spec.workdir:
        env["KBATCH_SUBMIT_DIR"] = env["SLURM_SUBMIT_DIR"] = spec.workdir
    if spec.memory:
        env["SLURM_MEM_PER_NODE"] = str(spec.memory // (1024 * 1024))
    return env


def pending_job(
    spec: JobSpec,
    *,
    job_id: str,
    user: str,
    backend: str,
    reason: str,
    paths: OutputPaths | None = None,
) -> Job:
    """The wire :class:`Job` of a spec that has just been accepted (or, for a dry run,
    would be): PENDING, with what it asks for."""
    return Job(
        id=job_id,
        user=user,
        name=job_name(spec),
        state=JobState.PENDING,
        reason=reason,
        submitted=datetime.now(UTC),
        workdir=spec.workdir,
        output=paths.output if paths else spec.output,
        error=paths.error if paths else spec.error,
        cpus=spec.cpus,
        memory=spec.memory,
        gpus=spec.gpus,
        time_limit=spec.time_limit,
        comment=spec.comment,
        backend=backend,
        dependency=spec.dependency,
        begin=spec.begin,
    )
