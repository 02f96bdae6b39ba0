"""Benchmark data: local datasets, and object trees written straight into rclone's served directory."""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
_CHUNK = 16 * MiB


@dataclass(frozen=True)
class Dataset:
    """Files to move: ``path`` is one file or a directory of files; ``count`` files, ``size`` bytes in all."""

    key: str
    label: str
    path: Path
    count: int
    size: int

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()


def random_file(path: Path, size: int) -> None:
    """Incompressible bytes, so no layer can cheat on zeros."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            n = min(_CHUNK, left)
            fh.write(os.urandom(n))
            left -= n


def sparse_file(path: Path, size: int) -> None:
    """A file of ``size`` bytes that takes no disk space (reads as zeros)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)


def make_dataset(
    root: Path, key: str, label: str, count: int, each: int, *, single: bool = False
) -> Dataset:
    if single:
        path = root / key / "model.bin"
        random_file(path, each)
        return Dataset(key, label, path, 1, each)
    base = root / key
    base.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        random_file(base / f"part-{i:05d}.bin", each)
    return Dataset(key, label, base, count, count * each)


def link_tree(src: Path, dest: Path) -> None:
    """Hard-link ``src`` (a file or a directory of files) to ``dest``; copy across filesystems."""

    def place(a: Path, b: Path) -> None:
        try:
            os.link(a, b)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copyfile(a, b)

    if src.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        for entry in src.iterdir():
            place(entry, dest / entry.name)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        place(src, dest)


def tree_stats(path: Path, skip_names: tuple[str, ...] = ()) -> tuple[int, int]:
    """(files, bytes) under ``path`` (a file counts as one); names in ``skip_names`` are left out."""
    if not path.exists():
        return 0, 0
    if path.is_file():
        return 1, path.stat().st_size
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            if name in skip_names:
                continue
            files += 1
            size += os.stat(os.path.join(dirpath, name)).st_size
    return files, size


def write_checkpoint_tree(
    prefix_dir: Path, checkpoints: int, objects: int, object_size: int
) -> list[str]:
    """``checkpoint-1/ … checkpoint-N/``, each ``objects`` keys: ``objects - 1`` files plus a valid marker.

    Written on disk under the served directory (the server must be restarted to see them).
    Returns every key relative to ``prefix_dir``, oldest checkpoint first, marker first within one.
    """
    from runctl.checkpoints import MARKER_NAME, FileEntry, Manifest

    if prefix_dir.exists():
        shutil.rmtree(prefix_dir)
    payload = b"r" * object_size
    keys: list[str] = []
    now = time.time()
    for step in range(1, checkpoints + 1):
        name = f"checkpoint-{step}"
        ckpt = prefix_dir / name
        ckpt.mkdir(parents=True)
        files = {}
        for j in range(objects - 1):
            rel = f"shard-{j:03d}.bin"
            (ckpt / rel).write_bytes(payload)
            files[rel] = FileEntry(object_size)
        marker = Manifest(name, step, files, created=now).to_bytes()
        (ckpt / MARKER_NAME).write_bytes(marker)
        keys.append(f"{name}/{MARKER_NAME}")
        keys.extend(f"{name}/{rel}" for rel in files)
    return keys
