"""What a job left in its code directory: every regular file that is new or changed.

The directory is the job's: it may hold symlinks to anything, FIFOs, sockets,
files of other accounts hard-linked in, or folders swapped for links while we
look.  So it is read only through file descriptors: each folder opened with
``O_NOFOLLOW`` relative to its parent's descriptor, each file opened with
``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` (a regular file, of the
job's account when one is given).  Nothing is followed, nothing blocks, and
anything else is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kbatch.errors import SpecError
from kbatch.uploads.manifest import FileEntry, Manifest, check_relative_path

__all__ = ["Found", "changed_files", "hash_fd"]

CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class Found:
    """A new or changed file: its entry, and an open descriptor to copy it from."""

    entry: FileEntry
    fd: int


def hash_fd(fd: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        size += len(chunk)
        offset += len(chunk)
    return digest.hexdigest(), size


def changed_files(
    top: str,
    uploaded: Manifest,
    *,
    owners: frozenset[int] | None = None,
    skip: Callable[[os.stat_result], bool] = lambda info: False,
) -> Iterator[Found]:
    """Each regular file below ``top`` whose content or mode differs from ``uploaded``.

    ``owners``: only files owned by one of these uids count (the job's account, and
    root for hard links the server made).  ``skip``: files known unchanged without
    reading them (a hard link to the very blob uploaded).  The descriptor of each
    yielded file is closed when the next one is asked for.
    """
    before = uploaded.by_path()
    try:
        root = os.open(top, _DIR_FLAGS)
    except OSError:
        return
    stack: list[tuple[str, int]] = [("", root)]
    try:
        while stack:
            prefix, dir_fd = stack.pop()
            try:
                with os.scandir(dir_fd) as listing:
                    names = sorted(entry.name for entry in listing)
                for name in names:
                    path = prefix + name
                    try:
                        check_relative_path(path)
                    except SpecError:
                        continue  # a name that could not travel back (control characters)
                    try:
                        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
                    except OSError:
                        continue  # a symlink (ELOOP), gone, or not ours to read
                    try:
                        info = os.fstat(fd)
                        if stat.S_ISDIR(info.st_mode):
                            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                            if os.fstat(child).st_ino != info.st_ino:
                                os.close(child)  # swapped while we looked
                                continue
                            stack.append((path + "/", child))
                            continue
                        if not stat.S_ISREG(info.st_mode):
                            continue
                        if owners is not None and info.st_uid not in owners:
                            continue
                        executable = bool(info.st_mode & 0o100)
                        old = before.get(path)
                        if old is not None and old.executable == executable and skip(info):
                            continue
                        sha256, size = hash_fd(fd)
                        if old is not None and (old.sha256, old.executable) == (sha256, executable):
                            continue
                        yield Found(FileEntry(path=path, sha256=sha256, size=size,
                                              executable=executable), fd)  # fmt: skip
                    finally:
                        os.close(fd)
            finally:
                os.close(dir_fd)
    finally:
        for _, fd in stack:
            with contextlib.suppress(OSError):
                os.close(fd)
