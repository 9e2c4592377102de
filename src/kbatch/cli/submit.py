"""``kbatch submit``: sbatch's options and directives in, a job id out."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from kbatch.directives import ParsedOptions, Support, help_lines, parse_tokens
from kbatch.errors import SpecError

if TYPE_CHECKING:
    import argparse

    from kbatch.client import Client
    from kbatch.models import Job, JobSpec, SweepParams

__all__ = ["exit_status", "submit", "submit_spec", "submit_words"]

# The most of a sweep's CSV the client reads; the server's policy (max_params_bytes) decides.
MAX_PARAMS_READ = 4 * 1024 * 1024

USAGE = (
    "usage: kbatch submit [OPTIONS] SCRIPT [ARGS...]\n"
    "       kbatch submit [OPTIONS] --wrap COMMAND\n"
    "       kbatch submit [OPTIONS] NOTEBOOK.ipynb [-p NAME VALUE ...] [--params-yaml FILE]\n"
)


def _help() -> str:
    lines = [USAGE, "Submit a batch script.  #SBATCH and #KBATCH lines at the top of the script"]
    lines.append("are read as options; options given here override them.\n")
    for title, supports in (
        ("job options", [Support.HONOURED]),
        ("submit options", [Support.CLI]),
    ):
        lines.append(f"{title}:")
        for flags, text in help_lines(supports):
            lines.append(f"  {flags:<34} {text}")
        lines.append("")
    ignored = ", ".join(
        f"--{flags.split('--')[1].split()[0]}" for flags, _ in help_lines([Support.IGNORED])
    )
    lines.append(
        "A NOTEBOOK.ipynb runs with papermill in the job's python3.  After its path:\n"
        "  -p NAME VALUE (typed as papermill does), -r NAME VALUE (a string),\n"
        "  --params-yaml FILE, --kernel NAME, --nb-output PATTERN.\n"
    )
    lines.append(f"accepted and ignored (they only mean something on a cluster): {ignored}")
    lines.append(
        "A sweep: --params FILE.csv runs one task per data row (task i: row i); each column\n"
        "is an environment variable of its task, and {column} (or {index}) in --wrap is\n"
        "the row's value, quoted for the shell."
    )
    return "\n".join(lines)


def _read_script(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(2 * 1024 * 1024)
    except FileNotFoundError:
        raise SpecError(f"no such script: {path}") from None
    except IsADirectoryError:
        raise SpecError(f"{path} is a directory; give a script file") from None
    except PermissionError:
        raise SpecError(f"cannot read {path}: permission denied") from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a text script (it is not UTF-8)") from None


def submit(args: argparse.Namespace) -> int:
    return submit_words(args.words)


def submit_words(words: list[str]) -> int:
    """``kbatch submit WORDS...``."""
    if "-h" in words[:1] or "--help" in words:
        # --help after the script is the script's own argument
        cut = next((i for i, w in enumerate(words) if not w.startswith("-")), len(words))
        if "-h" in words[:cut] or "--help" in words[:cut]:
            print(_help())
            return 0
    cli = parse_tokens([w for w in words if w not in ("-h",)])
    return submit_parsed(cli)


def submit_spec(client: Client, spec: JobSpec) -> Job:
    """Submit ``spec`` once, however often this is rerun before the server answers."""
    return _submit(client, spec, dry_run=False)


def exit_status(job: Job) -> int:
    """What ``--wait`` exits with: 0 if it completed, else its exit code (an array's
    highest), or 1 when that says nothing (cancelled before it started)."""
    if job.state.value == "COMPLETED":
        return 0
    return job.exit_code or 1


def _submit(client: Client, spec: JobSpec, *, dry_run: bool) -> Job:
    """Submit with a key that a rerun of this command reuses until the server answers."""
    if dry_run:
        return client.submit(spec, dry_run=True)
    from kbatch.client.journal import submission_key
    from kbatch.paths import state_dir

    with submission_key(state_dir() / "submissions", client.url, spec) as key:
        return client.submit(spec, idempotency_key=key)


def _code_path(script: str, cli: ParsedOptions, cwd: str) -> str | None:
    """``--code`` from the command line, else from a ``#SBATCH``/``#KBATCH`` line."""
    from kbatch.directives import parse_directives

    options = parse_directives(script)
    options.extend(cli)
    found = options.get("code")
    if found is None:
        return None
    if not found.value:
        raise SpecError(f"{found.describe()}: give a folder or file to upload")
    return os.path.join(cwd, os.path.expanduser(found.value))


