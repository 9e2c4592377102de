"""The pure parts of code upload: the manifest's checks, the client's walk, results on disk."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from kbatch.client.transfer import choose_results, result_target, write_verified
from kbatch.errors import SpecError
from kbatch.uploads.manifest import FileEntry, Manifest, check_manifest, manifest_id
from kbatch.uploads.results import changed_files
from kbatch.uploads.tree import hash_file, manifest_of, walk

D1 = "a" * 64
D2 = "b" * 64


def entry(path: str, size: int = 1, digest: str = D1, executable: bool = False) -> FileEntry:
    return FileEntry(path=path, sha256=digest, size=size, executable=executable)


def check(*paths: str, **limits: int | None) -> Manifest:
    return check_manifest(
        Manifest(files=[entry(p) for p in paths]),
        max_bytes=limits.get("max_bytes"),
        max_files=limits.get("max_files"),
    )


# -- the manifest ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("../x", "escapes"),
        ("a/../../x", "escapes"),
        ("a/..", "escapes"),
        ("/etc/passwd", "absolute"),
        ("a//b", "escapes"),
        ("./a", "escapes"),
        ("a/", "escapes"),
        ("a\\..\\b", "backslash"),
        ("a\nb", "control characters"),
        ("a\x1b[2Jb", "control characters"),
        ("a\x00b", "control characters"),
        ("x" * 300, "over 255 bytes"),
    ],
)
def test_paths_that_could_leave_the_folder_are_refused(path: str, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        check("ok.txt", path)


def test_a_good_manifest_comes_back_sorted() -> None:
    manifest = check("b/c.py", "a.py", "b/a.py")
    assert [f.path for f in manifest.files] == ["a.py", "b/a.py", "b/c.py"]


def test_duplicates_and_a_file_that_is_also_a_folder_are_refused() -> None:
    with pytest.raises(SpecError, match="given twice"):
        check("a.py", "a.py")
    with pytest.raises(SpecError, match="as a file and as the folder"):
        check("a", "a/b/c.py")


def test_limits_name_the_policy_key_and_what_to_do() -> None:
    with pytest.raises(
        SpecError, match=r"3 files, over the limit of 2 \(policy max_upload_files\)"
    ):
        check("a", "b", "c", max_files=2)
    with pytest.raises(SpecError, match=r"3 bytes, over the limit of 2 bytes.*max_upload_bytes"):
        check("a", "b", "c", max_bytes=2)
    assert len(check("a", "b", max_files=2, max_bytes=2).files) == 2


def test_the_id_does_not_depend_on_order_but_on_every_field() -> None:
    one = Manifest(files=[entry("a"), entry("b", digest=D2)])
    two = Manifest(files=[entry("b", digest=D2), entry("a")])
    assert manifest_id(one) == manifest_id(two)
    changed = Manifest(files=[entry("a", executable=True), entry("b", digest=D2)])
    assert manifest_id(changed) != manifest_id(one)


# -- the client's walk -------------------------------------------------------------


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def paths(root: Path) -> list[str]:
    return [f.path for f in walk(root)]


def test_gitignore_and_kbatchignore_are_honoured_at_every_depth(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {
            ".gitignore": "*.log\nbuild/\n/top.txt\n",
            ".kbatchignore": "data/\n!keep.log\n",
            "run.py": "",
            "top.txt": "",
            "a.log": "",
            "keep.log": "",
            "build/out.o": "",
            "data/big.bin": "",
            "src/top.txt": "",  # /top.txt is anchored to the root
            "src/x.log": "",
            "src/.gitignore": "*.tmp\n!y.log\n",
            "src/y.log": "",  # re-included by the deeper file
            "src/z.tmp": "",
            "other/z.tmp": "",  # the deeper rule applies below src/ only
            ".git/config": "",
        },
    )
    assert paths(root) == [
        ".gitignore",
        ".kbatchignore",
        "keep.log",
        "other/z.tmp",
        "run.py",
        "src/.gitignore",
        "src/top.txt",
        "src/y.log",
    ]


def test_executable_bit_and_contents_are_recorded(tmp_path: Path) -> None:
    root = tree(tmp_path, {"run.sh": "#!/bin/sh\n", "data.txt": "hello"})
    (root / "run.sh").chmod(0o755)
    manifest = manifest_of(walk(root))
    by_path = manifest.by_path()
    assert by_path["run.sh"].executable and not by_path["data.txt"].executable
    assert by_path["data.txt"].size == 5
    assert by_path["data.txt"].sha256 == hash_file(root / "data.txt")[0]
    assert by_path["data.txt"].sha256.startswith("2cf24dba")  # sha256("hello")


def test_a_single_file_is_uploaded_under_its_name(tmp_path: Path) -> None:
    tree(tmp_path, {"train.py": "print(1)\n"})
    assert paths(tmp_path / "train.py") == ["train.py"]


def test_a_symlink_inside_travels_as_what_it_points_to(tmp_path: Path) -> None:
    root = tree(tmp_path / "p", {"real/a.txt": "A", "b.txt": "B"})
    (root / "link.txt").symlink_to("b.txt")
    (root / "linked").symlink_to("real")
    assert paths(root) == ["b.txt", "link.txt", "linked/a.txt", "real/a.txt"]


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside.txt", "/etc"])
def test_a_symlink_out_of_the_folder_is_refused(tmp_path: Path, target: str) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    root = tree(tmp_path / "p", {"a.py": ""})
    (root / "sub").mkdir()
    (root / "sub" / "evil").symlink_to(target)
    with pytest.raises(SpecError, match=r"sub/evil is a symlink to .*outside the folder"):
        walk(root)


def test_a_dangling_symlink_and_a_loop_are_refused(tmp_path: Path) -> None:
    root = tree(tmp_path / "p", {"a.py": ""})
    (root / "gone").symlink_to("nothing-here")
    with pytest.raises(SpecError, match="does not exist"):
        walk(root)
    (root / "gone").unlink()
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to("..")
    with pytest.raises(SpecError, match="sub/up is a symlink to a folder above it"):
        walk(root)


def test_an_ignored_symlink_out_is_not_refused(tmp_path: Path) -> None:
    root = tree(tmp_path / "p", {"a.py": "", ".kbatchignore": "evil\n"})
    (root / "evil").symlink_to("/etc")
    assert paths(root) == [".kbatchignore", "a.py"]


def test_devices_sockets_and_fifos_are_refused(tmp_path: Path) -> None:
    root = tree(tmp_path / "p", {"a.py": ""})
    os.mkfifo(root / "pipe")
    with pytest.raises(SpecError, match=r"pipe is a FIFO .*remove it or list it in .kbatchignore"):
        walk(root)
    (root / "pipe").unlink()
    os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(SpecError, match="null is a device"):
        walk(root)
    (root / "null").unlink()
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(root / "sock"))
        with pytest.raises(SpecError, match="sock is a socket"):
            walk(root)
    finally:
        server.close()
    with pytest.raises(SpecError, match="no such file or folder"):
        walk(root / "missing")


# -- results: choosing them, and writing them where they belong ---------------------


def test_results_are_chosen_with_gitignore_patterns() -> None:
    manifest = Manifest(files=[entry("out/a.csv"), entry("b.csv"), entry("log.txt")])
    chosen = choose_results(manifest, results=["*.csv"], ignore=["out/"])
    assert [e.path for e in chosen] == ["b.csv"]
    assert len(choose_results(manifest)) == 3


def test_a_result_path_that_escapes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not safe to write"):
        result_target(tmp_path, "../../.bashrc")
    with pytest.raises(SpecError, match="not safe to write"):
        result_target(tmp_path, "/root/.bashrc")
    assert result_target(tmp_path, "a/b") == tmp_path / "a" / "b"


def test_writing_a_result_checks_its_hash_and_never_follows_a_symlink(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    good = FileEntry(path="sub/r.txt", sha256=hash_of(b"result"), size=6, executable=True)
    written = write_verified(dest, good, [b"res", b"ult"])
    assert written.read_bytes() == b"result" and os.access(written, os.X_OK)
    with pytest.raises(SpecError, match="arrived with sha256"):
        write_verified(dest, entry("bad.txt"), [b"not what the manifest says"])
    assert sorted(p.name for p in dest.iterdir()) == ["sub"]  # nothing half-written
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "via").symlink_to(outside)
    with pytest.raises(SpecError, match="in the way of a result"):
        write_verified(dest, FileEntry(path="via/x", sha256=hash_of(b""), size=0), [b""])
    assert list(outside.iterdir()) == []
    # A symlink at the file's own place is replaced, not written through.
    (dest / "sub" / "r.txt").unlink()
    (dest / "sub" / "r.txt").symlink_to(outside / "target")
    write_verified(dest, good, [b"result"])
    assert not (dest / "sub" / "r.txt").is_symlink() and list(outside.iterdir()) == []


def hash_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_changed_files_sees_new_and_changed_and_nothing_a_job_could_trap(tmp_path: Path) -> None:
    code = tree(tmp_path / "code", {"same.txt": "same", "edit.txt": "old", "mode.sh": "x"})
    uploaded = manifest_of(walk(code))
    (code / "edit.txt").write_text("new")
    (code / "mode.sh").chmod(0o755)
    tree(code, {"out/new.csv": "1,2"})
    (code / "secret").symlink_to("/etc/shadow")
    (code / "dirlink").symlink_to("/etc")
    os.mkfifo(code / "fifo")  # would block a reader that opened it without O_NONBLOCK
    found = [f.entry for f in changed_files(str(code), uploaded)]
    assert [e.path for e in found] == ["edit.txt", "mode.sh", "out/new.csv"]
    assert found[0].sha256 == hash_of(b"new") and found[1].executable
    others = [f.entry.path for f in changed_files(str(code), uploaded, owners=frozenset({12345}))]
    assert others == []  # files of another account are not results


# -- the client's cache of hashes ------------------------------------------------------


def test_the_hash_cache_skips_unchanged_files_and_never_trusts_a_racy_one(tmp_path: Path) -> None:
    from kbatch.uploads.tree import HashCache

    root = tree(tmp_path / "p", {"old.txt": "old", "new.txt": "new"})
    os.utime(root / "old.txt", ns=(1_000_000_000, 1_000_000_000))  # 1970, as mtime says
    cache_dir = tmp_path / "cache"
    first = manifest_of(walk(root), cache=HashCache.for_folder(root, cache_dir))
    cache = HashCache.for_folder(root, cache_dir)
    # ctime is now, so even old.txt is too fresh to trust: nothing was remembered
    assert cache.entries == {}
    cache.RACY_NS = -(10**18)  # a cache that trusts any stamp, to see it used
    manifest_of(walk(root), cache=cache)
    remembered = HashCache.for_folder(root, cache_dir)
    assert set(remembered.entries) == {str(root / "old.txt"), str(root / "new.txt")}
    # A remembered hash is used without reading the file: a planted one shows through.
    stamp, _ = remembered.entries[str(root / "old.txt")]
    remembered.entries[str(root / "old.txt")] = (stamp, D1)
    assert manifest_of(walk(root), cache=remembered).by_path()["old.txt"].sha256 == D1
    # A changed file has another stamp: it is hashed again.
    (root / "new.txt").write_text("changed")
    again = manifest_of(walk(root), cache=remembered).by_path()["new.txt"]
    assert again.sha256 == hash_of(b"changed") != first.by_path()["new.txt"].sha256
