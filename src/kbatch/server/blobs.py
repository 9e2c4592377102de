"""The server's content-addressed store of uploaded files (``kbatch submit --code``).

Layout, in ``<state dir>/uploads/`` (on Kubernetes a volume the chart gives the server)::

    blobs/ab/ab12...ef      one file per distinct content, named by its sha256, read-only
    blobs/ab/ab12...ef.K    one user's read-only twin of it, for hard links into their
                            jobs' folders (run_as_user); .K.x executable
    tmp/                    blobs being received; never seen by a job
    uploads.sqlite          who has uploaded what, manifests, and each job's upload and results
    transfer.key            signs transfer tokens: what a job's pod uses to fetch its files
                            and hand back its results (Kubernetes), that job's alone

Per user: a user "has" a blob only if they sent it themselves (:meth:`BlobStore.missing`
answers per user), so nobody learns from this store what anyone else uploaded,
even though the disk keeps one copy of each content.  A blob is received into
``tmp/`` while its sha256 is computed and its size checked, and renamed into
place only if it matches its name: an interrupted or wrong upload leaves
nothing a job could start from, and a retry sends again only what is missing.

Garbage: :meth:`BlobStore.sweep` drops the records of jobs that are gone,
manifests no job uses (after a grace period, so an upload in progress is kept),
and then every blob that nothing kept refers to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import hmac
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec

from kbatch.errors import InvalidRequest
from kbatch.uploads.manifest import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MAX_UPLOAD_FILES,
    FileEntry,
    Manifest,
    UploadAnswer,
    is_digest,
    manifest_id,
)
from kbatch.uploads.results import changed_files

__all__ = ["TOKEN_PREFIX", "BlobStore"]

log = logging.getLogger("kbatch.uploads")
F = TypeVar("F", bound=Callable[..., Any])
TOKEN_PREFIX = "kbj1."  # noqa: S105 (a prefix) transfer tokens: kbj1.<job id>.<expiry>.<hmac>
GRACE = 24 * 3600.0  # seconds an upload not (yet) used by a job is kept
TMP_STALE = 3600.0  # a temp file untouched this long belongs to no upload in progress
FICLONE = 0x40049409  # ioctl: a copy-on-write clone (btrfs, XFS), else a real copy

_SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    user TEXT NOT NULL, digest TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (user, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests (
    user TEXT NOT NULL, id TEXT NOT NULL, body BLOB NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (user, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, user TEXT NOT NULL, manifest TEXT NOT NULL, results BLOB
);
"""


def _copy(source: Path, target: Path, mode: int) -> None:
    """``target`` (new) as a copy of ``source``: a clone where the filesystem can."""
    fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        fd_in = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.ioctl(fd_out, FICLONE, fd_in)
                return
            except OSError:
                pass
            size = os.fstat(fd_in).st_size
            offset = 0
            while offset < size:
                sent = os.sendfile(fd_out, fd_in, offset, size - offset)
                if sent == 0:
                    break
                offset += sent
        finally:
            os.close(fd_in)
    finally:
        os.close(fd_out)


