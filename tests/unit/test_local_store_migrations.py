"""The local store opens every schema version that was released, and migrates it in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kbatch.backends.local.store import SCHEMA_VERSION, JobStore
from kbatch.lifecycle import Desired
from kbatch.models import JobSpec, JobState

DATA = Path(__file__).resolve().parents[1] / "data"


def _v1(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.executescript((DATA / "store-v1.sql").read_text())
    db.close()
    return path


def test_a_version_1_store_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    store = JobStore(_v1(tmp_path / "jobs.sqlite"))
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        done, running, waiting = (store.get(i) for i in (1, 2, 3))
        assert done is not None and running is not None and waiting is not None
        assert [done.state, running.state, waiting.state] == [
            JobState.COMPLETED,
            JobState.RUNNING,
            JobState.PENDING,
        ]
        # Version 1 ran the end hook of every job that ended: it must not run again.
        assert (done.finalized, running.finalized, waiting.finalized) == (1, 0, 0)
        assert {r.desired for r in (done, running, waiting)} == {Desired.RUN}
        assert waiting.spec.memory == 2**30  # specs written by version 1 still decode
        assert store.needing_attention() == [2]  # the running job is looked at after a restart
        # New jobs go on from the old ids; the old idempotency keys still hold.
        new, created = store.insert(
            user="bob",
            spec=JobSpec(script="#!/bin/sh\n", workdir="/w"),
            paths=lambda i: (f"/w/{i}", None),
            idempotency_key="fresh",
            now=1.0,
        )
        assert (new.id, created) == (4, True)
        again, created = store.insert(
            user="bob",
            spec=waiting.spec,
            paths=lambda i: (f"/w/{i}", None),
            idempotency_key="k2",
            now=2.0,
        )
        assert (again.id, created) == (3, False)
    finally:
        store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite")  # opening again changes nothing
    try:
        assert [j.id for j in reopened.list_jobs()] == ["1", "2", "3", "4"]
    finally:
        reopened.close()


def test_a_store_from_a_newer_kbatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    JobStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer kbatch"):
        JobStore(path)


def test_a_failed_migration_leaves_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kbatch.backends.local import store as store_module

    path = _v1(tmp_path / "jobs.sqlite")
    broken = dict(store_module.MIGRATIONS)
    broken[2] = broken[2] + "\nTHIS IS NOT SQL;"
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    with pytest.raises(sqlite3.OperationalError):
        JobStore(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    assert "desired" not in columns  # all or nothing
    db.close()
