"""Moving files: an upload for ``submit --code``, and a job's results for ``fetch``.

Pure parts (choosing results, checking where they go) are here beside the I/O
that :class:`kbatch.client.Client` drives, so both the CLI and Python users get
the same checks: a fetched path that would land outside ``DEST`` (a hostile job
may name a result ``../../.bashrc``), or go through a symlink already there, is
refused before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from kbatch.errors import SpecError
from kbatch.uploads.manifest import FileEntry, Manifest, check_relative_path

__all__ = [
    "Progress",
    "already_there",
    "choose_results",
    "result_target",
    "write_verified",
]

# Told how many bytes moved since the last call; the CLI draws a bar with it.
Progress = Callable[[int], None]


def choose_results(
    manifest: Manifest, *, results: Sequence[str] = (), ignore: Sequence[str] = ()
) -> list[FileEntry]:
    """The entries to fetch: matching one of ``results`` (if any), none of ``ignore``.

    Patterns are gitignore's (``*.csv`` at any depth, ``out/`` a folder, ``/x`` at the top).
    """
    import pathspec

    wanted = pathspec.GitIgnoreSpec.from_lines(results) if results else None
    unwanted = pathspec.GitIgnoreSpec.from_lines(ignore) if ignore else None
    chosen = []
    for entry in manifest.files:
        if wanted is not None and not wanted.match_file(entry.path):
            continue
        if unwanted is not None and unwanted.match_file(entry.path):
            continue
        chosen.append(entry)
    return chosen


def result_target(dest: Path, path: str) -> Path:
    """Where ``path`` goes below ``dest``, after refusing a path that could leave it."""
    try:
        check_relative_path(path, what="result path")
    except SpecError as exc:
        raise SpecError(f"the job named a result that is not safe to write: {exc}") from exc
    return dest.joinpath(*path.split("/"))


def _make_parents(dest: Path, target: Path) -> None:
    """Create the folders between ``dest`` and ``target``, refusing any that is not a
    real folder (a symlink left there would carry the write elsewhere)."""
    current = dest
    for part in target.relative_to(dest).parts[:-1]:
        current = current / part
        try:
            info = current.lstat()
        except FileNotFoundError:
            current.mkdir(mode=0o755)
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise SpecError(
                f"{current} is in the way of a result (a file or symlink, not a folder); "
                "move it, or fetch into another folder"
            )


def write_verified(
    dest: Path,
    entry: FileEntry,
    chunks: Iterable[bytes],
    progress: Progress | None = None,
) -> Path:
    """Write ``entry`` below ``dest`` from ``chunks``, checking
    its sha256 before it replaces what was there (never following a symlink there)."""
    target = result_target(dest, entry.path)
    _make_parents(dest, target)
    with contextlib.suppress(FileNotFoundError):
        info = target.lstat()
        if stat.S_ISDIR(info.st_mode):
            raise SpecError(f"{target} is a folder in the way of a result; move it")
    tmp = target.with_name(f".{target.name}.kbatch-{os.getpid()}.tmp")
    digest = hashlib.sha256()
    mode = 0o755 if entry.executable else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        for chunk in chunks:
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            if progress is not None:
                progress(len(chunk))
        os.close(fd)
        fd = -1
        if digest.hexdigest() != entry.sha256:
            raise SpecError(
                f"{entry.path} arrived with sha256 {digest.hexdigest()}, not {entry.sha256}; "
                "fetch again"
            )
        os.replace(tmp, target)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def already_there(target: Path, entry: FileEntry) -> bool:
    """Whether ``target`` is a regular file (not a link) with the entry's content already."""
    try:
        info = target.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != entry.size:
        return False
    with open(target, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest() == entry.sha256
