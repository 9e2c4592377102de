"""Idempotency keys for CLI submissions that survive the CLI process.

The client retries a submission within one run with the same key, so a lost
answer makes no second job.  But when every retry fails (``TransportError``),
the user runs ``kbatch submit`` again, a new process: with a new random key, a
job the server did make before the answer was lost would be made twice.

So the key is a random nonce kept on disk until the server answers:

- A submission is named by the digest of the server URL and the spec (script,
  arguments, options, working directory, environment: everything sent).
- Before sending, the CLI opens ``<state dir>/submissions/<digest>-<slot>``
  and holds an exclusive ``flock`` on it for the whole run.  A file that exists
  and is not locked by anyone is the record of an earlier run whose outcome is
  unknown: its key is reused (if younger than :data:`MAX_AGE`), so the server
  answers with the job that run may have made.  A new file gets a new key.
- Once the server has answered (the job, or a refusal: a 4xx says nothing was
  made), the file is removed.  It stays on a lost connection or a 5xx.

Hence a rerun after a failure is the same submission, but a deliberate second
submission of the same script, after the first was acknowledged, finds no file
and makes a second job.  Runs at the same time (``for i in 1 2 3; do kbatch
submit x.sh & done``) find each other's files locked and take the next slot,
so each gets its own key and its own job; and a slot is reused by a later run
only after the run that held it has ended without an answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from kbatch.errors import ApiError
from kbatch.models import JobSpec

__all__ = ["MAX_AGE", "submission_key"]

MAX_AGE = 24 * 3600.0  # seconds a key of an unanswered submission is reused for
MAX_SLOTS = 64


def spec_digest(url: str, spec: JobSpec) -> str:
    content = msgspec.json.encode({"url": url, "spec": spec}, order="sorted")
    return hashlib.sha256(content).hexdigest()[:32]


@contextlib.contextmanager
def submission_key(directory: Path, url: str, spec: JobSpec) -> Iterator[str]:
    """The idempotency key for submitting ``spec`` to ``url``; forgotten once answered.

    Best effort: where the record cannot be kept (a full disk, a read-only home),
    the key is random, as it was before records existed.
    """
    try:
        claimed = _claim(directory, spec_digest(url, spec))
    except OSError:
        claimed = None
    if claimed is None:
        yield os.urandom(16).hex()
        return
    fd, path, key = claimed
    try:
        try:
            yield key
        except ApiError as exc:
            if exc.status < 500:
                _forget(fd, path)  # refused: nothing was made
            raise
        _forget(fd, path)  # answered; a later run is a new submission
    finally:
        os.close(fd)


def _claim(directory: Path, digest: str) -> tuple[int, Path, str] | None:
    """The first slot no running submission holds, locked: its fd, path and key."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for slot in range(MAX_SLOTS):
        path = directory / f"{digest}-{slot}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # another run is submitting the same spec right now
            continue
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # its holder answered and removed it between our open and lock
            os.close(fd)
            return _claim(directory, digest)
        key = _recorded(fd)
        if key is None:
            key = os.urandom(16).hex()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{key} {time.time():.0f}\n".encode(), 0)
            os.fsync(fd)
        return fd, path, key
    return None  # 64 identical submissions at once: each of the rest gets a random key


def _forget(fd: int, path: Path) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # a run that opened it before the unlink finds no key
        path.unlink(missing_ok=True)


def _recorded(fd: int) -> str | None:
    """The key of an earlier, unanswered run, if it is recent enough to reuse."""
    words = os.pread(fd, 200, 0).decode(errors="replace").split()
    if len(words) != 2 or not words[1].isdigit():
        return None
    if time.time() - int(words[1]) > MAX_AGE:
        return None
    return words[0]
