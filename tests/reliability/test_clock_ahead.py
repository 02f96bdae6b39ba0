"""A server whose clock runs ahead of this machine's, as s5cmd's listings meet it.

s5cmd leaves out of a listing every object whose LastModified is later than the moment its
first page arrived (peak/s5cmd#531: on AWS an object just written can be dated up to a second
ahead; a MinIO or Ceph on a host whose clock runs fast dates everything ahead). What runctl
decides from a listing must not take such an object for missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from runctl.checkpoints import MARKER_NAME
from runctl.s3url import S3URL
from runctl.transfer import get_transfer
from runctl.uploader import CheckpointUploader
from tests.cli.cli_support import run
from tests.reliability.conftest import QUICK_RETRY, config_for, get_object, put_object
from tests.servers import S3Server

#: How far the server's clock runs ahead: longer than any test here takes.
AHEAD = 600.0


@pytest.fixture
def ahead(rclone_server: S3Server, make_proxy):
    """The rclone server behind a proxy that dates everything AHEAD seconds later."""
    return make_proxy(rclone_server, clock_ahead=AHEAD)


def test_s5cmd_listings_leave_out_what_is_dated_ahead(rclone_server: S3Server, ahead) -> None:
    # The premise, so that the tests below test something: s5cmd does not list such an object.
    bucket = S3URL(rclone_server.new_bucket())
    put_object(rclone_server, bucket, "run/step_1.pt")
    # (backend, what it lists, what it then finds of two paths its listing did not show: boto3
    # asks too, for a server whose listing falls short; retention pass)
    for backend, listed, found in (("s5cmd", [], ["step_1.pt"]), ("boto3", ["run/step_1.pt"], ["step_1.pt"])):
        t = get_transfer(config_for(ahead.url), use_s5cmd=backend == "s5cmd")
        try:
            assert [o.key for o in t.iter_objects(bucket.join("run/"), recursive=True)] == listed
            assert list(t.unlisted(bucket.join("run/"), ["step_1.pt", "step_2.pt"])) == found
        finally:
            t.close()


def test_the_uploader_verifies_a_directory_the_listing_cannot_see(
    rclone_server: S3Server, ahead, tmp_path: Path
) -> None:
    bucket = S3URL(rclone_server.new_bucket())
    root = tmp_path / "ckpt"
    (root / "step_4").mkdir(parents=True)
    shards = {f"shard_{i}.bin": os.urandom(10_000 + i) for i in range(3)}
    for rel, blob in shards.items():
        (root / "step_4" / rel).write_bytes(blob)
    with CheckpointUploader(
        root, bucket.join("run/"), config=config_for(ahead.url), use_s5cmd=True, retry=QUICK_RETRY
    ) as up:
        up.submit(root / "step_4")
        up.flush(timeout=120)
        status = up.status()
    assert (status.uploaded, status.failures, status.retries) == (1, 0, 0), status
    assert get_object(rclone_server, bucket, f"run/step_4/{MARKER_NAME}")
    for rel, blob in shards.items():
        assert get_object(rclone_server, bucket, f"run/step_4/{rel}") == blob


def test_cli_upload_marks_a_directory_the_listing_cannot_see(
    rclone_server: S3Server, ahead, tmp_path: Path
) -> None:
    bucket = S3URL(rclone_server.new_bucket())
    src = tmp_path / "ckpts" / "step_4"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"m" * 1000)
    (src / "trainer_state.json").write_text('{"global_step": 4}')
    result = run(
        "--endpoint-url", ahead.url, "s3", "upload", str(tmp_path / "ckpts"), f"s3://{bucket.bucket}/run/", "-r",
        env=rclone_server.env(),
    )
    assert result.exit_code == 0, result.stderr
    assert "not marked complete" not in result.stderr
    assert get_object(rclone_server, bucket, f"run/step_4/{MARKER_NAME}")


def test_sync_down_delete_keeps_a_file_whose_object_the_listing_cannot_see(
    rclone_server: S3Server, ahead, tmp_path: Path
) -> None:
    bucket = S3URL(rclone_server.new_bucket())
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "last.ckpt").write_bytes(b"old")
    put_object(rclone_server, bucket, "run/last.ckpt", b"new version")
    result = run(
        "--endpoint-url", ahead.url, "s3", "sync", str(mirror), f"s3://{bucket.bucket}/run/",
        "--direction", "down", "--delete", env=rclone_server.env(),
    )
    assert (mirror / "last.ckpt").exists(), result.stdout + result.stderr
    assert (mirror / "last.ckpt").read_bytes() == b"new version"
    assert result.exit_code == 0, result.stderr


def test_watch_reports_an_object_overwritten_during_its_listing_as_changed(
    rclone_server: S3Server, make_proxy
) -> None:
    # An overwrite that s5cmd's listing left out (dated after the listing began) was reported
    # as "deleted", and the checkpoint as gone, though S3 held its newer version.
    from runctl.watch import ObjectEvent, PrefixWatcher

    proxy = make_proxy(rclone_server)
    bucket = S3URL(rclone_server.new_bucket())
    put_object(rclone_server, bucket, "run/last.ckpt", b"one")
    transfer = get_transfer(config_for(proxy.url), use_s5cmd=True)
    try:
        watcher = PrefixWatcher(transfer, bucket.join("run/"))
        watcher.poll()  # the baseline sees last.ckpt
        put_object(rclone_server, bucket, "run/last.ckpt", b"two, longer")
        proxy.clock_ahead = AHEAD  # the new version is dated after the next listing begins
        events = [e for e in watcher.poll() if isinstance(e, ObjectEvent)]
        assert [(e.kind, e.size) for e in events] == [("changed", len(b"two, longer"))]
    finally:
        transfer.close()


def test_the_uploader_keeps_a_pin_its_listing_cannot_see(
    rclone_server: S3Server, make_proxy, tmp_path: Path
) -> None:
    # A pin the retention's listing did not show was taken for unpinned elsewhere and its file
    # removed: the local cleanup, which goes by the file, would then delete the pinned copy.
    from runctl.checkpoints import PIN_DIR

    proxy = make_proxy(rclone_server)
    bucket = S3URL(rclone_server.new_bucket())
    root = tmp_path / "ckpt"
    root.mkdir()
    with CheckpointUploader(
        root, bucket.join("run/"), config=config_for(proxy.url), use_s5cmd=True, keep_last_n=1,
        retry=QUICK_RETRY,
    ) as up:
        (root / "step_1.pt").write_bytes(b"one")
        up.protect("step_1.pt")
        up.submit(root / "step_1.pt")
        up.flush(timeout=60)
        time.sleep(1.2)  # the pin was sent over a second before the next listing begins
        proxy.clock_ahead = AHEAD
        (root / "step_2.pt").write_bytes(b"two")
        up.submit(root / "step_2.pt")
        up.flush(timeout=60)
    assert (root / PIN_DIR / "step_1.pt").exists()
    assert get_object(rclone_server, bucket, f"run/{PIN_DIR}/step_1.pt") == b""


def test_retention_keeps_what_a_pin_its_listing_cannot_see_names(rclone_server: S3Server, make_proxy) -> None:
    # Another node pinned step_1 just before this cleanup; on a server dated ahead, s5cmd's
    # listing showed the checkpoints (older) but not the pin: step_1 was deleted.
    proxy = make_proxy(rclone_server)
    bucket = S3URL(rclone_server.new_bucket())
    for step in (1, 2, 3):
        put_object(rclone_server, bucket, f"run/step_{step}.pt", b"x")
    env = rclone_server.env()
    first = run("--endpoint-url", proxy.url, "s3", "list", f"s3://{bucket.bucket}/run/", env=env)
    assert first.exit_code == 0 and "step_1.pt" in first.stdout
    put_object(rclone_server, bucket, "run/.runctl/pinned/step_1.pt", b"")
    proxy.clock_ahead = AHEAD
    proxy.dated_ahead = lambda key: "/.runctl/pinned/" in key  # the pin alone is dated ahead
    result = run(
        "--endpoint-url", proxy.url, "s3", "cleanup", f"s3://{bucket.bucket}/run/", "--keep-last-n", "1",
        env=env,
    )
    assert result.exit_code == 0, result.stderr
    keys = {o["Key"] for o in rclone_server.client().list_objects_v2(Bucket=bucket.bucket)["Contents"]}
    assert keys == {"run/.runctl/pinned/step_1.pt", "run/step_1.pt", "run/step_3.pt"}


def test_upload_leaves_alone_a_marker_its_listing_cannot_see(
    rclone_server: S3Server, make_proxy, tmp_path: Path
) -> None:
    # An unchanged directory whose marker the listing did not show had its marker written
    # again: `watch` then reported an old checkpoint as completed anew.
    proxy = make_proxy(rclone_server)
    bucket = S3URL(rclone_server.new_bucket())
    src = tmp_path / "ckpts" / "checkpoint-4"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"m" * 1000)
    (src / "trainer_state.json").write_text('{"global_step": 4}')
    args = ("--endpoint-url", proxy.url, "s3", "upload", str(tmp_path / "ckpts"), f"s3://{bucket.bucket}/run/", "-r")
    assert run(*args, env=rclone_server.env()).exit_code == 0
    marker = f"run/checkpoint-4/{MARKER_NAME}"
    first = get_object(rclone_server, bucket, marker)
    proxy.clock_ahead = AHEAD
    proxy.dated_ahead = lambda key: MARKER_NAME in key
    again = run(*args, env=rclone_server.env())
    assert again.exit_code == 0, again.stderr
    assert get_object(rclone_server, bucket, marker) == first
