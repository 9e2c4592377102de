"""The local store's listing fast path gives exactly what decoding each record gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbatch.backends.local.store import JobStore
from kbatch.models import JobSpec, JobState


def _filled(path: Path) -> JobStore:
    store = JobStore(path / "jobs.sqlite")
    specs = [
        JobSpec(script="#!/bin/sh\ntrue\n", workdir="/home/a", comment="sweep 1", cpus=2),
        JobSpec(script="#!/bin/sh\ntrue\n", workdir="/home/b", environment={"X": "1" * 500}),
        JobSpec(script="#!/bin/sh\nfalse\n", name="named", memory=2**30, time_limit=60),
    ]
    for i, spec in enumerate(specs):
        store.insert(
            user="alice" if i < 2 else "bob",
            spec=spec,
            paths=lambda job_id: (f"/out/{job_id}", None if job_id != 3 else f"/err/{job_id}"),
            idempotency_key=None,
            now=1_700_000_000.5 + i,
        )
    store.update(3, state=JobState.FAILED, exit_code=1, started=1_700_000_010.25)
    store.update(3, finished=1_700_000_020.0, reason="NonZeroExitCode")
    return store


@pytest.mark.parametrize(
    ("user", "states"),
    [(None, None), ("alice", None), (None, [JobState.FAILED]), ("bob", [JobState.PENDING])],
)
def test_list_jobs_matches_records(
    tmp_path: Path, user: str | None, states: list[JobState] | None
) -> None:
    store = _filled(tmp_path)
    try:
        expected = [r.to_job() for r in store.list(user=user, states=states)]
        assert store.list_jobs(user=user, states=states) == expected
    finally:
        store.close()
    if user is None and states is None:
        assert [j.comment for j in expected] == ["sweep 1", None, None]
        assert [j.workdir for j in expected] == ["/home/a", "/home/b", None]
