"""SIGKILL of the uploading process (or of its s5cmd child) at chosen points: resume, never a torn checkpoint."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runctl.checkpoints import group_s3
from runctl.journal import Journal
from runctl.s3url import S3URL
from runctl.transfer import get_transfer
from runctl.transfer.base import ObjectInfo
from runctl.uploader import CheckpointUploader
from tests.reliability.conftest import QUICK_RETRY, config_for, get_object, s3_snapshot
from tests.reliability.faultproxy import FaultPlan, Rule
from tests.servers import S3Server

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def spawn(server: S3Server, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, **server.env(), PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability._worker", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen[str], wanted: str, timeout: float = 60) -> None:
    """Read the child's stdout (without blocking past ``timeout``) until the line ``wanted``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"child exited before {wanted!r}: {err[-2000:]}")
        buffer += chunk
        if wanted.encode() in buffer.splitlines():
            return
    raise AssertionError(f"no {wanted!r} within {timeout}s (got {buffer!r})")


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def complete_in_s3(server: S3Server, prefix: S3URL) -> dict[str, tuple[str, ...]]:
    t = get_transfer(server.config(), use_s5cmd=False)
    try:
        objects = [o for o in t.iter_objects(prefix, recursive=True) if isinstance(o, ObjectInfo)]
        grouped = group_s3(
            objects, prefix, read_marker=lambda k: t.get_bytes(S3URL(prefix.bucket, k))
        )
        return {c.name: c.files for c in grouped.checkpoints if c.complete}
    finally:
        t.close()


def assert_no_torn_checkpoint(
    server: S3Server, bucket: S3URL, prefix: S3URL, sources: dict[str, bytes]
) -> set[str]:
    """Every checkpoint S3 shows as complete has exactly the bytes that were submitted."""
    complete = complete_in_s3(server, prefix)
    for name, files in complete.items():
        for key in files:
            rel = key[len(prefix.key) :]
            assert get_object(server, bucket, key) == sources[rel], f"{key} is torn"
        if name in {rel.split("/")[0] for rel in sources if "/" in rel}:
            dir_files = {rel for rel in sources if rel.startswith(name + "/")}
            assert {k[len(prefix.key) :] for k in files} == dir_files, f"{name} is missing files"
    return set(complete)


def assert_journal_intact(root: Path) -> None:
    lines = (root / ".runctl" / "journal.jsonl").read_bytes().split(b"\n")
    whole = [line for line in lines[:-1] if line.strip()]
    for line in whole:
        json.loads(line)  # every line that ended with a newline parses
    assert whole, "the journal recorded the hand-over before the kill"


