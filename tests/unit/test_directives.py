import json
from pathlib import Path

import pytest

from kbatch.directives import OPTIONS, Support, find_directives, parse_directives, parse_tokens
from kbatch.errors import SpecError
from kbatch.spec import build_spec

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "sbatch-headers.jsonl"


def spec_of(
    script: str, *cli: str, ignore_unknown: bool = False, environ: dict[str, str] | None = None
):
    return build_spec(
        script,
        cli=parse_tokens(list(cli)),
        args=[],
        cwd="/home/u",
        environ=environ or {"HOME": "/home/u", "PATH": "/bin"},
        default_name="run.sh",
        ignore_unknown=ignore_unknown,
    )


def test_header_ends_at_first_command() -> None:
    script = (
        "#!/bin/bash\n#SBATCH -J a\n\n# a comment\n#KBATCH --mem=1G\necho hi\n#SBATCH -J late\n"
    )
    assert [d.text for d in find_directives(script)] == ["-J a", "--mem=1G"]


def test_double_hash_is_a_comment_and_trailing_comments_are_cut() -> None:
    script = "#!/bin/sh\n##SBATCH --mem=1G\n#SBATCH --time=10 # ten minutes\n#SBATCH -o 'a b.out'\necho\n"
    parsed = parse_directives(script)
    assert [v.text for v in parsed.values] == ["--time=10", "-o a b.out"]
    assert parsed.get("output").value == "a b.out"


def test_all_forms_of_options() -> None:
    parsed = parse_tokens(
        ["-J", "x", "-c4", "--mem", "2G", "--time=1:00", "-N1", "--exclusive", "run.sh", "-c", "9"]
    )
    assert parsed.get("job_name").value == "x"
    assert parsed.get("cpus_per_task").value == "4"
    assert parsed.get("mem").value == "2G"
    assert parsed.get("time").value == "1:00"
    assert parsed.get("nodes").value == "1"
    assert parsed.positionals == ["run.sh", "-c", "9"]  # after the script: the script's own


def test_command_line_overrides_directives() -> None:
    script = "#!/bin/sh\n#SBATCH --mem=1G\n#SBATCH -c 2\n#SBATCH -J fromfile\necho\n"
    spec = spec_of(script, "--mem=3G", "-J", "fromcli").spec
    assert spec.memory == 3 * 1024**3
    assert spec.cpus == 2
    assert spec.name == "fromcli"


def test_kbatch_and_sbatch_prefixes_later_wins() -> None:
    spec = spec_of("#!/bin/sh\n#SBATCH --time=10\n#KBATCH --time=20\necho\n").spec
    assert spec.time_limit == 1200


def test_unknown_option_is_an_error_naming_it() -> None:
    with pytest.raises(
        SpecError, match=r"unknown option --frobnicate=3 \(line 2\).*--ignore-unknown"
    ):
        spec_of("#!/bin/sh\n#SBATCH --frobnicate=3\necho\n")


def test_unknown_option_with_ignore_unknown_is_a_warning() -> None:
    result = spec_of("#!/bin/sh\n#SBATCH --frobnicate=3\necho\n", ignore_unknown=True)
    assert any("--frobnicate=3" in w for w in result.warnings)


def test_cluster_only_options_are_reported_ignored() -> None:
    result = spec_of("#!/bin/sh\n#SBATCH -p gpu\n#SBATCH --account=abc\n#SBATCH --nodes=1\necho\n")
    assert len(result.warnings) == 2
    assert "-p gpu (line 2)" in result.warnings[0]
    assert "--account=abc" in result.warnings[1]


def test_deferred_features_are_refused_not_dropped() -> None:
    with pytest.raises(SpecError, match=r"--input=x .* not supported by kbatch yet"):
        spec_of("#!/bin/sh\n#SBATCH --input=x\necho\n")


def test_multi_node_is_refused() -> None:
    with pytest.raises(SpecError, match="one node"):
        spec_of("#!/bin/sh\n#SBATCH --nodes=4\necho\n")


