"""Rows 3e/3f's floor, ``benchmarks/least_download.py``, keeps the promises it stands for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.suite import LEAST_DOWNLOAD
from benchmarks.tools import find_s5cmd
from tests.servers import S3Server


def _least(server: S3Server, source: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LEAST_DOWNLOAD), find_s5cmd(), server.endpoint_url, source, str(dest)],
        env={**os.environ, **server.env()},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_least_download_places_every_object_with_its_time_and_a_line_each(
    rclone_server: S3Server, tmp_path: Path
) -> None:
    bucket = rclone_server.new_bucket()
    client = rclone_server.client()
    bodies = {"run/a.bin": b"a" * 10, "run/sub/b.bin": b"b" * 20, "other/c.bin": b"c"}
    for key, body in bodies.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    dest = tmp_path / "out"

    proc = _least(rclone_server, f"s3://{bucket}/run/", dest)

    assert proc.returncode == 0, proc.stderr
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["a.bin", "sub/b.bin"]  # nothing of other/, and the temporary directory went
    assert sorted(p.name for p in dest.iterdir()) == ["a.bin", "sub"]
    listed = client.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]
    times = {o["Key"]: o["LastModified"].timestamp() for o in listed}  # to the millisecond
    for rel in files:
        key = f"run/{rel}"
        assert (dest / rel).read_bytes() == bodies[key]
        assert abs((dest / rel).stat().st_mtime - times[key]) < 0.002, key
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and f"s3://{bucket}/run/sub/b.bin" in proc.stdout
    assert "(20 B)" in proc.stdout


def test_least_download_refuses_a_directory_that_resolves_outside_the_destination(
    rclone_server: S3Server, tmp_path: Path
) -> None:
    bucket = rclone_server.new_bucket()
    rclone_server.client().put_object(Bucket=bucket, Key="run/sub/b.bin", Body=b"b")
    dest, outside = tmp_path / "out", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside)

    proc = _least(rclone_server, f"s3://{bucket}/run/", dest)

    assert proc.returncode != 0
    assert "resolves outside" in proc.stderr
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in dest.iterdir()) == ["sub"]