def make_checkpoints(root: Path) -> dict[str, bytes]:
    sources: dict[str, bytes] = {}
    for step in (1, 2):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for i in range(3):
            data = os.urandom(100_000 + i + step)
            (d / f"shard_{i}.bin").write_bytes(data)
            sources[f"checkpoint-{step}/shard_{i}.bin"] = data
    data = os.urandom(300_000)
    (root / "step_3.pt").write_bytes(data)
    sources["step_3.pt"] = data
    return sources


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
@pytest.mark.parametrize("point", ["between-files", "before-marker", "during-retention"])
def test_sigkill_at_a_point_then_resume(
    moto_server: S3Server, backend: str, point: str, tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    sources = make_checkpoints(root)
    bucket = S3URL(moto_server.new_bucket())
    prefix = bucket.join("run/")
    keep = "1" if point == "during-retention" else "none"
    proc = spawn(moto_server, "stop-at", str(root), str(prefix), backend, point, keep)
    try:
        wait_for_line(proc, f"AT {point}")
    finally:
        kill(proc)
    assert_journal_intact(root)
    visible = assert_no_torn_checkpoint(moto_server, bucket, prefix, sources)
    if point in ("between-files", "before-marker"):
        assert "checkpoint-1" not in visible  # half a directory, or no marker: never complete
    # A new process on the same directory resumes and finishes.
    with CheckpointUploader(
        root,
        prefix,
        config=moto_server.config(),
        use_s5cmd=backend == "s5cmd",
        keep_last_n=int(keep) if keep != "none" else None,
        retry=QUICK_RETRY,
    ) as up:
        up.flush(timeout=120)
    assert_journal_intact(root)
    assert Journal(root).pending() == []
    visible = assert_no_torn_checkpoint(moto_server, bucket, prefix, sources)
    if keep == "none":
        assert visible == {"checkpoint-1", "checkpoint-2", "step_3.pt"}
    else:
        # Killed while retention ran for checkpoint-2: step_3.pt was never handed over.
        assert visible == {"checkpoint-2"}


@pytest.mark.slow
def test_interrupted_retention_is_finished_on_resume(moto_server: S3Server, tmp_path: Path) -> None:
    """Killed between a directory checkpoint's marker delete and its files: the next run finishes."""
    root = tmp_path / "ckpt"
    root.mkdir()
    make_checkpoints(root)
    bucket = S3URL(moto_server.new_bucket())
    prefix = bucket.join("run/")
    proc = spawn(moto_server, "stop-at", str(root), str(prefix), "boto3", "during-retention", "1")
    try:
        wait_for_line(proc, "AT during-retention")
    finally:
        kill(proc)
    with CheckpointUploader(
        root, prefix, config=moto_server.config(), use_s5cmd=False, keep_last_n=1, retry=QUICK_RETRY
    ) as up:
        up.flush(timeout=120)
    left = set(s3_snapshot(moto_server, bucket.bucket))
    assert not any(k.startswith("run/checkpoint-1/") for k in left), sorted(left)


@pytest.mark.slow
def test_sigkill_mid_multipart_upload(moto_server: S3Server, tmp_path: Path) -> None:
    """A 60 MiB checkpoint (multipart with s5cmd) killed while parts are in flight, then resumed."""
    root = tmp_path / "ckpt"
    root.mkdir()
    data = os.urandom(60 * MiB)
    (root / "step_7.pt").write_bytes(data)
    bucket = S3URL(moto_server.new_bucket())
    prefix = bucket.join("run/")
    client = moto_server.client()
    proc = spawn(moto_server, "stop-at", str(root), str(prefix), "s5cmd", "none", "none")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads"):
                break
            time.sleep(0.02)
        else:
            pytest.fail("no multipart upload was seen in progress")
    finally:
        kill(proc)
    for child in psutil.process_iter(["cmdline"]):
        assert str(root) not in " ".join(child.info["cmdline"] or []) or "s5cmd" not in " ".join(
            child.info["cmdline"] or []
        ), "an s5cmd child outlived its killed parent"
    assert (
        complete_in_s3(moto_server, prefix) == {}
        or get_object(moto_server, bucket, "run/step_7.pt") == data
    )
    assert_journal_intact(root)
    with CheckpointUploader(root, prefix, config=moto_server.config(), retry=QUICK_RETRY) as up:
        up.flush(timeout=180)
    assert get_object(moto_server, bucket, "run/step_7.pt") == data


def test_killing_the_s5cmd_child_is_retried(
    moto_server: S3Server, make_proxy, tmp_path: Path
) -> None:
    """kill -9 of s5cmd alone: the uploader counts a retry and the checkpoint still lands whole."""
    proxy = make_proxy(
        moto_server, FaultPlan(rules=[Rule("stall", 1, method="PUT")], stall_seconds=5)
    )
    root = tmp_path / "ckpt"
    root.mkdir()
    data = os.urandom(500_000)
    (root / "step_1.pt").write_bytes(data)
    bucket = S3URL(moto_server.new_bucket())
    killed = []
    with CheckpointUploader(
        root, bucket.join("run/"), config=config_for(proxy.url), use_s5cmd=True, retry=QUICK_RETRY
    ) as up:
        handle = up.submit(root / "step_1.pt")
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for child in psutil.Process().children(recursive=True):
                try:
                    if child.name() == "s5cmd" and "run" in " ".join(child.cmdline()):
                        child.kill()
                        killed.append(child.pid)
                except psutil.Error:
                    pass
            time.sleep(0.05)
        assert killed, "never saw the s5cmd child"
        outcome = handle.result(timeout=60)
        status = up.status()
    assert outcome.state == "verified"
    assert status.retries >= 1 and status.failures == 0
    assert get_object(moto_server, bucket, "run/step_1.pt") == data
