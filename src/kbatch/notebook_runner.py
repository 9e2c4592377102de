"""Runs a notebook inside a kbatch job; ``kbatch submit NOTEBOOK.ipynb`` makes a script of it.

The script of a notebook job is this module's source, then the payload (the
notebook, its parameters, kernel and output pattern: JSON in base64) and a
call to :func:`main`.  It is self-contained on purpose: the job's ``python3``
(the user's environment, or an image on Kubernetes) need not have kbatch
installed, only papermill and the notebook's kernel.  It runs on Python 3.8+.

Papermill executes the notebook: it injects the parameters as a cell after
the one tagged ``parameters``, saves the executed notebook after each cell,
and on an error still writes the partial notebook before raising.  This
module adds what a batch job needs around it: a missing kernel fails at once,
the log shows each cell's start, end and elapsed time and the cells' own
output as it comes, and a failing cell ends the job with a non-zero exit code
and the cell's number and error in the log.

Parameters come from the payload, then from the JSON object in the
``KBATCH_NOTEBOOK_PARAMETERS`` environment variable, if set: that is how each
task of an array will get its own row of a sweep.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

__all__ = [
    "EXIT_CELL_FAILED",
    "EXIT_SETUP_FAILED",
    "PARAMETERS_ENV",
    "RunnerError",
    "decode_payload",
    "encode_payload",
    "expand_output",
    "main",
    "merge_parameters",
    "parse_value",
]

PARAMETERS_ENV = "KBATCH_NOTEBOOK_PARAMETERS"
# Where a one-line reason for a failure goes, when the backend asks for one.
REASON_FILE_ENV = "KBATCH_REASON_FILE"
EXIT_CELL_FAILED = 1
EXIT_SETUP_FAILED = 2
PAYLOAD_VERSION = 1
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TOKEN = re.compile(r"%(\d*)([a-zA-Z%])")


class RunnerError(Exception):
    """Why the notebook could not be run at all (before any cell ran)."""


def encode_payload(payload: Mapping[str, Any]) -> str:
    """The payload as base64 lines, for the script."""
    data = base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()
    return "\n".join(data[i : i + 76] for i in range(0, len(data), 76))


def decode_payload(text: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(base64.b64decode("".join(text.split())))
    if payload.get("version") != PAYLOAD_VERSION:
        raise RunnerError(
            f"this job's script holds payload version {payload.get('version')!r}; "
            f"this runner reads version {PAYLOAD_VERSION}"
        )
    return payload


def expand_output(pattern: str, environ: Mapping[str, str]) -> str:
    """``%j %J`` job id, ``%x`` name, ``%u`` user, ``%A``/``%a`` array job/task, ``%N``, ``%%``.

    The same tokens as :func:`kbatch.patterns.expand_pattern`, read from the
    job's environment (this module cannot import kbatch).
    """
    job_id = environ.get("SLURM_JOB_ID") or environ.get("KBATCH_JOB_ID") or "0"
    values = {
        "j": job_id,
        "J": job_id,
        "A": environ.get("SLURM_ARRAY_JOB_ID") or job_id,
        "a": environ.get("SLURM_ARRAY_TASK_ID") or "0",
        "x": environ.get("SLURM_JOB_NAME") or environ.get("KBATCH_JOB_NAME") or "notebook",
        "u": environ.get("USER") or environ.get("LOGNAME") or "user",
        "N": environ.get("HOSTNAME") or "localhost",
        "%": "%",
    }

    def substitute(match: re.Match[str]) -> str:
        width, letter = match.groups()
        if letter not in values:
            raise RunnerError(f"output pattern {pattern!r}: %{letter} is not known")
        value = values[letter]
        return value.zfill(int(width)) if width and letter != "%" else value

    return _TOKEN.sub(substitute, pattern)


def parse_value(text: str) -> Any:
    """A ``-p`` value typed as papermill types it: True/False, None, int, float, else str."""
    if text == "True":
        return True
    if text == "False":
        return False
    if text == "None":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def merge_parameters(payload: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The payload's parameters, then a sweep task's row (its columns are variables of the
    task, typed as ``-p`` values are), then those in ``KBATCH_NOTEBOOK_PARAMETERS``."""
    parameters: dict[str, Any] = dict(payload.get("parameters") or {})
    for column in payload.get("sweep") or ():
        if column in environ:
            parameters[column] = parse_value(environ[column])
    extra = environ.get(PARAMETERS_ENV)
    if extra:
        try:
            values = json.loads(extra)
        except ValueError as exc:
            raise RunnerError(f"{PARAMETERS_ENV} is not JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise RunnerError(f"{PARAMETERS_ENV} must be a JSON object of NAME: value")
        known: list[str] | None = payload.get("known")
        unknown = sorted(k for k in values if known is None or k not in known)
        if unknown:
            raise RunnerError(
                f"{PARAMETERS_ENV} names unknown parameter(s) {', '.join(unknown)}; "
                f"the notebook's parameters cell assigns: {', '.join(known or []) or 'nothing'}"
            )
        parameters.update(values)
    return parameters


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class _Progress:
    """Cell-by-cell lines in the job's log, numbered as in the submitted notebook."""

    def __init__(self, out: IO[str], total: int, injected_at: int | None) -> None:
        self.out = out
        self.total = total
        self.injected_at = injected_at  # index of papermill's parameters cell, if any
        self.started = time.monotonic()
        self.cell_started = self.started
        self.failed: str | None = None  # "cell 5 (In [4])"

    def label(self, index: int) -> str:
        if self.injected_at is None or index < self.injected_at:
            return f"cell {index + 1}/{self.total}"
        if index == self.injected_at:
            return "injected parameters"
        return f"cell {index}/{self.total}"

    def say(self, text: str) -> None:
        self.out.flush()
        self.out.write(f"kbatch: {text} [elapsed {_clock(time.monotonic() - self.started)}]\n")
        self.out.flush()

    def on_cell_execute(self, cell: Any, cell_index: int, **_: Any) -> None:
        self.cell_started = time.monotonic()
        self.say(f"{self.label(cell_index)} started")

    def on_cell_executed(self, cell: Any, cell_index: int, execute_reply: Any, **_: Any) -> None:
        took = time.monotonic() - self.cell_started
        status = (execute_reply or {}).get("content", {}).get("status", "ok")
        if status == "error":
            content = execute_reply["content"]
            count = cell.get("execution_count")
            where = self.label(cell_index).split("/")[0]
            self.failed = f"{where} (In [{count}])" if count else where
            self.say(
                f"{self.label(cell_index)} FAILED after {took:.1f}s: "
                f"{content.get('ename')}: {content.get('evalue')}"
            )
        else:
            self.say(f"{self.label(cell_index)} finished in {took:.1f}s")


def _fail(message: str, environ: Mapping[str, str]) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"kbatch: {message}\n")
    sys.stderr.flush()
    reason_file = environ.get(REASON_FILE_ENV)
    if reason_file:
        try:
            with open(reason_file, "w") as handle:
                handle.write(message.splitlines()[0][:1000] + "\n")
        except OSError:
            pass


