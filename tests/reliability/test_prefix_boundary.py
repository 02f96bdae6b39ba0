"""Cleanup of s3://b/run never touches run2/, run-old/ or unrecognised objects; a bucket root needs confirming."""

from __future__ import annotations

from pathlib import Path

import pytest

from runctl.checkpoints import MARKER_NAME, build_manifest
from runctl.s3url import S3URL
from runctl.uploader import CheckpointUploader
from tests.cli.cli_support import assert_one_line_error, run
from tests.reliability.conftest import QUICK_RETRY, put_object, s3_snapshot
from tests.servers import S3Server

NEIGHBOURS = [
    "run2/step_1.pt",
    "run2/step_2.pt",
    "run-old/step_1.pt",
    "run-old/checkpoint-1/a.bin",
    "runner/step_3.pt",
    "run/train.log",
    "run/notes/step_9.pt",  # under an unrecognised directory: not a checkpoint of run/
    "run/config.yaml",
    "step_0.pt",
    "step_99.pt",
]


def populate(server: S3Server, bucket: S3URL, tmp_path: Path) -> None:
    for key in NEIGHBOURS:
        put_object(server, bucket, key, key.encode())
    for i in (1, 2, 3):
        put_object(server, bucket, f"run/step_{i}.pt", b"s" * i)
    shard = tmp_path / "checkpoint-4"
    shard.mkdir()
    (shard / "a.bin").write_bytes(b"4444")
    put_object(server, bucket, "run/checkpoint-4/a.bin", b"4444")
    marker = build_manifest(shard, "checkpoint-4", 4).to_bytes()
    put_object(server, bucket, f"run/checkpoint-4/{MARKER_NAME}", marker)


@pytest.mark.parametrize("backend", ["--use-s5cmd", "--no-use-s5cmd"])
@pytest.mark.parametrize("target", ["run", pytest.param("run/", marks=pytest.mark.slow)])
def test_cleanup_stays_inside_the_prefix(
    s3_server: S3Server, bucket: S3URL, backend: str, target: str, tmp_path: Path
) -> None:
    populate(s3_server, bucket, tmp_path)
    before = s3_snapshot(s3_server, bucket.bucket)
    endpoint = ["--endpoint-url", s3_server.endpoint_url]
    result = run(*endpoint, "s3", "cleanup", str(bucket.join(target)), "-n", "1", backend)
    assert result.exit_code == 0, result.stderr
    after = s3_snapshot(s3_server, bucket.bucket)
    gone = set(before) - set(after)
    assert gone == {"run/step_1.pt", "run/step_2.pt", "run/step_3.pt"}
    assert all(after[k] == before[k] for k in NEIGHBOURS)

    # The bucket root: refused without the confirmation flag, and nothing changes.
    refused = run(*endpoint, "s3", "cleanup", str(bucket), "-n", "1", backend)
    assert refused.exit_code == 2
    assert_one_line_error(refused.stderr, contains="--yes-bucket-root")
    assert s3_snapshot(s3_server, bucket.bucket) == after
    confirmed = run(
        *endpoint, "s3", "cleanup", str(bucket), "-n", "1", "--yes-bucket-root", backend
    )
    assert confirmed.exit_code == 0, confirmed.stderr
    final = s3_snapshot(s3_server, bucket.bucket)
    # Only root-level checkpoints count there; every prefix below stays whole.
    assert set(after) - set(final) == {"step_0.pt"}


def test_uploader_retention_stays_inside_the_prefix(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    populate(s3_server, bucket, tmp_path)
    before = s3_snapshot(s3_server, bucket.bucket)
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "step_5.pt").write_bytes(b"5" * 5)
    with CheckpointUploader(
        root,
        "s3://" + bucket.bucket + "/run",
        config=s3_server.config(),
        keep_last_n=1,
        use_s5cmd=False,
        retry=QUICK_RETRY,
    ) as up:
        up.submit(root / "step_5.pt")
    after = s3_snapshot(s3_server, bucket.bucket)
    assert set(before) - set(after) == {
        "run/step_1.pt",
        "run/step_2.pt",
        "run/step_3.pt",
        "run/checkpoint-4/a.bin",
        f"run/checkpoint-4/{MARKER_NAME}",
    }
    assert set(after) - set(before) == {"run/step_5.pt"}
    assert all(after[k] == before[k] for k in NEIGHBOURS)
