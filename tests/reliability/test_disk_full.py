"""A full disk (an 8 MiB tmpfs): saves and downloads fail with clear errors; nothing durable is lost."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runctl.s3url import S3URL
from runctl.uploader import CheckpointUploader
from tests.cli.cli_support import assert_one_line_error, run
from tests.reliability.conftest import QUICK_RETRY, get_object, put_object
from tests.servers import S3Server


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write until ENOSPC, like a torch.save that runs out of room."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_full_disk_keeps_durable_checkpoints(
    small_disk: Path, moto_server: S3Server, tmp_path: Path
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    root = small_disk / "ckpt"
    root.mkdir()
    blobs = {f"step_{i}.pt": os.urandom(1_000_000 + i) for i in (1, 2)}
    up = CheckpointUploader(
        root,
        bucket.join("run/"),
        config=moto_server.config(),
        use_s5cmd=False,
        local_keep_last_n=1,
        retry=QUICK_RETRY,
    )
    try:
        for name, data in blobs.items():
            (root / name).write_bytes(data)
            up.submit(root / name)
        up.flush(timeout=60)
        # The training loop's next save fills the disk and fails.
        with pytest.raises(OSError):
            with open(root / "step_3.pt", "wb") as fh:
                fh.write(os.urandom(20_000_000))
        (root / "step_3.pt").unlink()
        fill(root / "filler.bin")
        (root / "step_4.pt").write_bytes(b"")  # a zero-byte "save" still fits
        up.submit(root / "step_4.pt")
        try:
            up.flush(timeout=60)
        except Exception as exc:  # noqa: BLE001 - must be a clear runctl error, not a crash
            assert "No space" in str(exc) or "ENOSPC" in str(exc) or "journal" in str(exc), exc
    finally:
        try:
            up.close(timeout=30)
        except Exception:  # noqa: BLE001
            pass
    # What was durable is still in S3, whole; what is local and newest is still there.
    for name, data in blobs.items():
        assert get_object(moto_server, bucket, f"run/{name}") == data
    for name, data in blobs.items():  # gone locally only because it is durable in S3
        assert not (root / name).exists() or (root / name).read_bytes() == data
    assert (root / "filler.bin").exists(), "an unrecognised file is never deleted"


@pytest.mark.parametrize("backend", ["--use-s5cmd", "--no-use-s5cmd"])
def test_download_into_a_full_disk_fails_cleanly(
    small_disk: Path, moto_server: S3Server, backend: str
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    put_object(moto_server, bucket, "run/step_1.pt", os.urandom(12_000_000))
    dest = small_disk / "restore"
    dest.mkdir()
    (dest / "step_1.pt").write_bytes(b"the old copy")
    result = run(
        "--endpoint-url",
        moto_server.endpoint_url,
        "s3",
        "download",
        str(bucket.join("run/step_1.pt")),
        str(dest / "step_1.pt"),
        backend,
    )
    assert result.exit_code == 1, result.stderr
    assert_one_line_error(result.stderr)
    # Atomic: the old file is intact and no temp file is left behind.
    assert (dest / "step_1.pt").read_bytes() == b"the old copy"
    assert sorted(p.name for p in dest.iterdir()) == ["step_1.pt"]
