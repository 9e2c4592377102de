"""Notebooks as batch jobs: ``kbatch submit NOTEBOOK.ipynb [-p NAME VALUE ...]``.

The client reads the notebook only to check it (JSON, nbformat 4, a kernel,
a cell tagged ``parameters`` when parameters are given, no unknown parameter
name) and turns it into an ordinary batch script: the source of
:mod:`kbatch.notebook_runner` followed by the notebook and its parameters as
base64 JSON.  The job's own ``python3`` runs it with papermill, so the notebook
travels with the job and runs wherever the job runs.

Words after the notebook's path are papermill's: ``-p NAME VALUE`` (typed as
papermill types them), ``-r NAME VALUE`` (kept as a string), ``--params-yaml
FILE``, ``--kernel NAME`` and ``--nb-output PATTERN``.  Before the path,
``-p`` stays Slurm's ``--partition``.

Pure but for reading the notebook and the YAML file; ``yaml`` is imported only
when ``--params-yaml`` is used (the optional ``notebooks`` extra of the distribution ``jupyterhub-kbatch``).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kbatch.directives import ParsedOptions
from kbatch.errors import SpecError
from kbatch.models import MAX_SCRIPT_BYTES
from kbatch.notebook_runner import parse_value
from kbatch.patterns import check_pattern

if TYPE_CHECKING:
    import ast

__all__ = [
    "NOTEBOOK_OPTIONS",
    "Notebook",
    "NotebookArgs",
    "build_notebook_script",
    "is_notebook",
    "load_params_yaml",
    "notebook_job_script",
    "parameter_names",
    "parse_notebook",
    "parse_notebook_words",
    "parse_value",
    "refuse_notebook_options",
    "resolve_parameters",
]

MAX_NOTEBOOK_READ = 64 * 1024 * 1024  # read at most this much; larger is refused anyway
# Options of the option table that only mean something for a notebook.
NOTEBOOK_OPTIONS = ("kernel", "nb_output", "params_yaml")
_R_ASSIGN = re.compile(r"^\s*([A-Za-z_.][A-Za-z0-9_.]*)\s*(?:<-|=(?!=))")


def is_notebook(path: str) -> bool:
    return path.endswith(".ipynb")


@dataclass
class NotebookArgs:
    """What followed the notebook's path on the command line."""

    parameters: list[tuple[str, Any]] = field(default_factory=list)
    params_yaml: str | None = None
    kernel: str | None = None
    output: str | None = None


@dataclass(frozen=True)
class Notebook:
    """A checked notebook: its content, kernel, language and parameters cell."""

    name: str
    content: dict[str, Any]
    kernel: str | None
    language: str | None
    parameters_cell: int | None  # index of the first cell tagged ``parameters``
    known: tuple[str, ...] | None  # names the parameters cell assigns


_AFTER_HELP = (
    "after a notebook's path come only -p NAME VALUE, -r NAME VALUE, --params-yaml FILE, "
    "--kernel NAME and --nb-output PATTERN; give job options such as --mem before the notebook"
)


def parse_notebook_words(words: list[str]) -> NotebookArgs:
    """The words after the notebook's path, papermill's way."""
    args = NotebookArgs()
    index = 0

    def take(count: int, what: str) -> list[str]:
        nonlocal index
        if index + count > len(words):
            raise SpecError(f"{words[index - 1]} needs {what}")
        taken = words[index : index + count]
        index += count
        return taken

    while index < len(words):
        word = words[index]
        index += 1
        flag, eq, inline = word.partition("=")
        if word in ("-p", "--parameters", "-r", "--parameters-raw", "--parameters_raw"):
            name, value = take(2, "a NAME and a VALUE")
            raw = word in ("-r", "--parameters-raw", "--parameters_raw")
            args.parameters.append((name, value if raw else parse_value(value)))
        elif flag in ("--params-yaml", "--kernel", "-k", "--nb-output"):
            value = inline if eq else take(1, "a value")[0]
            if flag == "--params-yaml":
                args.params_yaml = value
            elif flag == "--nb-output":
                args.output = value
            else:
                args.kernel = value
        else:
            raise SpecError(f"{word!r}: {_AFTER_HELP}")
    return args