def _missing_papermill(exc: ImportError) -> str:
    return (
        f"papermill is not installed in the job's Python ({sys.executable}): {exc}; "
        "install it there (pip install papermill, or '/path/to/kbatch-checkout[notebooks]')"
    )


def _check_kernel(kernel: str) -> str:
    """The kernel's language; a missing kernel fails here, before anything runs."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError as exc:
        raise RunnerError(_missing_papermill(exc)) from exc

    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(kernel)
    except NoSuchKernel:
        installed = ", ".join(sorted(manager.find_kernel_specs())) or "none"
        raise RunnerError(
            f"the notebook's kernel {kernel!r} is not installed where the job runs "
            f"(installed kernels: {installed}); install it in the job's environment "
            f"(e.g. python3 -m ipykernel install --user --name {kernel}) "
            "or submit with --kernel NAME"
        ) from None
    return str(spec.language or "")


def _check_output(path: str) -> None:
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise RunnerError(
            f"cannot write the executed notebook to {path}: {directory} does not exist "
            "where the job runs; give --nb-output a directory the job sees"
        )
    if not os.access(directory, os.W_OK):
        raise RunnerError(f"cannot write the executed notebook to {path}: {directory} is read-only")


def _kernel_groups() -> list[int]:
    """Process groups led by this process's children: the kernel's (jupyter_client starts
    it in a session of its own, out of the job's process group)."""
    groups: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return groups
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[1]) == os.getpid() and int(fields[2]) == int(entry) != os.getpgrp():
            groups.append(int(entry))
    return groups