def _locked(method: F) -> F:
    @functools.wraps(method)
    def locked(self: BlobStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return cast(F, locked)


class BlobStore:
    """Blobs on disk, and in SQLite who has which, the manifests and each job's files."""

    def __init__(self, root: Path, *, grace: float = GRACE) -> None:
        self.root = root
        self.grace = grace
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        # What one job's results may hold; the server sets the policy's upload limits.
        self.max_result_bytes = DEFAULT_MAX_UPLOAD_BYTES
        self.max_result_files = DEFAULT_MAX_UPLOAD_FILES
        self._db: sqlite3.Connection | None = None
        # One connection, used from the event loop and from the backend's threads (a
        # job's copy, its results): one statement or query at a time.
        self._lock = threading.RLock()
        self._key_bytes: bytes | None = None
        self._unsynced = False

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        for path in (self.root, self.blobs, self.tmp):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        stale = time.time() - TMP_STALE
        for leftover in self.tmp.iterdir():  # uploads cut by a crash, long ago
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()
        db = sqlite3.connect(
            self.root / "uploads.sqlite", isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the blob store is not open")
        return self._db

    # -- transfer tokens (a job's pod: its files in, its results out) -------------

    def _key(self) -> bytes:
        if self._key_bytes is not None:
            return self._key_bytes
        path = self.root / "transfer.key"
        with contextlib.suppress(FileNotFoundError):
            self._key_bytes = path.read_bytes()
            return self._key_bytes
        key = os.urandom(32)
        tmp = self.root / f".transfer.key.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # the first replica's key wins
        os.unlink(tmp)
        self._key_bytes = path.read_bytes()
        return self._key_bytes

    def transfer_token(self, job_id: str, expires: float) -> str:
        """A token good only for job ``job_id``'s files and results, until ``expires``."""
        body = f"{job_id}.{int(expires)}"
        mac = hmac.new(self._key(), body.encode(), hashlib.sha256).hexdigest()
        return f"{TOKEN_PREFIX}{body}.{mac}"

    def transfer_job(self, token: str) -> str | None:
        """The job a transfer token is for, if it is one of ours and has not expired."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 300:
            return None
        job_id, _, rest = token[len(TOKEN_PREFIX) :].partition(".")
        expires, _, mac = rest.partition(".")
        if not (expires.isdigit() and job_id):
            return None
        body = f"{job_id}.{expires}"
        good = hmac.new(self._key(), body.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(good, mac) or int(expires) < time.time():
            return None
        return job_id

    def path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.blobs / digest[:2] / digest

    def _twin_path(self, digest: str, user: str, *, executable: bool) -> Path:
        key = hashlib.sha256(user.encode()).hexdigest()[:16]
        return self.path(digest).with_name(f"{digest}.{key}{'.x' if executable else ''}")

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    # -- what a user has ---------------------------------------------------------

    @_locked
    def missing(self, user: str, digests: Iterable[str]) -> list[str]:
        """Of ``digests``, those ``user`` has not sent (whoever else did), in order."""
        wanted = list(dict.fromkeys(digests))
        have: set[str] = set()
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self.db.execute(
                f"SELECT digest FROM owners WHERE user = ? AND digest IN ({marks})",  # noqa: S608
                [user, *part],
            )
            have.update(row[0] for row in rows)
        # An owner's row goes with the blob (sweep), so a row means the blob is there.
        return [d for d in wanted if d not in have]

    @_locked
    def _own(self, user: str, digest: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO owners (user, digest, at) VALUES (?, ?, ?)",
            (user, digest, time.time()),
        )

    async def receive(
        self, user: str, digest: str, chunks: AsyncIterator[bytes], *, max_bytes: int
    ) -> int:
        """Store a blob sent by ``user``: its bytes must hash to ``digest``, within ``max_bytes``.

        Written to ``tmp/`` while hashed, renamed into place once it matches; on any
        error (too large, wrong hash, the client gone) the partial file is removed.
        """
        digest_ = hashlib.sha256()
        size = 0
        fd, name = _temp(self.tmp)
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidRequest(
                        f"the file is over the limit of {max_bytes} bytes (policy "
                        "max_upload_bytes); leave it out with .kbatchignore",
                        status=413,
                        code="too_large",
                    )
                digest_.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            if digest_.hexdigest() != digest:
                raise InvalidRequest(
                    f"the bytes sent hash to {digest_.hexdigest()}, not to {digest}; the file "
                    "changed while it was sent? Submit again",
                    status=422,
                    code="digest_mismatch",
                )
            target = self.path(digest)
            os.fchmod(fd, 0o444)
            with self._lock:  # not while a sweep decides what is unused
                if not target.exists():
                    target.parent.mkdir(mode=0o700, exist_ok=True)
                    os.replace(name, target)
                    self._unsynced = True  # made durable before a manifest can name it
                self._own(user, digest)
            return size
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def ingest(self, fd: int, digest: str) -> None:
        """Copy an open file known to hash to ``digest`` into the store (for results)."""
        target = self.path(digest)
        if target.exists():
            return
        out, name = _temp(self.tmp)
        try:
            check = hashlib.sha256()
            offset = 0
            while chunk := os.pread(fd, 1024 * 1024, offset):
                check.update(chunk)
                offset += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            if check.hexdigest() != digest:
                raise OSError(errno.EAGAIN, "the file changed while it was copied")
            os.fchmod(out, 0o444)
            target.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(name, target)
        finally:
            os.close(out)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    # -- manifests ---------------------------------------------------------------

    @_locked
    def commit(self, user: str, manifest: Manifest) -> UploadAnswer:
        """Store ``user``'s (checked) manifest if they have sent every blob; else say which not."""
        ident = manifest_id(manifest)
        missing = self.missing(user, (f.sha256 for f in manifest.files))
        answer = UploadAnswer(
            id=ident,
            complete=not missing,
            missing=missing,
            files=len(manifest.files),
            bytes=manifest.total_bytes,
        )
        if not missing:
            if self._unsynced:
                # Blobs are written without an fsync each (one per file would cost more
                # than the upload); they are on disk before any job can start from them.
                os.sync()
                self._unsynced = False
            now = time.time()
            known = self.db.execute(
                "UPDATE manifests SET at = ? WHERE user = ? AND id = ?", (now, user, ident)
            ).rowcount
            if not known:  # (the same upload again only says it is still wanted)
                self.db.execute("BEGIN")
                try:
                    self.db.execute(
                        "INSERT INTO manifests (user, id, body, at) VALUES (?, ?, ?, ?)",
                        (user, ident, msgspec.json.encode(manifest), now),
                    )
                    # What the manifest uses stays this user's while the manifest is kept.
                    self.db.executemany(
                        "UPDATE owners SET at = ? WHERE user = ? AND digest = ?",
                        [(now, user, d) for d in manifest.digests()],
                    )
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
        return answer

    @_locked
    def manifest(self, user: str, ident: str) -> Manifest | None:
        row = self.db.execute(
            "SELECT body FROM manifests WHERE user = ? AND id = ?", (user, ident)
        ).fetchone()
        return None if row is None else msgspec.json.decode(row[0], type=Manifest)

    # -- jobs --------------------------------------------------------------------

    @_locked
    def attach(self, job_id: str, user: str, ident: str) -> None:
        """Record that job ``job_id`` (of ``user``) runs from upload ``ident``."""
        self.db.execute(
            "INSERT OR IGNORE INTO jobs (job_id, user, manifest) VALUES (?, ?, ?)",
            (job_id, user, ident),
        )

    @_locked
    def job_manifest(self, job_id: str) -> Manifest | None:
        row = self.db.execute(
            "SELECT m.body FROM jobs j JOIN manifests m ON m.user = j.user AND m.id = j.manifest"
            " WHERE j.job_id = ?",
            (job_id,),
        ).fetchone()
        return None if row is None else msgspec.json.decode(row[0], type=Manifest)

    @_locked
    def has_job(self, job_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row is not None

    @_locked
    def set_results(self, job_id: str, user: str, ident: str, results: Manifest) -> None:
        self.db.execute(
            "INSERT INTO jobs (job_id, user, manifest, results) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (job_id) DO UPDATE SET results = excluded.results",
            (job_id, user, ident, msgspec.json.encode(results)),
        )

    @_locked
    def store_results(self, job_id: str, results: Manifest) -> bool:
        """The results a job's pod handed back; False if the job has no upload recorded."""
        cursor = self.db.execute(
            "UPDATE jobs SET results = ? WHERE job_id = ?", (msgspec.json.encode(results), job_id)
        )
        return cursor.rowcount > 0

    @_locked
    def results(self, job_id: str) -> Manifest | None:
        row = self.db.execute("SELECT results FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return msgspec.json.decode(row[0], type=Manifest)

    @_locked
    def forget_job(self, job_id: str) -> None:
        """The job's record is gone: its upload and results may be collected by the next sweep."""
        self.db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    # -- a job's copy, and what it left ------------------------------------------

    def materialize(
        self,
        manifest: Manifest,
        dest: Path,
        *,
        link: bool,
        owner: tuple[int, int] | None = None,
        user: str = "",
    ) -> None:
        """The manifest's files in the new, empty folder ``dest``.

        ``link``: hard links to read-only, root-owned files of the store (only when the
        job runs as another account, which can then neither write nor chmod them; a
        job that writes a file replaces it).  They link to ``user``'s own twin of each
        blob, never to the blob itself: a link count seen by one user's job counts
        that user's jobs only, and says nothing of anyone else's uploads.  Else each
        file is a copy (a clone where the filesystem can), owned by ``owner``.
        """
        made: list[Path] = []
        for entry in manifest.files:
            target = dest.joinpath(*entry.path.split("/"))
            parent = target.parent
            if not parent.is_dir():
                missing_dirs = []
                while not parent.exists():
                    missing_dirs.append(parent)
                    parent = parent.parent
                for directory in reversed(missing_dirs):
                    directory.mkdir(mode=0o755)
                    made.append(directory)
            source = self.path(entry.sha256)
            mode = 0o755 if entry.executable else 0o644
            if link:
                twin = self._twin(entry.sha256, user, executable=entry.executable)
                try:
                    os.link(twin, target)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
            _copy(source, target, mode)
            os.chmod(target, mode)
            made.append(target)
        if owner is not None:
            for path in made:
                os.lchown(path, *owner)

    def _twin(self, digest: str, user: str, *, executable: bool) -> Path:
        """``user``'s read-only (0444, or 0555) copy of a blob, for hard links, made once."""
        twin = self._twin_path(digest, user, executable=executable)
        if not twin.exists():
            mode = 0o555 if executable else 0o444
            fd, name = _temp(self.tmp)
            os.close(fd)
            os.unlink(name)
            _copy(self.path(digest), Path(name), mode)
            os.chmod(name, mode)
            os.replace(name, twin)
        return twin

    def collect(
        self,
        job_id: str,
        user: str,
        ident: str,
        code_dir: Path,
        *,
        owners: frozenset[int] | None,
    ) -> Manifest:
        """Store what the job left in ``code_dir`` that is new or changed, as its results.

        At most :attr:`max_result_files` files and :attr:`max_result_bytes` bytes (the
        policy's upload limits) are kept; the rest is left out, with a warning in the log.
        """
        max_files, max_bytes = self.max_result_files, self.max_result_bytes
        uploaded = self.manifest(user, ident) or Manifest(files=[])
        blob_inodes = set()
        for entry in uploaded.files:
            for executable in (False, True):
                with contextlib.suppress(OSError):
                    info = self._twin_path(entry.sha256, user, executable=executable).stat()
                    blob_inodes.add((info.st_dev, info.st_ino))
        found: list[FileEntry] = []
        total = 0
        for item in changed_files(
            str(code_dir),
            uploaded,
            owners=owners,
            skip=lambda info: (info.st_dev, info.st_ino) in blob_inodes,
        ):
            if len(found) >= max_files or total + item.entry.size > max_bytes:
                log.warning(
                    "job %s: results over the limits (%d files, %d bytes); the rest is not kept",
                    job_id,
                    max_files,
                    max_bytes,
                )
                break
            try:
                self.ingest(item.fd, item.entry.sha256)
            except OSError as exc:
                log.warning("job %s: result %r not kept: %s", job_id, item.entry.path, exc)
                continue
            found.append(item.entry)
            total += item.entry.size
        results = Manifest(files=found)
        self.set_results(job_id, user, ident, results)
        return results

    # -- garbage -----------------------------------------------------------------

    async def sweep(self, alive: Callable[[list[str]], Awaitable[set[str]]]) -> int:
        """Collect what nothing uses; ``alive`` says which of some job ids still exist.

        Returns the number of blob files removed.
        """
        with self._lock:
            job_ids = [row[0] for row in self.db.execute("SELECT job_id FROM jobs")]
        living = await alive(job_ids)
        with self._lock:
            return self._sweep(set(job_ids) - living)

    def _sweep(self, gone: set[str]) -> int:
        for job_id in gone:
            self.forget_job(job_id)
        cutoff = time.time() - self.grace
        self.db.execute(
            "DELETE FROM manifests WHERE at < ? AND NOT EXISTS (SELECT 1 FROM jobs j WHERE "
            "j.user = manifests.user AND j.manifest = manifests.id)",
            (cutoff,),
        )
        used: set[str] = set()
        for (body,) in self.db.execute("SELECT body FROM manifests"):
            used |= msgspec.json.decode(body, type=Manifest).digests()
        for (body,) in self.db.execute("SELECT results FROM jobs WHERE results IS NOT NULL"):
            used |= msgspec.json.decode(body, type=Manifest).digests()
        stale = [
            (user, digest)
            for user, digest in self.db.execute(
                "SELECT user, digest FROM owners WHERE at < ?", (cutoff,)
            )
            if digest not in used
        ]
        self.db.executemany("DELETE FROM owners WHERE user = ? AND digest = ?", stale)
        used |= {row[0] for row in self.db.execute("SELECT DISTINCT digest FROM owners")}
        removed = 0
        for shard in self.blobs.iterdir():
            for blob in shard.iterdir():
                if blob.name.partition(".")[0] not in used:  # its twins go with it
                    with contextlib.suppress(FileNotFoundError):
                        blob.unlink()
                        removed += 1
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
        return removed


def _temp(directory: Path) -> tuple[int, str]:
    name = str(directory / f"{os.getpid()}-{os.urandom(8).hex()}")
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), name