def _tags(cell: dict[str, Any]) -> list[str]:
    metadata = cell.get("metadata")
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def parameter_names(source: str, language: str | None) -> list[str]:
    """The names a parameters cell assigns at its top level, in order."""
    names: list[str] = []
    if (language or "python").lower() == "python":
        kept = [
            "" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()
        ]
        import ast  # only for a notebook: `kbatch submit script.sh` does without it

        try:
            tree = ast.parse("\n".join(kept))
        except SyntaxError:
            tree = None
        if tree is not None:
            for node in tree.body:
                targets: list[ast.expr] = []
                if isinstance(node, ast.Assign):
                    targets = list(node.targets)
                elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                    targets = [node.target]
                for target in targets:
                    elements = target.elts if isinstance(target, ast.Tuple | ast.List) else [target]
                    names += [e.id for e in elements if isinstance(e, ast.Name)]
            return list(dict.fromkeys(names))
    for line in source.splitlines():
        match = _R_ASSIGN.match(line)
        if match:
            names.append(match.group(1))
    return list(dict.fromkeys(names))


def parse_notebook(data: bytes, path: str, *, kernel: str | None = None) -> Notebook:
    """Check a notebook's bytes: JSON, nbformat 4, well-formed cells; find its parameters."""
    name = os.path.basename(path)
    try:
        content = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a notebook: it is not UTF-8 text") from None
    except ValueError as exc:
        raise SpecError(
            f"{path} is not a notebook: it is not valid JSON ({exc}); "
            "open and save it in Jupyter to repair it"
        ) from None
    if not isinstance(content, dict) or ("cells" not in content and "worksheets" not in content):
        raise SpecError(f"{path} is not a notebook: it has no cells")
    version = content.get("nbformat")
    if version != 4:
        raise SpecError(
            f"{path} is nbformat {version}; only nbformat 4 notebooks run as jobs: "
            "convert it with: jupyter nbconvert --to notebook --nbformat 4 "
            f"--output {name} {name}"
        )
    cells = content.get("cells")
    metadata = content.get("metadata", {})
    if not isinstance(cells, list) or not isinstance(metadata, dict):
        raise SpecError(f"{path} is not a well-formed notebook: cells or metadata are malformed")
    for number, cell in enumerate(cells, start=1):
        source = cell.get("source") if isinstance(cell, dict) else None
        if (
            not isinstance(cell, dict)
            or cell.get("cell_type") not in ("code", "markdown", "raw")
            or not (
                isinstance(source, str)
                or (isinstance(source, list) and all(isinstance(s, str) for s in source))
            )
        ):
            raise SpecError(f"{path} is not a well-formed notebook: cell {number} is malformed")
    found = metadata.get("kernelspec")
    kernelspec: dict[str, Any] = found if isinstance(found, dict) else {}
    language_info = metadata.get("language_info")
    named = kernelspec.get("name") if isinstance(kernelspec.get("name"), str) else None
    chosen = kernel or named
    if not chosen:
        raise SpecError(
            f"{path} does not name its kernel (metadata.kernelspec); "
            "pass --kernel NAME, e.g. --kernel python3"
        )
    language: str | None = None
    if chosen == named:
        language = kernelspec.get("language") or (
            language_info.get("name") if isinstance(language_info, dict) else None
        )
    tagged = [i for i, c in enumerate(cells) if "parameters" in _tags(c)]
    parameters_cell = tagged[0] if tagged else None
    known = None
    if parameters_cell is not None:
        known = tuple(parameter_names(_source(cells[parameters_cell]), language))
    return Notebook(
        name=name,
        content=content,
        kernel=chosen,
        language=language if isinstance(language, str) else None,
        parameters_cell=parameters_cell,
        known=known,
    )