def _with_code(client: Client, spec: JobSpec, path: str, *, quiet: bool, dry_run: bool) -> JobSpec:
    """The spec naming the upload of ``path``, uploaded now (only what the server lacks)."""
    import msgspec

    from kbatch.cli.progress import ProgressBar
    from kbatch.paths import state_dir
    from kbatch.uploads.tree import HashCache, manifest_of, walk

    files = walk(path)
    hashing = ProgressBar("hashing  ", enabled=not quiet)
    hashing.plan(len(files), sum(f.size for f in files))
    try:
        cache = HashCache.for_folder(path, state_dir() / "hashes")
        manifest = manifest_of(files, hashing, cache)
    finally:
        hashing.close()
    if dry_run:
        print(
            f"kbatch: --code {path}: {len(files)} files, {manifest.total_bytes} bytes "
            "(not uploaded: --test-only)",
            file=sys.stderr,
        )
        return spec
    sending = ProgressBar("uploading", enabled=not quiet)
    try:
        answer = client.upload_files(files, manifest, progress=sending, on_plan=sending.plan)
    finally:
        sending.close()
    return msgspec.structs.replace(spec, code=answer.id)


def _read_params(path: str) -> SweepParams:
    """A sweep's CSV file, checked as the server will (the server also applies its limit)."""
    from kbatch.arrays import parse_params

    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PARAMS_READ + 1)
    except FileNotFoundError:
        raise SpecError(f"--params: no such file: {path}") from None
    except IsADirectoryError:
        raise SpecError(f"--params: {path} is a directory; give a CSV file") from None
    except PermissionError:
        raise SpecError(f"--params: cannot read {path}: permission denied") from None
    return parse_params(data, origin=f"--params {path}", max_bytes=MAX_PARAMS_READ)


def submit_parsed(cli: ParsedOptions) -> int:
    from kbatch import notebooks
    from kbatch.client import Client
    from kbatch.spec import build_spec, default_job_name, wrap_script

    params_option = cli.get("params")
    params = _read_params(params_option.value or "") if params_option is not None else None
    wrap = cli.get("wrap")
    if wrap is not None:
        if cli.positionals:
            raise SpecError(
                f"give either a script or --wrap, not both (got script {cli.positionals[0]!r})"
            )
        script_path = None
        command = wrap.value or ""
        if params is not None or cli.get("array", "seq") is not None:
            from kbatch.arrays import substitute_columns

            command = substitute_columns(command, params.columns if params else ())
        script = wrap_script(command)
        script_args: list[str] = []
    else:
        if not cli.positionals:
            raise SpecError("no script given; use kbatch submit SCRIPT or kbatch submit --wrap CMD")
        script_path, *script_args = cli.positionals
        if notebooks.is_notebook(script_path):
            array = params is not None or cli.get("array", "seq") is not None
            script = notebooks.notebook_job_script(
                script_path,
                script_args,
                cli,
                cwd=os.getcwd(),
                sweep_columns=(tuple(params.columns) if params else ()) if array else None,
            )
            script_args = []
        else:
            script = _read_script(script_path)
    if script_path is None or not notebooks.is_notebook(script_path):
        notebooks.refuse_notebook_options(cli)
    submission = build_spec(
        script,
        cli=cli,
        args=script_args,
        cwd=os.getcwd(),
        environ=os.environ,
        default_name=default_job_name(script_path),
        ignore_unknown=cli.flag("ignore_unknown"),
        params=params,
    )
    for warning in submission.warnings:
        print(f"kbatch: warning: {warning}", file=sys.stderr)
    code_path = _code_path(script, cli, os.getcwd())
    with Client.from_config() as client:
        spec = submission.spec
        if code_path is not None:
            quiet = cli.flag("parsable") or cli.flag("json")
            spec = _with_code(client, spec, code_path, quiet=quiet, dry_run=cli.flag("test_only"))
        job = _submit(client, spec, dry_run=cli.flag("test_only"))
        if cli.flag("test_only"):
            from kbatch.cli.output import print_job

            print("kbatch: the job is valid; nothing was submitted (--test-only)", file=sys.stderr)
            print_job(job)
            return 0
        if cli.flag("json"):
            from kbatch.cli.output import print_json

            print_json(job)
        elif cli.flag("parsable"):
            print(job.id)
        else:
            print(f"Submitted batch job {job.id}")
        sys.stdout.flush()
        if cli.flag("wait"):
            return exit_status(client.wait(job.id))
    return 0
