"""Slurm's ``--dependency`` grammar, and whether a job's dependencies are met.  Pure.

``after:ID[:ID...]`` (they have started, or ended), ``afterany`` (they have
ended), ``afterok`` (they completed), ``afternotok`` (they ended otherwise),
``singleton`` (no earlier job of this name and user is still active); terms
joined by ``,`` must all hold, by ``?`` any one.  ``aftercorr`` (task N of an array
after task N of another) is not supported yet: it is refused by name.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from kbatch.errors import SpecError
from kbatch.models import JobState

__all__ = [
    "Dependency",
    "DependencyStatus",
    "Term",
    "describe",
    "evaluate",
    "parse_dependency",
]

_KINDS = ("after", "afterany", "afterok", "afternotok", "singleton")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")


@dataclass(frozen=True)
class Term:
    kind: str  # one of _KINDS
    job_ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.kind if not self.job_ids else f"{self.kind}:{':'.join(self.job_ids)}"


@dataclass(frozen=True)
class Dependency:
    terms: tuple[Term, ...]
    any_of: bool = False  # "?" between terms: any one; "," (default): all

    def __str__(self) -> str:
        return ("?" if self.any_of else ",").join(str(t) for t in self.terms)

    @property
    def job_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for t in self.terms for i in t.job_ids))


def parse_dependency(text: str) -> Dependency:
    """The dependency a user wrote, or :class:`SpecError` saying what to change."""
    text = text.strip()
    if not text:
        raise SpecError("--dependency is empty; use e.g. afterok:123", field="dependency")
    if "," in text and "?" in text:
        raise SpecError(
            f"--dependency={text}: use ',' (all must hold) or '?' (any one), not both",
            field="dependency",
        )
    any_of = "?" in text
    terms = []
    for part in text.split("?" if any_of else ","):
        kind, _, rest = part.strip().partition(":")
        kind = kind.lower()
        if kind == "aftercorr":
            raise SpecError(
                f"--dependency={text}: aftercorr (task N of an array waits for task N of "
                "another) is not supported yet; use afterok:ID to wait for every task of "
                "the other array",
                field="dependency",
            )
        if kind not in _KINDS:
            raise SpecError(
                f"--dependency={text}: {kind or '(nothing)'!r} is not a dependency type; "
                f"use {', '.join(_KINDS)}",
                field="dependency",
            )
        if kind == "singleton":
            if rest:
                raise SpecError(
                    f"--dependency={text}: singleton takes no job ids", field="dependency"
                )
            terms.append(Term(kind))
            continue
        ids = tuple(rest.split(":")) if rest else ()
        if not ids:
            raise SpecError(
                f"--dependency={text}: {kind} needs job ids, e.g. {kind}:123", field="dependency"
            )
        for job_id in ids:
            if "+" in job_id:
                raise SpecError(
                    f"--dependency={text}: a delay after a job (+time) is not supported; "
                    "use --begin",
                    field="dependency",
                )
            if not _ID.fullmatch(job_id):
                raise SpecError(
                    f"--dependency={text}: {job_id!r} is not a job id", field="dependency"
                )
        terms.append(Term(kind, ids))
    return Dependency(tuple(terms), any_of)


class DependencyStatus(enum.Enum):
    WAITING = "Dependency"
    MET = "met"
    NEVER = "DependencyNeverSatisfied"


def _term(term: Term, states: Mapping[str, JobState], singleton_clear: bool) -> DependencyStatus:
    if term.kind == "singleton":
        return DependencyStatus.MET if singleton_clear else DependencyStatus.WAITING
    results = []
    for job_id in term.job_ids:
        state = states.get(job_id)
        if state is None:  # its record is gone (expired): it ended long ago, how is unknown
            results.append(
                DependencyStatus.MET
                if term.kind in ("after", "afterany")
                else DependencyStatus.NEVER
            )
            continue
        if term.kind == "after":
            met = state is not JobState.PENDING
            results.append(DependencyStatus.MET if met else DependencyStatus.WAITING)
        elif not state.is_terminal:
            results.append(DependencyStatus.WAITING)
        elif term.kind == "afterany":
            results.append(DependencyStatus.MET)
        elif term.kind == "afterok":
            ok = state is JobState.COMPLETED
            results.append(DependencyStatus.MET if ok else DependencyStatus.NEVER)
        else:  # afternotok
            ok = state is not JobState.COMPLETED
            results.append(DependencyStatus.MET if ok else DependencyStatus.NEVER)
    if DependencyStatus.NEVER in results:
        return DependencyStatus.NEVER
    if DependencyStatus.WAITING in results:
        return DependencyStatus.WAITING
    return DependencyStatus.MET


def evaluate(
    dependency: Dependency, states: Mapping[str, JobState], *, singleton_clear: bool = True
) -> tuple[DependencyStatus, list[str], list[str]]:
    """Whether ``dependency`` holds given the states of the jobs it names.

    Returns the status and the terms still waited on and already met (for
    ``kbatch show``).  With ``?``, one met term is enough and only all terms
    never met make it never; with ``,``, one never-met term makes it never.
    """
    waiting: list[str] = []
    met: list[str] = []
    never: list[str] = []
    for term in dependency.terms:
        status = _term(term, states, singleton_clear)
        {DependencyStatus.MET: met, DependencyStatus.WAITING: waiting}.get(status, never).append(
            str(term)
        )
    if dependency.any_of:
        if met:
            return DependencyStatus.MET, waiting, met
        if waiting:
            return DependencyStatus.WAITING, waiting, met
        return DependencyStatus.NEVER, waiting + never, met
    if never:
        return DependencyStatus.NEVER, waiting + never, met
    if waiting:
        return DependencyStatus.WAITING, waiting, met
    return DependencyStatus.MET, waiting, met


def describe(
    dependency: Dependency, states: Mapping[str, JobState], *, singleton_clear: bool = True
) -> str:
    """Slurm's ``scontrol show job`` form: each term with ``(fulfilled)``,
    ``(unfulfilled)`` or ``(failed)``, joined as the user joined them."""
    marks = {
        DependencyStatus.MET: "fulfilled",
        DependencyStatus.WAITING: "unfulfilled",
        DependencyStatus.NEVER: "failed",
    }
    parts = [f"{term}({marks[_term(term, states, singleton_clear)]})" for term in dependency.terms]
    return ("?" if dependency.any_of else ",").join(parts)