def load_params_yaml(path: str) -> dict[str, Any]:
    """``--params-yaml FILE``: a mapping of parameter names to values."""
    try:
        import yaml
    except ImportError:
        raise SpecError(
            "--params-yaml needs PyYAML; install pyyaml (or the notebooks extra: '/path/to/kbatch-checkout[notebooks]')"
        ) from None
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except OSError as exc:
        raise SpecError(f"--params-yaml {path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"--params-yaml {path} is not valid YAML: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise SpecError(f"--params-yaml {path} must hold a mapping of NAME: value")
    for key, value in values.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise SpecError(
                f"--params-yaml {path}: {key} is a {type(value).__name__}, which cannot be "
                "passed to a notebook; quote it to pass it as a string"
            ) from None
    return values


def resolve_parameters(
    notebook: Notebook, yaml_values: dict[str, Any], cli_values: list[tuple[str, Any]]
) -> dict[str, Any]:
    """YAML's values, then ``-p``'s (later ones win); an unknown name is refused."""
    parameters = dict(yaml_values)
    parameters.update(cli_values)
    if not parameters:
        return {}
    if notebook.known is None:
        raise SpecError(
            f"{notebook.name} has no cell tagged 'parameters', so it takes no parameters; "
            "tag the cell that sets their defaults with 'parameters' "
            "(JupyterLab: the property inspector; Notebook: View > Cell Toolbar > Tags)"
        )
    unknown = [name for name in parameters if name not in notebook.known]
    if unknown:
        known = ", ".join(notebook.known) or "nothing"
        raise SpecError(
            f"unknown parameter {', '.join(repr(n) for n in unknown)} for {notebook.name}: "
            f"its parameters cell assigns {known}; fix the name or add it to that cell"
        )
    for name, value in parameters.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"parameter {name}={value}: only finite numbers can be passed")
    return parameters


def _job_notebook(notebook: Notebook, parameters: dict[str, Any]) -> dict[str, Any]:
    """The notebook as it travels: outputs cleared (papermill clears them anyway), cell
    ids added where nbformat 4.5 wants them, and the parameters cell of an earlier
    papermill run dropped when new ones are given."""
    content = dict(notebook.content)
    needs_ids = isinstance(content.get("nbformat_minor"), int) and content["nbformat_minor"] >= 5
    cells = []
    for cell in content["cells"]:
        if parameters and "injected-parameters" in _tags(cell):
            continue
        if cell.get("cell_type") == "code":
            cell = {**cell, "outputs": [], "execution_count": None}
        if needs_ids and "id" not in cell:  # nbformat 4.5 wants them; papermill would warn
            cell = {**cell, "id": os.urandom(4).hex()}  # uuid would import platform
        cells.append(cell)
    content["cells"] = cells
    return content


def build_notebook_script(
    notebook: Notebook,
    parameters: dict[str, Any],
    *,
    output: str,
    runner_source: str,
    sweep_columns: tuple[str, ...] = (),
) -> str:
    """The batch script of a notebook job: the runner, then the payload."""
    from kbatch.notebook_runner import PAYLOAD_VERSION, encode_payload

    payload = {
        "version": PAYLOAD_VERSION,
        "name": notebook.name,
        "kernel": notebook.kernel,
        "language": notebook.language,
        "output": output,
        "parameters": parameters,
        "known": list(notebook.known) if notebook.known is not None else None,
        # A sweep: each task reads these parameters from its row's variables.
        "sweep": list(sweep_columns),
        "notebook": _job_notebook(notebook, parameters),
    }
    header = (
        "#!/usr/bin/env python3\n"
        f"# kbatch notebook job: runs {notebook.name!r} with papermill in the job's python3.\n"
        "# Made by kbatch submit; the notebook and its parameters are the payload at the end.\n"
    )
    script = (
        f"{header}{runner_source.rstrip()}\n\n\n"
        f'KBATCH_PAYLOAD = """\n{encode_payload(payload)}\n"""\n\n'
        'if __name__ == "__main__":\n    sys.exit(main(KBATCH_PAYLOAD))\n'
    )
    size = len(script.encode())
    if size > MAX_SCRIPT_BYTES:
        raise SpecError(
            f"{notebook.name} is too large to travel with the job: its job script would be "
            f"{size} bytes, over the {MAX_SCRIPT_BYTES}-byte limit (outputs are already left "
            "out); use a smaller notebook, e.g. with its data in files the job reads "
            "(code upload will lift this limit later)"
        )
    return script


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_NOTEBOOK_READ)
    except FileNotFoundError:
        raise SpecError(f"no such notebook: {path}") from None
    except IsADirectoryError:
        raise SpecError(f"{path} is a directory; give a notebook file") from None
    except PermissionError:
        raise SpecError(f"cannot read {path}: permission denied") from None


