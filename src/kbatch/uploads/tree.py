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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kbatch.errors import SpecError

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec
from kbatch.uploads.manifest import FileEntry, Manifest, check_relative_path

__all__ = [
    "IGNORE_FILES",
    "HashCache",
    "LocalFile",
    "hash_file",
    "manifest_of",
    "walk",
]

IGNORE_FILES = (".gitignore", ".kbatchignore")
ALWAYS_SKIPPED = frozenset({".git"})
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: its path in the upload, where to read it, and its mode.

    ``stamp`` (size, mtime, ctime, inode, device) tells a file unchanged since it
    was last hashed (see :class:`HashCache`).
    """

    path: str
    source: Path
    size: int
    executable: bool
    stamp: tuple[int, ...] = ()


def _stamp(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)


class HashCache:
    """The sha256 of files hashed before, by where they are and their stamp, as git's
    index keeps them: a folder submitted again is not read again, only listed.

    A file changed within two seconds of being hashed could keep its stamp (a clock
    tick holds many writes), so such files are never remembered ("racy git").  Kept
    in one JSON file per folder; a cache that cannot be read is an empty one.
    """

    RACY_NS = 2_000_000_000

    def __init__(self, path: Path | None) -> None:
        import msgspec

        self.path = path
        self.entries: dict[str, tuple[tuple[int, ...], str]] = {}
        self.changed = False
        if path is not None:
            try:
                raw = msgspec.json.decode(path.read_bytes(), type=dict[str, tuple[list[int], str]])
                self.entries = {k: (tuple(v[0]), v[1]) for k, v in raw.items()}
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                self.entries = {}

    @classmethod
    def for_folder(cls, folder: str | os.PathLike[str], base: Path) -> HashCache:
        key = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:32]
        return cls(base / f"{key}.json")

    def get(self, file: LocalFile) -> str | None:
        found = self.entries.get(str(file.source))
        return found[1] if found is not None and file.stamp and found[0] == file.stamp else None

    def put(self, file: LocalFile, sha256: str, size: int) -> None:
        if not file.stamp or size != file.size:
            return
        newest = max(file.stamp[1], file.stamp[2])
        if newest > time.time_ns() - self.RACY_NS:
            return
        self.entries[str(file.source)] = (file.stamp, sha256)
        self.changed = True

    def save(self, keep: set[str]) -> None:
        """Write the cache, with entries of the files in ``keep`` only."""
        import msgspec

        if self.path is None or not (self.changed or set(self.entries) - keep):
            return
        entries = {k: v for k, v in self.entries.items() if k in keep}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(msgspec.json.encode(entries))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache: losing it costs a rehash, nothing else


class _Rules:
    """The ignore files seen so far, outermost first: ``(folder prefix, spec)``."""

    def __init__(self, layers: tuple[tuple[str, GitIgnoreSpec], ...] = ()) -> None:
        self.layers = layers

    def below(self, prefix: str, directory: Path) -> _Rules:
        added: list[tuple[str, GitIgnoreSpec]] = []
        for name in IGNORE_FILES:
            try:
                text = (directory / name).read_text(errors="replace")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                raise SpecError(f"cannot read {directory / name}: {exc.strerror}") from exc
            import pathspec  # only where there are rules: its import takes a while

            added.append((prefix, pathspec.GitIgnoreSpec.from_lines(text.splitlines())))
        return _Rules(self.layers + tuple(added)) if added else self

    def ignored(self, path: str, is_dir: bool) -> bool:
        result = False
        for prefix, spec in self.layers:
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
        return [
            LocalFile(name, given.resolve(), info.st_size, bool(info.st_mode & 0o111), _stamp(info))
        ]
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
                found.append(LocalFile(path, Path(source), info.st_size, executable, _stamp(info)))
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
    files: Iterable[LocalFile],
    progress: Callable[[int], None] | None = None,
    cache: HashCache | None = None,
) -> Manifest:
    """The manifest of ``files`` (hashing each, unless ``cache`` knows it unchanged);
    ``progress`` is told of every file's size."""
    entries: list[FileEntry] = []
    seen: set[str] = set()
    for file in files:
        known = cache.get(file) if cache is not None else None
        if known is not None:
            sha256, size = known, file.size
        else:
            sha256, size = hash_file(file.source)
            if cache is not None:
                cache.put(file, sha256, size)
        seen.add(str(file.source))
        entries.append(
            FileEntry(path=file.path, sha256=sha256, size=size, executable=file.executable)
        )
        if progress is not None:
            progress(size)
    if cache is not None:
        cache.save(seen)
    return Manifest(files=entries)
