"""The admin's policy, checked on the server for every submission.

Nothing a user sends reaches a backend before :func:`check` has passed it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from kbatch.arrays import check_params, parse_array
from kbatch.backends.userlimits import UserLimits
from kbatch.dependencies import parse_dependency
from kbatch.errors import SpecError
from kbatch.models import JobSpec
from kbatch.spec import SECRET_ENVIRONMENT
from kbatch.units import format_duration, format_memory
from kbatch.uploads.manifest import DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MAX_UPLOAD_FILES

__all__ = ["BEGIN_SLACK", "Policy", "check"]

BEGIN_SLACK = timedelta(seconds=60)  # clocks of client and server may differ a little


@dataclass(frozen=True)
class Policy:
    max_cpus: int | None = None
    max_memory: int | None = None  # bytes
    max_gpus: int | None = None
    max_time: int | None = None  # seconds
    default_time: int | None = None  # applied when the user gives no --time
    allowed_images: tuple[str, ...] = ()  # glob patterns; empty: any image
    max_script_bytes: int = 1024 * 1024
    max_env_bytes: int = 256 * 1024
    admin_groups: tuple[str, ...] = field(default=())
    # sbatch --kill-on-invalid-dep for jobs that do not say: cancel a job whose
    # dependency can never be met (True), or leave it pending with that reason.
    kill_on_invalid_dep: bool = False
    # Per user, at once (Slurm's QOS MaxJobsPerUser, MaxSubmitJobsPerUser, MaxTRESPerUser).
    # A job beyond a running limit waits PENDING with Slurm's reason; beyond the submitted
    # limit it is refused.  Enforced by the local backend (kbatch.backends.local.scheduler).
    max_running_jobs_per_user: int | None = None
    max_submitted_jobs_per_user: int | None = None  # pending + running
    max_cpus_per_user: int | None = None
    max_memory_per_user: int | None = None  # bytes; jobs must then give --mem
    max_gpus_per_user: int | None = None
    # Code upload (kbatch submit --code): the total size and number of files of one upload,
    # and of what one job leaves behind as its results.
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_upload_files: int = DEFAULT_MAX_UPLOAD_FILES
    # Arrays (issue 12): tasks in one array, its highest index, and a sweep's table size
    # (bytes of its values; the Kubernetes backend keeps it in a ConfigMap, under 1 MiB).
    max_array_tasks: int = 100_000
    max_array_index: int | None = None  # default: kbatch.arrays.MAX_INDEX
    max_params_bytes: int = 512 * 1024

    def user_limits(self) -> UserLimits:
        """The per-user limits, as the backend enforces them."""
        return UserLimits(
            max_running_jobs_per_user=self.max_running_jobs_per_user,
            max_submitted_jobs_per_user=self.max_submitted_jobs_per_user,
            max_cpus_per_user=self.max_cpus_per_user,
            max_memory_per_user=self.max_memory_per_user,
            max_gpus_per_user=self.max_gpus_per_user,
        )


def check(spec: JobSpec, policy: Policy) -> JobSpec:
    """The spec with policy defaults applied, or :class:`SpecError` naming the rule broken."""
    if policy.max_cpus is not None and spec.cpus > policy.max_cpus:
        raise SpecError(
            f"the job asks for {spec.cpus} CPUs; the limit (policy max_cpus) is {policy.max_cpus}",
            field="cpus",
        )
    if policy.max_memory is not None and (spec.memory or 0) > policy.max_memory:
        raise SpecError(
            f"the job asks for {format_memory(spec.memory)} of memory; the limit (policy "
            f"max_memory) is {format_memory(policy.max_memory)}",
            field="memory",
        )
    if policy.max_gpus is not None and spec.gpus > policy.max_gpus:
        raise SpecError(
            f"the job asks for {spec.gpus} GPUs; the limit (policy max_gpus) is {policy.max_gpus}",
            field="gpus",
        )
    _check_per_user(spec, policy)
    time_limit = spec.time_limit if spec.time_limit is not None else policy.default_time
    if policy.max_time is not None:
        if time_limit is None:
            time_limit = policy.max_time
        elif time_limit > policy.max_time:
            raise SpecError(
                f"the job asks for a time limit of {format_duration(spec.time_limit)}; the limit "
                f"(policy max_time) is {format_duration(policy.max_time)}",
                field="time_limit",
            )
    if (
        spec.image is not None
        and policy.allowed_images
        and not any(fnmatch.fnmatchcase(spec.image, p) for p in policy.allowed_images)
    ):
        raise SpecError(
            f"image {spec.image!r} is not allowed (policy allowed_images: "
            f"{', '.join(policy.allowed_images)})",
            field="image",
        )
    if len(spec.script.encode()) > policy.max_script_bytes:
        raise SpecError(
            f"the script is over the {policy.max_script_bytes}-byte limit (policy max_script_bytes)",
            field="script",
        )
    env_size = sum(len(k) + len(v) for k, v in spec.environment.items())
    if env_size > policy.max_env_bytes:
        raise SpecError(
            f"the environment is {env_size} bytes, over the {policy.max_env_bytes}-byte limit "
            "(policy max_env_bytes); use --export=NONE or a list of variables",
            field="environment",
        )
    for name in spec.environment:
        if "=" in name or "\x00" in name or not name:
            raise SpecError(f"environment variable name {name!r} is not valid", field="environment")
    environment = {k: v for k, v in spec.environment.items() if k not in SECRET_ENVIRONMENT}
    memory = spec.memory or None  # memory 0 means no limit, as the CLI's --mem=0 does
    dependency = spec.dependency
    if dependency is not None:
        dependency = str(parse_dependency(dependency))  # refused here, normalised for backends
    kill = (
        policy.kill_on_invalid_dep if spec.kill_on_invalid_dep is None else spec.kill_on_invalid_dep
    )
    if spec.begin is not None:
        if spec.begin.tzinfo is None:
            raise SpecError("begin must be a time with its zone (e.g. ...+00:00)", field="begin")
        if spec.begin < datetime.now(UTC) - BEGIN_SLACK:
            raise SpecError(
                f"begin {spec.begin.isoformat()} is in the past; give a later time, or none "
                "to start as soon as possible",
                field="begin",
            )
    array = _check_array(spec, policy)
    return msgspec.structs.replace(
        spec,
        array=array,
        time_limit=time_limit,
        environment=environment,
        memory=memory,
        dependency=dependency,
        kill_on_invalid_dep=kill if dependency is not None else None,
    )


def _check_array(spec: JobSpec, policy: Policy) -> str | None:
    """The array's indexes within the admin's limits, normalised; a sweep's table checked
    and its size limited.  A sweep without ``array`` is one task per row."""
    params = spec.params
    text = spec.array
    if params is not None:
        size = sum(len(v.encode()) + 1 for row in params.rows for v in row)
        size += sum(len(c) + 1 for c in params.columns)
        if size > policy.max_params_bytes:
            raise SpecError(
                f"the sweep's table is {size} bytes, over the {policy.max_params_bytes}-byte "
                "limit (policy max_params_bytes); split the sweep into several arrays",
                field="params",
            )
        if not params.rows:
            raise SpecError("the sweep's table has no rows; give one row per task", field="params")
        if text is None:
            text = f"0-{len(params.rows) - 1}"
    if text is None:
        return None
    request = parse_array(text, max_tasks=policy.max_array_tasks, max_index=policy.max_array_index)
    if params is not None:
        check_params(params, request.indexes, origin="the sweep's table (--params)")
    return str(request)


def _check_per_user(spec: JobSpec, policy: Policy) -> None:
    """A job that a per-user limit would hold back for ever is refused now."""
    if policy.max_cpus_per_user is not None and spec.cpus > policy.max_cpus_per_user:
        raise SpecError(
            f"the job asks for {spec.cpus} CPUs; a user may use {policy.max_cpus_per_user} at "
            "once (policy max_cpus_per_user)",
            field="cpus",
        )
    if policy.max_gpus_per_user is not None and spec.gpus > policy.max_gpus_per_user:
        raise SpecError(
            f"the job asks for {spec.gpus} GPUs; a user may use {policy.max_gpus_per_user} at "
            "once (policy max_gpus_per_user)",
            field="gpus",
        )
    if policy.max_memory_per_user is not None:
        if not spec.memory:
            raise SpecError(
                "this server limits the memory each user's jobs hold at once (policy "
                "max_memory_per_user): give the job a memory limit with --mem",
                field="memory",
            )
        if spec.memory > policy.max_memory_per_user:
            raise SpecError(
                f"the job asks for {format_memory(spec.memory)} of memory; a user may use "
                f"{format_memory(policy.max_memory_per_user)} at once (policy "
                "max_memory_per_user)",
                field="memory",
            )
