"""The client side of notebook jobs (pure) and the runner's pure parts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from papermill.cli import _resolve_type

from kbatch import notebook_runner
from kbatch.directives import parse_tokens
from kbatch.errors import SpecError
from kbatch.models import MAX_SCRIPT_BYTES
from kbatch.notebooks import (
    Notebook,
    build_notebook_script,
    notebook_job_script,
    parameter_names,
    parse_notebook,
    parse_notebook_words,
    parse_value,
    refuse_notebook_options,
    resolve_parameters,
)
from kbatch.patterns import expand_pattern


def notebook(*cells: dict[str, Any], **metadata: Any) -> bytes:
    meta = metadata or {"kernelspec": {"name": "python3", "language": "python"}}
    return json.dumps(
        {"nbformat": 4, "nbformat_minor": 5, "metadata": meta, "cells": list(cells)}
    ).encode()


def code(source: str | list[str], *tags: str) -> dict[str, Any]:
    return {
        "cell_type": "code",
        "metadata": {"tags": list(tags)},
        "source": source,
        "outputs": [{"output_type": "stream", "name": "stdout", "text": "old output\n"}],
        "execution_count": 3,
    }


@pytest.mark.parametrize(
    "text",
    [
        "7",
        "-3",
        "1_000",
        "0.5",
        "1e3",
        "nan",
        "inf",
        "True",
        "False",
        "None",
        "true",
        "none",
        "",
        "a b",
        "0x10",
    ],
)
def test_values_are_typed_as_papermill_types_them(text: str) -> None:
    ours, theirs = parse_value(text), _resolve_type(text)
    assert type(ours) is type(theirs)
    assert ours == theirs or (isinstance(ours, float) and math.isnan(ours))


def test_words_after_the_notebook() -> None:
    args = parse_notebook_words(
        [
            "-p",
            "n",
            "3",
            "-r",
            "s",
            "3",
            "--params-yaml=p.yaml",
            "-k",
            "ir",
            "--nb-output",
            "o.ipynb",
        ]
    )
    assert args.parameters == [("n", 3), ("s", "3")]
    assert (args.params_yaml, args.kernel, args.output) == ("p.yaml", "ir", "o.ipynb")
    with pytest.raises(SpecError, match="needs a NAME and a VALUE"):
        parse_notebook_words(["-p", "n"])
    with pytest.raises(SpecError, match="give job options such as --mem before the notebook"):
        parse_notebook_words(["--mem=1G"])


def test_before_the_notebook_p_is_the_partition() -> None:
    cli = parse_tokens(["-p", "gpu", "nb.ipynb", "-p", "n", "3"])
    assert cli.get("partition").value == "gpu"
    assert cli.positionals == ["nb.ipynb", "-p", "n", "3"]


def test_parameter_names() -> None:
    source = "%matplotlib inline\na = 1\nb: int = 2\nc, d = 3, 4\ne += 1\nif a:\n    nested = 1\n"
    assert parameter_names(source, "python") == ["a", "b", "c", "d", "e"]
    assert parameter_names("x <- 1\ny = 2\nz == 3\n", "R") == ["x", "y"]


def test_a_checked_notebook() -> None:
    nb = parse_notebook(
        notebook(code("print(1)"), code(["a = 1\n", "b = 'x'\n"], "parameters")), "d/nb.ipynb"
    )
    assert (nb.name, nb.kernel, nb.language, nb.parameters_cell, nb.known) == (
        "nb.ipynb",
        "python3",
        "python",
        1,
        ("a", "b"),
    )
    # --kernel replaces the notebook's; its language is then the kernel's to say
    other = parse_notebook(notebook(code("1")), "nb.ipynb", kernel="other")
    assert (other.kernel, other.language, other.known) == ("other", None, None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "is not a notebook: it is not valid JSON"),
        (b"\xff\xfe", "is not a notebook: it is not UTF-8"),
        (b'"text"', "is not a notebook: it has no cells"),
        (b'{"nbformat": 3, "worksheets": []}', "is nbformat 3; only nbformat 4"),
        (b'{"nbformat": 4, "cells": [{"cell_type": "code"}]}', "cell 1 is malformed"),
        (b'{"nbformat": 4, "cells": [], "metadata": {}}', "does not name its kernel"),
    ],
)
def test_bad_notebooks_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_notebook(data, "nb.ipynb")


def test_parameters_are_checked_against_the_parameters_cell() -> None:
    nb = parse_notebook(notebook(code("a = 1\nb = 2", "parameters")), "nb.ipynb")
    assert resolve_parameters(nb, {"a": 5, "b": [1]}, [("a", 6)]) == {"a": 6, "b": [1]}
    with pytest.raises(SpecError, match=r"unknown parameter 'c' for nb.ipynb: .* assigns a, b"):
        resolve_parameters(nb, {}, [("c", 1)])
    with pytest.raises(SpecError, match="only finite numbers"):
        resolve_parameters(nb, {}, [("a", float("nan"))])
    plain = parse_notebook(notebook(code("a = 1")), "nb.ipynb")
    assert resolve_parameters(plain, {}, []) == {}
    with pytest.raises(SpecError, match="has no cell tagged 'parameters'"):
        resolve_parameters(plain, {}, [("a", 1)])


def test_the_script_carries_the_notebook_without_outputs() -> None:
    nb = parse_notebook(
        notebook(code("a = 1", "parameters"), code("a = 9", "injected-parameters"), code("a")),
        "nb.ipynb",
    )
    script = build_notebook_script(
        nb, {"a": 2}, output="/h/nb-%j.ipynb", runner_source="import sys\ndef main(p): return 0\n"
    )
    assert script.startswith("#!/usr/bin/env python3\n")
    assert "KBATCH_PAYLOAD" in script and "SBATCH" not in script
    blob = script.split('KBATCH_PAYLOAD = """')[1].split('"""')[0]
    payload = notebook_runner.decode_payload(blob)
    assert payload["parameters"] == {"a": 2} and payload["known"] == ["a"]
    cells = payload["notebook"]["cells"]
    assert [c["source"] for c in cells] == ["a = 1", "a"]  # the old injected cell is gone
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in cells)


def test_a_notebook_too_large_for_a_script_is_refused() -> None:
    big = Notebook(
        "big.ipynb",
        {"cells": [code("x = '" + "y" * MAX_SCRIPT_BYTES + "'")]},
        "python3",
        None,
        None,
        None,
    )
    with pytest.raises(
        SpecError, match=r"too large to travel with the job.*use a smaller notebook"
    ):
        build_notebook_script(big, {}, output="o.ipynb", runner_source="")


def test_notebook_options_only_with_a_notebook() -> None:
    with pytest.raises(SpecError, match=r"--kernel python3 .* is for notebooks"):
        refuse_notebook_options(parse_tokens(["--kernel", "python3", "run.sh"]))


@pytest.mark.parametrize(
    "pattern", ["nb-%j.ipynb", "%x_%A_%a_%u.ipynb", "%5j-%%.ipynb", "/a/%N.ipynb"]
)
def test_runner_expands_patterns_as_kbatch_does(pattern: str) -> None:
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NAME": "nb.ipynb",
        "USER": "ada",
        "HOSTNAME": "localhost",
    }
    assert notebook_runner.expand_output(pattern, env) == expand_pattern(
        pattern, job_id="42", name="nb.ipynb", user="ada"
    )
    array = {**env, "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2"}
    assert notebook_runner.expand_output("%A_%a", array) == "40_2"


def test_a_task_can_take_its_parameters_from_the_environment() -> None:
    payload = {"parameters": {"a": 1, "b": 2}, "known": ["a", "b"]}
    env = {notebook_runner.PARAMETERS_ENV: '{"b": 3.5}'}
    assert notebook_runner.merge_parameters(payload, env) == {"a": 1, "b": 3.5}
    assert notebook_runner.merge_parameters(payload, {}) == {"a": 1, "b": 2}
    with pytest.raises(
        notebook_runner.RunnerError, match=r"unknown parameter.*c; .* assigns: a, b"
    ):
        notebook_runner.merge_parameters(payload, {notebook_runner.PARAMETERS_ENV: '{"c": 1}'})
    with pytest.raises(notebook_runner.RunnerError, match="not JSON"):
        notebook_runner.merge_parameters(payload, {notebook_runner.PARAMETERS_ENV: "{"})


def test_payload_round_trip() -> None:
    payload = {"version": 1, "text": 'é\n"""', "n": [1, 2.5, None, True]}
    encoded = notebook_runner.encode_payload(payload)
    assert max(len(line) for line in encoded.splitlines()) <= 76
    assert notebook_runner.decode_payload(encoded) == payload
    with pytest.raises(notebook_runner.RunnerError, match="payload version 9"):
        notebook_runner.decode_payload(notebook_runner.encode_payload({"version": 9}))


