"""_walk_files: which local files a tree upload sends, in what order, and what it reports as odd."""

from __future__ import annotations

import os
from pathlib import Path

from runctl.transfer.ops import _walk_files


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_files_come_in_name_order_before_their_subdirectories(tmp_path: Path) -> None:
    for rel in ["b.pt", "a.pt", "sub/z.bin", "sub/deeper/c", "aa/y", "zz.txt", ".hidden", "sub/ä ö"]:
        _touch(tmp_path / rel)
    (tmp_path / "empty").mkdir()
    walked = list(_walk_files(tmp_path))
    assert [rel for rel, _ in walked] == [
        ".hidden", "a.pt", "b.pt", "zz.txt", "aa/y", "sub/z.bin", "sub/ä ö", "sub/deeper/c",
    ]
    assert all(path == tmp_path / rel for rel, path in walked)


def test_odd_entries_are_reported_and_only_file_symlinks_are_sent(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _touch(outside / "target.bin", b"outside")
    _touch(root / "plain.bin")
    _touch(root / ".runctl" / "journal.jsonl")
    _touch(root / ".runctl-tmp-0123")
    _touch(root / ".runctl-tmp-k3j9x2/d/part.bin")  # an interrupted prefix download's directory
    _touch(root / "sub" / ".runctl" / "lock")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "filelink.bin").symlink_to(outside / "target.bin")
    (root / "dangling").symlink_to(tmp_path / "missing")
    os.mkfifo(root / "pipe")
    odd: list[Path] = []
    walked = [rel for rel, _ in _walk_files(root, odd)]
    assert walked == ["filelink.bin", "plain.bin"]
    assert sorted(p.relative_to(root).as_posix() for p in odd) == [
        ".runctl", ".runctl-tmp-0123", ".runctl-tmp-k3j9x2", "dangling", "dirlink", "filelink.bin",
        "pipe", "sub/.runctl",
    ]
    # Without a list for odd entries, the same files are sent (and the rest logged).
    assert [rel for rel, _ in _walk_files(root)] == walked


def test_a_relative_root_gives_relative_paths_and_a_missing_one_gives_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    _touch(tmp_path / "ckpt" / "d" / "a.pt")
    monkeypatch.chdir(tmp_path)
    assert list(_walk_files(Path("ckpt"))) == [("d/a.pt", Path("ckpt/d/a.pt"))]
    assert list(_walk_files(Path("no-such-dir"))) == []
