"""Turning what a user typed (a script, its directives, command-line options) into a JobSpec.

Pure: the caller passes the script text, the working directory and the
environment, so this is tested without files, servers or processes.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from kbatch.arrays import check_params, parse_array
from kbatch.dependencies import parse_dependency
from kbatch.directives import OptionValue, ParsedOptions, Support, parse_directives
from kbatch.errors import SpecError
from kbatch.models import MAX_SCRIPT_BYTES, JobSpec, SweepParams
from kbatch.units import parse_begin, parse_memory, parse_time_limit

__all__ = [
    "SECRET_ENVIRONMENT",
    "Submission",
    "build_spec",
    "default_job_name",
    "export_environment",
    "wrap_script",
]

# Credentials of the submitting session never travel into a job.
SECRET_ENVIRONMENT = frozenset(
    {"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "KBATCH_TOKEN", "KBATCH_API_TOKEN"}
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GPU_COUNT = re.compile(r"^(?:[A-Za-z0-9_.\-]+:)?(\d+)$")


@dataclass
class Submission:
    """A resolved job spec and what the user should be told about it."""

    spec: JobSpec
    warnings: list[str] = field(default_factory=list)


def wrap_script(command: str) -> str:
    """The script ``sbatch --wrap`` would run."""
    return f"#!/bin/sh\n# This script was created by kbatch --wrap.\n\n{command}\n"


def export_environment(value: str, environ: Mapping[str, str], origin: str) -> dict[str, str]:
    """Slurm's ``--export``: ``ALL``, ``NONE`` or ``[ALL,]VAR[=value],...``."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise SpecError(f"--export= ({origin}) is empty; use ALL, NONE or a list of VAR[=value]")
    result: dict[str, str] = {}
    for item in items:
        upper = item.upper()
        if upper == "ALL":
            result.update(environ)
        elif upper == "NONE":
            continue
        else:
            name, eq, val = item.partition("=")
            if not _ENV_NAME.match(name):
                raise SpecError(
                    f"--export={value} ({origin}): {name!r} is not an environment variable name"
                )
            if eq:
                result[name] = val
            elif name in environ:
                result[name] = environ[name]
    return {k: v for k, v in result.items() if k not in SECRET_ENVIRONMENT}


def _int_option(value: OptionValue, *, minimum: int) -> int:
    try:
        number = int(value.value or "")
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise SpecError(f"{value.describe()}: expected a whole number of at least {minimum}")
    return number


def _gpu_count(value: OptionValue) -> int:
    """GPUs from ``--gpus=[type:]N`` or ``--gres=gpu[:type][:N]`` (a bare type means 1)."""
    text = value.value or ""
    if value.option.long == "gres":
        kinds = [part.split(":", 1) for part in text.split(",")]
        other = [part[0] for part in kinds if part[0] != "gpu"]
        if other or not kinds:
            raise SpecError(
                f"{value.describe()}: only gpu resources are understood "
                f"(not {', '.join(other)}); use --gres=gpu:N or --gpus=N"
            )
        text = kinds[0][1] if len(kinds[0]) > 1 else "1"
        if not text.rsplit(":", 1)[-1].isdigit():
            text = "1"  # --gres=gpu:a100 or a MIG profile such as gpu:1g.20gb: one GPU
    match = _GPU_COUNT.match(text)
    if match is None:
        raise SpecError(f"{value.describe()}: expected a GPU count such as 2 or a100:2")
    return int(match.group(1))


