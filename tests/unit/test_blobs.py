"""The server's blob store on a real directory and SQLite file: per-user answers, no
half-made blobs, manifests only when complete, garbage collected when unused."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kbatch.errors import InvalidRequest
from kbatch.models import JobSpec
from kbatch.server.app import _sweep_uploads
from kbatch.server.blobs import BlobStore
from kbatch.uploads.manifest import FileEntry, Manifest
from tests.support.memory_backend import MemoryBackend


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def chunks(*parts: bytes, fail: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if fail:
        raise ConnectionResetError("the client went away")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlobStore]:
    blobs = BlobStore(tmp_path / "uploads", grace=3600)
    blobs.open()
    yield blobs
    blobs.close()


def put(store: BlobStore, user: str, data: bytes, *, digest: str | None = None) -> int:
    return asyncio.run(store.receive(user, digest or sha(data), chunks(data), max_bytes=1000))


def leftovers(store: BlobStore) -> list[Path]:
    return list(store.tmp.iterdir())


def test_missing_is_per_user_though_the_disk_keeps_one_copy(store: BlobStore) -> None:
    data = b"alice's secret model"
    assert store.missing("alice", [sha(data)]) == [sha(data)]
    assert put(store, "alice", data) == len(data)
    assert store.missing("alice", [sha(data)]) == []
    # bob cannot learn that alice has it: for him it is missing, and he must send it all
    assert store.missing("bob", [sha(data)]) == [sha(data)]
    put(store, "bob", data)
    assert store.missing("bob", [sha(data)]) == []
    blobs = [p for shard in store.blobs.iterdir() for p in shard.iterdir()]
    assert len(blobs) == 1 and stat.S_IMODE(blobs[0].stat().st_mode) == 0o444


def test_a_wrong_hash_too_large_or_cut_upload_leaves_nothing(store: BlobStore) -> None:
    with pytest.raises(InvalidRequest, match="hash to") as wrong:
        put(store, "alice", b"these bytes", digest=sha(b"other bytes"))
    assert wrong.value.status == 422 and wrong.value.code == "digest_mismatch"
    big = b"x" * 1001
    with pytest.raises(InvalidRequest, match="over the limit of 1000 bytes") as large:
        put(store, "alice", big)
    assert large.value.status == 413
    with pytest.raises(ConnectionResetError):
        asyncio.run(store.receive("alice", sha(b"ab"), chunks(b"a", fail=True), max_bytes=10))
    assert leftovers(store) == []
    assert not any(store.blobs.iterdir())
    assert store.missing("alice", [sha(b"these bytes"), sha(big), sha(b"ab")]) == [
        sha(b"these bytes"),
        sha(big),
        sha(b"ab"),
    ]


def manifest_of(**files: bytes) -> Manifest:
    return Manifest(
        files=[FileEntry(path=p, sha256=sha(d), size=len(d)) for p, d in sorted(files.items())]
    )


def test_a_manifest_is_stored_only_once_every_blob_is_the_callers(store: BlobStore) -> None:
    manifest = manifest_of(a=b"A", b=b"B")
    put(store, "bob", b"A")  # bob's blob does not count for alice
    answer = store.commit("alice", manifest)
    assert not answer.complete and answer.missing == [sha(b"A"), sha(b"B")]
    assert store.manifest("alice", answer.id) is None
    put(store, "alice", b"A")
    assert store.commit("alice", manifest).missing == [sha(b"B")]  # a retry sends the rest only
    put(store, "alice", b"B")
    done = store.commit("alice", manifest)
    assert done.complete and done.missing == [] and (done.files, done.bytes) == (2, 2)
    assert store.manifest("alice", done.id) == manifest
    assert store.manifest("bob", done.id) is None  # the id is no key to someone else's upload


def test_materialize_copies_or_links_and_keeps_the_executable_bit(
    store: BlobStore, tmp_path: Path
) -> None:
    put(store, "alice", b"#!/bin/sh\n")
    put(store, "alice", b"data")
    manifest = Manifest(
        files=[
            FileEntry(path="bin/run.sh", sha256=sha(b"#!/bin/sh\n"), size=10, executable=True),
            FileEntry(path="data.txt", sha256=sha(b"data"), size=4),
        ]
    )
    copied = tmp_path / "copied"
    copied.mkdir()
    store.materialize(manifest, copied, link=False)
    assert os.access(copied / "bin/run.sh", os.X_OK)
    assert stat.S_IMODE((copied / "data.txt").stat().st_mode) == 0o644
    (copied / "data.txt").write_text("changed")  # a copy: the blob is untouched
    assert store.path(sha(b"data")).read_bytes() == b"data"
    linked = tmp_path / "linked"
    linked.mkdir()
    store.materialize(manifest, linked, link=True, user="alice")
    twin = linked / "data.txt"
    assert stat.S_IMODE(twin.stat().st_mode) == 0o444
    assert twin.stat().st_ino != store.path(sha(b"data")).stat().st_ino  # never the blob itself
    run = linked / "bin/run.sh"
    assert os.access(run, os.X_OK) and stat.S_IMODE(run.stat().st_mode) == 0o555
    # the plain blob stays not executable: the twin is a file of its own
    assert stat.S_IMODE(store.path(sha(b"#!/bin/sh\n")).stat().st_mode) == 0o444
    # Alice's second job shares her twin; Bob's job links his own: a link count that one
    # user's job sees counts that user's jobs, never anyone else's.
    again = tmp_path / "again"
    again.mkdir()
    store.materialize(manifest, again, link=True, user="alice")
    assert (again / "data.txt").stat().st_ino == twin.stat().st_ino
    assert twin.stat().st_nlink == 3  # the twin, and alice's two jobs
    bobs = tmp_path / "bobs"
    bobs.mkdir()
    store.materialize(manifest, bobs, link=True, user="bob")
    assert (bobs / "data.txt").stat().st_ino != twin.stat().st_ino
    assert twin.stat().st_nlink == 3 and (bobs / "data.txt").stat().st_nlink == 2


def test_collect_keeps_new_and_changed_files_as_the_jobs_results(
    store: BlobStore, tmp_path: Path
) -> None:
    put(store, "alice", b"input")
    manifest = manifest_of(**{"in.txt": b"input"})
    ident = store.commit("alice", manifest).id
    code = tmp_path / "code"
    code.mkdir()
    store.materialize(manifest, code, link=True, user="alice")
    (code / "out.txt").write_bytes(b"output")
    results = store.collect("7", "alice", ident, code, owners=None)
    assert [e.path for e in results.files] == ["out.txt"]
    assert store.results("7") == results
    assert store.path(sha(b"output")).read_bytes() == b"output"


def test_sweep_collects_what_nothing_uses(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "uploads", grace=0)
    store.open()
    try:
        put(store, "alice", b"kept")
        put(store, "alice", b"result")
        put(store, "alice", b"stray")  # sent, never used by a manifest
        ident = store.commit("alice", manifest_of(k=b"kept")).id
        store.attach("1", "alice", ident)
        store.set_results("1", "alice", ident, manifest_of(r=b"result"))

        async def alive(ids: list[str]) -> set[str]:
            return {"1"} & set(ids)

        assert asyncio.run(store.sweep(alive)) == 1
        assert store.exists(sha(b"kept")) and store.exists(sha(b"result"))
        assert not store.exists(sha(b"stray"))
        assert store.missing("alice", [sha(b"stray")]) == [sha(b"stray")]

        async def none(ids: list[str]) -> set[str]:
            return set()

        assert asyncio.run(store.sweep(none)) == 2  # job 1 is gone: its upload and results go
        assert store.results("1") is None and store.manifest("alice", ident) is None
        assert [p for shard in store.blobs.iterdir() for p in shard.iterdir()] == []
    finally:
        store.close()


def test_the_servers_sweep_asks_the_backend_which_jobs_are_left(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, bool]:
        store = BlobStore(tmp_path / "uploads", grace=0)
        store.open()
        backend = MemoryBackend()
        await backend.start()
        try:
            await store.receive("alice", sha(b"kept"), chunks(b"kept"), max_bytes=100)
            await store.receive("alice", sha(b"gone"), chunks(b"gone"), max_bytes=100)
            kept = store.commit("alice", manifest_of(k=b"kept")).id
            gone = store.commit("alice", manifest_of(g=b"gone")).id
            job = await backend.submit("alice", JobSpec(script="#!/bin/sh\n"), idempotency_key=None)
            store.attach(job.id, "alice", kept)
            store.attach("no-such-job", "alice", gone)
            sweeper = asyncio.create_task(_sweep_uploads(store, backend, every=0.01))
            for _ in range(500):
                await asyncio.sleep(0.01)
                if not store.exists(sha(b"gone")):
                    break
            sweeper.cancel()
            return store.exists(sha(b"kept")), store.exists(sha(b"gone"))
        finally:
            await backend.stop()
            store.close()

    assert asyncio.run(scenario()) == (True, False)
