"""Slurm's --dependency grammar and --begin times: what is accepted, what it means, and the
clear refusals (issue 13's bad inputs)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kbatch.dependencies import DependencyStatus, evaluate, parse_dependency
from kbatch.errors import SpecError
from kbatch.models import JobState
from kbatch.units import parse_begin

C, F, P, R, X = (
    JobState.COMPLETED,
    JobState.FAILED,
    JobState.PENDING,
    JobState.RUNNING,
    JobState.CANCELLED,
)


@pytest.mark.parametrize(
    ("text", "shown", "ids"),
    [
        ("afterok:12", "afterok:12", ("12",)),
        ("afterok:12:13,afterany:14", "afterok:12:13,afterany:14", ("12", "13", "14")),
        ("afternotok:5?afterok:6", "afternotok:5?afterok:6", ("5", "6")),
        ("singleton", "singleton", ()),
        ("after:a1b2c3d4", "after:a1b2c3d4", ("a1b2c3d4",)),
        ("AFTEROK:7", "afterok:7", ("7",)),
    ],
)
def test_grammar(text: str, shown: str, ids: tuple[str, ...]) -> None:
    dep = parse_dependency(text)
    assert (str(dep), dep.job_ids) == (shown, ids)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("afterok", "needs job ids"),
        ("afterok:", "needs job ids"),
        ("afterbad:1", "not a dependency type"),
        ("afterok:1,afterany:2?after:3", "not both"),
        ("singleton:4", "no job ids"),
        ("afterok:1+60", r"\(\+time\)"),
        ("afterok:1/2", "not a job id"),
        ("aftercorr:9", "not supported yet; use afterok:ID"),
    ],
)
def test_refusals_say_what_to_change(text: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        parse_dependency(text)


@pytest.mark.parametrize(
    ("text", "states", "status"),
    [
        ("afterok:1", {"1": R}, DependencyStatus.WAITING),
        ("afterok:1", {"1": C}, DependencyStatus.MET),
        ("afterok:1", {"1": F}, DependencyStatus.NEVER),
        ("afterok:1", {"1": X}, DependencyStatus.NEVER),
        ("afternotok:1", {"1": C}, DependencyStatus.NEVER),
        ("afternotok:1", {"1": JobState.TIMEOUT}, DependencyStatus.MET),
        ("afterany:1", {"1": JobState.TIMEOUT}, DependencyStatus.MET),
        ("afterany:1", {"1": P}, DependencyStatus.WAITING),
        ("after:1", {"1": P}, DependencyStatus.WAITING),
        ("after:1", {"1": R}, DependencyStatus.MET),
        ("afterok:1:2", {"1": C, "2": R}, DependencyStatus.WAITING),
        ("afterok:1,afterok:2", {"1": C, "2": F}, DependencyStatus.NEVER),
        ("afterok:1?afterok:2", {"1": F, "2": R}, DependencyStatus.WAITING),
        ("afterok:1?afterok:2", {"1": F, "2": C}, DependencyStatus.MET),
        ("afterok:1?afterok:2", {"1": F, "2": X}, DependencyStatus.NEVER),
        ("afterok:1", {}, DependencyStatus.NEVER),  # its record expired: how it ended is unknown
        ("afterany:1", {}, DependencyStatus.MET),
    ],
)
def test_evaluation(text: str, states: dict[str, JobState], status: DependencyStatus) -> None:
    assert evaluate(parse_dependency(text), states)[0] is status


def test_show_lists_what_is_waited_on_and_what_is_met() -> None:
    status, waiting, met = evaluate(
        parse_dependency("afterok:1,afterany:2,singleton"), {"1": C, "2": R}, singleton_clear=False
    )
    assert status is DependencyStatus.WAITING
    assert (waiting, met) == (["afterany:2", "singleton"], ["afterok:1"])


NOW = datetime(2026, 11, 29, 14, 30, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("now+30", NOW + timedelta(seconds=30)),  # seconds, as in Slurm
        ("now+10minutes", NOW + timedelta(minutes=10)),
        ("now+1hour", NOW + timedelta(hours=1)),
        ("now+2days", NOW + timedelta(days=2)),
        ("16:00", NOW.replace(hour=16, minute=0)),
        ("4:00pm", NOW.replace(hour=16, minute=0)),
        ("09:15", (NOW + timedelta(days=1)).replace(hour=9, minute=15)),  # passed: tomorrow
        ("noon", (NOW + timedelta(days=1)).replace(hour=12, minute=0)),
        ("teatime", NOW.replace(hour=16, minute=0)),
        ("tomorrow", (NOW + timedelta(days=1)).replace(hour=0, minute=0)),
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12-01T08:00", datetime(2026, 12, 1, 8, 0, tzinfo=UTC)),
    ],
)
def test_begin_forms(text: str, expected: datetime) -> None:
    assert parse_begin(text, NOW) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("2026-11-01T08:00", "in the past"),
        ("yesterday", "not a time"),
        ("25:00", "not a time"),
        ("2026-13-01", "not a time"),
        ("now+5fortnights", "not a time"),
        ("", "not a time"),
    ],
)
def test_begin_refusals(text: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        parse_begin(text, NOW)