def test_a_setup_failure_is_reported_and_written_to_the_reason_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = tmp_path / "reason"
    env = {"KBATCH_REASON_FILE": str(reason)}
    bad = notebook_runner.encode_payload(
        {"version": 1, "name": "nb.ipynb", "kernel": "k", "output": "/nonexistent/dir/o.ipynb"}
    )
    assert notebook_runner.main(bad, env, handle_signals=False) == notebook_runner.EXIT_SETUP_FAILED
    err = capsys.readouterr().err
    assert "kbatch: cannot write the executed notebook to /nonexistent/dir/o.ipynb" in err
    assert reason.read_text().startswith("cannot write the executed notebook")


def test_kubernetes_job_shape_of_a_notebook_job(tmp_path: Path) -> None:
    """Pure: the script goes in the ConfigMap and the entrypoint runs it; no cluster here."""
    from kbatch.backends.kubernetes.manifests import JobContext, build_manifests
    from kbatch.spec import build_spec

    path = tmp_path / "nb.ipynb"
    path.write_bytes(notebook(code("a = 1", "parameters"), code("print(a)")))
    cli = parse_tokens(["-c", "2", "nb.ipynb", "-p", "a", "5"])
    script = notebook_job_script(str(path), cli.positionals[1:], cli, cwd="/home/jovyan")
    spec = build_spec(
        script, cli=cli, args=[], cwd="/home/jovyan", environ={}, default_name="nb.ipynb"
    ).spec
    m = build_manifests(
        spec, JobContext(job_id="abc12345", user="ada", namespace="ns", default_image="img")
    )
    container = m.job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "/kbatch/entrypoint", "/kbatch/script"]
    assert m.config_map["data"]["script"] == script
    assert script.startswith("#!/usr/bin/env python3\n")
    assert m.secret["stringData"]["SLURM_JOB_ID"] == "abc12345"  # the runner's %j
    payload = notebook_runner.decode_payload(
        script.split('KBATCH_PAYLOAD = """')[1].split('"""')[0]
    )
    assert payload["output"] == f"{tmp_path}/nb-%j.ipynb"  # beside the notebook
    assert payload["parameters"] == {"a": 5}


def test_without_papermill_in_the_jobs_python_the_job_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("jupyter_client", "jupyter_client.kernelspec", "papermill"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    payload = notebook_runner.encode_payload(
        {"version": 1, "name": "nb.ipynb", "kernel": "python3", "output": f"{tmp_path}/o.ipynb"}
    )
    assert notebook_runner.main(payload, {}, handle_signals=False) == 2
    assert "papermill is not installed in the job's Python" in capsys.readouterr().err


def test_the_runner_is_self_contained_and_old_python_grammar() -> None:
    """It runs in the job's python3, which may be older than kbatch's and lack kbatch."""
    import ast

    source = Path(notebook_runner.__file__).read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert "kbatch" not in imported
    assert imported - set(sys.stdlib_module_names) == {"jupyter_client", "nbformat", "papermill"}