def test_resources() -> None:
    spec = spec_of(
        "#!/bin/sh\n#SBATCH -c 4\n#SBATCH --mem-per-cpu=1G\n#SBATCH --gres=gpu:a100:2\necho\n"
    ).spec
    assert (spec.cpus, spec.memory, spec.gpus) == (4, 4 * 1024**3, 2)
    assert spec_of("#!/bin/sh\n#SBATCH --gres=gpu:1g.20gb\necho\n").spec.gpus == 1
    assert spec_of("#!/bin/sh\n#SBATCH --gpus=h100:3\necho\n").spec.gpus == 3
    assert spec_of("#!/bin/sh\n#SBATCH --mem=0\necho\n").spec.memory is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--mem=2X", "not a memory size"),
        ("--time=1h", "not a time limit"),
        ("-c zero", "whole number"),
        ("--gres=license:2", "only gpu"),
        ("--open-mode=sometimes", "append or truncate"),
        ("--export=1BAD", "not an environment variable name"),
        ("-J", "needs a value"),
        ("--output='unclosed", "close the quote"),
        ("--wrap=hi", "option of the kbatch submit command"),
    ],
)
def test_bad_directives_say_what_to_change(line: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_of(f"#!/bin/sh\n#SBATCH {line}\necho\n")


def test_export() -> None:
    environ = {"A": "1", "B": "2", "JUPYTERHUB_API_TOKEN": "secret", "KBATCH_TOKEN": "s2"}
    assert spec_of("#!/bin/sh\necho\n", environ=environ).spec.environment == {"A": "1", "B": "2"}
    assert spec_of("#!/bin/sh\necho\n", "--export=NONE", environ=environ).spec.environment == {}
    only = spec_of("#!/bin/sh\necho\n", "--export=A,C=3", environ=environ).spec.environment
    assert only == {"A": "1", "C": "3"}
    both = spec_of("#!/bin/sh\necho\n", "--export=ALL,C=3", environ=environ).spec.environment
    assert both == {"A": "1", "B": "2", "C": "3"}
    # a token is never exported, even on request
    assert (
        "JUPYTERHUB_API_TOKEN"
        not in spec_of(
            "#!/bin/sh\necho\n", "--export=JUPYTERHUB_API_TOKEN", environ=environ
        ).spec.environment
    )


def test_chdir_is_relative_to_the_submit_directory() -> None:
    assert spec_of("#!/bin/sh\necho\n", "-D", "sub").spec.workdir == "/home/u/sub"
    assert spec_of("#!/bin/sh\necho\n", "-D", "/abs").spec.workdir == "/abs"


def test_every_option_in_the_table_has_help() -> None:
    assert all(o.help for o in OPTIONS)
    longs = [o.long for o in OPTIONS]
    assert len(longs) == len(set(longs))
    shorts = [o.short for o in OPTIONS if o.short]
    assert len(shorts) == len(set(shorts))


def _corpus() -> list[dict[str, object]]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


def test_corpus_is_present() -> None:
    assert len(_corpus()) == 53


@pytest.mark.parametrize("entry", _corpus(), ids=lambda e: f"{e['repo']}/{e['path']}")
def test_corpus_header_is_honoured_or_reported(entry: dict[str, object]) -> None:
    """Every real header parses; each directive is honoured, or named in a warning or error."""
    script = str(entry["header"]) + "\necho body\n"
    directives = list(entry["directives"])  # type: ignore[call-overload]
    parsed = parse_directives(script)
    assert len(parsed.values) + len(parsed.unknown) == len(directives)
    try:
        result = spec_of(script)
        reported = " ".join(result.warnings)
    except SpecError as exc:
        reported = str(exc)
        # strict mode refuses only for a reason it names; --ignore-unknown then submits,
        # unless a value is one sbatch refuses too (e.g. an --array with a stray '#'):
        # then the error quotes that directive.
        try:
            result = spec_of(script, ignore_unknown=True)
        except SpecError as again:
            assert any(
                v.option.support is Support.HONOURED and v.text in str(again) for v in parsed.values
            ), str(again)
            return
        reported += " " + " ".join(result.warnings)
    for value in parsed.values:
        if value.option.support is Support.HONOURED and value.option.long not in (
            "nodes",
            "ntasks",
        ):
            continue
        if value.option.long in ("nodes", "ntasks") and (value.value or "") in ("1", "1-1"):
            continue
        assert value.text in reported, f"{value.text} neither honoured nor reported"
    for unknown in parsed.unknown:
        assert unknown in reported


def test_tasks_and_nodes() -> None:
    assert "one task" in spec_of("#!/bin/sh\n#SBATCH -n 4\necho\n").warnings[0]
    assert spec_of("#!/bin/sh\n#SBATCH --ntasks=1\n#SBATCH -N 1\necho\n").warnings == []
    with pytest.raises(SpecError, match="whole number"):
        spec_of("#!/bin/sh\n#SBATCH --ntasks=many\necho\n")
    assert "one node" in spec_of("#!/bin/sh\n#SBATCH -N5\necho\n", ignore_unknown=True).warnings[0]


def test_hold_is_honoured_from_the_command_line_and_directives() -> None:
    plain = "#!/bin/sh\ntrue\n"
    assert spec_of(plain).spec.hold is False
    assert spec_of(plain, "--hold").spec.hold is True
    assert spec_of(plain, "-H").spec.hold is True
    assert spec_of("#!/bin/sh\n#SBATCH --hold\ntrue\n").spec.hold is True
    assert spec_of("#!/bin/sh\n#SBATCH -H\n#SBATCH -J x\ntrue\n").spec.hold is True
    assert spec_of("#!/bin/sh\n#KBATCH -H\ntrue\n").warnings == []
