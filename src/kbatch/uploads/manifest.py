"""The manifest of an upload: every file's relative path, sha256, size and executable bit.

A manifest is data a user sends: :func:`check_manifest` refuses any path that
could leave the folder it is unpacked into (``..``, absolute, empty or ``.``
parts, control characters), duplicates, a path that is both a file and a
folder, and totals over the admin's limits.  The same checks run on the client
(before anything is sent) and on the server (which trusts nothing it is sent),
and again when a client writes fetched results, which a job named.

A manifest's id is the sha256 of its canonical encoding (files sorted by path),
so the same folder gives the same id however it was walked.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

import msgspec

from kbatch.errors import SpecError

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MAX_UPLOAD_FILES",
    "DIGEST_PATTERN",
    "FileEntry",
    "Manifest",
    "UploadAnswer",
    "check_manifest",
    "check_relative_path",
    "is_digest",
    "manifest_id",
]

DEFAULT_MAX_UPLOAD_BYTES = 1024**3  # 1 GiB, the policy's default max_upload_bytes
DEFAULT_MAX_UPLOAD_FILES = 100_000  # the policy's default max_upload_files
DIGEST_PATTERN = "^[0-9a-f]{64}$"
MAX_PATH = 4096
MAX_PART = 255
_DIGEST = re.compile(DIGEST_PATTERN)
# Control characters (C0, DEL, C1) and bidi overrides: a path is shown on terminals.
_UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

Digest = Annotated[str, msgspec.Meta(pattern=DIGEST_PATTERN)]


class FileEntry(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """One file: where it goes (``a/b.py``, below the folder), its content and mode."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATH)]
    sha256: Digest
    size: Annotated[int, msgspec.Meta(ge=0)]
    executable: bool = False


class Manifest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The files of an upload (or of a job's results), sorted by path."""

    files: list[FileEntry]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def digests(self) -> set[str]:
        return {f.sha256 for f in self.files}

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}


class UploadAnswer(msgspec.Struct, kw_only=True):
    """The answer to a manifest: its id, and the blobs the caller still has to send.

    ``complete`` is true once the manifest is stored (nothing missing): then a job
    may name ``id`` as its ``code``.
    """

    id: str
    complete: bool
    missing: list[str]
    files: int
    bytes: int


def is_digest(value: str) -> bool:
    return bool(_DIGEST.fullmatch(value))


# A path that is certainly fine: plain names of at most 255 bytes joined by single slashes,
# none of them "." or "..", nothing unshowable (checked apart), no backslash.
_PLAIN = re.compile(r"(?!\.\.?(?:/|$))[^/\\]{1,255}(?:/(?!\.\.?(?:/|$))[^/\\]{1,255})*")


def check_relative_path(path: str, *, what: str = "path") -> str:
    """``path`` if it stays below the folder it is relative to, else :class:`SpecError`."""
    if (
        len(path) <= MAX_PART
        and path.isascii()
        and _PLAIN.fullmatch(path)
        and not _UNSHOWABLE.search(path)
    ):
        return path  # the common case, at a fraction of the cost of the checks below
    shown = repr(path[:200])
    if not path:
        raise SpecError(f"an empty {what} is not allowed", field="files")
    if len(path.encode()) > MAX_PATH:
        raise SpecError(
            f"the {what} {shown}... is over {MAX_PATH} bytes; shorten it", field="files"
        )
    if _UNSHOWABLE.search(path):
        raise SpecError(
            f"the {what} {shown} holds control characters; rename the file", field="files"
        )
    if path.startswith("/"):
        raise SpecError(
            f"the {what} {shown} is absolute; paths must be relative to the folder", field="files"
        )
    if "\\" in path:
        raise SpecError(
            f"the {what} {shown} holds a backslash; rename the file (it could mean a "
            "folder on another system)",
            field="files",
        )
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise SpecError(
                f"the {what} {shown} escapes or is not a plain path ('..', '.' or '//' "
                "in it); give paths below the folder",
                field="files",
            )
        if len(part.encode()) > MAX_PART:
            raise SpecError(
                f"the {what} {shown} has a name over {MAX_PART} bytes; shorten it", field="files"
            )
    return path


def check_manifest(
    manifest: Manifest, *, max_bytes: int | None, max_files: int | None, what: str = "upload"
) -> Manifest:
    """The manifest, sorted by path, if every path is safe and it is within the limits."""
    if max_files is not None and len(manifest.files) > max_files:
        raise SpecError(
            f"the {what} has {len(manifest.files)} files, over the limit of {max_files} "
            "(policy max_upload_files); leave some out with a .kbatchignore file",
            field="files",
        )
    total = 0
    seen: set[str] = set()
    for entry in manifest.files:
        check_relative_path(entry.path)
        if entry.path in seen:
            raise SpecError(f"the path {entry.path!r} is given twice", field="files")
        seen.add(entry.path)
        total += entry.size
    if max_bytes is not None and total > max_bytes:
        raise SpecError(
            f"the {what} is {total} bytes, over the limit of {max_bytes} bytes (policy "
            "max_upload_bytes); leave large files out with a .kbatchignore file and have "
            "the job read them from shared storage",
            field="files",
        )
    for path in seen:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in seen:
                raise SpecError(
                    f"{parent!r} is given as a file and as the folder of {path!r}", field="files"
                )
            parent = parent.rpartition("/")[0]
    return Manifest(files=sorted(manifest.files, key=lambda f: f.path))


def manifest_id(manifest: Manifest) -> str:
    """The sha256 of the manifest's canonical encoding (files sorted by path)."""
    files = sorted(manifest.files, key=lambda f: f.path)
    return hashlib.sha256(msgspec.json.encode(Manifest(files=files))).hexdigest()
