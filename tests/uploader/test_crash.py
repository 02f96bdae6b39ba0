"""Crash safety with a real child process: SIGKILL mid-upload, then a new uploader resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runctl.checkpoints import MARKER_NAME
from runctl.journal import Journal
from runctl.s3url import S3URL
from runctl.uploader import CheckpointUploader, latest_checkpoint
from tests.servers import S3Server
from tests.uploader.conftest import FAST_RETRY, Wrapped, keys_under, write

REPO = Path(__file__).resolve().parents[2]


def child(server: S3Server, root: Path, url: S3URL, mode: str) -> subprocess.Popen[str]:
    env = dict(os.environ, **server.env(), PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.uploader._child", str(root), str(url), mode],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_resume_after_sigkill_mid_upload(
    root: Path, moto_server: S3Server, moto_bucket: S3URL, boto_transfer: object, backend: str
) -> None:
    shards = {f"shard_{i}.bin": os.urandom(300_000) for i in range(4)}
    for rel, data in shards.items():
        write(root / "checkpoint-1" / rel, data)
    step2, step3 = os.urandom(500_000), os.urandom(2_000_000)
    write(root / "step_2.pt", step2)
    write(root / "step_3.pt", step3)
    url = moto_bucket.join("run/")

    proc = child(moto_server, root, url, f"hang-{backend}")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "PARTIAL"
        journal = Journal(root)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pending = {e.name for e in journal.pending()}
            if (
                pending == {"checkpoint-1", "step_2.pt", "step_3.pt"}
                and not (root / "step_2.pt").exists()
            ):
                break
            time.sleep(0.05)
        assert pending == {"checkpoint-1", "step_2.pt", "step_3.pt"}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    # Half a directory landed, without its marker: readers do not see it.
    half = keys_under(boto_transfer, url.join("checkpoint-1/"))
    assert len(half) == 2 and MARKER_NAME not in half

    wrapped = Wrapped(boto_transfer)
    with CheckpointUploader(root, url, transfer=wrapped, keep_last_n=3, retry=FAST_RETRY) as up:  # type: ignore[arg-type]
        up.flush(timeout=60)
        status = up.status()
    assert status.uploaded == 3 and status.failures == 0
    landed = keys_under(boto_transfer, url)
    assert set(landed) == {f"checkpoint-1/{r}" for r in shards} | {
        f"checkpoint-1/{MARKER_NAME}",
        "step_2.pt",
        "step_3.pt",
    }
    # Only what was missing went again.
    dir_puts = [c[1] for c in wrapped.calls if c[0] == "put_files" and "checkpoint-1" in c[1][0]]
    assert [len(p) for p in dir_puts] == [2]
    got = latest_checkpoint(url, root.parent / "restore", transfer=boto_transfer)  # type: ignore[arg-type]
    assert got is not None and got.read_bytes() == step3
    assert boto_transfer.get_bytes(url.join("step_2.pt")) == step2  # type: ignore[attr-defined]
    assert all(
        boto_transfer.get_bytes(url.join(f"checkpoint-1/{r}")) == d for r, d in shards.items()
    )  # type: ignore[attr-defined]
    assert Journal(root).pending() == []
    assert list((root / ".runctl" / "staging").iterdir()) == []


@pytest.mark.parametrize(("mode", "said", "pending_names"), [
    # the first last.ckpt, still queued, is superseded: its "skipped" line comes after the
    # second one's "queued" line
    ("supersede", "SUPERSEDED", ["last.ckpt", "step_1.pt"]),
    # the first last.ckpt was uploading: its "verified" line comes after the second's "queued"
    ("inflight", "INFLIGHT", ["last.ckpt"]),
])
def test_a_newer_save_queued_before_a_crash_is_resumed(
    root: Path, moto_server: S3Server, moto_bucket: S3URL, boto_transfer: object,
    mode: str, said: str, pending_names: list[str],
) -> None:
    write(root / "step_1.pt", b"step one")
    url = moto_bucket.join("run/")
    proc = child(moto_server, root, url, f"{mode}-boto3")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == said
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert sorted(e.name for e in Journal(root).pending()) == pending_names

    with CheckpointUploader(root, url, transfer=boto_transfer, retry=FAST_RETRY) as up:  # type: ignore[arg-type]
        up.flush(timeout=60)
    assert boto_transfer.get_bytes(url.join("last.ckpt")) == b"v2" * 1000  # type: ignore[attr-defined]
    assert Journal(root).pending() == []


def test_a_checkpoint_skipped_before_a_crash_goes_locally_once_a_newer_one_is_durable(
    root: Path, moto_server: S3Server, moto_bucket: S3URL, boto_transfer: object
) -> None:
    for step in range(1, 5):
        write(root / f"step_{step}.pt", b"step %d" % step)
    url = moto_bucket.join("run/")
    proc = child(moto_server, root, url, "skip-boto3")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "SKIPPED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert Journal(root).replay()["step_2.pt"].state == "skipped"

    with CheckpointUploader(
        root, url, transfer=boto_transfer, keep_last_n=2, local_keep_last_n=2, retry=FAST_RETRY  # type: ignore[arg-type]
    ) as up:
        up.flush(timeout=60)
    assert sorted(keys_under(boto_transfer, url)) == ["step_3.pt", "step_4.pt"]
    # step_2.pt (and step_1.pt, unless it was already uploading) was never uploaded and never
    # will be: with newer ones durable, local keep-last-2 lets it go, as it would have
    # without the crash. Disk stays bounded.
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3.pt", "step_4.pt"]


def test_atexit_flushes_an_uploader_nobody_closed(
    root: Path, moto_server: S3Server, moto_bucket: S3URL, boto_transfer: object
) -> None:
    data = os.urandom(100_000)
    write(root / "step_7.pt", data)
    url = moto_bucket.join("run/")
    proc = child(moto_server, root, url, "exit-boto3")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert boto_transfer.get_bytes(url.join("step_7.pt")) == data  # type: ignore[attr-defined]


def test_a_resumed_directory_skipped_as_moot_goes_locally_once_newer_ones_are_durable(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # A crash left checkpoint-1..3 queued. The next run resumes them, but saves 4 and 5 before
    # 2 and 3 start: keep-last-2 makes those moot, so they are skipped. A resumed directory
    # carries no inventory, so its "skipped" line once had no size or mtime, and local
    # retention kept it for good (Hugging Face, after a preemption: a whole checkpoint each).
    _left_queued_by_a_crash(root)
    _resume_and_save_4_and_5(root, moto_bucket.join("run/"), boto_transfer)
    lines = [json.loads(x) for x in (root / ".runctl" / "journal.jsonl").read_text().splitlines()]
    (skip,) = [x for x in lines if x["name"] == "checkpoint-2" and x["state"] == "skipped"]
    assert skip["size"] == 102 + 2  # model.bin and trainer_state.json, as scan_local counts
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert Journal(root).replay()["checkpoint-2"].state == "deleted_local"


def test_what_a_killed_run_left_of_a_directory_in_s3_goes_once_it_is_skipped_as_moot(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # A run killed mid-upload of checkpoint-2 and -3 left part of each in S3, marker-less. The
    # next run skipped both as moot (newer ones queued), and nothing ever deleted those files:
    # with each preemption S3 held one more whole checkpoint that keep-last-N never counted.
    url = moto_bucket.join("run/")
    _left_queued_by_a_crash(root)
    for step in (2, 3):  # the files that made it before the kill; no marker
        boto_transfer.put_files(
            [(root / f"checkpoint-{step}" / "model.bin", url.join(f"checkpoint-{step}/model.bin"))]
        )
        Journal(root).record(f"checkpoint-{step}", "uploaded")
    _resume_and_save_4_and_5(root, url, boto_transfer)
    assert Journal(root).replay()["checkpoint-2"].state == "deleted_local"  # skipped, as before
    left = sorted({key.split("/")[0] for key in keys_under(boto_transfer, url)})
    assert left == ["checkpoint-4", "checkpoint-5"]


def _save_dir(root: Path, step: int) -> Path:
    write(root / f"checkpoint-{step}" / "model.bin", b"m" * (100 + step))
    write(root / f"checkpoint-{step}" / "trainer_state.json", b"{}")
    return root / f"checkpoint-{step}"


def _left_queued_by_a_crash(root: Path) -> None:
    """checkpoint-1..3 saved and queued in the journal, as a crash leaves them."""
    for step in (1, 2, 3):
        _save_dir(root, step)
        Journal(root).record(f"checkpoint-{step}", "queued")


def _resume_and_save_4_and_5(root: Path, url: S3URL, transfer: object) -> None:
    """A keep-last-2 uploader resumes 1..3; 4 and 5 are saved while 1 uploads and 2, 3 wait."""
    from tests.uploader.conftest import Gate

    wrapped = Wrapped(transfer)
    gate = Gate(wrapped)
    up = CheckpointUploader(
        root, url, transfer=wrapped, keep_last_n=2, local_keep_last_n=2, retry=FAST_RETRY  # type: ignore[arg-type]
    )
    try:
        assert gate.entered.wait(30)  # checkpoint-1 is uploading, 2 and 3 wait in the queue
        for step in (4, 5):
            up.submit(_save_dir(root, step))
        gate.open()
        up.flush(timeout=60)
    finally:
        up.close(timeout=60)


def test_a_resumed_directory_saved_again_is_kept_until_its_new_version_is_durable(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # The resumed checkpoint-2 is superseded by a new save of the same name, whose upload then
    # fails. The skip must name the old version: read from disk at skip time, it named the new
    # one, and local retention deleted the new checkpoint-2, never in S3 (promise 2).
    from runctl.exceptions import TransferError, UploadError
    from tests.uploader.conftest import Gate

    for step in (1, 2):
        write(root / f"checkpoint-{step}" / "model.bin", b"o" * 100)
        write(root / f"checkpoint-{step}" / "trainer_state.json", b"{}")
        Journal(root).record(f"checkpoint-{step}", "queued")
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = CheckpointUploader(
        root, moto_bucket.join("run/"), transfer=wrapped, retry=FAST_RETRY, local_keep_last_n=2  # type: ignore[arg-type]
    )
    try:
        assert gate.entered.wait(30)  # checkpoint-1 is uploading; the resumed checkpoint-2 waits
        write(root / "checkpoint-2" / "model.bin", b"N" * 5000)
        up.submit(root / "checkpoint-2")

        def refuse_checkpoint_2(count: int, pairs: list) -> None:
            gate._wait(count, pairs)
            if any("checkpoint-2" in str(p) for p, _ in pairs):
                raise TransferError("S3 refused checkpoint-2", code="AccessDenied")

        wrapped.before_put = refuse_checkpoint_2
        gate.open()
        with pytest.raises(UploadError):
            up.flush(timeout=60)
        for step in (3, 4):
            write(root / f"checkpoint-{step}" / "model.bin", b"m" * 100)
            write(root / f"checkpoint-{step}" / "trainer_state.json", b"{}")
            up.submit(root / f"checkpoint-{step}")
            up.flush(timeout=60)
    finally:
        up.close(timeout=60)
    assert (root / "checkpoint-2" / "model.bin").read_bytes() == b"N" * 5000
