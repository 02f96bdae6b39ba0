"""Staging copies appear whole or not at all: a resume must never take a short copy for the checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from runctl.staging import StagingArea, open_for_staging


def test_an_interrupted_copy_of_an_open_file_leaves_nothing_a_resume_would_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "step_1.pt"
    source.write_bytes(os.urandom(300_000))
    fd = open_for_staging(source)
    source.unlink()
    sendfile = os.sendfile

    def dies_after_one_chunk(out: int, in_: int, offset: int, count: int) -> int:
        if offset:
            raise OSError(5, "Input/output error")
        return sendfile(out, in_, offset, min(count, 100_000))

    monkeypatch.setattr(os, "sendfile", dies_after_one_chunk)
    area = StagingArea(tmp_path)
    try:
        with pytest.raises(OSError):
            area.copy_open_file(fd, source, "1-1")
    finally:
        os.close(fd)
    assert area.find("step_1.pt") is None
    assert [p.name for p in area.dir.rglob("*") if p.is_file()] == []


def test_an_interrupted_copy_of_a_file_leaves_nothing_a_resume_would_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "step_1.pt"
    source.write_bytes(os.urandom(300_000))

    def half_then_fail(src: Path, dst: Path) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", half_then_fail)
    area = StagingArea(tmp_path)
    with pytest.raises(OSError):
        area.copy_file(source, "1-1")
    assert area.find("step_1.pt") is None


def test_a_copy_of_an_open_file_is_the_version_opened_with_its_mtime(tmp_path: Path) -> None:
    source = tmp_path / "step_1.pt"
    data = os.urandom(123_457)
    source.write_bytes(data)
    os.utime(source, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    fd = open_for_staging(source)
    (tmp_path / "new").write_bytes(b"a newer version")
    os.replace(tmp_path / "new", source)
    try:
        snapshot = StagingArea(tmp_path).copy_open_file(fd, source, "1-1")
    finally:
        os.close(fd)
    assert snapshot.path.read_bytes() == data
    assert os.stat(snapshot.path).st_mtime_ns == 1_700_000_000_123_456_789
    assert snapshot.size == len(data)


def test_a_directory_staged_in_part_is_never_found_for_a_resume(tmp_path: Path) -> None:
    # A run killed while linking a directory's files (the trainer's rotation deleting the
    # source meanwhile) left a partial tree; the next run uploaded it and marked it complete.
    source = tmp_path / "checkpoint-500"
    source.mkdir()
    for name in ("a.bin", "b.bin", "trainer_state.json"):
        (source / name).write_bytes(b"x")
    area = StagingArea(tmp_path)
    partial = area.slot("1-1", source.name)
    partial.mkdir(parents=True)
    os.link(source / "a.bin", partial / "a.bin")  # killed here
    assert area.find("checkpoint-500") is None
    whole = area.snapshot_dir(source, "1-2")
    assert area.find("checkpoint-500") == whole.path
    assert sorted(whole.files) == ["a.bin", "b.bin", "trainer_state.json"]
