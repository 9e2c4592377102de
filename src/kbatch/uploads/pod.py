"""What moves a Kubernetes job's files, in its pod, from kbatch's own image.

The job's image needs nothing (a POSIX shell for the entrypoint): these run in
containers of their own beside it, sharing the ``/code`` volume::

    python -m kbatch.uploads.pod download /code   # init container: the job's files in
    python -m kbatch.uploads.pod sidecar /code    # native sidecar: on SIGTERM (the job has
                                                  # ended), hands back what is new or changed
    python -m kbatch.uploads.pod results /code    # the same, at once

From the environment: ``KBATCH_TRANSFER_URL`` (the server as the pod reaches it),
``KBATCH_JOB_ID`` and ``KBATCH_TRANSFER_TOKEN`` (good for this job's files and
results alone, until the job's time is up).  Every path the server names is
checked before anything is written, as ``kbatch fetch`` does.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["download", "hand_back", "main"]


def download(url: str, token: str, job_id: str, dest: Path) -> int:
    """The job's uploaded files into ``dest``; returns how many."""
    from kbatch.client import Client
    from kbatch.client import requests as rq
    from kbatch.uploads.manifest import Manifest, check_manifest

    with Client(url, token, retry_for=60) as client:
        manifest = check_manifest(
            client._call(rq.job_code(job_id), Manifest), max_bytes=None, max_files=None
        )
        dest.mkdir(parents=True, exist_ok=True)
        for entry in manifest.files:
            client._download(rq.job_code_file(job_id, entry.sha256), dest, entry, None)
    return len(manifest.files)


def hand_back(url: str, token: str, job_id: str, code: Path) -> int:
    """What the job left in ``code`` that is new or changed, to the server; returns how many."""
    import msgspec

    from kbatch.client import Client
    from kbatch.client import requests as rq
    from kbatch.uploads.manifest import Manifest, UploadAnswer
    from kbatch.uploads.results import changed_files

    with Client(url, token, retry_for=60) as client:
        uploaded = client._call(rq.job_code(job_id), Manifest)
        entries = [found.entry for found in changed_files(str(code), uploaded)]
        results = Manifest(files=entries)
        body = msgspec.json.encode(results)
        answer = client._call(rq.post_results(job_id, body), UploadAnswer)
        if answer.complete:
            return len(entries)
        by_digest = {e.sha256: e for e in entries}
        for digest in answer.missing:
            entry = by_digest[digest]
            source = code.joinpath(*entry.path.split("/"))
            client._put_file(rq.put_result(job_id, digest, entry.size), source, None)
        answer = client._call(rq.post_results(job_id, body), UploadAnswer)
        if not answer.complete:
            raise SystemExit(f"kbatch-transfer: the server still lacks {answer.missing}")
    return len(entries)


def _sidecar(url: str, token: str, job_id: str, code: Path) -> int:
    """Wait for SIGTERM (the kubelet's, once the job's container has ended), then hand back."""
    ended = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: ended.set())
    signal.signal(signal.SIGINT, lambda *_: ended.set())
    print("kbatch-transfer: waiting for the job to end", file=sys.stderr, flush=True)
    while not ended.wait(3600):
        pass
    return hand_back(url, token, job_id, code)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    from kbatch.errors import KbatchError

    args = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if env is None else env
    if len(args) != 2 or args[0] not in ("download", "results", "sidecar"):
        print("usage: python -m kbatch.uploads.pod download|results|sidecar DIR", file=sys.stderr)
        return 2
    missing = [
        k
        for k in ("KBATCH_TRANSFER_URL", "KBATCH_JOB_ID", "KBATCH_TRANSFER_TOKEN")
        if not environ.get(k)
    ]
    if missing:
        print(f"kbatch-transfer: {', '.join(missing)} not set", file=sys.stderr)
        return 2
    action, where = args[0], Path(args[1])
    url, token, job_id = (
        environ["KBATCH_TRANSFER_URL"],
        environ["KBATCH_TRANSFER_TOKEN"],
        environ["KBATCH_JOB_ID"],
    )
    try:
        if action == "download":
            count = download(url, token, job_id, where)
            print(f"kbatch-transfer: {count} files in {where}", file=sys.stderr)
        elif action == "results":
            count = hand_back(url, token, job_id, where)
            print(f"kbatch-transfer: handed back {count} result files", file=sys.stderr)
        else:
            count = _sidecar(url, token, job_id, where)
            print(f"kbatch-transfer: handed back {count} result files", file=sys.stderr)
    except KbatchError as exc:
        print(f"kbatch-transfer: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
