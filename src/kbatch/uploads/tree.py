"""The client's walk of a folder to upload: which files go, and refusals of what cannot.

``.gitignore`` and ``.kbatchignore`` files are honoured in every folder, with
git's rules (pathspec's ``GitIgnoreSpec``, the gitignore matcher git itself is
tested against): a rule applies below the folder of its file, a deeper file's
rules win, ``.kbatchignore`` after ``.gitignore`` in the same folder (so it can
re-include with ``!``), and an ignored folder is not entered.  ``.git`` is never
sent.

Refused, with what to do instead: a symlink that points outside the folder (or
nowhere), a device, socket or FIFO, a folder reached twice through symlinks.
A symlink inside the folder travels as the file (or folder) it points to.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kbatch.errors import SpecError
from kbatch.uploads.manifest import FileEntry, Manifest, check_relative_path

__all__ = ["IGNORE_FILES", "LocalFile", "hash_file", "manifest_of", "walk"]

IGNORE_FILES = (".gitignore", ".kbatchignore")
ALWAYS_SKIPPED = frozenset({".git"})
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: its path in the upload, where to read it, and its mode."""

    path: str
    source: Path
    size: int
    executable: bool


class _Rules:
    """The ignore files seen so far, outermost first: ``(folder prefix, spec)``."""

    def __init__(self, layers: tuple[tuple[str, object], ...] = ()) -> None:
        self.layers = layers

    def below(self, prefix: str, directory: Path) -> _Rules:
        import pathspec

        added: list[tuple[str, object]] = []
        for name in IGNORE_FILES:
            try:
                text = (directory / name).read_text(errors="replace")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                raise SpecError(f"cannot read {directory / name}: {exc.strerror}") from exc
            added.append((prefix, pathspec.GitIgnoreSpec.from_lines(text.splitlines())))
        return _Rules(self.layers + tuple(added)) if added else self

    def ignored(self, path: str, is_dir: bool) -> bool:
        import pathspec

        result = False
        for prefix, spec in self.layers:
            assert isinstance(spec, pathspec.GitIgnoreSpec)
            relative = path[len(prefix) :] + ("/" if is_dir else "")
            include = spec.check_file(relative).include
            if include is not None:
                result = include
        return result


def _kind(mode: int) -> str | None:
    """What a non-regular, non-directory file is, in words (None for those two)."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def walk(top: str | os.PathLike[str]) -> list[LocalFile]:
    """The files to upload from ``top`` (a folder, or one file), sorted by path."""
    given = Path(top)
    try:
        info = given.stat()
    except FileNotFoundError:
        raise SpecError(f"--code {given}: no such file or folder") from None
    except OSError as exc:
        raise SpecError(f"--code {given}: {exc.strerror}") from exc
    if stat.S_ISREG(info.st_mode):
        name = given.resolve().name
        check_relative_path(name, what="file name")
        return [LocalFile(name, given.resolve(), info.st_size, bool(info.st_mode & 0o111))]
    if not stat.S_ISDIR(info.st_mode):
        raise SpecError(f"--code {given}: is {_kind(info.st_mode)}; give a folder or a file")
    root = os.path.realpath(given)
    found: list[LocalFile] = []
    # (path of the folder in the upload, its real path, the rules that apply in it, and
    # the real paths of the folders above it: a symlink back to one of them is a loop)
    stack: list[tuple[str, str, _Rules, frozenset[str]]] = [("", root, _Rules(), frozenset())]
    while stack:
        prefix, real_dir, rules, above = stack.pop()
        if real_dir in above:
            raise SpecError(
                f"--code {given}: {prefix.rstrip('/')} is a symlink to a folder above it (a "
                "loop); remove the link or list it in .kbatchignore"
            )
        rules = rules.below(prefix, Path(real_dir))
        try:
            names = sorted(os.listdir(real_dir))
        except OSError as exc:
            raise SpecError(f"--code {given}: cannot list {prefix or '.'}: {exc.strerror}") from exc
        for name in names:
            if name in ALWAYS_SKIPPED:
                continue
            path = prefix + name
            source = os.path.join(real_dir, name)
            try:
                info = os.lstat(source)
            except FileNotFoundError:
                continue  # gone since the listing
            if stat.S_ISLNK(info.st_mode):
                if rules.ignored(path, is_dir=os.path.isdir(source)):
                    continue
                target = os.path.realpath(source)
                if not _inside(target, root):
                    raise SpecError(
                        f"--code {given}: {path} is a symlink to {os.readlink(source)}, outside "
                        "the folder; copy the file into the folder, or list it in .kbatchignore"
                    )
                try:
                    info = os.stat(target)
                except OSError:
                    raise SpecError(
                        f"--code {given}: {path} is a symlink to {os.readlink(source)}, which "
                        "does not exist; remove it or list it in .kbatchignore"
                    ) from None
                source = target
            is_dir = stat.S_ISDIR(info.st_mode)
            if rules.ignored(path, is_dir=is_dir):
                continue
            kind = _kind(info.st_mode)
            if kind is not None:
                raise SpecError(
                    f"--code {given}: {path} is {kind}, which cannot be uploaded; remove it "
                    "or list it in .kbatchignore"
                )
            check_relative_path(path)
            if is_dir:
                stack.append((path + "/", source, rules, above | {real_dir}))
            else:
                executable = bool(info.st_mode & 0o100)
                found.append(LocalFile(path, Path(source), info.st_size, executable))
    found.sort(key=lambda f: f.path)
    return found


def hash_file(path: Path) -> tuple[str, int]:
    """The sha256 (hex) and size of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb", buffering=0) as handle:
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            while read := handle.readinto(buffer):
                digest.update(view[:read])
                size += read
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from exc
    return digest.hexdigest(), size


def manifest_of(
    files: Iterable[LocalFile], progress: Callable[[int], None] | None = None
) -> Manifest:
    """The manifest of ``files`` (hashing each); ``progress`` is told of every file's size."""
    entries: list[FileEntry] = []
    for file in files:
        sha256, size = hash_file(file.source)
        entries.append(
            FileEntry(path=file.path, sha256=sha256, size=size, executable=file.executable)
        )
        if progress is not None:
            progress(size)
    return Manifest(files=entries)