def _stop_kernels(grace: float = 1.0) -> None:
    """End the kernel and what it started, as the job's process group is being ended."""
    groups = _kernel_groups()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(OSError):
                os.killpg(group, sig)
        deadline = time.monotonic() + grace
        while groups and time.monotonic() < deadline:
            _reap()
            groups = [g for g in groups if _alive(g)]
            time.sleep(0.02)
        if not groups:
            return


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except OSError:
        return False
    return True


def _on_signal(signum: int, frame: object) -> None:
    """Cancelled or out of time: the kernel goes with the job, then the job ends."""
    sys.stdout.flush()
    sys.stderr.write(f"kbatch: stopping the notebook: signal {signum}\n")
    sys.stderr.flush()
    _stop_kernels()
    os._exit(128 + signum)


def _run(payload: dict[str, Any], environ: Mapping[str, str]) -> int:
    name = str(payload["name"])
    kernel = str(payload["kernel"])
    parameters = merge_parameters(payload, environ)
    output = os.path.abspath(expand_output(str(payload["output"]), environ))
    _check_output(output)
    kernel_language = _check_kernel(kernel)  # before papermill's slow import: fail at once
    language = payload.get("language") or kernel_language
    try:
        import nbformat
        import papermill
        from papermill.exceptions import PapermillExecutionError
    except ImportError as exc:
        raise RunnerError(_missing_papermill(exc)) from exc

    nb = nbformat.from_dict(payload["notebook"])  # type: ignore[no-untyped-call]
    injected_at: int | None = None
    if parameters:
        tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        injected_at = tagged[0] + 1 if tagged else 0
    progress = _Progress(sys.stdout, len(nb.cells), injected_at)
    progress.say(
        f"running {name} ({len(nb.cells)} cells, kernel {kernel}) with papermill "
        f"{papermill.__version__}; the executed notebook goes to {output}"
    )
    if parameters:
        shown = ", ".join(f"{k}={v!r}" for k, v in parameters.items())
        progress.say(f"parameters: {shown}")
    try:
        papermill.execute_notebook(
            nb,
            output.replace("{", "{{").replace("}", "}}"),  # papermill formats paths
            parameters=parameters or None,
            kernel_name=kernel,
            language=language,
            request_save_on_cell_execute=True,
            progress_bar=False,
            log_output=False,
            stdout_file=sys.stdout,
            stderr_file=sys.stderr,
            on_cell_execute=progress.on_cell_execute,
            on_cell_executed=progress.on_cell_executed,
        )
    except PapermillExecutionError as exc:
        where = progress.failed or f"In [{exc.exec_count}]"
        trace = _ANSI.sub("", "\n".join(exc.traceback or []))
        sys.stdout.flush()
        sys.stderr.write(f"{trace}\n")
        _fail(
            f"{name} failed at {where}: {exc.ename}: {exc.evalue}\n"
            f"kbatch: the partial executed notebook is {output}",
            environ,
        )
        return EXIT_CELL_FAILED
    except Exception as exc:  # noqa: BLE001 - the kernel died, a timeout: what ran is saved
        where = f" during {progress.failed}" if progress.failed else ""
        _fail(
            f"{name} stopped{where}: {type(exc).__name__}: {exc}\n"
            f"kbatch: the partial executed notebook is {output}",
            environ,
        )
        return EXIT_CELL_FAILED
    progress.say(f"{name} completed; the executed notebook is {output}")
    return 0


def main(
    payload_text: str, environ: Mapping[str, str] | None = None, *, handle_signals: bool = True
) -> int:
    """Run the notebook in the payload; the exit code of the job."""
    env = os.environ if environ is None else environ
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _on_signal)
    try:
        return _run(decode_payload(payload_text), env)
    except RunnerError as exc:
        _fail(str(exc), env)
        return EXIT_SETUP_FAILED
