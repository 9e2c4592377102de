"""The local store's insert: the record it returns is the row it wrote, and a group
commit (``insert_many``) refuses one submission without losing the others."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kbatch.backends.local.store import Insert, JobStore
from kbatch.errors import Conflict, PermissionDenied
from kbatch.models import JobSpec

SPECS = [
    JobSpec(script="#!/bin/sh\ntrue\n", workdir="/home/a", comment="c", cpus=2),
    JobSpec(script="#!/bin/sh\ntrue\n", workdir="/home/a", hold=True, memory=2**30),
    JobSpec(script="#!/bin/sh\ntrue\n", name="n", dependency="afterok:1", time_limit=60),
    JobSpec(script="#!/bin/sh\ntrue\n", begin=datetime(2030, 1, 1, tzinfo=UTC)),
    JobSpec(script="#!/bin/sh\ntrue\n", array="0-9%2", name="arr"),
]


def _paths(job_id: int) -> tuple[str, str | None]:
    return f"/out/{job_id}", f"/err/{job_id}" if job_id % 2 else None


@pytest.mark.parametrize("priority", [False, True])
def test_the_returned_record_is_the_row(tmp_path: Path, priority: bool) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    for i, spec in enumerate(SPECS):
        record, new = store.insert(
            user="alice",
            spec=spec,
            paths=_paths,
            idempotency_key=f"k{i}",
            now=1_700_000_000.25 + i,
            priority=priority,
        )
        assert new
        assert record == store.get(record.id)
    reasons = [store.get(i + 1).reason for i in range(len(SPECS))]
    # With priority, a job behind a pending one of its user says so (a held one stays held).
    if priority:
        assert reasons == ["None", "JobHeldUser", "Priority", "Priority", "Priority"]
    else:
        assert reasons == ["None", "JobHeldUser", "None", "None", "None"]


def test_a_group_commit_refuses_one_and_keeps_the_others(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    spec = SPECS[0]
    first, _ = store.insert(user="alice", spec=spec, paths=_paths, idempotency_key="same", now=1.0)

    def item(user: str, key: str | None, spec: JobSpec = spec) -> Insert:
        return Insert(
            user=user, spec=spec, paths=_paths, idempotency_key=key, now=2.0, max_active=3
        )

    results = store.insert_many(
        [
            item("alice", "new"),  # stored
            item("alice", "same"),  # the job the key made before
            item("alice", "same", SPECS[1]),  # the key with another spec: refused
            item("alice", "again"),  # stored: alice has 3 active now
            item("alice", "one-too-many"),  # over max_active: refused, in the same transaction
            item("alice", "new"),  # the key used earlier in this very batch
            item("bob", "new"),  # keys are per user
        ]
    )
    stored, same, reused, again, over, repeat, bob = results
    assert isinstance(stored, tuple) and stored[1]
    assert same == (first, False)
    assert isinstance(reused, Conflict)
    assert isinstance(again, tuple) and again[1]
    assert isinstance(over, PermissionDenied)
    assert isinstance(repeat, tuple) and repeat == (stored[0], False)
    assert isinstance(bob, tuple) and bob[1]
    ids = [r.id for r in store.list()]
    assert ids == [first.id, stored[0].id, again[0].id, bob[0].id]
    assert all(store.get(i) == r for i, r in [(stored[0].id, stored[0]), (bob[0].id, bob[0])])


@pytest.mark.parametrize(("synchronous", "pragma"), [("normal", 1), ("full", 2)])
def test_what_a_commit_waits_for_is_chosen(tmp_path: Path, synchronous: str, pragma: int) -> None:
    store = JobStore(tmp_path / "jobs.sqlite", synchronous=synchronous)
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == pragma
    with pytest.raises(ValueError, match="synchronous"):
        JobStore(tmp_path / "other.sqlite", synchronous="off")
