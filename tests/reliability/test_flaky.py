"""A flaky server (500, 503 SlowDown, resets, stalls via a fault proxy): everything still ends correct."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from runctl.checkpoints import MARKER_NAME, group_s3
from runctl.exceptions import AccessDeniedError, UploadError
from runctl.s3url import S3URL
from runctl.transfer import get_transfer
from runctl.transfer.base import ObjectInfo
from runctl.uploader import CheckpointUploader, latest_checkpoint
from tests.cli.cli_support import assert_one_line_error, records, run
from tests.reliability.conftest import (
    COMBOS,
    QUICK_RETRY,
    config_for,
    get_object,
    put_object,
    s3_snapshot,
)
from tests.reliability.faultproxy import FaultPlan, Rule
from tests.servers import S3Server

FLAKY = {"error500": 0.08, "slowdown": 0.08, "reset": 0.06, "stall": 0.04}


def run_cli(endpoint: str, *args: str):  # noqa: ANN201
    """``runctl --endpoint-url ENDPOINT ARGS`` in-process."""
    return run("--endpoint-url", endpoint, *args)


def flaky_plan(seed: int, *rules: Rule) -> FaultPlan:
    return FaultPlan(
        seed=seed,
        probabilities=dict(FLAKY),
        max_consecutive=2,
        stall_seconds=0.5,
        rules=list(rules),
    )


def complete_checkpoints(server: S3Server, prefix: S3URL) -> dict[str, tuple[str, ...]]:
    """name -> files of every checkpoint S3 shows as complete (markers read and checked)."""
    t = get_transfer(server.config(), use_s5cmd=False)
    try:
        objects = [o for o in t.iter_objects(prefix, recursive=True) if isinstance(o, ObjectInfo)]
        grouped = group_s3(
            objects, prefix, read_marker=lambda key: t.get_bytes(S3URL(prefix.bucket, key))
        )
        return {c.name: c.files for c in grouped.checkpoints if c.complete}
    finally:
        t.close()


@pytest.mark.parametrize(("kind", "backend"), COMBOS)
def test_uploader_ends_correct_through_a_flaky_server(
    request: pytest.FixtureRequest, kind: str, backend: str, make_proxy, tmp_path: Path
) -> None:
    s3_server: S3Server = request.getfixturevalue(f"{kind}_server")
    bucket = S3URL(s3_server.new_bucket())
    # The first 6 PUTs of step_3.pt fail: more than the SDK's own retries, so the uploader retries.
    proxy = make_proxy(
        s3_server, flaky_plan(7, Rule("error500", 6, method="PUT", path_contains="step_3.pt"))
    )
    root = tmp_path / "ckpt"
    root.mkdir()
    prefix = bucket.join("run/")
    data = {f"step_{i}.pt": os.urandom(200_000 + i) for i in (1, 2, 3)}
    shards = {f"shard_{i}.bin": os.urandom(50_000 + i) for i in range(3)}
    with CheckpointUploader(
        root,
        prefix,
        config=config_for(proxy.url),
        use_s5cmd=backend == "s5cmd",
        keep_last_n=2,
        local_keep_last_n=1,
        retry=QUICK_RETRY,
    ) as up:
        for name, blob in data.items():
            (root / name).write_bytes(blob)
            up.submit(root / name)
        (root / "step_4").mkdir()
        for rel, blob in shards.items():
            (root / "step_4" / rel).write_bytes(blob)
        up.submit(root / "step_4")
        up.flush(timeout=120)
        status = up.status()
    assert proxy.faults() > 0, proxy.counts
    assert status.failures == 0 and status.uploaded + status.skipped == 4
    # Retries happened, are counted, and stayed within the policy.
    assert 1 <= status.retries <= 4 * (QUICK_RETRY.attempts - 1), status
    complete = complete_checkpoints(s3_server, prefix)
    assert set(complete) == {"step_3.pt", "step_4"}
    assert get_object(s3_server, bucket, "run/step_3.pt") == data["step_3.pt"]
    for rel, blob in shards.items():
        assert get_object(s3_server, bucket, f"run/step_4/{rel}") == blob
    keys = set(s3_snapshot(s3_server, bucket.bucket))
    assert keys == {"run/step_3.pt", f"run/step_4/{MARKER_NAME}"} | {
        f"run/step_4/{r}" for r in shards
    }
    local = {p.name for p in root.iterdir() if p.name != ".runctl"}
    assert local == {"step_4"}


@pytest.mark.parametrize(("kind", "backend"), COMBOS)
def test_cli_upload_list_download_cleanup_through_a_flaky_server(
    request: pytest.FixtureRequest, kind: str, backend: str, make_proxy, tmp_path: Path
) -> None:
    s3_server: S3Server = request.getfixturevalue(f"{kind}_server")
    bucket = S3URL(s3_server.new_bucket())
    proxy = make_proxy(s3_server, flaky_plan(11))
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    src = tmp_path / "src"
    src.mkdir()
    blobs = {f"step_{i}.pt": os.urandom(30_000 + i) for i in range(1, 7)}
    for name, blob in blobs.items():
        (src / name).write_bytes(blob)
    (src / "train.log").write_bytes(b"log")
    url = str(bucket.join("run/"))

    def cli(*args: str):  # noqa: ANN202
        started = time.monotonic()
        result = run("--endpoint-url", proxy.url, *args)
        assert time.monotonic() - started < 60
        return result

    up = cli("s3", "upload", str(src), url, "--recursive", flag, "--json")
    assert up.exit_code == 0, up.stderr
    assert {get_object(s3_server, bucket, f"run/{n}") for n in blobs} == set(blobs.values())

    listed = cli("s3", "list", url, "--recursive", flag, "--json")
    assert listed.exit_code == 0, listed.stderr
    assert {r["key"] for r in records(listed.stdout) if r["type"] == "object"} == {
        f"run/{n}" for n in [*blobs, "train.log"]
    }

    dest = tmp_path / "dest"
    down = cli("s3", "download", url, str(dest), "--recursive", flag, "--json")
    assert down.exit_code == 0, down.stderr
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {**blobs, "train.log": b"log"}

    clean = cli("s3", "cleanup", url, "--keep-last-n", "2", flag, "--json")
    assert clean.exit_code == 0, clean.stderr
    assert set(s3_snapshot(s3_server, bucket.bucket)) == {
        "run/step_5.pt",
        "run/step_6.pt",
        "run/train.log",
    }
    got = latest_checkpoint(
        url, tmp_path / "latest", config=config_for(proxy.url), use_s5cmd=backend == "s5cmd"
    )
    assert got is not None and got.read_bytes() == blobs["step_6.pt"]
    assert proxy.faults() > 0, proxy.counts


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_wrong_secret_fails_fast_instead_of_retrying(
    rclone_server: S3Server, backend: str, tmp_path: Path
) -> None:
    bucket = S3URL(rclone_server.new_bucket())
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "step_1.pt").write_bytes(b"x" * 1000)
    started = time.monotonic()
    up = CheckpointUploader(
        root,
        bucket.join("run/"),
        config=config_for(rclone_server.endpoint_url, secret="wrong-secret-0000"),
        use_s5cmd=backend == "s5cmd",
        retry=QUICK_RETRY,
    )
    handle = up.submit(root / "step_1.pt")
    exc = handle.exception(timeout=60)
    assert isinstance(exc, AccessDeniedError), repr(exc)
    with pytest.raises(UploadError, match="step_1.pt"):
        up.close(timeout=30)
    assert time.monotonic() - started < 30
    status = up.status()
    assert status.retries == 0 and status.failures == 1
    assert (root / "step_1.pt").exists()

    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    started = time.monotonic()
    result = run(
        "--endpoint-url",
        rclone_server.endpoint_url,
        "s3",
        "upload",
        str(root / "step_1.pt"),
        str(bucket.join("run/")),
        flag,
        env={"AWS_SECRET_ACCESS_KEY": "wrong-secret-0000"},
    )
    assert result.exit_code == 1
    assert_one_line_error(result.stderr)
    assert time.monotonic() - started < 30
    assert s3_snapshot(rclone_server, bucket.bucket) == {}


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_download_latest_fails_rather_than_take_an_older_checkpoint_when_a_marker_cannot_be_read(
    moto_server: S3Server, make_proxy, tmp_path: Path, backend: str
) -> None:
    # A 500 on the newest checkpoint's marker (beyond the retries) was taken for "incomplete":
    # `download --latest` brought down checkpoint-2, exit 0, with a warning; an outage just
    # after the listing said "no complete checkpoint" (re-run pass), which a launcher takes
    # for "start afresh". A marker that is gone is still "incomplete", silently.
    from tests.cli.cli_support import put, put_marker

    bucket = S3URL(moto_server.new_bucket())
    prefix = bucket.join("run/")
    for step in (2, 3):
        put(moto_server, bucket, f"run/checkpoint-{step}/model.bin", b"ab")
        put_marker(moto_server, prefix, f"checkpoint-{step}", {"model.bin": 2})
    marker = f"checkpoint-3/{MARKER_NAME}"
    proxy = make_proxy(moto_server, FaultPlan(rules=[Rule("error500", 1000, "GET", marker)]))
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    result = run(
        "--endpoint-url", proxy.url, "s3", "download", str(prefix), str(tmp_path / "dl"), "--latest", flag
    )
    assert result.exit_code == 1, result.output
    line = assert_one_line_error(result.stderr, contains=f"cannot read the marker run/{marker}")
    assert "not choosing a checkpoint" in line
    assert not (tmp_path / "dl" / "checkpoint-2").exists()


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_upload_r_of_new_bytes_with_old_times_that_fails_leaves_no_stale_marker(
    rclone_server: S3Server, backend: str, make_proxy, tmp_path: Path
) -> None:
    """Files copied with their times (`cp -p`), same sizes: the directory looked unchanged and
    kept its marker through `upload -r`, which sends every file again; with one failed, S3 held
    new and old files under the old marker, which `review` counted complete (fault pass)."""
    bucket = S3URL(rclone_server.new_bucket())
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    then = time.time() - 3600

    def write(tag: bytes) -> None:
        for name in ("part1.bin", "part2.bin", "trainer_state.json"):
            (ckpt / name).write_bytes(tag * 1000)
            os.utime(ckpt / name, (then, then))

    url = str(bucket.join("run/checkpoint-5/"))
    write(b"A")
    first = run("--endpoint-url", rclone_server.endpoint_url, "s3", "upload", str(ckpt), url, "-r", flag)
    assert first.exit_code == 0, first.stderr
    assert "run/checkpoint-5/" + MARKER_NAME in s3_snapshot(rclone_server, bucket.bucket)
    write(b"B")
    proxy = make_proxy(rclone_server, FaultPlan(rules=[Rule("slowdown", 10**6, method="PUT", path_contains="part2")]))
    second = run("--endpoint-url", proxy.url, "s3", "upload", str(ckpt), url, "-r", flag)
    assert second.exit_code == 1
    assert "is not marked complete" in second.stderr
    assert "run/checkpoint-5/" + MARKER_NAME not in s3_snapshot(rclone_server, bucket.bucket)
    assert get_object(rclone_server, bucket, "run/checkpoint-5/part1.bin") == b"B" * 1000
    # once it all goes up, it is marked again
    third = run("--endpoint-url", rclone_server.endpoint_url, "s3", "upload", str(ckpt), url, "-r", flag)
    assert third.exit_code == 0, third.stderr
    assert "run/checkpoint-5/" + MARKER_NAME in s3_snapshot(rclone_server, bucket.bucket)


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_cleanup_of_abandoned_uploads_never_takes_a_checkpoint_whose_marker_it_could_not_read(
    rclone_server: S3Server, backend: str, make_proxy, tmp_path: Path
) -> None:
    """Marker reads failing (503 SlowDown throughout) made complete checkpoints incomplete, and,
    their markers dated long ago, `--incomplete-older-than` took them for abandoned uploads:
    every one deleted, the newest too, "kept 0", exit 0 (fault pass)."""
    bucket = S3URL(rclone_server.new_bucket())
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    src = tmp_path / "run"
    for step in (1, 2, 3):
        (src / f"checkpoint-{step}").mkdir(parents=True)
        (src / f"checkpoint-{step}" / "w.bin").write_bytes(b"w" * step)
    then = time.time() - 3600
    for path in src.rglob("*"):
        os.utime(path, (then, then))
    url = str(bucket.join("run/"))
    up = run("--endpoint-url", rclone_server.endpoint_url, "s3", "upload", str(src), url, "-r", flag)
    assert up.exit_code == 0, up.stderr
    before = set(s3_snapshot(rclone_server, bucket.bucket))
    assert len([k for k in before if k.endswith(MARKER_NAME)]) == 3
    time.sleep(2.1)  # the markers are older than the limit
    proxy = make_proxy(
        rclone_server, FaultPlan(rules=[Rule("slowdown", 10**6, method="GET", path_contains=MARKER_NAME)])
    )
    clean = run("--endpoint-url", proxy.url, "s3", "cleanup", url, "-n", "1", "--incomplete-older-than", "1s",
                flag, "--json")  # fmt: skip
    assert set(s3_snapshot(rclone_server, bucket.bucket)) == before, clean.stdout
    assert "could not be read" in clean.stdout


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_a_checkpoint_refused_for_expired_credentials_lands_once_a_later_one_has(
    rclone_server: S3Server, backend: str, make_proxy, tmp_path: Path
) -> None:
    """ExpiredToken is not retried at once (no wait renews credentials), and was never tried
    again: after a short window of them, the run ended with UploadError naming a checkpoint a
    retry would have landed, and local retention kept it (fault pass)."""
    bucket = S3URL(rclone_server.new_bucket())
    proxy = make_proxy(rclone_server, FaultPlan(rules=[Rule("expired", 1, method="PUT", path_contains="step_1.pt")]))
    root = tmp_path / "ckpt"
    root.mkdir()
    prefix = bucket.join("run/")
    with CheckpointUploader(
        root, prefix, config=config_for(proxy.url), use_s5cmd=backend == "s5cmd", retry=QUICK_RETRY
    ) as up:
        (root / "step_1.pt").write_bytes(b"one")
        first = up.submit(root / "step_1.pt")
        error = first.exception(60)
        assert isinstance(error, AccessDeniedError) and error.code == "ExpiredToken", error
        (root / "step_2.pt").write_bytes(b"two")
        up.submit(root / "step_2.pt").result(60)
        up.flush(timeout=60)  # raised UploadError naming step_1.pt
    assert proxy.counts["expired"] == 1
    assert get_object(rclone_server, bucket, "run/step_1.pt") == b"one"
    assert get_object(rclone_server, bucket, "run/step_2.pt") == b"two"


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_a_marker_answered_200_and_never_stored_is_no_verified_checkpoint(
    rclone_server: S3Server, backend: str, make_proxy, tmp_path: Path
) -> None:
    """A marker PUT answered 200 by something in between and never stored: the checkpoint was
    recorded verified, and local retention could delete the local copy (fault pass). It is
    asked for again after its PUT; the next attempt stores it."""
    bucket = S3URL(rclone_server.new_bucket())
    proxy = make_proxy(rclone_server, FaultPlan(rules=[Rule("fake200", 1, method="PUT", path_contains=MARKER_NAME)]))
    root = tmp_path / "ckpt"
    (root / "checkpoint-1").mkdir(parents=True)
    (root / "checkpoint-1" / "w.bin").write_bytes(b"weights")
    with CheckpointUploader(
        root, bucket.join("run/"), config=config_for(proxy.url), use_s5cmd=backend == "s5cmd", retry=QUICK_RETRY
    ) as up:
        up.submit(root / "checkpoint-1").result(60)
        status = up.status()
    assert proxy.counts["fake200"] == 1 and status.retries >= 1, (proxy.counts, status)
    assert f"run/checkpoint-1/{MARKER_NAME}" in s3_snapshot(rclone_server, bucket.bucket)


def test_a_listing_that_ends_short_without_a_continuation_token_is_an_error(
    moto_server: S3Server, make_proxy, tmp_path: Path
) -> None:
    """A page saying IsTruncated with no continuation token: botocore took it for the last, the
    listing ended short, and what it left out (a marker) read as missing: cleanup deleted a
    complete checkpoint (fault pass). The boto3 backend refuses such a listing."""
    import re

    bucket = S3URL(moto_server.new_bucket())
    for name in ("step_1.pt", "step_2.pt", "step_3.pt"):
        moto_server.client().put_object(Bucket=bucket.bucket, Key=f"run/{name}", Body=b"x")
    proxy = make_proxy(moto_server)

    def cut(method: str, path: str, body: bytes) -> bytes:
        if method != "GET" or "list-type=2" not in path:
            return body
        body = re.sub(rb"<Contents>.*?</Contents>", b"", body, count=1, flags=re.DOTALL)
        body = re.sub(rb"<NextContinuationToken>[^<]*</NextContinuationToken>", b"", body)
        return re.sub(rb"<IsTruncated>false</IsTruncated>", b"<IsTruncated>true</IsTruncated>", body)

    proxy.rewrite = cut
    clean = run("--endpoint-url", proxy.url, "s3", "cleanup", f"{bucket}run/", "-n", "1", "--no-use-s5cmd")
    assert clean.exit_code == 1
    assert_one_line_error(clean.stderr, contains="gave no continuation token")
    assert len(s3_snapshot(moto_server, bucket.bucket)) == 3


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_a_pin_a_listing_leaves_out_still_keeps_its_checkpoint(
    rclone_server: S3Server, backend: str, make_proxy, tmp_path: Path
) -> None:
    """A listing that left a pin out: on boto3 nothing asked (its listings "show everything"),
    and cleanup, watch and the uploader deleted the pinned checkpoint; with the pin dated ahead
    (a server clock ahead), s5cmd left it out and `sync -d up --delete` deleted the checkpoint
    (retention pass). Each asks S3 for the pin before deleting."""
    import re

    from runctl.checkpoints import pin_url

    bucket = S3URL(rclone_server.new_bucket())
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    run = bucket.join("run/")
    for name in ("step_100.pt", "step_200.pt", "step_300.pt", "step_400.pt"):
        put_object(rclone_server, bucket, f"run/{name}")
    put_object(rclone_server, bucket, pin_url(run, "step_100.pt").key, b"")
    proxy = make_proxy(rclone_server)

    def no_pins(method: str, path: str, body: bytes) -> bytes:
        if method == "GET" and "list-type=2" in path:
            return re.sub(rb"<Contents>\s*<Key>[^<]*\.runctl/pinned/[^<]*</Key>.*?</Contents>", b"", body, flags=re.S)
        return body

    proxy.rewrite = no_pins
    clean = run_cli(proxy.url, "s3", "cleanup", str(run), "-n", "1", flag)
    assert clean.exit_code == 0, clean.stderr
    local = tmp_path / "local"
    local.mkdir()
    (local / "step_400.pt").write_bytes(b"x")
    synced = run_cli(proxy.url, "s3", "sync", str(local), str(run), "-d", "up", "--delete", flag)
    assert synced.exit_code == 0, synced.stderr
    left = set(s3_snapshot(rclone_server, bucket.bucket))
    assert "run/step_100.pt" in left, left
    assert "run/step_200.pt" not in left and "run/step_400.pt" in left, left


def test_a_page_served_twice_is_counted_once_by_a_size_cap(
    moto_server: S3Server, make_proxy
) -> None:
    """A listing repeating its objects (a server restarting it on a bad token) doubled every
    size, and `--max-total-size` deleted twice what it should (retention pass)."""
    import re

    bucket = S3URL(moto_server.new_bucket())
    for n in (1, 2, 3, 4, 5):
        moto_server.client().put_object(Bucket=bucket.bucket, Key=f"run/step_{n}.pt", Body=b"x" * 100)
    proxy = make_proxy(moto_server)

    def twice(method: str, path: str, body: bytes) -> bytes:
        if method == "GET" and "list-type=2" in path:
            contents = b"".join(re.findall(rb"<Contents>.*?</Contents>", body, flags=re.S))
            return body.replace(b"</ListBucketResult>", contents + b"</ListBucketResult>")
        return body

    proxy.rewrite = twice
    clean = run_cli(proxy.url, "s3", "cleanup", f"{bucket}run/", "--max-total-size", "300B", "--no-use-s5cmd")
    assert clean.exit_code == 0, clean.stderr
    assert sorted(s3_snapshot(moto_server, bucket.bucket)) == ["run/step_3.pt", "run/step_4.pt", "run/step_5.pt"]


def test_review_that_could_not_list_multipart_uploads_never_says_it_listed_them(
    moto_server: S3Server, make_proxy, tmp_path: Path
) -> None:
    # A server that refuses ListMultipartUploads (rclone has no such listing) leaves the review
    # standing, with the error; its JSON must not also say the uploads were listed (none seen
    # would then read as none there).
    bucket = S3URL(moto_server.new_bucket())
    put_object(moto_server, bucket, "run/step_1.pt", b"ab")
    proxy = make_proxy(moto_server, FaultPlan(rules=[Rule("error500", 1000, "GET", "uploads")]))
    result = run("--endpoint-url", proxy.url, "s3", "review", str(bucket.join("run/")), "--json", "--no-use-s5cmd")
    assert result.exit_code == 0, result.output
    doc = records(result.stdout)[-1]
    assert doc["multipart_error"] and doc["multipart_listed"] is False
    result = run("--endpoint-url", proxy.url, "s3", "review", str(bucket.join("run/")), "--no-use-s5cmd")
    assert "Multipart uploads: could not list them" in result.stdout
