"""``sbatch`` options: one table, read from ``#SBATCH``/``#KBATCH`` lines and the command line.

Every option a user can give, in a script header or to ``kbatch submit``, is
looked up in :data:`OPTIONS`.  An option is either honoured (it sets a field of
the job), ignored with a warning (it only means something on a cluster, such as
``--partition``), deferred (Slurm has it, kbatch does not yet: an error unless
``--ignore-unknown``), or unknown (an error unless ``--ignore-unknown``).
Nothing is ever dropped silently.

Directives are read the way Slurm reads them: ``#SBATCH`` and ``#KBATCH`` lines
before the first line of the script that is neither blank nor a comment; text
after an unquoted `` #`` is a comment; ``##SBATCH`` is a comment.  Later lines
override earlier ones, and the command line overrides them all.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kbatch.errors import SpecError

__all__ = [
    "OPTIONS",
    "Directive",
    "OptionDef",
    "OptionValue",
    "ParsedOptions",
    "Support",
    "find_directives",
    "parse_directives",
    "parse_tokens",
]

DIRECTIVE_PREFIXES = ("#KBATCH", "#SBATCH")


class Support(enum.Enum):
    HONOURED = "honoured"
    IGNORED = "ignored"  # cluster-only: accepted, reported as ignored
    DEFERRED = "deferred"  # a Slurm feature kbatch does not have yet
    CLI = "cli"  # a switch of the submit command, not a job property


@dataclass(frozen=True)
class OptionDef:
    long: str
    short: str | None = None
    metavar: str | None = "VALUE"  # None: a flag that takes no value
    support: Support = Support.HONOURED
    help: str = ""
    optional_value: bool = False  # a value only in the --opt=value form

    @property
    def dest(self) -> str:
        return self.long.replace("-", "_")

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None and not self.optional_value


def _h(
    long: str, short: str | None = None, metavar: str | None = "VALUE", help: str = ""
) -> OptionDef:
    return OptionDef(long, short, metavar, Support.HONOURED, help)


def _ignored(
    long: str, short: str | None = None, metavar: str | None = "VALUE", why: str = ""
) -> OptionDef:
    return OptionDef(
        long, short, metavar, Support.IGNORED, why or "has no meaning outside a cluster"
    )


def _deferred(long: str, short: str | None = None, metavar: str | None = "VALUE") -> OptionDef:
    return OptionDef(long, short, metavar, Support.DEFERRED, "is not supported by kbatch yet")


_CLUSTER = "only means something on a Slurm cluster"
_TASKS = "kbatch runs the script once, as one task; ask for CPUs with -c/--cpus-per-task"

OPTIONS: tuple[OptionDef, ...] = (
    _h("job-name", "J", "NAME", "name of the job (default: the script's file name)"),
    _h(
        "output",
        "o",
        "PATTERN",
        "stdout file; %j job id, %x name, %u user, %A array, %a task (default kbatch-%j.out)",
    ),
    _h("error", "e", "PATTERN", "stderr file (default: joined with the output)"),
    _h("open-mode", None, "append|truncate", "how to open the output files (default truncate)"),
    _h("cpus-per-task", "c", "N", "CPUs for the job (default 1)"),
    _h(
        "mem", None, "SIZE", "memory limit: 500M, 2G, 1.5Gi; bare numbers are MiB; 0 means no limit"
    ),
    _h("mem-per-cpu", None, "SIZE", "memory limit per CPU (multiplied by --cpus-per-task)"),
    _h("mem-per-gpu", None, "SIZE", "memory limit per GPU (multiplied by --gpus)"),
    _h("cpus-per-gpu", None, "N", "CPUs per GPU (multiplied by --gpus)"),
    _h("gpus", "G", "[TYPE:]N", "GPUs for the job"),
    _h("gpus-per-node", None, "[TYPE:]N", "GPUs for the job (a kbatch job is one node)"),
    _h("gpus-per-task", None, "[TYPE:]N", "GPUs for the job (a kbatch job is one task)"),
    _h("gres", None, "gpu[:TYPE]:N", "generic resources; only gpu is understood"),
    _h("time", "t", "TIME", "time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS"),
    _h("chdir", "D", "DIR", "working directory of the job (default: the submit directory)"),
    _h("export", None, "ALL|NONE|VAR[=val],...", "environment to pass to the job (default ALL)"),
    _h("comment", None, "TEXT", "a comment shown with the job"),
    _h("image", None, "IMAGE", "container image (Kubernetes backend; default: your notebook's)"),
    _h("nodes", "N", "1", "number of nodes; kbatch jobs run on one"),
    _h("ntasks", "n", "N", "number of tasks; " + _TASKS),
    _h("test-only", None, None, "validate the job and print it, but do not submit"),
    _h("hold", "H", None, "submit the job held: it waits until 'kbatch release ID'"),
    _h(
        "code",
        None,
        "DIR|FILE",
        "upload DIR (or FILE) with the job; it starts in a fresh copy ($KBATCH_CODE_DIR); "
        ".gitignore and .kbatchignore are honoured; 'kbatch fetch ID' gets what it leaves",
    ),
    _ignored("ntasks-per-node", None, "N", _TASKS),
    _ignored("tasks-per-node", None, "N", _TASKS),
    _ignored("ntasks-per-core", None, "N", _TASKS),
    _ignored("ntasks-per-socket", None, "N", _TASKS),
    _ignored("ntasks-per-gpu", None, "N", _TASKS),
    _ignored("mincpus", None, "N", _TASKS),
    _ignored("partition", "p", "NAME", _CLUSTER),
    _ignored("account", "A", "NAME", _CLUSTER),
    _ignored("qos", "q", "NAME", _CLUSTER),
    _ignored("constraint", "C", "LIST", _CLUSTER),
    _ignored("nodelist", "w", "LIST", _CLUSTER),
    _ignored("exclude", "x", "LIST", _CLUSTER),
    _ignored("reservation", None, "NAME", _CLUSTER),
    _ignored("licenses", "L", "LIST", _CLUSTER),
    _ignored("clusters", "M", "LIST", _CLUSTER),
    _ignored("wckey", None, "KEY", _CLUSTER),
    _ignored("switches", None, "N", _CLUSTER),
    OptionDef("exclusive", None, "MODE", Support.IGNORED, _CLUSTER, optional_value=True),
    _ignored("oversubscribe", "s", None, _CLUSTER),
    _ignored("hint", None, "HINT", _CLUSTER),
    _ignored("distribution", "m", "DIST", _CLUSTER),
    _ignored("mem-bind", None, "TYPE", _CLUSTER),
    _ignored("cpu-bind", None, "TYPE", _CLUSTER),
    _ignored("gpu-bind", None, "TYPE", _CLUSTER),
    _ignored("gres-flags", None, "FLAGS", _CLUSTER),
    _ignored("threads-per-core", None, "N", _CLUSTER),
    _ignored("cores-per-socket", None, "N", _CLUSTER),
    _ignored("sockets-per-node", None, "N", _CLUSTER),
    _ignored("tmp", None, "SIZE", _CLUSTER),
    _ignored("priority", None, "N", _CLUSTER),
    _ignored("nice", None, "N", _CLUSTER),
    _ignored("requeue", None, None, "kbatch never requeues a job that ran"),
    _ignored("no-requeue", None, None, "kbatch never requeues a job that ran"),
    _ignored("mail-type", None, "TYPES", "kbatch does not send mail yet"),
    _ignored("mail-user", None, "ADDRESS", "kbatch does not send mail yet"),
    _ignored("signal", None, "[B:]SIG[@TIME]", "kbatch sends SIGTERM at the time limit"),
    _ignored("get-user-env", None, "MODE", "the environment is captured at submit time"),
    _ignored("propagate", None, "LIMITS", _CLUSTER),
    _ignored("profile", None, "TYPE", _CLUSTER),
    _ignored("acctg-freq", None, "FREQ", _CLUSTER),
    _ignored("verbose", "v", None, "kbatch has no verbose mode"),
    _ignored("quiet", "Q", None, "kbatch is quiet already"),
    _h(
        "array",
        "a",
        "INDEXES",
        "a job array: 0-31, 1,3,5, 1-7:2, with %N to run at most N tasks at once (0-99%10)",
    ),
    _h(
        "dependency",
        "d",
        "LIST",
        "start after other jobs: afterok:ID[:ID...], afterany, afternotok, after, singleton; ',' all, '?' any",
    ),
    _h(
        "begin",
        "b",
        "TIME",
        "start no earlier than TIME: now+30 (seconds), now+1hour, 16:00, 2026-12-01T08:00",
    ),
    _deferred("deadline", None, "TIME"),
    _deferred("input", "i", "FILE"),
    _h(
        "kill-on-invalid-dep", None, "yes|no", "cancel the job when its dependency can never be met"
    ),
    OptionDef(
        "wrap", None, "COMMAND", Support.CLI, "run COMMAND in a /bin/sh script instead of SCRIPT"
    ),
    OptionDef(
        "params",
        None,
        "FILE.csv",
        Support.CLI,
        "a sweep: one task per data row, each column a variable; {column} in --wrap",
    ),
    OptionDef("seq", None, "N", Support.CLI, "an array of N tasks, 0 to N-1 (--array=0-(N-1))"),
    OptionDef("parsable", None, None, Support.CLI, "print the job id alone"),
    OptionDef("json", None, None, Support.CLI, "print the submitted job as JSON"),
    OptionDef(
        "wait", "W", None, Support.CLI, "wait for the job to end and exit with its exit code"
    ),
    OptionDef(
        "ignore-unknown", None, None, Support.CLI, "warn about unknown options instead of failing"
    ),
    # Notebooks (kbatch.notebooks); also accepted after the notebook's path.
    OptionDef(
        "kernel", None, "NAME", Support.CLI, "a notebook's kernel (default: the one it names)"
    ),
    OptionDef(
        "nb-output",
        None,
        "PATTERN",
        Support.CLI,
        "the executed notebook (default NOTEBOOK-%j.ipynb beside the notebook)",
    ),
    OptionDef(
        "params-yaml", None, "FILE", Support.CLI, "a notebook's parameters from a YAML mapping"
    ),
)

_BY_LONG = {o.long: o for o in OPTIONS}
_BY_SHORT = {o.short: o for o in OPTIONS if o.short}


@dataclass(frozen=True)
class OptionValue:
    """One option as the user gave it, with where it came from (for messages)."""

    option: OptionDef
    value: str | None
    origin: str  # "line 5" or "command line"
    text: str  # as typed, e.g. "--mem=2G" or "-J train"

    def describe(self) -> str:
        return f"{self.text} ({self.origin})"


@dataclass
class ParsedOptions:
    """Options in the order given; :meth:`get` answers with the last one that set a key."""

    values: list[OptionValue] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # descriptions of unknown options
    positionals: list[str] = field(default_factory=list)

    def get(self, *dests: str) -> OptionValue | None:
        """The last option given for any of ``dests`` (later ones override earlier)."""
        for value in reversed(self.values):
            if value.option.dest in dests:
                return value
        return None

    def flag(self, dest: str) -> bool:
        return self.get(dest) is not None

    def extend(self, other: ParsedOptions) -> None:
        self.values.extend(other.values)
        self.unknown.extend(other.unknown)


@dataclass(frozen=True)
class Directive:
    line: int
    prefix: str
    text: str  # what follows the prefix


def find_directives(script: str) -> list[Directive]:
    """The ``#SBATCH``/``#KBATCH`` lines of a script's header, in order."""
    found: list[Directive] = []
    for number, raw in enumerate(script.splitlines(), start=1):
        line = raw.strip()
        if number == 1 and line.startswith("#!"):
            continue
        if not line:
            continue
        if not line.startswith("#"):
            break  # the first command ends the header, as in sbatch
        for prefix in DIRECTIVE_PREFIXES:
            if line.startswith(prefix) and (
                len(line) == len(prefix) or line[len(prefix)].isspace()
            ):
                found.append(Directive(number, prefix, line[len(prefix) :].strip()))
    return found


