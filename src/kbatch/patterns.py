"""Output file name patterns: ``kbatch-%j.out`` and friends, as in sbatch."""

from __future__ import annotations

import posixpath
import re

from kbatch.errors import SpecError

__all__ = ["DEFAULT_OUTPUT", "check_pattern", "expand_pattern", "resolve_output"]

DEFAULT_OUTPUT = "kbatch-%j.out"
_TOKEN = re.compile(r"%(\d*)([a-zA-Z%])")
_KNOWN = "jJxuAaN%"


def expand_pattern(
    pattern: str, *, job_id: str, name: str, user: str, node: str = "localhost"
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
            "A": job_id,
            "a": "0",
            "x": name,
            "u": user,
            "N": node,
            "%": "%",
        }[letter]
        return value.zfill(int(width)) if width and letter != "%" else value

    return _TOKEN.sub(substitute, pattern)


def resolve_output(pattern: str | None, *, workdir: str, job_id: str, name: str, user: str) -> str:
    """The absolute path of an output file, relative patterns under the working directory."""
    expanded = expand_pattern(pattern or DEFAULT_OUTPUT, job_id=job_id, name=name, user=user)
    return posixpath.normpath(posixpath.join(workdir, expanded))


def check_pattern(pattern: str) -> None:
    """Raise :class:`SpecError` for an unknown ``%`` token, before anything is created."""
    expand_pattern(pattern, job_id="1", name="x", user="u")
