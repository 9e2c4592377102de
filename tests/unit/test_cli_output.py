"""The CLI's tables."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kbatch.cli.output import print_table
from kbatch.models import Job, JobState


def test_an_empty_queue_prints_the_header(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([])
    assert capsys.readouterr().out.split() == ["JOBID", "NAME", "STATE", "TIME", "REASON"]


def test_a_queue_with_users(capsys: pytest.CaptureFixture[str]) -> None:
    job = Job(
        id="7", user="alice", name="train.sh", state=JobState.PENDING, submitted=datetime.now(UTC)
    )
    print_table([job], show_user=True)
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["JOBID", "USER", "NAME", "STATE", "TIME", "REASON"]
    assert row.split()[:4] == ["7", "alice", "train.sh", "PENDING"]


def test_show_says_who_cancelled(capsys: pytest.CaptureFixture[str]) -> None:
    from kbatch.cli.output import print_job

    job = Job(id="7", user="u", name="n", state=JobState.PENDING, submitted=datetime.now(UTC))
    print_job(job)
    assert "CancelledBy" not in capsys.readouterr().out
    cancelled = Job(
        id="7",
        user="u",
        name="n",
        state=JobState.CANCELLED,
        submitted=datetime.now(UTC),
        cancelled_by="admin",
    )
    print_job(cancelled)
    assert "CancelledBy: admin" in capsys.readouterr().out
