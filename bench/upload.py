"""Part 5: code upload (``submit --code``) and ``kbatch fetch`` through a real server.

A generated tree (200 MB in 5,000 files; a tenth of that with ``--quick``) is
uploaded with the client's own ``upload``, the way ``kbatch submit --code``
does (walk, hash, ask, send what is missing); the floor is ``tar c | curl -T``
of the same tree to the same server, one stream into the same blob store
(``PUT /api/v1/blobs/<sha256 of the tar>``).  Then the same tree again,
unchanged, and with one file changed; and a job's 100 MB result fetched, with
``curl`` of the same file as its floor.  Throughputs are of the tree's bytes.
Timings are reported, never asserted by the tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.context import Context
from bench.kbatch_server import KbatchServer
from bench.report import Metric, SectionResult
from kbatch.client import Client
from kbatch.models import JobSpec

__all__ = ["TITLE", "run"]

TITLE = "5. Code upload and fetch"
MB = 1_000_000
TAR = ["tar", "c", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner"]


def make_tree(root: Path, total: int, files: int) -> int:
    """``files`` files of random bytes, ``total`` bytes in all, in 50 folders."""
    root.mkdir(parents=True)
    size = total // files
    for i in range(files):
        folder = root / f"d{i % 50:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{i:05d}.bin").write_bytes(os.urandom(size))
    return size * files


def _seconds(action: object) -> float:
    start = time.perf_counter()
    assert callable(action)
    action()
    return time.perf_counter() - start


def run(ctx: Context, result: SectionResult) -> None:
    if shutil.which("curl") is None or shutil.which("tar") is None:
        result.not_measured("curl and tar are needed for the floor")
        return
    scale = 10 if ctx.quick else 1
    total, count = 200 * MB // scale, 5000 // scale
    scratch = ctx.scratch / "upload"
    tree = scratch / "tree"
    size = make_tree(tree, total, count)
    result.details["tree"] = f"{count} files of random bytes, {size / MB:.0f} MB, in 50 folders"
    config = scratch / "kbatch.toml"
    config.write_text('[policy]\nmax_upload_bytes = "2G"\n')
    server = KbatchServer(scratch / "state", args=["--config", str(config)])
    server.start()
    result.details["server"] = "`kbatch server`, local backend, upload limit raised to 2 GiB"
    try:
        _floor(server, tree, size, scratch, result)
        _uploads(server, tree, size, result)
        _fetch(server, scratch, result, 100 * MB // scale)
        peak = server.peak_rss_mib()
        if peak is not None:
            result.add(
                Metric(
                    "server_peak_rss",
                    "server peak memory over the whole section",
                    "MiB",
                    peak,
                    note=f"every file streamed; the largest single body was {size / MB:.0f} MB",
                )
            )
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _floor(
    server: KbatchServer, tree: Path, size: int, scratch: Path, result: SectionResult
) -> None:
    archive = scratch / "tree.tar"
    with open(archive, "wb") as out:
        subprocess.run([*TAR, "-C", str(tree), "."], stdout=out, check=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    archive.unlink()
    url = f"{server.url}/api/v1/blobs/{digest}"
    command = (
        f"{' '.join(TAR)} -C {tree} . | curl -sf -T - -H 'Authorization: Bearer {server.token}' "
        f"-o /dev/null {url}"
    )
    seconds = _seconds(
        lambda: subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)
    )
    result.add(
        Metric(
            "floor_throughput",
            "floor: `tar c | curl -T` of the tree to the server",
            "MB/s",
            size / MB / seconds,
            better="higher",
            note=f"{seconds:.2f} s; one stream, hashed and stored by the same blob store",
        )
    )


def _uploads(server: KbatchServer, tree: Path, size: int, result: SectionResult) -> None:
    token = server.add_token("bench-uploader")  # has sent nothing: the first upload sends all
    with Client(server.url, token) as client:
        first = _seconds(lambda: client.upload(tree))
        result.add(
            Metric(
                "first_upload_throughput",
                "first upload of the tree (`client.upload`: walk, hash, send)",
                "MB/s",
                size / MB / first,
                better="higher",
                note=f"{first:.2f} s",
            )
        )
        result.add(Metric("first_upload", "first upload of the tree", "s", first))
        again = [_seconds(lambda: client.upload(tree)) for _ in range(3)]
        result.add(
            Metric.from_samples(
                "reupload_unchanged",
                "the same tree again, unchanged (listed, hashes remembered, one request)",
                "s",
                again,
            )
        )
        changed = next(tree.rglob("*.bin"))
        times = []
        for _ in range(3):
            changed.write_bytes(os.urandom(changed.stat().st_size))
            times.append(_seconds(lambda: client.upload(tree)))
        result.add(
            Metric.from_samples(
                "reupload_one_changed", "the tree again with one file changed", "s", times
            )
        )


def _fetch(server: KbatchServer, scratch: Path, result: SectionResult, size: int) -> None:
    code = scratch / "job"
    code.mkdir()
    (code / "README").write_text("a job that writes one large result\n")
    with server.client() as client:
        upload = client.upload(code)
        script = f"#!/bin/sh\nhead -c {size} /dev/urandom > result.bin\n"
        job = client.submit(JobSpec(script=script, workdir=str(scratch), code=upload.id))
        client.wait(job.id, poll=0.1, timeout=600)
        (entry,) = client.results(job.id).files
        seconds = _seconds(lambda: client.fetch(job.id, scratch / "fetched"))
        assert (scratch / "fetched" / "result.bin").stat().st_size == size
        result.add(
            Metric(
                "fetch_throughput",
                f"`client.fetch` of a {size // MB} MB result",
                "MB/s",
                size / MB / seconds,
                better="higher",
                note=f"{seconds:.2f} s, written and checked against its sha256",
            )
        )
        url = f"{server.url}/api/v1/jobs/{job.id}/results/{entry.sha256}"
        command = [
            "curl", "-sf", "-H", f"Authorization: Bearer {server.token}", "-o",
            str(scratch / "curl.bin"), url,
        ]  # fmt: skip
        floor = _seconds(lambda: subprocess.run(command, check=True))
        result.add(
            Metric(
                "fetch_floor_throughput",
                "floor: `curl` of the same result",
                "MB/s",
                size / MB / floor,
                better="higher",
                note=f"{floor:.2f} s",
            )
        )