def build_spec(
    script: str,
    *,
    cli: ParsedOptions,
    args: list[str],
    cwd: str,
    environ: Mapping[str, str],
    default_name: str,
    ignore_unknown: bool = False,
    params: SweepParams | None = None,
) -> Submission:
    """Resolve a script's directives and the command line into a :class:`JobSpec`."""
    if not script.strip():
        raise SpecError("the script is empty; give a script with commands to run, or --wrap CMD")
    if len(script.encode()) > MAX_SCRIPT_BYTES:
        raise SpecError(
            f"the script is {len(script.encode())} bytes, over the {MAX_SCRIPT_BYTES}-byte limit; "
            "keep large data in files the job reads"
        )
    if "\x00" in script:
        raise SpecError("the script holds NUL bytes; submit a text script")
    options = parse_directives(script)
    options.extend(cli)
    warnings: list[str] = []

    problems: list[str] = []
    for unknown in options.unknown:
        problems.append(f"unknown option {unknown}")
    for value in options.values:
        if value.option.support is Support.DEFERRED:
            problems.append(f"{value.describe()} {value.option.help}")
        elif value.option.support is Support.IGNORED:
            warnings.append(f"ignoring {value.describe()}: {value.option.help}")
    if problems:
        if not ignore_unknown:
            raise SpecError(
                "; ".join(problems) + "; remove it, or pass --ignore-unknown to submit without it"
            )
        warnings.extend(f"ignoring {p}" for p in problems)

    def text(dest: str) -> str | None:
        found = options.get(dest)
        return found.value if found else None

    nodes = options.get("nodes")
    if nodes is not None and (nodes.value or "") not in ("1", "1-1"):
        if not ignore_unknown:
            raise SpecError(
                f"{nodes.describe()}: kbatch runs a job on one node; remove it or use --nodes=1"
            )
        warnings.append(f"ignoring {nodes.describe()}: kbatch runs a job on one node")
    ntasks = options.get("ntasks")
    if ntasks is not None and _int_option(ntasks, minimum=1) > 1:
        warnings.append(f"ignoring {ntasks.describe()}: {ntasks.option.help}")

    gpus = 0
    if (found := options.get("gpus", "gpus_per_node", "gpus_per_task", "gres")) is not None:
        gpus = _gpu_count(found)

    cpus = 1
    if (found := options.get("cpus_per_task")) is not None:
        cpus = _int_option(found, minimum=1)
    if (found := options.get("cpus_per_gpu")) is not None and gpus:
        cpus = _int_option(found, minimum=1) * gpus

    memory: int | None = None
    if (mem_option := options.get("mem", "mem_per_cpu", "mem_per_gpu")) is not None:
        size = parse_memory(mem_option.value or "", option=f"--{mem_option.option.long}")
        if mem_option.option.long == "mem-per-cpu":
            size *= cpus
        elif mem_option.option.long == "mem-per-gpu":
            size *= max(gpus, 1)
        memory = size or None  # --mem=0: no limit, as on a Slurm node of its own

    time_limit = None
    if (found := options.get("time")) is not None:
        time_limit = parse_time_limit(found.value or "")

    workdir = posixpath.normpath(posixpath.join(cwd, text("chdir") or "."))
    export_option = options.get("export")
    environment = export_environment(
        export_option.value or "" if export_option else "ALL",
        environ,
        export_option.origin if export_option else "default",
    )

    open_mode = text("open_mode") or "truncate"
    if open_mode not in ("truncate", "append"):
        raise SpecError(f"--open-mode={open_mode}: use append or truncate")

    name = text("job_name") or default_name
    if not name.strip() or len(name) > 200 or any(c in name for c in "\n\r\x00/"):
        raise SpecError(
            f"job name {name!r} is not usable; use up to 200 characters without '/' or newlines"
        )

    dependency = None
    if (found := options.get("dependency")) is not None:
        dependency = str(parse_dependency(found.value or ""))
    kill_on_invalid_dep = None
    if (found := options.get("kill_on_invalid_dep")) is not None:
        answer = (found.value or "").lower()
        if answer not in ("yes", "no"):
            raise SpecError(f"{found.describe()}: use yes or no", field="kill_on_invalid_dep")
        kill_on_invalid_dep = answer == "yes"
    begin = None
    if (found := options.get("begin")) is not None:
        begin = parse_begin(found.value or "", datetime.now().astimezone())
    array = _array(options, params)

    spec = JobSpec(
        script=script,
        args=list(args),
        name=name,
        workdir=workdir,
        output=text("output"),
        error=text("error"),
        open_mode=open_mode,
        cpus=cpus,
        memory=memory,
        gpus=gpus,
        time_limit=time_limit,
        environment=environment,
        comment=text("comment"),
        image=text("image"),
        hold=options.get("hold") is not None,
        dependency=dependency,
        kill_on_invalid_dep=kill_on_invalid_dep,
        begin=begin,
        array=array,
        params=params,
    )
    return Submission(spec=spec, warnings=warnings)


def _array(options: ParsedOptions, params: SweepParams | None) -> str | None:
    """``--array`` (or ``--seq N``), normalised; with a sweep, one task per row by default."""
    found = options.get("array")
    seq = options.get("seq")
    if found is not None and seq is not None:
        raise SpecError(
            f"give either {found.describe()} or {seq.describe()}, not both", field="array"
        )
    text: str | None = None
    if seq is not None:
        text = f"0-{_int_option(seq, minimum=1) - 1}"
    elif found is not None:
        text = found.value or ""
    elif params is not None:
        text = f"0-{len(params.rows) - 1}"
    if text is None:
        return None
    try:
        request = parse_array(text)
    except SpecError as exc:
        where = found.origin if found is not None and seq is None else "command line"
        raise SpecError(f"{exc} ({where})", field="array") from None
    if params is not None:
        check_params(params, request.indexes)
    return str(request)


def default_job_name(script_path: str | None) -> str:
    """Slurm's default: the script's file name, or ``wrap`` for ``--wrap``."""
    return os.path.basename(script_path) if script_path else "wrap"
