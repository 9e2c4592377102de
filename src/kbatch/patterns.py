"""Output file name patterns: ``kbatch-%j.out`` and friends, as in sbatch."""

from __future__ import annotations

import posixpath
import re

from kbatch.errors import SpecError

__all__ = [
    "DEFAULT_ARRAY_OUTPUT",
    "DEFAULT_OUTPUT",
    "check_pattern",
    "expand_pattern",
    "resolve_output",
]

DEFAULT_OUTPUT = "kbatch-%j.out"
DEFAULT_ARRAY_OUTPUT = "kbatch-%A_%a.out"
_TOKEN = re.compile(r"%(\d*)([a-zA-Z%])")
_KNOWN = "jJxuAaN%"


def expand_pattern(
    pattern: str,
    *,
    job_id: str,
    name: str,
    user: str,
    node: str = "localhost",
    array_id: str | None = None,
    task: int | None = None,
) -> str:
    """Replace ``%j %J`` (job id), ``%x`` (name), ``%u`` (user), ``%A``/``%a`` (array), ``%N``, ``%%``.

    A number between ``%`` and the letter pads with zeros, as ``%4j`` does in sbatch.
    """

    def substitute(match: re.Match[str]) -> str:
        width, letter = match.groups()
        if letter not in _KNOWN:
            raise SpecError(
                f"output pattern {pattern!r}: %{letter} is not known; use %j (job id), "
                "%x (job name), %u (user), %A, %a, %N or %% for a literal %",
                field="output",
            )
        value = {
            "j": job_id,
            "J": job_id,
            "A": array_id or job_id,
            "a": "0" if task is None else str(task),
            "x": name,
            "u": user,
            "N": node,
            "%": "%",
        }[letter]
        return value.zfill(int(width)) if width and letter != "%" else value

    return _TOKEN.sub(substitute, pattern)


def resolve_output(
    pattern: str | None,
    *,
    workdir: str,
    job_id: str,
    name: str,
    user: str,
    array_id: str | None = None,
    task: int | None = None,
) -> str:
    """The absolute path of an output file, relative patterns under the working directory.

    The default is ``kbatch-%j.out``, and ``kbatch-%A_%a.out`` for a task of an array.
    """
    default = DEFAULT_OUTPUT if task is None else DEFAULT_ARRAY_OUTPUT
    expanded = expand_pattern(
        pattern or default,
        job_id=job_id,
        name=name,
        user=user,
        array_id=array_id,
        task=task,
    )
    return posixpath.normpath(posixpath.join(workdir, expanded))


def check_pattern(pattern: str) -> None:
    """Raise :class:`SpecError` for an unknown ``%`` token, before anything is created."""
    expand_pattern(pattern, job_id="1", name="x", user="u")
