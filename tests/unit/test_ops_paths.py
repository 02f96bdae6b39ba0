"""safe_local_path: which keys may be written under a download destination."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runctl.exceptions import TransferError, UnsafeKeyError
from runctl.transfer.ops import safe_local_path

NAME_MAX = 255


@pytest.mark.parametrize(
    "key",
    [
        "a/../../x",
        "../x",
        "..",
        ".",
        "./x",
        "a/./b",
        "a/..",
        "/abs",
        "/etc/passwd",
        "a//b",
        "a/",
        "",
        "nul\x00byte",
        "x" * (NAME_MAX + 1),
        "ok/" + "é" * 200,  # 400 bytes in UTF-8: too long for one component
        "/".join(["d" * 200] * 25),  # every part fits, the whole path does not
        # A backslash is a separator on Windows only: on POSIX it is one more character of a
        # name (aws writes such keys; refusing them made 'sync --delete' round trips lose them).
        *(["a\\..\\b", "..\\x"] if os.sep == "\\" else []),
    ],
)
def test_unsafe_keys_are_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(UnsafeKeyError) as info:
        safe_local_path(tmp_path, key)
    assert isinstance(info.value, TransferError)
    assert str(info.value).startswith("unsafe key ")
    assert info.value.code == "UnsafeKey"


@pytest.mark.parametrize(
    "key, rel",
    [
        ("ok/fine.txt", "ok/fine.txt"),
        ("file", "file"),
        ("..hidden", "..hidden"),
        ("dots...", "dots..."),
        (".runctl-manifest.json", ".runctl-manifest.json"),
        ("a b/c*?[d].pt", "a b/c*?[d].pt"),
        ("ünïcødé/日本.pt", "ünïcødé/日本.pt"),
        ("x" * NAME_MAX, "x" * NAME_MAX),
        ("deep/" * 10 + "leaf", "deep/" * 10 + "leaf"),
        *([("a\\..\\b", "a\\..\\b"), ("..\\x", "..\\x")] if os.sep == "/" else []),
    ],
)
def test_safe_keys_map_inside(tmp_path: Path, key: str, rel: str) -> None:
    path = safe_local_path(tmp_path, key)
    assert path == tmp_path / rel
    assert tmp_path.resolve() in path.resolve().parents


def test_symlinked_directory_out_of_the_root_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "inner").mkdir()
    (root / "alias").symlink_to(root / "inner", target_is_directory=True)
    with pytest.raises(UnsafeKeyError, match="outside"):
        safe_local_path(root, "escape/file")
    with pytest.raises(UnsafeKeyError, match="outside"):
        safe_local_path(root, "escape/deeper/still/file")
    # A symlink that stays inside is fine, and so is a symlinked file (it is replaced, not followed).
    assert safe_local_path(root, "alias/file") == root / "alias" / "file"
    (root / "filelink").symlink_to(outside / "target")
    assert safe_local_path(root, "filelink") == root / "filelink"


def test_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert safe_local_path(link, "a/b") == link / "a" / "b"


def test_symlink_loop_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(UnsafeKeyError):
        safe_local_path(tmp_path, "loop/x")


def test_destination_need_not_exist(tmp_path: Path) -> None:
    assert safe_local_path(tmp_path / "new" / "dest", "a/b.pt") == tmp_path / "new" / "dest" / "a" / "b.pt"
    assert not (tmp_path / "new").exists()


def test_name_max_comes_from_the_filesystem(tmp_path: Path) -> None:
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    safe_local_path(tmp_path, "n" * limit)
    with pytest.raises(UnsafeKeyError, match="longer than the filesystem allows"):
        safe_local_path(tmp_path, "n" * (limit + 1))


def test_a_file_moves_into_place_across_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A prefix download stages inside the destination; a mount point below it makes the
    # rename fail with EXDEV, and the file is then copied beside its place and renamed.
    import errno

    from runctl.transfer import ops

    staged, final = tmp_path / "stage" / "a.bin", tmp_path / "mnt" / "a.bin"
    staged.parent.mkdir()
    final.parent.mkdir()
    staged.write_bytes(b"weights")
    os.utime(staged, (1_600_000_000, 1_600_000_000))
    final.write_bytes(b"old")
    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        calls.append((Path(src).parent.name, Path(dst).parent.name))
        if Path(src) == staged:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(ops.os, "replace", replace)
    ops._move_into_place(staged, final)
    assert final.read_bytes() == b"weights"
    assert final.stat().st_mtime == 1_600_000_000
    assert calls == [("stage", "mnt"), ("mnt", "mnt")]  # the copy went beside its place first
    assert sorted(p.name for p in final.parent.iterdir()) == ["a.bin"]

    def refuse(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ops.os, "replace", refuse)  # any other error is the caller's to report
    with pytest.raises(PermissionError):
        ops._move_into_place(staged, final)


def test_own_descriptor_names_only_an_open_standard_stream(tmp_path: Path) -> None:
    from runctl.transfer.ops import own_descriptor

    assert own_descriptor("/dev/stdout") == 1 and own_descriptor("/proc/self/fd/2") == 2
    # Another number may be any descriptor by now (a socket, the journal): the object once went
    # into a child's pipe, exit 0. And a path is resolved as the kernel does, directories first.
    assert own_descriptor("/dev/fd/7") is None
    assert own_descriptor(f"/proc/{os.getpid() + 1}/fd/1") is None
    (tmp_path / "r1" / "r2").mkdir(parents=True)
    (tmp_path / "x").symlink_to("/dev/stdout")
    (tmp_path / "al").symlink_to("r1/r2")
    (tmp_path / "r1" / "r2" / "l").symlink_to("../../x")
    assert own_descriptor(tmp_path / "al" / "l") == 1
    assert own_descriptor(tmp_path / "x") == 1 and own_descriptor(tmp_path / "r1") is None