def _strip_comment(text: str) -> str:
    """Cut a trailing comment: an unquoted ``#`` at the start or after white space."""
    quote: str | None = None
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            return text[:index]
    return text


def parse_directives(script: str) -> ParsedOptions:
    """Every directive of a script's header, looked up in the option table."""
    parsed = ParsedOptions()
    for directive in find_directives(script):
        origin = f"line {directive.line}"
        try:
            tokens = shlex.split(_strip_comment(directive.text))
        except ValueError as exc:
            raise SpecError(
                f"{origin}: {directive.prefix} {directive.text}: {exc}; close the quote"
            ) from exc
        if not tokens:
            continue
        line_options = parse_tokens(tokens, origin=origin, allow_positionals=False)
        for value in line_options.values:
            if value.option.support is Support.CLI:
                raise SpecError(
                    f"{origin}: {value.text} is an option of the kbatch submit command, "
                    "not of a job; give it on the command line"
                )
        parsed.extend(line_options)
    return parsed


def parse_tokens(
    tokens: Sequence[str], *, origin: str = "command line", allow_positionals: bool = True
) -> ParsedOptions:
    """Options from a list of words, as ``sbatch`` reads them.

    With ``allow_positionals`` the first word that is not an option is the
    script, and every word after it goes to the script (``kbatch submit -c 2
    run.sh --its-own-flag``).
    """
    parsed = ParsedOptions()
    words = list(tokens)
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--" and allow_positionals:
            parsed.positionals.extend(words[index:])
            break
        if not word.startswith("-") or word == "-":
            if not allow_positionals:
                raise SpecError(
                    f"{origin}: {' '.join(words)}: {word!r} is not an option; "
                    "a directive holds options only (e.g. #SBATCH --time=10:00)"
                )
            parsed.positionals.extend(words[index - 1 :])
            break
        option, value, text = _split_option(word)
        if option is None:
            parsed.unknown.append(f"{text} ({origin})")
            # Slurm-style unknown options with a separate value cannot be told
            # apart from flags; a following non-option word stays a positional.
            continue
        if option.takes_value and value is None:
            if index >= len(words):
                raise SpecError(f"{origin}: {text} needs a value ({option.metavar})")
            value = words[index]
            index += 1
            text = f"{text} {value}"
        elif option.metavar is None and value is not None:
            raise SpecError(f"{origin}: {text}: --{option.long} takes no value")
        parsed.values.append(OptionValue(option, value, origin, text))
    return parsed


def _split_option(word: str) -> tuple[OptionDef | None, str | None, str]:
    if word.startswith("--"):
        name, eq, value = word[2:].partition("=")
        return _BY_LONG.get(name), (value if eq else None), word
    letter, rest = word[1:2], word[2:]
    option = _BY_SHORT.get(letter)
    if option is None:
        return None, None, word
    if option.metavar is None:
        if rest:
            return None, None, word
        return option, None, word
    if rest.startswith("="):
        rest = rest[1:]
    return option, (rest or None), word


def help_lines(supports: Iterable[Support]) -> list[tuple[str, str]]:
    """``(flags, help)`` rows of the option table, for ``kbatch submit --help``."""
    wanted = set(supports)
    rows: list[tuple[str, str]] = []
    for option in OPTIONS:
        if option.support not in wanted:
            continue
        flags = (f"-{option.short}, " if option.short else "    ") + f"--{option.long}"
        if option.metavar:
            flags += f" {option.metavar}"
        rows.append((flags, option.help))
    return rows
