"""Rows 3c and 3f's floors, ``benchmarks/least_upload.py`` and ``least_download.py``, keep the promises they stand for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.suite import LEAST_DOWNLOAD, LEAST_UPLOAD
from benchmarks.tools import find_s5cmd
from tests.servers import S3Server


def _least(
    server: S3Server, source: str, dest: Path | str, script: Path = LEAST_DOWNLOAD
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), find_s5cmd(), server.endpoint_url, str(source), str(dest)],
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


def test_least_upload_sends_every_file_to_its_own_key_with_a_line_each(
    rclone_server: S3Server, tmp_path: Path
) -> None:
    bucket = rclone_server.new_bucket()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 10)
    (src / "sub" / "b.bin").write_bytes(b"b" * 20)

    proc = _least(rclone_server, src, f"s3://{bucket}/run/", LEAST_UPLOAD)

    assert proc.returncode == 0, proc.stderr
    listed = rclone_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert {o["Key"]: o["Size"] for o in listed} == {"run/a.bin": 10, "run/sub/b.bin": 20}
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and f"s3://{bucket}/run/sub/b.bin (20 B)" in proc.stdout


def test_least_upload_refuses_a_symlink_in_the_tree(rclone_server: S3Server, tmp_path: Path) -> None:
    bucket = rclone_server.new_bucket()
    src, secret = tmp_path / "src", tmp_path / "secret"
    src.mkdir()
    secret.write_bytes(b"s")
    (src / "a.bin").write_bytes(b"a")
    (src / "link").symlink_to(secret)

    proc = _least(rclone_server, src, f"s3://{bucket}/run/", LEAST_UPLOAD)

    assert proc.returncode != 0 and "not a plain file" in proc.stderr
    assert "Contents" not in rclone_server.client().list_objects_v2(Bucket=bucket)