def refuse_notebook_options(cli: ParsedOptions) -> None:
    """``--kernel``, ``--nb-output`` and ``--params-yaml`` are for notebooks only."""
    for dest in NOTEBOOK_OPTIONS:
        found = cli.get(dest)
        if found is not None:
            raise SpecError(f"{found.describe()} is for notebooks; submit a NOTEBOOK.ipynb")


def notebook_job_script(
    path: str,
    words: list[str],
    cli: ParsedOptions,
    *,
    cwd: str,
    sweep_columns: tuple[str, ...] | None = None,
) -> str:
    """``kbatch submit NOTEBOOK.ipynb WORDS...``: the job's script, or :class:`SpecError`.

    ``sweep_columns`` (an array, with the columns of its ``--params`` CSV): each task
    runs the notebook with its row's values as parameters and its own output notebook.
    """
    args = parse_notebook_words(words)

    def option(dest: str, after: str | None) -> str | None:
        found = cli.get(dest)
        return after if after is not None else (found.value if found else None)

    kernel = option("kernel", args.kernel)
    output = option("nb_output", args.output)
    params_yaml = option("params_yaml", args.params_yaml)
    notebook = parse_notebook(_read(path), path, kernel=kernel)
    yaml_values = load_params_yaml(params_yaml) if params_yaml else {}
    parameters = resolve_parameters(notebook, yaml_values, args.parameters)
    columns = sweep_columns or ()
    if columns:
        _check_sweep_columns(notebook, columns)
    if output is None:
        where = posixpath.dirname(posixpath.normpath(posixpath.join(cwd, path)))
        stem = notebook.name[: -len(".ipynb")].replace("%", "%%")
        suffix = "%A_%a" if sweep_columns is not None else "%j"
        output = posixpath.join(where, f"{stem}-{suffix}.ipynb")
    if not output.endswith(".ipynb"):
        raise SpecError(f"--nb-output {output}: the executed notebook's name must end in .ipynb")
    check_pattern(output)
    from importlib.resources import files  # 8 ms: only for a notebook

    runner = files("kbatch").joinpath("notebook_runner.py").read_text(encoding="utf-8")
    return build_notebook_script(
        notebook, parameters, output=output, runner_source=runner, sweep_columns=columns
    )


def _check_sweep_columns(notebook: Notebook, columns: tuple[str, ...]) -> None:
    """A sweep's columns are the notebook's parameters: each must be one it assigns."""
    if notebook.known is None:
        raise SpecError(
            f"{notebook.name} has no cell tagged 'parameters', so a --params sweep cannot set "
            "its columns; tag the cell that sets their defaults with 'parameters'"
        )
    unknown = [name for name in columns if name not in notebook.known]
    if unknown:
        raise SpecError(
            f"--params: column {', '.join(repr(n) for n in unknown)} is not a parameter of "
            f"{notebook.name} (its parameters cell assigns {', '.join(notebook.known) or 'nothing'}); "
            "rename the column or add the parameter to that cell"
        )
