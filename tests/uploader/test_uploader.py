"""The uploader's promises, each against a real S3 server on loopback."""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from runctl.checkpoints import MARKER_NAME, Manifest
from runctl.exceptions import (
    FlushTimeout,
    PartialTransferError,
    TransferError,
    UploadError,
    UsageError,
)
from runctl.journal import Journal
from runctl.retry import RetryPolicy
from runctl.s3url import S3URL
from runctl.uploader import CheckpointUploader, latest_checkpoint
from tests.servers import self_signed, start_rclone
from tests.uploader.conftest import FAST_RETRY, Gate, Wrapped, keys_under, write

MiB = 1024 * 1024


def uploader(root: Path, url: S3URL, transfer: object, **kwargs: object) -> CheckpointUploader:
    kwargs.setdefault("retry", FAST_RETRY)
    return CheckpointUploader(root, url.join("run/"), transfer=transfer, **kwargs)  # type: ignore[arg-type]


#: Two quick attempts: an outage fails an upload at once.
BRIEF_RETRY = RetryPolicy(attempts=2, backoff_factor=0.01, backoff_max=0.01, jitter=0)


@contextmanager
def stoppable_s3(tmp_path: Path, backend: str = "boto3") -> Iterator[tuple[Any, S3URL, Any]]:
    """An rclone server that ``stop()`` and ``start()`` take down and bring back, a bucket, a transfer."""
    from runctl.transfer import get_transfer

    server = start_rclone(tmp_path / "rclone")
    try:
        transfer = get_transfer(server.config(), use_s5cmd=backend == "s5cmd")
        try:
            yield server, S3URL(server.new_bucket()), transfer
        finally:
            transfer.close()
    finally:
        server.stop()


def upload_one(
    root: Path, url: S3URL, transfer: Any, name: str, data: bytes, then: Callable[[], object] = tuple
) -> bytes:
    """Submit ``data`` saved as ``name`` to a fresh uploader, run ``then``; what S3 holds after close.

    The upload must end verified.
    """
    up = uploader(root, url, transfer)
    handle = up.submit(write(root / name, data))
    then()
    assert handle.result(30).state == "verified"
    up.close(timeout=30)
    return transfer.get_bytes(url.join(f"run/{name}"))


# -- promise 1: no stall ----------------------------------------------------------------------


def test_submit_of_1gib_returns_in_milliseconds(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)  # the upload starts but never finishes: we time only submit()
    up = uploader(root, moto_bucket, wrapped)
    times = []
    try:
        for i in range(5):
            path = root / f"step_{i}.pt"
            with open(path, "wb") as fh:
                fh.truncate(1024 * MiB)  # sparse: 1 GiB in no time
            start = time.perf_counter()
            handle = up.submit(path)
            times.append(time.perf_counter() - start)
            assert not handle.done()
        assert gate.entered.wait(10), "the worker should be uploading while submit has returned"
        assert statistics.median(times) < 0.05, times
        assert up.status().in_flight == "step_0.pt"
    finally:
        with pytest.raises(FlushTimeout):
            up.close(timeout=0.3)
    # Nothing was lost: every submitted checkpoint is still pending in the journal for a resume.
    assert {e.name for e in Journal(root).pending()} >= {f"step_{i}.pt" for i in range(1, 5)}


def test_the_staging_link_is_made_off_the_training_thread(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hard link is a journaled write: on a busy disk it waited 24-25 ms (benchmark row 1's
    # p99). submit() only opens the file; the link of that open file is made in the background.
    linked_on: list[threading.Thread] = []
    link = os.link

    def recording_link(*args: object, **kwargs: object) -> None:
        linked_on.append(threading.current_thread())
        link(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", recording_link)
    data = os.urandom(100_000)
    assert upload_one(root, moto_bucket, boto_transfer, "step_1.pt", data) == data
    assert linked_on and threading.main_thread() not in linked_on


def test_submit_wakes_one_thread_last_and_the_upload_still_starts(
    root: Path,
    moto_bucket: S3URL,
    boto_transfer: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every thread woken from submit() can cost the training thread its core or the GIL for
    # milliseconds (benchmark rows 1 and 1b). A file staged in the background wakes only the
    # staging thread, after the journal line is written and the job queued; that thread asks
    # for the journal's fsync and wakes the worker once the file is staged.
    import runctl.uploader as uploader_module

    up = uploader(root, moto_bucket, boto_transfer)
    events: list[tuple[str, str]] = []
    queued: list[bool] = []
    journal_queue = up._journal._queue
    stager_queue = up._stager._queue
    notify_all = up._cond.notify_all
    record = uploader_module.Journal.record

    class Recording:
        def __init__(self, inner: Any, event: str) -> None:
            self.inner, self.event = inner, event

        def put(self, item: object) -> None:
            if item is not None:  # None: close() stopping the thread
                events.append((self.event, threading.current_thread().name))
            if self.event == "wake stager" and item is not None:
                queued.append(any(j.name == "step_1.pt" for j in up._queue))
            self.inner.put(item)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    def notify() -> None:
        events.append(("wake worker", threading.current_thread().name))
        notify_all()

    def recorded(self: object, name: str, state: str, **kwargs: Any) -> None:
        events.append((f"line {state}", threading.current_thread().name))
        record(self, name, state, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(up._journal, "_queue", Recording(journal_queue, "journal"))
    monkeypatch.setattr(up._stager, "_queue", Recording(stager_queue, "wake stager"))
    monkeypatch.setattr(up._cond, "notify_all", notify)
    monkeypatch.setattr(uploader_module.Journal, "record", recorded)
    release = threading.Event()
    link_open_file = up.staging.link_open_file

    def gated_link(*args: object) -> object:
        release.wait(10)
        return link_open_file(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(up.staging, "link_open_file", gated_link)
    data = os.urandom(10_000)
    handle = up.submit(write(root / "step_1.pt", data))
    from_submit = list(events)
    release.set()
    assert handle.result(30).state == "verified"
    up.close(timeout=30)
    assert boto_transfer.get_bytes(moto_bucket.join("run/step_1.pt")) == data  # type: ignore[attr-defined]
    assert from_submit == [("line queued", "MainThread"), ("wake stager", "MainThread")]
    assert queued[0] is True  # the job was in the queue before the staging thread could run
    # (later puts: close()'s flush waits for the stager by queueing a marker)
    after = events[len(from_submit) :]
    assert after[:2] == [("journal", "runctl-stage"), ("wake worker", "runctl-stage")]


def test_a_file_that_cannot_be_opened_is_still_staged_at_submit(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of file descriptors (EMFILE), or unreadable: submit() links at once, as before, and
    # never raises into the training loop for it.
    import runctl.uploader as uploader_module

    def no_fds(path: Path) -> int:
        raise OSError(24, "Too many open files", str(path))

    monkeypatch.setattr(uploader_module, "open_for_staging", no_fds)
    data = os.urandom(50_000)
    # Deleted right after submit(): the link made in submit() keeps it.
    deleted = (root / "step_1.pt").unlink
    assert upload_one(root, moto_bucket, boto_transfer, "step_1.pt", data, then=deleted) == data


# -- promise 2: durable before delete -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_local_checkpoints_accumulate_while_s3_is_down(
    tmp_path: Path, root: Path, backend: str
) -> None:
    with stoppable_s3(tmp_path, backend) as (server, url, transfer):
        up = uploader(
            root, url, transfer, keep_last_n=5, local_keep_last_n=1, retry=BRIEF_RETRY, stall_timeout=5
        )
        write(root / "step_0.pt", b"zero")
        up.submit(root / "step_0.pt").result(30)
        server.stop()
        for i in range(1, 4):
            write(root / f"step_{i}.pt", b"x" * i)
            up.submit(root / f"step_{i}.pt")
        with pytest.raises(UploadError) as info:
            up.flush(timeout=120)
        assert all(f"step_{i}.pt" in str(info.value) for i in range(1, 4))
        # Not durable, so not deleted: every checkpoint is still on disk.
        assert sorted(p.name for p in root.glob("step_*")) == [f"step_{i}.pt" for i in range(4)]

        server.start()
        write(root / "step_4.pt", b"four")
        up.submit(root / "step_4.pt").result(60)
        # S3 is back: the failed ones get another round, land, and only then go locally.
        up.close(timeout=60)
        # (The last to land, step_3, is protected from the retention pass its own landing runs.)
        assert sorted(p.name for p in root.glob("step_*")) == ["step_3.pt", "step_4.pt"]
        in_s3 = sorted(keys_under(transfer, url.join("run/")))
        assert in_s3 == [f"step_{i}.pt" for i in range(5)]
        assert transfer.get_bytes(url.join("run/step_2.pt")) == b"xx"


@pytest.mark.parametrize("keep_last_n", [None, 1])
def test_a_checkpoint_that_failed_in_an_outage_is_retried_once_s3_is_back(
    tmp_path: Path, root: Path, keep_last_n: int | None
) -> None:
    # Default retries span about 15 s: a checkpoint saved early in a longer outage failed for
    # the rest of the run, and the run ended with UploadError although S3 was back and newer
    # checkpoints had landed. Now it gets another round once one lands; and when keep-last-N
    # newer ones have landed, retention would delete it anyway, so it is let go as moot.
    with stoppable_s3(tmp_path) as (server, url, transfer):
        up = uploader(root, url, transfer, keep_last_n=keep_last_n, retry=BRIEF_RETRY)
        server.stop()
        failed = up.submit(write(root / "step_1.pt", b"one"))
        assert isinstance(failed.exception(60), TransferError)
        server.start()
        up.submit(write(root / "step_2.pt", b"two")).result(60)
        up.close(timeout=60)  # raised UploadError naming step_1.pt
        in_s3 = sorted(keys_under(transfer, url.join("run/")))
        latest = Journal(root).replay()["step_1.pt"]
        if keep_last_n is None:
            assert in_s3 == ["step_1.pt", "step_2.pt"]
            assert latest.state == "verified"
        else:
            assert in_s3 == ["step_2.pt"]
            assert latest.state == "skipped" and "anyway" in (latest.detail or "")


def test_a_failed_checkpoint_saved_again_never_lands_over_the_newer_version(
    tmp_path: Path, root: Path
) -> None:
    with stoppable_s3(tmp_path) as (server, url, transfer):
        up = uploader(root, url, transfer, retry=BRIEF_RETRY)
        server.stop()
        assert up.submit(write(root / "last.ckpt", b"old")).exception(60) is not None
        server.start()
        up.submit(write(root / "last.ckpt", b"new")).result(60)
        up.submit(write(root / "step_3.pt", b"3")).result(60)
        up.close(timeout=60)
        assert transfer.get_bytes(url.join("run/last.ckpt")) == b"new"


# -- promise 3: no torn objects ------------------------------------------------------------------


def test_deleted_right_after_submit_still_lands_whole(
    root: Path, bucket: S3URL, transfer: object
) -> None:
    data = os.urandom(256 * 1024)
    up = uploader(root, bucket, transfer)
    path = write(root / "epoch=0-step=10.ckpt", data)
    handle = up.submit(path)
    path.unlink()  # Lightning's top-k removal
    assert handle.result(60).state == "verified"
    up.close(timeout=60)
    assert transfer.get_bytes(bucket.join("run/epoch=0-step=10.ckpt")) == data  # type: ignore[attr-defined]
    assert not any((root / ".runctl" / "staging").rglob("*.ckpt")), "staging is cleaned up"


def test_deleted_or_replaced_before_it_is_staged_uploads_the_version_handed_over(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between submit() and the background link the trainer may delete the file (top-k) or
    # replace it (atomic save of last.ckpt): the file opened at submit is then copied instead.
    from runctl.staging import StagingArea

    held = threading.Event()
    link_open_file, copy_open_file = StagingArea.link_open_file, StagingArea.copy_open_file
    copied_on: list[str] = []

    def late(self: StagingArea, fd: int, source: Path, token: str) -> Path | None:
        assert held.wait(10)
        return link_open_file(self, fd, source, token)

    def recorded(self: StagingArea, fd: int, source: Path, token: str) -> object:
        copied_on.append(threading.current_thread().name)
        return copy_open_file(self, fd, source, token)

    monkeypatch.setattr(StagingArea, "link_open_file", late)
    monkeypatch.setattr(StagingArea, "copy_open_file", recorded)
    up = uploader(root, moto_bucket, boto_transfer)
    first, old, new = os.urandom(300_000), os.urandom(200_000), b"new version"
    deleted = up.submit(write(root / "epoch=0-step=10.ckpt", first))
    replaced = up.submit(write(root / "last.ckpt", old))
    (root / "epoch=0-step=10.ckpt").unlink()
    write(root / "last.ckpt.tmp", new)
    os.replace(root / "last.ckpt.tmp", root / "last.ckpt")
    held.set()
    assert deleted.result(30).state == "verified"
    assert replaced.result(30).state == "verified"
    up.close(timeout=30)
    get = boto_transfer.get_bytes  # type: ignore[attr-defined]
    assert get(moto_bucket.join("run/epoch=0-step=10.ckpt")) == first
    assert get(moto_bucket.join("run/last.ckpt")) == old
    assert [p.name for p in (root / ".runctl" / "staging").rglob("*") if p.is_file()] == []
    # Both had lost their names: copied at once (a crash after that leaves a staged copy to
    # resume from), on the staging thread: not the worker, which may be busy with an earlier
    # upload for minutes, nor the journal thread, whose fsyncs uploads wait for.
    assert copied_on == ["runctl-stage", "runctl-stage"]


def test_a_staging_link_that_fails_is_copied_not_skipped(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A skipped checkpoint counts as superseded, which lets local retention delete it: a
    # link that fails for want of space (or anything else) must not end as "skipped". The
    # file opened at submit is copied instead, not whatever the name holds by then.
    from runctl.staging import StagingArea

    def replaced_then_no_space(self: StagingArea, fd: int, source: Path, token: str) -> Path | None:
        write(root / "last.ckpt.tmp", b"a newer version")
        os.replace(root / "last.ckpt.tmp", source)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StagingArea, "link_open_file", replaced_then_no_space)
    data = os.urandom(70_000)
    assert upload_one(root, moto_bucket, boto_transfer, "last.ckpt", data) == data


def test_local_deletions_wait_while_paused_and_run_once_resumed(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # The Hugging Face Trainer lists checkpoint-* and reads each one's time as it saves: a local
    # deletion between the two failed the save (HF pass). The callback pauses them meanwhile.
    up = uploader(root, moto_bucket, boto_transfer, local_keep_last_n=1)
    up.pause_local_deletions()
    for step in (1, 2, 3):
        up.submit(write(root / f"step_{step}.pt", b"x" * step))
    up.flush(timeout=60)
    assert sorted(p.name for p in root.glob("*.pt")) == ["step_1.pt", "step_2.pt", "step_3.pt"]
    up.resume_local_deletions()
    up.flush(timeout=60)
    assert sorted(p.name for p in root.glob("*.pt")) == ["step_3.pt"]
    up.close(timeout=60)


def _no_room_to_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every staging of a checkpoint fails as on a full disk."""
    from runctl.staging import StagingArea

    def no_space(self: StagingArea, fd: int, source: Path, token: str) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StagingArea, "link_open_file", no_space)
    monkeypatch.setattr(StagingArea, "copy_open_file", no_space)


def test_wait_idle_waits_without_taking_the_failures_flush_reports(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second waiter (the Lightning DDP observer) waits for the uploads and reports nothing:
    # the failure is still flush's to raise.
    _no_room_to_stage(monkeypatch)
    up = uploader(root, moto_bucket, boto_transfer)
    up.submit(write(root / "step_1.pt", b"x" * 1000))
    assert up.wait_idle(timeout=30) is True
    assert up.status().pending == ()
    with pytest.raises(UploadError, match="step_1.pt"):
        up.flush(timeout=30)
    up.close(timeout=30)
    assert up.wait_idle(timeout=1) is True  # closed: nothing to wait for


def test_a_checkpoint_that_cannot_be_staged_is_a_failure_not_a_skip(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_room_to_stage(monkeypatch)
    up = uploader(root, moto_bucket, boto_transfer)
    handle = up.submit(write(root / "step_1.pt", b"x" * 1000))
    with pytest.raises(OSError, match="No space left"):
        handle.result(30)
    with pytest.raises(UploadError, match="step_1.pt"):
        up.close(timeout=30)
    status = up.status()
    assert (status.failures, status.skipped) == (1, 0)
    assert Journal(root).replay()["step_1.pt"].state == "failed"
    assert (root / "step_1.pt").exists()


def test_rewrite_or_delete_while_queued_uploads_the_submitted_version(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    old, new = b"A" * 100_000, b"B" * 50_000
    up.submit(write(root / "step_0.pt", b"0"))
    gate.entered.wait(10)  # the worker is busy: what follows waits in the queue
    write(root / "last.ckpt", old)
    handle = up.submit(root / "last.ckpt")
    doomed = up.submit(write(root / "epoch=1-step=5.ckpt", b"C" * 1000))
    write(root / "last.ckpt.tmp", new)
    os.replace(root / "last.ckpt.tmp", root / "last.ckpt")  # atomic rewrite while queued
    (root / "epoch=1-step=5.ckpt").unlink()  # top-k removal while queued
    gate.open()
    handle.result(30)
    assert doomed.result(30).state == "verified"
    up.close(timeout=30)
    assert boto_transfer.get_bytes(moto_bucket.join("run/last.ckpt")) == old  # type: ignore[attr-defined]
    assert boto_transfer.get_bytes(moto_bucket.join("run/epoch=1-step=5.ckpt")) == b"C" * 1000  # type: ignore[attr-defined]
    # The local file is a different version now: it is not durable.
    st = (root / "last.ckpt").stat()
    assert not Journal(root).is_durable("last.ckpt", st.st_size, st.st_mtime)


def test_in_place_rewrite_of_an_alias_during_upload_lands_the_submitted_version(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    """last.ckpt is rewritten every save: it goes up from a private copy, never the shared inode."""
    old, new = b"A" * 200_000, b"B" * 200_000
    path = write(root / "last.ckpt", old)
    wrapped = Wrapped(boto_transfer)
    url = moto_bucket.join("run/last.ckpt")

    def rewrite_in_place(count: int, pairs: list[tuple[Path, S3URL]]) -> None:
        with open(path, "r+b") as fh:  # same inode as the staged hard link
            fh.write(new)

    wrapped.before_put = rewrite_in_place
    up = uploader(root, moto_bucket, wrapped)
    assert up.submit(path).result(30).state == "verified"
    up.close(timeout=30)
    assert boto_transfer.get_bytes(url) == old  # type: ignore[attr-defined]
    assert wrapped.put_count == 1
    st = path.stat()
    assert not Journal(root).is_durable("last.ckpt", st.st_size, st.st_mtime), "the rewrite is not durable"


def test_in_place_rewrite_during_upload_is_never_sent_for_the_version_handed_over(
    root: Path, moto_bucket: S3URL, boto_transfer: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A name saved once is hard-linked; a save written over it during its upload leaves no
    version handed over: it was sent again as it stood (torn, had that save been cut short) and
    reported verified. Now it is skipped, said, and the object the first attempt sent, half of
    each, deleted."""
    old, new = b"A" * 200_000, b"B" * 200_000
    path = write(root / "model-final.pt", old)
    wrapped = Wrapped(boto_transfer)
    url = moto_bucket.join("run/model-final.pt")

    def tear(count: int, pairs: list[tuple[Path, S3URL]]) -> None:
        if count == 1:
            # What a streaming reader sees when the file is rewritten in place halfway through.
            half = pairs[0][0].read_bytes()[:100_000]
            with open(path, "r+b") as fh:  # same inode: reaches the staged hard link too
                fh.write(new[:50_000])  # ... and that save is cut short there
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
            boto_transfer.put_bytes(half + new[100_000:], url)  # type: ignore[attr-defined]

    wrapped.before_put = tear
    up = uploader(root, moto_bucket, wrapped)
    with caplog.at_level(logging.WARNING, logger="runctl"):
        assert up.submit(path).result(30).state == "skipped"
        up.close(timeout=30)
    assert boto_transfer.stat(url) is None  # type: ignore[attr-defined]
    assert wrapped.put_count == 1
    assert any("model-final.pt was written in place" in r.getMessage() for r in caplog.records)


def _half_rewrite(path: Path, data: bytes) -> None:
    """The next save over ``path`` in place (torch.save's open: same inode, truncated), paused
    a quarter of the way through."""
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(data[: len(data) // 4])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))  # a later mtime, as a write has


def test_a_file_written_in_place_while_queued_is_never_uploaded_for_the_version_handed_over(
    root: Path, moto_bucket: S3URL, boto_transfer: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A hard link shares the inode handed over: a save written in place over it before its
    upload began (half written here) is not that version, and is never sent as it. A name saved
    again and again (latest.pt) is superseded quietly; a name handed over once is said aloud."""
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    up.submit(write(root / "step_0.pt", b"0"))
    gate.entered.wait(10)  # the worker is busy: what follows waits in the queue
    old, new = b"A" * 400_000, b"B" * 400_000
    handles = {name: up.submit(write(root / name, old)) for name in ("latest.pt", "step_100.pt")}
    for name in handles:
        _half_rewrite(root / name, new)
    with caplog.at_level(logging.INFO, logger="runctl"):
        gate.open()
        up.close(timeout=30)
    assert {name: h.result(1).state for name, h in handles.items()} == {
        "latest.pt": "skipped",
        "step_100.pt": "skipped",
    }
    assert sorted(keys_under(boto_transfer, moto_bucket.join("run/"))) == ["step_0.pt"]
    said = {r.getMessage(): r.levelno for r in caplog.records if "written in place" in r.getMessage()}
    assert sorted(said.values()) == [logging.INFO, logging.WARNING]
    assert [m for m, level in said.items() if level == logging.WARNING][0].startswith(
        "skipping upload of step_100.pt"
    )


def test_resume_never_sends_a_file_written_over_since_it_was_handed_over(
    root: Path, moto_bucket: S3URL, boto_transfer: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A run killed in the middle of its next save over latest.pt, the one before still queued:
    the restarted run finds another version under that name, perhaps half written, and leaves it."""
    url = moto_bucket.join("run/")
    path = write(root / "latest.pt", b"A" * 400_000)
    st = path.stat()
    Journal(root).record(
        "latest.pt", "queued", size=st.st_size, mtime=st.st_mtime, s3_url=str(url.join("latest.pt"))
    )
    _half_rewrite(path, b"B" * 400_000)
    write(root / "step_5.pt", b"five")
    st5 = (root / "step_5.pt").stat()
    Journal(root).record(
        "step_5.pt", "queued", size=st5.st_size, mtime=st5.st_mtime, s3_url=str(url.join("step_5.pt"))
    )
    with caplog.at_level(logging.WARNING, logger="runctl"):
        with CheckpointUploader(root, url, transfer=boto_transfer, retry=FAST_RETRY) as up:  # type: ignore[arg-type]
            up.flush(timeout=60)
    assert [h.name for h in up.resumed] == ["step_5.pt"]  # the unchanged one still goes up
    assert sorted(keys_under(boto_transfer, url)) == ["step_5.pt"]
    assert any("cannot resume the upload of latest.pt: it was written over" in r.getMessage() for r in caplog.records)
    assert Journal(root).replay()["latest.pt"].state == "skipped"


def test_resume_takes_a_staged_copy_that_is_still_the_version_handed_over(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    """Killed mid-upload of last.ckpt (its private copy staged), then killed again in its next
    save: the newest staged file is the hard link, torn with the file; the private copy still
    holds the version handed over, and it is what goes up (it was dropped, nothing sent)."""
    from runctl.staging import StagingArea

    url = moto_bucket.join("run/")
    whole = b"A" * 400_000
    path = write(root / "last.ckpt", whole)
    st = path.stat()
    Journal(root).record("last.ckpt", "queued", size=st.st_size, mtime=st.st_mtime, s3_url=str(url.join("last.ckpt")))
    staging = StagingArea(root)
    copy = staging.slot("1-1-copy", "last.ckpt")
    copy.parent.mkdir(parents=True)
    shutil.copy2(path, copy)  # the private copy: the version handed over, its own inode
    link = staging.slot("1-1", "last.ckpt")
    link.parent.mkdir(parents=True)
    os.link(path, link)  # the hard link: shares what comes next
    _half_rewrite(path, b"B" * 400_000)
    with CheckpointUploader(root, url, transfer=boto_transfer, retry=FAST_RETRY) as up:  # type: ignore[arg-type]
        up.flush(timeout=60)
    assert [h.result(1).state for h in up.resumed] == ["verified"]
    assert boto_transfer.get_bytes(url.join("last.ckpt")) == whole  # type: ignore[attr-defined]


def test_a_directory_deleted_slowly_while_queued_is_a_quiet_skip(
    root: Path, moto_bucket: S3URL, boto_transfer: object, caplog: pytest.LogCaptureFixture
) -> None:
    """The Trainer's save_total_limit deletes an old checkpoint-N/ while it waits in the queue;
    a delete that takes about a second (large files, a slow disk) was warned about as "not the
    checkpoint handed over any more ... submit() it again" (diff review)."""
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    up.submit(write(root / "step_0.pt", b"0"))
    gate.entered.wait(10)
    ckpt = root / "checkpoint-100"
    for i in range(8):
        write(ckpt / f"shard-{i}.bin", b"s" * 1000)
    handle = up.submit(ckpt)

    (ckpt / "shard-0.bin").unlink()  # the delete has begun when the worker gets there
    deleter = threading.Thread(target=lambda: (time.sleep(0.05), slow_rmtree_rest()))

    def slow_rmtree_rest() -> None:
        for i in range(1, 8):
            (ckpt / f"shard-{i}.bin").unlink()
            time.sleep(0.15)
        ckpt.rmdir()

    with caplog.at_level(logging.INFO, logger="runctl"):
        deleter.start()
        gate.open()
        up.close(timeout=30)
        deleter.join(10)
    assert handle.result(1).state == "skipped"
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "checkpoint-100" in r.getMessage()]


def test_a_directory_changed_since_it_was_handed_over_is_said_not_skipped_quietly(
    root: Path, moto_bucket: S3URL, boto_transfer: object, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file of a directory checkpoint deleted, or one written, before its upload began: it is
    not the checkpoint handed over, and a warning names the file. A directory deleted whole
    (the Trainer's save_total_limit) is routine: INFO."""
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    up.submit(write(root / "step_0.pt", b"0"))
    gate.entered.wait(10)
    for step in (100, 200, 300):
        write(root / f"checkpoint-{step}" / "model.safetensors", b"m" * 1000)
        write(root / f"checkpoint-{step}" / "notes.txt", b"n")
    handles = {step: up.submit(root / f"checkpoint-{step}") for step in (100, 200, 300)}
    (root / "checkpoint-100" / "model.safetensors").unlink()
    with open(root / "checkpoint-200" / "notes.txt", "ab") as fh:
        fh.write(b"more")
    shutil.rmtree(root / "checkpoint-300")
    monkeypatch.setattr("runctl.uploader.DIR_DELETE_WAIT", 0.5)
    with caplog.at_level(logging.INFO, logger="runctl"):
        gate.open()
        up.close(timeout=30)
    assert {s: h.result(1).state for s, h in handles.items()} == dict.fromkeys((100, 200, 300), "skipped")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-100" in m and "model.safetensors" in m for m in warned), warned
    assert any("checkpoint-200/notes.txt" in m for m in warned), warned
    assert not any("checkpoint-300" in m for m in warned), warned


# -- promise 4: directory checkpoints, marker last ----------------------------------------------


def test_directory_checkpoint_files_first_marker_last(
    root: Path, bucket: S3URL, transfer: object
) -> None:
    wrapped = Wrapped(transfer)
    ckpt = root / "checkpoint-500"
    files = {
        "model.safetensors": os.urandom(70_000),
        "optimizer.pt": os.urandom(30_000),
        "sub/rng.pth": b"r",
    }
    for rel, data in files.items():
        write(ckpt / rel, data)
    up = uploader(root, bucket, wrapped)
    up.submit(ckpt, step=500).result(60)
    up.close(timeout=60)

    marker = str(bucket.join(f"run/checkpoint-500/{MARKER_NAME}"))
    order = [c for c in wrapped.calls if c[0] in ("put_files", "put_bytes")]
    assert order[-1] == ("put_bytes", marker), order
    # The client that writes the marker is built while the files upload, not after them.
    names = [c[0] for c in wrapped.calls]
    assert "warm_up" in names and names.index("warm_up") < names.index("put_files"), names
    put = {u for c in order[:-1] for u in c[1]}
    assert put == {str(bucket.join(f"run/checkpoint-500/{rel}")) for rel in files}
    manifest = Manifest.from_bytes(transfer.get_bytes(S3URL.parse(marker)))  # type: ignore[attr-defined]
    assert {rel: e.size for rel, e in manifest.files.items()} == {
        r: len(d) for r, d in files.items()
    }
    assert manifest.step == 500

    got = latest_checkpoint(bucket.join("run/"), root.parent / "restore", transfer=transfer)  # type: ignore[arg-type]
    assert got is not None and got.name == "checkpoint-500"
    assert {rel: (got / rel).read_bytes() for rel in files} == files


def test_latest_checkpoint_ignores_a_directory_without_marker(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    prefix = moto_bucket.join("run/")
    assert latest_checkpoint(prefix, root / "r0", transfer=boto_transfer) is None  # type: ignore[arg-type]
    boto_transfer.put_bytes(b"old", prefix.join("step_5.pt"))  # type: ignore[attr-defined]
    boto_transfer.put_bytes(b"half", prefix.join("step-9/model.bin"))  # type: ignore[attr-defined]
    got = latest_checkpoint(prefix, root / "r1", transfer=boto_transfer)  # type: ignore[arg-type]
    assert got == root / "r1" / "step_5.pt" and got.read_bytes() == b"old"


def test_latest_checkpoint_passes_by_a_lone_file_named_by_a_number(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # embeddings_4096.pt beside step_N.pt ranked as step 4,096: --latest brought it back as the
    # checkpoint to resume from.
    prefix = moto_bucket.join("run/")
    for name in ("step_100.pt", "step_200.pt", "embeddings_4096.pt"):
        boto_transfer.put_bytes(name.encode(), prefix.join(name))  # type: ignore[attr-defined]
    got = latest_checkpoint(prefix, root / "r", transfer=boto_transfer)  # type: ignore[arg-type]
    assert got == root / "r" / "step_200.pt"


def test_latest_checkpoint_takes_last_ckpt_when_it_landed_after_the_highest_step(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # save_top_k with a monitor, plus save_last: once the metric stopped improving, the highest
    # step kept is an old best, and resuming "latest" from it lost every epoch since.
    prefix = moto_bucket.join("run/")
    boto_transfer.put_bytes(b"last@4", prefix.join("last.ckpt"))  # type: ignore[attr-defined]
    time.sleep(1.1)  # LastModified counts whole seconds
    boto_transfer.put_bytes(b"best@8", prefix.join("epoch=0-step=8.ckpt"))  # type: ignore[attr-defined]
    got = latest_checkpoint(prefix, root / "a", transfer=boto_transfer)  # type: ignore[arg-type]
    assert got is not None and got.read_bytes() == b"best@8"  # last.ckpt is older: the step wins
    time.sleep(1.1)
    boto_transfer.put_bytes(b"last@32", prefix.join("last.ckpt"))  # type: ignore[attr-defined]
    got = latest_checkpoint(prefix, root / "b", transfer=boto_transfer)  # type: ignore[arg-type]
    assert got == root / "b" / "last.ckpt" and got.read_bytes() == b"last@32"


def test_latest_checkpoint_newer_than_downloads_only_a_higher_step(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # CheckpointManager.latest() asks this once, instead of a lookup and then a download.
    prefix = moto_bucket.join("run/")
    boto_transfer.put_bytes(b"5", prefix.join("step_5.pt"))  # type: ignore[attr-defined]
    for at_hand in ("step_5.pt", "step_7.pt"):
        got = latest_checkpoint(prefix, root / "r", transfer=boto_transfer, newer_than=at_hand)  # type: ignore[arg-type]
        assert got is None and not (root / "r").exists(), at_hand
    got = latest_checkpoint(prefix, root / "r", transfer=boto_transfer, newer_than="step_4.pt")  # type: ignore[arg-type]
    assert got == root / "r" / "step_5.pt" and got.read_bytes() == b"5"
    # A last.ckpt that landed later is newer still: it is what comes down (review of 7323b7b).
    time.sleep(1.1)  # LastModified counts whole seconds
    boto_transfer.put_bytes(b"last", prefix.join("last.ckpt"))  # type: ignore[attr-defined]
    got = latest_checkpoint(prefix, root / "s", transfer=boto_transfer, newer_than="step_4.pt")  # type: ignore[arg-type]
    assert got == root / "s" / "last.ckpt"
    assert latest_checkpoint(prefix, root / "t", transfer=boto_transfer, newer_than="step_5.pt") is None  # type: ignore[arg-type]


def test_latest_checkpoint_never_removes_an_earlier_copy_in_dest(
    moto_server: Any, root: Path, boto_transfer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An evaluator polling into one directory: its second call was cut off by retention after
    # a.bin had come down again over the first call's copy, and the retry removed what it had
    # written, a.bin of that whole earlier copy (diff review).
    from runctl.transfer import boto as boto_module
    from tests.cli.cli_support import put, put_marker

    prefix = S3URL(moto_server.new_bucket()).join("run/")
    for rel in ("a.bin", "b.bin"):
        put(moto_server, prefix, f"{prefix.key}checkpoint-1/{rel}", b"1" * 3)
    put_marker(moto_server, prefix, "checkpoint-1", {"a.bin": 3, "b.bin": 3})
    first = latest_checkpoint(prefix, root / "eval", transfer=boto_transfer)
    assert first is not None and sorted(p.name for p in first.iterdir()) == ["a.bin", "b.bin"]
    act, fired = _retention_elsewhere(moto_server, prefix), []
    original = boto_module.BotoTransfer._get_small

    def get_small(self: Any, url: S3URL, path: Path, *args: Any, **kwargs: Any) -> Any:
        got = original(self, url, path, *args, **kwargs)
        if url.key.endswith("checkpoint-1/a.bin") and not fired:
            fired.append(url)
            act()  # checkpoint-2 lands, checkpoint-1 goes, before b.bin is read
        return got

    monkeypatch.setattr(boto_module.BotoTransfer, "_get_small", get_small)
    monkeypatch.setattr(boto_module, "BATCH_CONCURRENCY", 1)  # a.bin, then b.bin
    got = latest_checkpoint(prefix, root / "eval", transfer=boto_transfer)
    assert fired and got == root / "eval" / "checkpoint-2"
    assert sorted(p.name for p in first.iterdir()) == ["a.bin", "b.bin"]


def test_latest_checkpoint_refuses_an_object_url_and_a_dest_that_is_a_file(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # An object's URL gave None, the answer that means "nothing in S3: start afresh"; a dest
    # that is a file, a raw FileExistsError (API pass).
    prefix = moto_bucket.join("run/")
    boto_transfer.put_bytes(b"5", prefix.join("step_5.pt"))
    with pytest.raises(UsageError, match=r"is an object, not a prefix.*s3://.*/run/\)"):
        latest_checkpoint(prefix.join("step_5.pt"), root / "r", transfer=boto_transfer)
    (root / "afile").write_bytes(b"x")
    with pytest.raises(UsageError, match="dest must be a directory"):
        latest_checkpoint(prefix, root / "afile", transfer=boto_transfer)
    # a prefix given without its slash still works, and one with nothing under it is None
    assert latest_checkpoint(S3URL(moto_bucket.bucket, "run"), root / "s", transfer=boto_transfer) == root / "s" / "step_5.pt"
    assert latest_checkpoint(S3URL(moto_bucket.bucket, "other"), root / "t", transfer=boto_transfer) is None


def _retention_elsewhere(server: Any, prefix: S3URL) -> Callable[[], None]:
    """Another process's uploader at work: checkpoint-2 lands whole, then checkpoint-1 goes
    (marker first), as keep_last_n=1 does."""
    from tests.cli.cli_support import put, put_marker

    def act() -> None:
        for rel in ("a.bin", "b.bin"):
            put(server, prefix, f"{prefix.key}checkpoint-2/{rel}", b"2" * 3)
        put_marker(server, prefix, "checkpoint-2", {"a.bin": 3, "b.bin": 3})
        client = server.client()
        for rel in (MARKER_NAME, "a.bin", "b.bin"):
            client.delete_object(Bucket=prefix.bucket, Key=f"{prefix.key}checkpoint-1/{rel}")

    return act


@pytest.mark.parametrize("when", ["marker read", "download"])
def test_latest_checkpoint_lists_again_when_retention_deletes_what_it_listed(
    s3_server: Any, bucket: S3URL, transfer: Any, root: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # Beside an uploader keeping 1, S3 always holds a whole checkpoint, yet a marker deleted
    # between the listing and its read gave None (4 in 58 calls), which the README's resume
    # recipe takes for a fresh start; one deleted during its download failed and left 6 of
    # its 20 files in dest (concurrency pass).
    from tests.cli.cli_support import put, put_marker

    prefix = bucket.join("run/")
    for rel in ("a.bin", "b.bin"):
        put(s3_server, prefix, f"{prefix.key}checkpoint-1/{rel}", b"1" * 3)
    put_marker(s3_server, prefix, "checkpoint-1", {"a.bin": 3, "b.bin": 3})
    act, fired = _retention_elsewhere(s3_server, prefix), []

    def once(method: str) -> None:
        original = getattr(transfer, method)

        def hooked(*args: Any, **kwargs: Any) -> Any:
            if not fired:
                fired.append(method)
                act()
            return original(*args, **kwargs)

        monkeypatch.setattr(transfer, method, hooked)

    for method in ("get_bytes",) if when == "marker read" else ("get_tree", "get_files"):
        once(method)

    got = latest_checkpoint(prefix, root / "restore", transfer=transfer)

    assert fired
    assert got == root / "restore" / "checkpoint-2"
    assert {p.name: p.read_bytes() for p in got.iterdir()} == {"a.bin": b"222", "b.bin": b"222"}
    assert sorted(p.name for p in (root / "restore").iterdir()) == ["checkpoint-2"]


# -- retention and protection --------------------------------------------------------------------


def test_retention_keeps_last_n_plus_best_and_resumed_from(
    root: Path, bucket: S3URL, transfer: object
) -> None:
    up = uploader(root, bucket, transfer, keep_last_n=2, local_keep_last_n=1)
    up.set_best("step_1.pt")
    up.set_resumed_from("step_2.pt")
    for i in range(1, 7):
        write(root / f"step_{i}.pt", b"%d" % i)
        up.submit(root / f"step_{i}.pt").result(60)
    up.close(timeout=60)
    in_s3 = sorted(keys_under(transfer, bucket.join("run/")))
    assert in_s3 == ["step_1.pt", "step_2.pt", "step_5.pt", "step_6.pt"]
    # Locally: everything durable and old is gone, except the protected ones.
    assert sorted(p.name for p in root.glob("step_*")) == ["step_1.pt", "step_2.pt", "step_6.pt"]
    deleted = {e.name for e in Journal(root).replay().values() if e.state == "deleted_s3"}
    assert deleted == {"step_3.pt", "step_4.pt"}


def test_held_retention_waits_for_release_then_runs_once_before_flush_returns(
    root: Path, bucket: S3URL, transfer: object
) -> None:
    prefix = bucket.join("run/")
    earlier = uploader(root, bucket, transfer)  # an earlier run's checkpoints, durable in S3
    for i in range(1, 5):
        earlier.submit(write(root / f"step_{i}.pt", b"%d" % i))
    earlier.close(timeout=60)
    up = uploader(root, bucket, transfer, keep_last_n=2, local_keep_last_n=2, hold_retention=True)
    write(root / "step_5.pt", b"5")
    assert up.submit(root / "step_5.pt").result(60).state == "verified"
    up.flush(60)
    # On hold: neither the start-up retention nor the one after an upload deleted anything.
    assert sorted(keys_under(transfer, prefix)) == [f"step_{i}.pt" for i in range(1, 6)]
    assert len(list(root.glob("step_*"))) == 5
    up.set_resumed_from("step_1.pt")  # learnt only now, as a framework restoring its state does
    up.release_retention()
    up.flush(60)  # waits for the retention that came due
    assert sorted(keys_under(transfer, prefix)) == ["step_1.pt", "step_4.pt", "step_5.pt"]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_1.pt", "step_4.pt", "step_5.pt"]
    up.release_retention()  # a second release is a no-op
    up.close(timeout=60)


def test_a_second_run_uploading_from_the_same_directory_is_warned_about(
    root: Path, moto_bucket: S3URL, boto_transfer: object, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # Two training runs started on one directory (and prefix) by mistake: each overwrote the
    # other's step_N.pt in S3, with nothing said but INFO lines; the second "resumed" the
    # first's pending uploads as left by an earlier run.
    import signal

    from tests.unit.test_locking import _marking

    caplog.set_level(logging.WARNING, logger="runctl")
    first = uploader(root, moto_bucket, boto_transfer)  # this process: not another run
    first.close(timeout=30)
    assert not [r for r in caplog.records if "another process" in r.getMessage()]
    other = _marking(root, unrelated=True, tmp_path=tmp_path)  # the other run's uploader
    try:
        up = uploader(root, moto_bucket, boto_transfer)
        up.close(timeout=30)
    finally:
        os.kill(other, signal.SIGKILL)
    (said,) = [r.getMessage() for r in caplog.records if "another process" in r.getMessage()]
    assert f"(pid {other}) is uploading checkpoints from {root} too" in said


def test_a_run_whose_checkpoints_are_outranked_by_another_runs_is_warned_once(
    root: Path, moto_bucket: S3URL, boto_transfer: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="runctl")
    prefix = moto_bucket.join("run/")
    for step in (100, 200, 300):  # an older run's checkpoints, at higher steps
        boto_transfer.put_bytes(b"old", prefix.join(f"step_{step}.pt"))  # type: ignore[attr-defined]
    up = uploader(root, moto_bucket, boto_transfer, keep_last_n=2)
    for step in (1, 2, 3):
        assert up.submit(write(root / f"step_{step}.pt", b"new")).result(30).state == "verified"
        up.flush(30)
    up.close(timeout=30)
    said = [r.getMessage() for r in caplog.records if "rank newer" in r.getMessage()]
    assert len(said) == 1, said
    assert "deleted step_1.pt, uploaded by this run" in said[0] and "step_300.pt" in said[0]
    assert "fresh prefix" in said[0]


# -- promise 9: backpressure ------------------------------------------------------------------------


def test_queued_checkpoints_retention_would_delete_are_skipped(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped, keep_last_n=2, local_keep_last_n=2)
    handles = {}
    for i in range(1, 7):
        handles[i] = up.submit(write(root / f"step_{i}.pt", b"x" * i))
        if i == 1:
            assert gate.entered.wait(10)
    # step_1 is uploading; of the queued ones only the newest 2 survive retention anyway.
    assert [handles[i].result(1).state for i in (2, 3, 4)] == ["skipped"] * 3
    assert up.status().skipped == 3 and up.status().queue_depth == 2
    gate.open()
    up.close(timeout=30)
    assert sorted(keys_under(boto_transfer, moto_bucket.join("run/"))) == ["step_5.pt", "step_6.pt"]
    assert [p.name for p in (root / ".runctl" / "staging").rglob("*.pt")] == []
    # Disk stays bounded: skipped ones go locally once newer ones are durable.
    assert sorted(p.name for p in root.glob("step_*")) == ["step_5.pt", "step_6.pt"]


def test_a_newer_submit_of_the_same_name_supersedes_the_queued_one(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    up.submit(write(root / "step_1.pt", b"1"))
    gate.entered.wait(10)
    first = up.submit(write(root / "last.ckpt", b"old"))
    write(root / "last.tmp", b"new")
    os.replace(root / "last.tmp", root / "last.ckpt")
    second = up.submit(root / "last.ckpt")
    assert first.result(1).state == "skipped"
    gate.open()
    assert second.result(30).state == "verified"
    up.close(timeout=30)
    assert boto_transfer.get_bytes(moto_bucket.join("run/last.ckpt")) == b"new"  # type: ignore[attr-defined]


def test_skipping_a_queued_save_leaves_its_disk_work_off_the_training_thread(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # Unlinking the staged copy and journaling the skip each cost up to tens of ms on a busy
    # disk (benchmark row 1); submit() must not pay them for the save it supersedes.
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped, keep_last_n=1)
    released_on: list[threading.Thread] = []
    release = up.staging.release
    up.staging.release = lambda token: (released_on.append(threading.current_thread()), release(token))[1]  # type: ignore[method-assign]
    up.submit(write(root / "step_1.pt", b"1"))
    assert gate.entered.wait(10)
    skipped = [up.submit(write(root / f"step_{i}.pt", b"x" * i)) for i in (2, 3)]
    assert skipped[0].result(5).state == "skipped"
    gate.open()
    up.close(timeout=30)
    assert released_on and threading.main_thread() not in released_on
    journal = Journal(root).replay()
    assert journal["step_2.pt"].state == "skipped"
    assert [p.name for p in (root / ".runctl" / "staging").rglob("*.pt")] == []


# -- errors, retries, failure policy ------------------------------------------------------------------


def test_failure_policy_raise_at_next_submit_with_the_root_cause(
    root: Path, s3_server, transfer: object
) -> None:  # noqa: ANN001
    missing = S3URL("no-such-bucket-" + os.urandom(4).hex())
    errors: list[tuple[str, BaseException]] = []
    up = uploader(
        root,
        missing,
        transfer,
        failure_policy="raise",
        max_consecutive_failures=2,
        on_error=lambda name, exc: errors.append((name, exc)),
    )
    for i in range(2):
        handle = up.submit(write(root / f"step_{i}.pt", b"x"))
        assert isinstance(handle.exception(60), TransferError)
    with pytest.raises(UploadError) as info:
        up.submit(write(root / "step_2.pt", b"x"))
    assert "NoSuchBucket" in str(info.value)
    assert "step_1.pt" in str(info.value)
    assert up.status().retries == 0, "a missing bucket is not retried"
    assert [name for name, _ in errors] == ["step_0.pt", "step_1.pt"]
    with pytest.raises(UploadError) as final:
        up.close(timeout=30)
    assert "step_0.pt" in str(final.value) and "step_1.pt" in str(final.value)


def test_transient_failure_is_retried_and_not_reported(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    wrapped = Wrapped(boto_transfer)

    def flaky(count: int, pairs: list[tuple[Path, S3URL]]) -> None:
        if count == 1:
            raise TransferError(
                "We encountered an internal error. Please try again.", code="InternalError"
            )

    wrapped.before_put = flaky
    errors: list[str] = []
    up = uploader(root, moto_bucket, wrapped, on_error=lambda n, e: errors.append(n))
    outcome = up.submit(write(root / "step_1.pt", b"data")).result(30)
    up.close(timeout=30)  # does not raise
    assert outcome.attempts == 2
    status = up.status()
    assert (status.retries, status.failures, status.uploaded) == (1, 0, 1)
    assert errors == []


def test_a_retry_resends_only_the_missing_files(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    wrapped = Wrapped(boto_transfer)
    ckpt = root / "step-100"
    for i in range(4):
        write(ckpt / f"shard_{i}.bin", bytes([i]) * 1000)

    def half_then_fail(count: int, pairs: list[tuple[Path, S3URL]]) -> None:
        if count == 1:
            boto_transfer.put_files(pairs[:2])  # type: ignore[attr-defined]
            raise PartialTransferError("connection reset", {str(u): "reset" for _, u in pairs[2:]})

    wrapped.before_put = half_then_fail
    up = uploader(root, moto_bucket, wrapped)
    up.submit(ckpt).result(30)
    up.close(timeout=30)
    puts = [c[1] for c in wrapped.calls if c[0] == "put_files"]
    assert [len(p) for p in puts] == [4, 2]
    assert all("shard_2" in u or "shard_3" in u for u in puts[1])
    assert MARKER_NAME in keys_under(boto_transfer, moto_bucket.join("run/step-100/"))


def test_checkpoint_timeout_abandons_a_stuck_attempt_and_retries(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)

    def stuck_once(count: int, pairs: list[tuple[Path, S3URL]]) -> None:
        if count == 1:
            gate._wait(count, pairs)  # hangs until the uploader closes the transfer
        else:
            gate.open()

    wrapped.before_put = stuck_once
    up = uploader(root, moto_bucket, wrapped, checkpoint_timeout=3.0)
    start = time.monotonic()
    outcome = up.submit(write(root / "step_1.pt", b"data")).result(30)
    up.close(timeout=30)
    assert outcome.attempts == 2 and up.status().retries == 1
    assert 2.9 < time.monotonic() - start < 20


def test_flush_timeout_is_bounded_and_names_pending(
    root: Path, moto_bucket: S3URL, boto_transfer: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="runctl.uploader")
    wrapped = Wrapped(boto_transfer)
    Gate(wrapped)  # never opens
    up = uploader(root, moto_bucket, wrapped)
    for i in range(3):
        up.submit(write(root / f"step_{i}.pt", b"x"))
    start = time.monotonic()
    with pytest.raises(FlushTimeout) as info:
        up.flush(timeout=0.5)
    assert time.monotonic() - start < 3
    assert info.value.pending == ["step_0.pt", "step_1.pt", "step_2.pt"]
    start = time.monotonic()
    with pytest.raises(FlushTimeout):
        up.close(timeout=0.3)
    assert time.monotonic() - start < 10
    # The close after a timed-out flush, with the same checkpoints pending, says it once.
    timed_out = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert [r.levelname for r in timed_out] == ["ERROR", "DEBUG"], timed_out
    assert not up._worker.is_alive()
    # what close gave up on stays pending (in the journal, for the next process), and says so
    assert up.status().pending == ("step_0.pt", "step_1.pt", "step_2.pt")
    assert up.status().to_dict()["pending"] == 3


def test_a_trainer_directory_without_its_state_is_refused(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # Submitted, it was uploaded and marked complete, and retention deleted the whole ones.
    torn = root / "checkpoint-30"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"m")
    (torn / "training_args.bin").write_bytes(b"a")
    with uploader(root, moto_bucket, boto_transfer) as up:
        with pytest.raises(UsageError, match="trainer_state.json"):
            up.submit(torn)
        (torn / "trainer_state.json").write_text("{}")
        assert up.submit(torn).result(30).state == "verified"


def test_a_new_uploader_compacts_a_long_journal(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    journal = Journal(root)
    for i in range(4000):  # a long run's history: each checkpoint up, then gone locally
        for state in ("queued", "verified", "deleted_local"):
            journal.record(f"step_{i}.pt", state, size=i, mtime=float(i), sync=False)
    journal.record("step_9999.pt", "verified", size=1, mtime=1.0)
    assert journal.path.stat().st_size > 1 << 20
    with uploader(root, moto_bucket, boto_transfer):
        pass
    assert journal.path.stat().st_size < 1000
    assert list(journal.replay()) == ["step_9999.pt"]


@pytest.mark.parametrize(("keep", "steps"), [(2, 40), (5, 60)])
def test_a_long_run_compacts_its_journal_as_it_goes(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch,
    keep: int, steps: int,
) -> None:
    # Compacting only at start let one long run's journal grow without end (about 0.5 KB a
    # checkpoint), re-read at every retention. With more kept in S3 than here, the S3 deletion
    # came after the local one, and compaction kept both lines of every checkpoint ever saved:
    # the soak pass's uploads slowed from 74 to 133 ms a checkpoint over 1,000 of them.
    from runctl import journal as journal_module

    monkeypatch.setattr(journal_module, "COMPACT_ABOVE", 4096)
    with uploader(root, moto_bucket, boto_transfer, keep_last_n=keep, local_keep_last_n=2) as up:
        for step in range(1, steps + 1):
            up.submit(write(root / f"step_{step}.pt", b"w%d" % step))
            up.flush(timeout=30)
            assert Journal(root).path.stat().st_size < 3 * 4096
    snapshot = Journal(root).snapshot()
    kept = [f"step_{step}.pt" for step in range(steps - keep + 1, steps + 1)]
    assert sorted(e.name for e in snapshot.verified_versions()) == kept[-2:]  # those still here
    assert sorted(keys_under(boto_transfer, moto_bucket.join("run/"))) == sorted(kept)


def test_ctrl_c_while_the_callbacks_wait_stops_waiting_at_once(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # The end-of-fit flush let Ctrl-C through but left the uploader open: the exit hook then
    # waited another 30 s. Now Ctrl-C closes it, and what is pending stays in the journal.
    import signal

    from runctl.integrations._common import finish_uploads

    wrapped = Wrapped(boto_transfer)
    Gate(wrapped)  # never opens
    up = uploader(root, moto_bucket, wrapped)
    up.submit(write(root / "step_1.pt", b"x"))
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        finish_uploads(up, timeout=60, on_upload_error="raise")
    assert time.monotonic() - start < 10
    assert not up._worker.is_alive()
    assert [e.name for e in Journal(root).pending()] == ["step_1.pt"]


def test_a_timeout_after_a_flush_that_finished_is_news_again(
    root: Path, moto_bucket: S3URL, boto_transfer: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="runctl.uploader")
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    for data in (b"1", b"22"):  # last.ckpt, rewritten: the same name pending both times
        gate.opened.clear()
        up.submit(write(root / "last.ckpt", data))
        with pytest.raises(FlushTimeout):
            up.flush(timeout=0.3)
        gate.open()
        up.flush(timeout=30)
    up.close()
    timed_out = [r.levelname for r in caplog.records if "timed out" in r.getMessage()]
    assert timed_out == ["ERROR", "ERROR"]


PATIENT_RETRY = RetryPolicy(attempts=1000, backoff_factor=0.05, backoff_max=0.1, jitter=0.0)


def unreachable(count: int, pairs: list) -> None:
    """A ``before_put`` for an S3 that refuses every connection."""
    raise TransferError("could not connect to the endpoint", code="EndpointConnectionError")


@pytest.mark.parametrize("s3", ["refusing", "hung"])
def test_flush_stops_waiting_once_nothing_has_moved_for_failing_timeout(
    root: Path, moto_bucket: S3URL, boto_transfer: object, s3: str
) -> None:
    # With a patient retry policy, a flush bounded only by its timeout would wait all of it (a
    # training error held up for 600 s). Refusing: each attempt fails and is tried again. Hung:
    # no attempt fails for a long time (a read timeout, then a stall watchdog); nothing moving
    # is what counts, not a failure.
    wrapped = Wrapped(boto_transfer)
    if s3 == "refusing":
        wrapped.before_put = unreachable
    else:
        Gate(wrapped)  # never opens: every put hangs
    up = uploader(root, moto_bucket, wrapped, retry=PATIENT_RETRY)
    up.submit(write(root / "step_1.pt", b"x"))
    start = time.monotonic()
    with pytest.raises(FlushTimeout) as info:
        up.flush(timeout=60, failing_timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 5
    assert info.value.pending == ["step_1.pt"]
    with pytest.raises(FlushTimeout):
        up.close(timeout=0.3)
    assert [e.name for e in Journal(root).pending()] == ["step_1.pt"]  # the next run resumes it


def test_jobs_failing_one_after_another_do_not_restart_the_failing_clock(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # Each job once counted its own start as progress: with S3 refusing connections, every
    # pending checkpoint spent all its attempts before the next, and a training error was held
    # 68 s by the README's 30 s rule. Here six jobs of about 1 s each against 2 s.
    wrapped = Wrapped(boto_transfer)
    wrapped.before_put = unreachable
    retry = RetryPolicy(attempts=4, backoff_factor=0.35, backoff_max=0.35, jitter=0.0)
    up = uploader(root, moto_bucket, wrapped, retry=retry)
    for i in range(6):
        up.submit(write(root / f"step_{i}.pt", b"x"))
    start = time.monotonic()
    with pytest.raises(FlushTimeout) as info:
        up.flush(timeout=60, failing_timeout=2.0)
    assert 2.0 <= time.monotonic() - start < 4.5
    assert len(info.value.pending) >= 3  # given up on while still queued, left to the journal
    # ...and the ones that ran out of attempts first are named beside them.
    assert info.value.failures and "failed to upload: step_0.pt: " in str(info.value), info.value
    with pytest.raises(FlushTimeout):
        up.close(timeout=0.3)


def test_an_upload_that_keeps_moving_is_not_cut_short(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # Bytes moving (boto3's progress callbacks) are progress, however long the upload takes.
    wrapped = Wrapped(boto_transfer)
    inner_put = wrapped.put_files

    def slow_but_moving(pairs, *, storage_class=None, progress=None):  # noqa: ANN001, ANN202
        for _ in range(60):  # 6 s in all, a byte every 0.1 s
            time.sleep(0.1)
            if progress is not None:
                progress(1)
        return inner_put(pairs, storage_class=storage_class, progress=progress)

    wrapped.put_files = slow_but_moving  # type: ignore[method-assign]
    up = uploader(root, moto_bucket, wrapped)
    handle = up.submit(write(root / "step_1.pt", b"x"))
    start = time.monotonic()
    # Twice the moving time would be cut without the bytes; the rest of an upload (staging, a
    # journal fsync on a busy disk: over 0.5 s once in CI, and over 2 s once on a host slow
    # for an hour) stays inside the 3 s.
    up.close(timeout=60, failing_timeout=3.0)
    assert time.monotonic() - start > 6.0
    assert handle.result(1).state == "verified"


def test_waiting_for_another_uploaders_turn_is_not_a_failing_s3(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # Another process's uploader of this directory is sending (runctl local's, resuming a
    # crashed run's upload): the wait for the turn is not "nothing reached S3".
    import threading

    from runctl.locking import upload_turn

    held, release = threading.Event(), threading.Event()

    def other_uploader() -> None:
        with upload_turn(root, give_up=lambda: False):
            held.set()
            release.wait(30)

    other = threading.Thread(target=other_uploader)
    other.start()
    assert held.wait(10)
    threading.Timer(4.0, release.set).start()
    up = uploader(root, moto_bucket, boto_transfer)
    handle = up.submit(write(root / "step_1.pt", b"x"))
    start = time.monotonic()
    up.close(timeout=60, failing_timeout=2.0)
    other.join(10)
    assert time.monotonic() - start > 3.5
    assert handle.result(1).state == "verified"


def test_s5cmd_shows_its_progress_while_a_large_file_goes_up(
    root: Path, moto_server: object, moto_bucket: S3URL
) -> None:
    # s5cmd reports a file only when it is done: its I/O counters are the sign of life.
    from runctl.transfer.s5cmd import S5cmdTransfer

    transfer = S5cmdTransfer(moto_server.config())  # type: ignore[attr-defined]
    path = write(root / "big.bin", os.urandom(1 << 20) * 200)
    assert transfer.active_at() is None  # nothing running
    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            at = transfer.active_at()
            if at is not None and (not seen or at > seen[-1]):
                seen.append(at)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        transfer.put_files([(path, moto_bucket.join("big.bin"))])
    finally:
        done.set()
        watcher.join()
        transfer.close()
    assert len(seen) >= 3, seen  # it moved, and was seen moving, more than once


def test_failing_timeout_counts_only_while_nothing_lands(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # A blip shorter than failing_timeout, and uploads landing in between, never stop the flush.
    wrapped = Wrapped(boto_transfer)
    down_until = time.monotonic() + 1.0

    def blip(count: int, pairs: list) -> None:
        if time.monotonic() < down_until:
            unreachable(count, pairs)

    wrapped.before_put = blip
    up = uploader(root, moto_bucket, wrapped, retry=PATIENT_RETRY)
    handles = [up.submit(write(root / f"step_{i}.pt", b"x")) for i in range(3)]
    up.flush(timeout=60, failing_timeout=3.0)  # the margin is for a loaded machine
    assert [h.result(1).state for h in handles] == ["verified"] * 3
    assert up.status().retries > 0
    down_until = time.monotonic() + 1.0
    up.submit(write(root / "step_9.pt", b"y"))
    up.close(timeout=60, failing_timeout=3.0)  # the clock started afresh after the landing
    assert sorted(keys_under(boto_transfer, moto_bucket.join("run/"))) == [
        "step_0.pt", "step_1.pt", "step_2.pt", "step_9.pt"
    ]


def test_an_upload_that_failed_in_an_earlier_process_is_tried_again(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # An outage during the final flush used up its retries: "failed" in the journal. The local
    # copy is still there, and the next uploader (S3 back) uploads it instead of dropping it.
    wrapped = Wrapped(boto_transfer)
    wrapped.before_put = unreachable
    up = uploader(root, moto_bucket, wrapped)
    up.submit(write(root / "step_1.pt", b"one"))
    with pytest.raises(UploadError):
        up.close(timeout=30)
    assert Journal(root).replay()["step_1.pt"].state == "failed"

    with uploader(root, moto_bucket, boto_transfer) as again:
        again.flush(timeout=30)
        assert again.status().uploaded == 1
    assert list(keys_under(boto_transfer, moto_bucket.join("run/"))) == ["step_1.pt"]
    assert Journal(root).replay()["step_1.pt"].state == "verified"


def test_a_root_spelled_through_a_symlink_and_dotdot_is_the_kernels(
    tmp_path: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    # dd/l/../ck with dd/l a link to other/sub is other/ck; submit() cleaned the path as text
    # (dd/ck): "it does not exist", and `runctl local` uploaded nothing, exit 0 (re-run pass).
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "l").symlink_to(tmp_path / "other" / "sub")
    root = tmp_path / "dd" / "l" / ".." / "ck"
    root.mkdir()
    with uploader(root, moto_bucket, boto_transfer) as up:
        assert up.submit(write(root / "step_1.pt", b"one")).result(30).state == "verified"
    assert (tmp_path / "other" / "ck" / "step_1.pt").exists()
    assert list(keys_under(boto_transfer, moto_bucket.join("run/"))) == ["step_1.pt"]


def test_submit_validates_its_argument(
    root: Path, moto_bucket: S3URL, boto_transfer: object, tmp_path: Path
) -> None:
    with uploader(root, moto_bucket, boto_transfer) as up:
        with pytest.raises(UsageError, match="does not exist"):
            up.submit(root / "step_404.pt")
        # A FIFO was taken: retried 5 times on s5cmd, read for good on boto3 (library pass).
        os.mkfifo(root / "step_5.pt")
        with pytest.raises(UsageError, match="not a regular file or directory"):
            up.submit(root / "step_5.pt")
        with pytest.raises(UsageError, match="directly inside"):
            up.submit(write(tmp_path / "elsewhere" / "step_1.pt", b"x"))
        with pytest.raises(UsageError, match="directly inside"):
            up.submit(write(root / "sub" / "step_1.pt", b"x"))
        # The root spelled another way (a symlink to it, "..") is still the root.
        (tmp_path / "alias").symlink_to(root)
        write(root / "step_2.pt", b"y")
        assert up.submit(tmp_path / "alias" / "step_2.pt").result(30).state == "verified"
        assert up.submit(root / "sub" / ".." / "step_2.pt").result(30).state == "verified"
    with pytest.raises(UsageError, match="failure_policy"):
        CheckpointUploader(root, "s3://bkt/run/", failure_policy="explode", transfer=boto_transfer)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="keep_last_n"):
        CheckpointUploader(root, "s3://bkt/run/", keep_last_n=0, transfer=boto_transfer)  # type: ignore[arg-type]


def test_a_submit_that_races_close_is_refused_and_leaks_no_descriptor(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() on another thread after submit() checked the uploader was open: the job must not
    # land in a closed uploader's queue, where nothing would finish its handle, nor its opened
    # file go to a staging thread that has stopped, where nothing would close it.
    import runctl.uploader as uploader_module

    up = uploader(root, moto_bucket, boto_transfer)
    path = write(root / "step_1.pt", b"x" * 1000)
    record = uploader_module.Journal.record
    closers: list[threading.Thread] = []

    def close_first(self: object, name: str, state: str, **kwargs: Any) -> None:
        if not closers:
            closers.append(threading.Thread(target=up.close, kwargs={"timeout": 30}))
            closers[0].start()
            closers[0].join(30)
        record(self, name, state, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(uploader_module.Journal, "record", close_first)
    with pytest.raises(UsageError, match="raced close"):
        up.submit(path)
    assert not closers[0].is_alive() and not up._stager._thread.is_alive()
    assert list(up._queue) == []
    fds = Path("/proc/self/fd")
    if fds.is_dir():
        opened = []
        for fd in fds.iterdir():
            try:
                opened.append(os.readlink(fd))
            except OSError:  # the listing's own descriptor, closed by now
                pass
        assert str(path) not in opened
    with pytest.raises(UsageError, match="after close"):
        up.submit(path)


def test_an_interrupted_wait_for_queue_space_takes_its_job_back(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C while submit() waits for room in a full queue (max_queue): the job it had queued
    # must not stay behind waiting for a staging no one asked for, where flush() would wait on
    # it until its timeout.
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped, max_queue=1)
    up.submit(write(root / "step_0.pt", b"0"))
    assert gate.entered.wait(10)  # in flight
    up.submit(write(root / "step_1.pt", b"1"))  # queued: the queue is full now
    wait = up._cond.wait

    def interrupted(timeout: float | None = None) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(up._cond, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        up.submit(write(root / "step_2.pt", b"2"))
    monkeypatch.setattr(up._cond, "wait", wait)
    assert [job.name for job in up._queue] == ["step_1.pt"]
    gate.open()
    up.close(timeout=10)
    assert sorted(keys_under(boto_transfer, moto_bucket.join("run/"))) == ["step_0.pt", "step_1.pt"]


def test_status_counts_bytes_and_journal_records_the_life(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    with uploader(root, moto_bucket, boto_transfer) as up:
        up.submit(write(root / "step_1.pt", b"x" * 1234)).result(30)
        status = up.status()
    assert (status.uploaded, status.bytes_uploaded, status.queue_depth) == (1, 1234, 0)
    assert status.to_dict()["bytes_uploaded"] == 1234.0
    lines = [json.loads(x) for x in (root / ".runctl" / "journal.jsonl").read_text().splitlines()]
    assert [x["state"] for x in lines if x["name"] == "step_1.pt"] == [
        "queued",
        "uploaded",
        "verified",
    ]


def test_a_name_waiting_twice_is_named_once_in_what_is_pending(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # A save resumed from the journal with the newer save of the same name queued behind it:
    # "flush timed out with 2 pending: step_2.pt, step_2.pt" (README walkthrough).
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    try:
        up.submit(write(root / "step_2.pt", b"first"))
        assert gate.entered.wait(30)
        write(root / "step_2.pt.tmp", b"second")
        os.replace(root / "step_2.pt.tmp", root / "step_2.pt")
        up.submit(root / "step_2.pt")
        with pytest.raises(FlushTimeout) as timed_out:
            up.flush(timeout=0.3)
        assert timed_out.value.pending == ["step_2.pt"]
        assert str(timed_out.value) == "flush timed out with 1 pending: step_2.pt"
        assert up.status().pending == ("step_2.pt",)
    finally:
        gate.open()
        up.close(timeout=60)


def test_a_flush_says_an_upload_under_way_is_under_way_not_zero_bytes_sent(
    root: Path, moto_bucket: S3URL, boto_transfer: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # s5cmd reports a file's bytes once it is done: "step_1.pt: 0 bytes sent" 5.3 s into a
    # 5.5 s upload read as a stall (DDP pass).
    import runctl.uploader

    monkeypatch.setattr(runctl.uploader, "PROGRESS_EVERY", 0.05)
    caplog.set_level(logging.INFO, logger="runctl.uploader")
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    try:
        up.submit(write(root / "step_1.pt", b"one"))
        assert gate.entered.wait(30)
        with pytest.raises(FlushTimeout):
            up.flush(timeout=0.3)
    finally:
        gate.open()
        up.close(timeout=60)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert said and all(m.endswith("step_1.pt: under way") for m in said), said


def test_a_submit_while_close_is_flushing_is_refused_not_abandoned_quietly(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    """Another thread's submit() while close() waits for the last upload: refused at once (it
    was taken, then abandoned at the stop, and close() returned as if all had landed)."""
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    up.submit(write(root / "step_1.pt", b"1"))
    gate.entered.wait(10)
    closer = threading.Thread(target=up.close, kwargs={"timeout": 30})
    closer.start()
    deadline = time.monotonic() + 10
    while not up._closing and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(UsageError, match="after close"):
        up.submit(write(root / "step_2.pt", b"2"))
    gate.open()
    closer.join(30)
    assert not closer.is_alive()
    assert sorted(keys_under(boto_transfer, moto_bucket.join("run/"))) == ["step_1.pt"]


@pytest.mark.parametrize("bad", [{"timeout": 0}, {"timeout": -1}, {"failing_timeout": 0}])
def test_a_close_with_a_bad_timeout_changes_nothing(
    root: Path, moto_bucket: S3URL, boto_transfer: object, bad: dict[str, float]
) -> None:
    # close(timeout=0) raised after it had stopped the uploader, and the corrected close(...)
    # returned at once with the queued checkpoints never sent (API pass).
    up = uploader(root, moto_bucket, boto_transfer)
    up.submit(write(root / "step_1.pt", b"1"))
    with pytest.raises(UsageError, match="timeout"):
        up.close(**bad)
    up.close(timeout=30)
    assert sorted(keys_under(boto_transfer, moto_bucket.join("run/"))) == ["step_1.pt"]


def test_threads_are_not_left_behind(root: Path, moto_bucket: S3URL, boto_transfer: object) -> None:
    before = {t.name for t in threading.enumerate()}
    with uploader(root, moto_bucket, boto_transfer) as up:
        up.submit(write(root / "step_1.pt", b"x"))
    after = {t.name for t in threading.enumerate()} - before
    # The transfer is the fixture's, not the uploader's: its request threads (made by the first
    # test that used it) live until the fixture closes it.
    assert not {n for n in after if n.startswith("runctl-") and not n.startswith("runctl-boto-call")}


def test_a_pin_the_listing_missed_is_kept_when_s3_cannot_be_asked(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # Before forgetting a pin its listing did not show, the uploader asks S3 (s5cmd's listings
    # leave out what is dated after they began). A failed question escaped retention after it
    # had deleted: the deletions went unrecorded ("deleting_s3" for good) and it said "failed".
    wrapped = Wrapped(boto_transfer)

    def listing_without_pins(url: S3URL, recursive: bool = True) -> Any:
        return (o for o in boto_transfer.iter_objects(url, recursive=recursive) if "/.runctl/pinned/" not in o.key)

    def s3_cannot_be_asked(prefix: S3URL, rels: Any) -> Any:
        if ".runctl/pinned/step_1.pt" in rels:  # (retention's own question, about step_2's pin, goes)
            raise TransferError("SlowDown: Please reduce your request rate.", code="SlowDown")
        return boto_transfer.unlisted(prefix, rels)

    wrapped.iter_objects = listing_without_pins  # type: ignore[method-assign]
    wrapped.unlisted = s3_cannot_be_asked  # type: ignore[method-assign]
    with uploader(root, moto_bucket, wrapped, keep_last_n=1) as up:
        up.protect("step_1.pt")
        up.submit(write(root / "step_1.pt", b"one"))
        up.flush(timeout=30)
        time.sleep(1.2)  # the pin was sent over a second before the next listing
        for step in (2, 3):
            up.submit(write(root / f"step_{step}.pt", b"x%d" % step))
            up.flush(timeout=30)
        assert up.status().retention_errors == 0
    assert (root / ".runctl" / "pinned" / "step_1.pt").exists()
    assert Journal(root).unfinished_deletions() == set()
    assert sorted(keys_under(boto_transfer, moto_bucket.join("run/"))) == [
        ".runctl/pinned/step_1.pt", "step_1.pt", "step_3.pt",
    ]


def test_a_file_this_machine_refuses_fails_at_once_without_retries(
    root: Path, moto_bucket: S3URL, boto_transfer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EACCES on the checkpoint (saved by another user, chmod 000) counted as S3 being down:
    # 5 attempts, then "retrying ... (S3 is back)" and 5 more, holding the flush for 30 s.
    from runctl.transfer import boto

    osutil = type(boto._whole_reads())
    real_open = osutil.open

    def refuse(self: Any, filename: str, mode: str) -> Any:
        if filename.endswith("step_2.pt"):
            raise PermissionError(13, "Permission denied", filename)
        return real_open(self, filename, mode)

    monkeypatch.setattr(osutil, "open", refuse)
    up = uploader(root, moto_bucket, boto_transfer)
    up.submit(write(root / "step_1.pt", b"one"))
    handle = up.submit(write(root / "step_2.pt", b"two"))
    assert isinstance(handle.exception(60), TransferError)
    assert handle.exception(0).code == "LocalAccessDenied"  # type: ignore[union-attr]
    with pytest.raises(UploadError, match="Permission denied"):
        up.close(timeout=30)
    assert (up.status().retries, up.status().failures, up.status().uploaded) == (0, 1, 1)


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_an_endpoint_certificate_not_trusted_fails_at_once_and_a_trusted_one_works(
    root: Path, tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTPS endpoint whose certificate this machine does not trust was retried as if S3
    were down: 5 attempts, 14-22 s per checkpoint, the same x509 error each time (config pass).
    With the certificate trusted (AWS_CA_BUNDLE, as aws reads it) the same upload lands."""
    from runctl.transfer import get_transfer

    server = start_rclone(tmp_path / "data", tls=self_signed(tmp_path / "tls"))
    patient = RetryPolicy(attempts=5, backoff_factor=0.01, backoff_max=0.01, jitter=0)
    try:
        (tmp_path / "data" / "tls-bucket").mkdir()
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        transfer = get_transfer(server.config(), use_s5cmd=backend == "s5cmd")
        up = uploader(root, S3URL("tls-bucket"), transfer, retry=patient)
        handle = up.submit(write(root / "step_1.pt", b"one"))
        error = handle.exception(120)
        assert isinstance(error, TransferError) and error.code == "CertificateError", error
        assert "certificate" in str(error).lower() or "x509" in str(error)
        with pytest.raises(UploadError):
            up.close(timeout=60)
        assert (up.status().retries, up.status().failures) == (0, 1)
        transfer.close()

        monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "tls" / "cert.pem"))
        transfer = get_transfer(server.config(), use_s5cmd=backend == "s5cmd")
        up = uploader(root, S3URL("tls-bucket"), transfer, retry=patient)
        up.submit(write(root / "step_2.pt", b"two"))
        up.close(timeout=60)
        assert up.status().uploaded == 2  # step_1, which failed, is taken up again from the journal
        landed = tmp_path / "data" / "tls-bucket" / "run"
        assert [(landed / n).read_bytes() for n in ("step_1.pt", "step_2.pt")] == [b"one", b"two"]
        transfer.close()
    finally:
        server.stop()


def test_names_that_are_not_utf8_are_refused_at_once(
    root: Path, bucket: S3URL, transfer: object
) -> None:
    # A directory checkpoint holding a file named b"tok\xe9.json" failed only after five
    # attempts of an error no retry could fix (on rclone, "SignatureDoesNotMatch").
    up = uploader(root, bucket, transfer)
    with pytest.raises(UsageError, match="not valid UTF-8"):
        up.submit(write(root / os.fsdecode(b"step_1\xe9.pt"), b"one"))
    ckpt = root / "checkpoint-2"
    ckpt.mkdir()
    write(ckpt / "model.bin", b"m")
    write(ckpt / os.fsdecode(b"tok\xe9.json"), b"t")
    handle = up.submit(ckpt)
    exc = handle.exception(60)
    assert isinstance(exc, TransferError) and exc.code == "LocalNameNotUTF8", exc
    assert "tok\\udce9.json" in str(exc)
    with pytest.raises(UploadError, match="not valid UTF-8"):
        up.close(timeout=30)
    assert (up.status().retries, up.status().failures) == (0, 1)
    assert not keys_under(transfer, bucket.join("run/"))


def test_a_directory_checkpoint_with_a_relative_symlink_uploads_what_it_points_to(
    root: Path, bucket: S3URL, transfer: object, tmp_path: Path
) -> None:
    # Staging hard-linked the symlink itself (link() does not follow it on Linux): from the
    # staging area "../../shared/tok.json" named nothing, and the checkpoint was skipped as
    # "kept changing while it was staged", with S3 empty and a run that ended without error.
    shared = tmp_path / "shared"
    write(shared / "tok.json", b'{"vocab": 3}')
    ckpt = root / "checkpoint-10"
    write(ckpt / "model.bin", os.urandom(5_000))
    (ckpt / "tok.json").symlink_to(os.path.relpath(shared / "tok.json", ckpt))
    up = uploader(root, bucket, transfer)
    up.submit(ckpt, step=10).result(60)
    up.close(timeout=60)
    assert up.status().uploaded == 1
    assert transfer.get_bytes(bucket.join("run/checkpoint-10/tok.json")) == b'{"vocab": 3}'  # type: ignore[attr-defined]
    manifest = Manifest.from_bytes(transfer.get_bytes(bucket.join(f"run/checkpoint-10/{MARKER_NAME}")))  # type: ignore[attr-defined]
    assert sorted(manifest.files) == ["model.bin", "tok.json"]


@pytest.mark.timeout(120)
def test_a_directory_checkpoint_leaves_out_what_is_not_its_data_and_says_so(
    root: Path, bucket: S3URL, transfer: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A FIFO in a checkpoint hung the boto3 uploader for good (its open waits for a writer) and
    # failed the checkpoint after 5 attempts on s5cmd ("not a regular file"); a symlinked
    # tokenizer/ was left out without a word and the checkpoint verified; a marker brought down
    # with the files (`download -r`) was sent as data, then "vanished from the staged copy":
    # "rewritten in place during each of 4 upload attempts", skipped, exit 0.
    caplog.set_level(logging.WARNING, logger="runctl.uploader")
    write(tmp_path / "shared" / "tokenizer" / "vocab.json", b"{}")
    ckpt = root / "checkpoint-10"
    write(ckpt / "model.bin", os.urandom(5_000))
    write(ckpt / "sub" / "optim.bin", os.urandom(3_000))
    os.mkfifo(ckpt / "pipe")
    os.mkfifo(ckpt / "sub" / "pipe")
    (ckpt / "tokenizer").symlink_to(tmp_path / "shared" / "tokenizer")
    write(ckpt / MARKER_NAME, b'{"files": {"old.bin": 1}}')
    up = uploader(root, bucket, transfer)
    up.submit(ckpt, step=10).result(60)
    up.close(timeout=60)
    assert (up.status().uploaded, up.status().retries) == (1, 0)
    run = bucket.join("run/")
    assert sorted(keys_under(transfer, run)) == [
        f"checkpoint-10/{MARKER_NAME}",
        "checkpoint-10/model.bin",
        "checkpoint-10/sub/optim.bin",
    ]
    manifest = Manifest.from_bytes(transfer.get_bytes(run.join(f"checkpoint-10/{MARKER_NAME}")))  # type: ignore[attr-defined]
    assert sorted(manifest.files) == ["model.bin", "sub/optim.bin"]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "checkpoint-10: leaving out pipe: not a regular file" in said, said
    assert "checkpoint-10: leaving out sub/pipe: not a regular file" in said, said
    assert "checkpoint-10: leaving out tokenizer/: a symlink to a directory (not followed)" in said, said
    assert not [m for m in said if "rewritten" in m or "vanished" in m], said


def test_directory_being_deleted_while_queued_is_skipped_never_uploaded_partial(
    root: Path, moto_bucket: S3URL, boto_transfer: object
) -> None:
    """HF's save_total_limit rmtree can run while the directory waits: no partial tree lands."""
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    up = uploader(root, moto_bucket, wrapped)
    up.submit(write(root / "step_0.pt", b"0"))
    gate.entered.wait(10)  # the worker is busy: the directory waits in the queue
    ckpt = root / "checkpoint-5"
    write(ckpt / "model.safetensors", b"m" * 1000)
    write(ckpt / "shards" / "optimizer.pt", b"o" * 1000)
    handle = up.submit(ckpt)
    shutil.rmtree(ckpt / "shards")  # the rmtree has reached the sub-directory first
    gate.open()
    assert handle.result(30).state == "skipped"
    up.close(timeout=30)
    keys = [o.key for o in boto_transfer.iter_objects(moto_bucket.join("run/"))]  # type: ignore[attr-defined]
    assert not [k for k in keys if "checkpoint-5" in k], keys


@contextmanager
def held_elsewhere(path: Path) -> Iterator[None]:
    """Hold ``path``'s flock on a descriptor of our own, as another process's cleanup would."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_a_retention_lock_held_elsewhere_never_holds_up_uploads(
    root: Path, moto_bucket: S3URL, boto_transfer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cleanup in another terminal (or one stopped with Ctrl-Z) held the prefix's lock: the
    # worker waited for it after the first landed checkpoint, and nothing more reached S3 for up
    # to 600 s, every checkpoint after it.
    import runctl.uploader as uploader_module
    from runctl.locking import s3_lock_path

    monkeypatch.setattr(uploader_module, "LOCK_RETRY_EVERY", 0.2, raising=False)
    prefix = moto_bucket.join("run/")
    up = uploader(root, moto_bucket, boto_transfer, keep_last_n=1, local_keep_last_n=1)
    with held_elsewhere(s3_lock_path(prefix, boto_transfer.config.endpoint_url)):
        with held_elsewhere(root / ".runctl" / "retention.lock"):
            for step in (1, 2, 3):  # each lands before the next: none is skipped as superseded
                up.submit(write(root / f"step_{step}.pt", b"w%d" % step))
                up.flush(timeout=30)
            assert sorted(keys_under(boto_transfer, prefix)) == ["step_1.pt", "step_2.pt", "step_3.pt"]
    deadline = time.monotonic() + 20
    while sorted(keys_under(boto_transfer, prefix)) != ["step_3.pt"]:  # once free, the idle worker
        assert time.monotonic() < deadline, "retention never ran once the lock was free"
        time.sleep(0.1)
    while sorted(p.name for p in root.glob("step_*")) != ["step_3.pt"]:
        assert time.monotonic() < deadline, "local retention never ran once the lock was free"
        time.sleep(0.1)
    up.close()


def test_a_retention_lock_held_through_close_is_waited_for_briefly_and_named(
    root: Path,
    moto_bucket: S3URL,
    boto_transfer: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import runctl.uploader as uploader_module
    from runctl.locking import s3_lock_path

    monkeypatch.setattr(uploader_module, "FINAL_LOCK_WAIT", 0.5, raising=False)
    prefix = moto_bucket.join("run/")
    with held_elsewhere(s3_lock_path(prefix, boto_transfer.config.endpoint_url)):
        with uploader(root, moto_bucket, boto_transfer, keep_last_n=1) as up:
            for step in (1, 2):
                up.submit(write(root / f"step_{step}.pt", b"w%d" % step))
                up.flush(timeout=30)
    assert sorted(keys_under(boto_transfer, prefix)) == ["step_1.pt", "step_2.pt"]
    assert any(
        "did not run before close" in r.getMessage() and str(prefix) in r.getMessage()
        for r in caplog.records
    )


def test_an_old_version_that_fails_in_flight_never_lands_over_a_newer_one(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # step_5.pt v1 was uploading (and failing) when v2 was submitted: held for another round,
    # v1 was revived once a later checkpoint landed, and landed over v2 (review).
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)

    def refuse_v1(count: int, pairs: list) -> None:
        gate._wait(count, pairs)
        if any(Path(p).read_bytes() == b"v1" for p, _ in pairs):
            raise TransferError("connection reset", code="RequestError")

    wrapped.before_put = refuse_v1
    up = uploader(root, moto_bucket, wrapped)
    first = up.submit(write(root / "step_5.pt", b"v1"))
    assert gate.entered.wait(30)  # v1 is in flight
    os.replace(write(root / "v2.tmp", b"v2"), root / "step_5.pt")  # saved again, a new file
    up.submit(root / "step_5.pt")
    gate.open()
    assert first.exception(30) is not None
    up.submit(write(root / "step_9.pt", b"later")).result(30)  # a landing revives what is held
    up.close(timeout=30)
    assert boto_transfer.get_bytes(moto_bucket.join("run/step_5.pt")) == b"v2"


def test_failed_checkpoints_held_through_an_outage_go_as_moot_when_newer_ones_come(
    tmp_path: Path, root: Path
) -> None:
    # Held failures pinned their staged copies for the whole outage, and with keep-last-1 each
    # was uploaded once S3 came back only for retention to delete it (review).
    with stoppable_s3(tmp_path) as (server, url, transfer):
        up = uploader(root, url, transfer, keep_last_n=1, retry=BRIEF_RETRY)
        server.stop()
        for step in (1, 2):
            assert up.submit(write(root / f"step_{step}.pt", b"w")).exception(60) is not None
        assert [j.name for j in up._failed_jobs] == ["step_2.pt"]  # step_1 went as moot
        server.start()
        up.submit(write(root / "step_3.pt", b"3")).result(60)
        up.close(timeout=60)  # nothing to report: both failures are moot now
        assert sorted(keys_under(transfer, url.join("run/"))) == ["step_3.pt"]
        journal = Journal(root).replay()
        assert all(journal[f"step_{s}.pt"].state == "skipped" for s in (1, 2))
        assert not any((root / ".runctl" / "staging").rglob("step_*"))


def test_a_directory_rewritten_in_place_between_attempts_is_skipped_never_sent_mixed(
    root: Path, moto_bucket: S3URL, boto_transfer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Attempt 1 sent a.bin, then the trainer rewrote both files in place (same sizes) and the
    # put failed. Attempt 2 took a.bin's old copy in S3 for sent: S3 held a.bin v1 beside b.bin
    # v2 under a valid marker. Then it sent the new version as it stood, as a file was (review
    # of a day's diff): a save cut short there went up torn under a marker. The version handed
    # over is gone: skipped, said, and nothing of it left in S3 to read as a checkpoint.
    from runctl.exceptions import TransferError

    caplog.set_level(logging.WARNING, logger="runctl.uploader")
    src = root / "step_100"
    for name in ("a.bin", "b.bin"):
        write(src / name, b"1" * 1000)
    wrapped = Wrapped(boto_transfer)

    def first_put_fails_half_way(count: int, pairs: list[tuple[Path, S3URL]]) -> None:
        if count == 1:
            boto_transfer.put_files(pairs[:1])
            for name in ("a.bin", "b.bin"):
                with open(src / name, "r+b") as fh:  # in place, as torch.save into an open file
                    fh.write(b"2" * 1000)
            raise TransferError("connection reset", code="RequestTimeout")

    wrapped.before_put = first_put_fails_half_way
    url = moto_bucket.join("run/")
    up = CheckpointUploader(root, url, transfer=wrapped, retry=FAST_RETRY)  # type: ignore[arg-type]
    try:
        outcome = up.submit(src).result(timeout=60)
    finally:
        up.close(timeout=60)
    assert outcome.state == "skipped"
    assert "step_100 was written in place since it was handed over (a.bin, b.bin)" in (outcome.detail or "")
    assert keys_under(boto_transfer, url) == {}
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [m for m in said if "submit() it again" in m], said


def test_a_directory_save_cut_short_during_its_upload_is_never_sent_as_verified(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # A directory saved again in place while it uploaded, that save killed half way: the files
    # were restamped and sent again as they stood, and the marker vouched for the torn one.
    src = root / "step_100"
    write(src / "model.bin", b"1" * 4000)
    write(src / "optim.bin", b"1" * 4000)
    wrapped = Wrapped(boto_transfer)

    def save_killed_half_way(count: int, pairs: list[tuple[Path, S3URL]]) -> None:
        if count == 1:
            with open(src / "optim.bin", "wb") as fh:  # truncated, half written, never finished
                fh.write(b"2" * 2000)

    wrapped.before_put = save_killed_half_way
    url = moto_bucket.join("run/")
    up = CheckpointUploader(root, url, transfer=wrapped, retry=FAST_RETRY)  # type: ignore[arg-type]
    try:
        outcome = up.submit(src).result(timeout=60)
    finally:
        up.close(timeout=60)
    assert outcome.state == "skipped", outcome
    assert keys_under(boto_transfer, url) == {}
    assert wrapped.put_count == 1


def test_a_directory_saved_again_with_fewer_files_leaves_none_of_the_old_ones_in_s3(
    root: Path, moto_bucket: S3URL, boto_transfer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # checkpoint-4 saved in full, then saved again under the same name with save_only_model:
    # S3 kept the first version's optimizer.pt beside the new weights, latest_checkpoint and
    # `download --latest` brought both down as one checkpoint, `review --verify` said complete.
    url = moto_bucket.join("run/")
    first = root / "checkpoint-4"
    write(first / "model.safetensors", b"old weights")
    write(first / "optimizer.pt", b"old optimizer")
    write(first / "rng_state.pth", b"old rng")
    up = CheckpointUploader(root, url, transfer=boto_transfer, retry=FAST_RETRY)
    up.submit(first).result(timeout=60)
    up.close(timeout=60)
    shutil.rmtree(first)
    write(first / "model.safetensors", b"new weights")
    up = CheckpointUploader(root, url, transfer=boto_transfer, retry=FAST_RETRY)
    assert up.submit(first).result(timeout=60).state == "verified"
    up.close(timeout=60)
    assert sorted(keys_under(boto_transfer, url)) == [f"checkpoint-4/{MARKER_NAME}", "checkpoint-4/model.safetensors"]

    # Such a pair left by an older runctl: a restore takes what the marker lists, and says so.
    boto_transfer.put_bytes(b"old optimizer", url.join("checkpoint-4/optimizer.pt"))
    caplog.set_level(logging.WARNING)
    restored = latest_checkpoint(url, tmp_path / "restore", transfer=boto_transfer)
    assert restored == tmp_path / "restore" / "checkpoint-4"
    assert sorted(p.name for p in restored.iterdir()) == ["model.safetensors"]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [m for m in said if "holds 1 file(s) its marker does not list (optimizer.pt)" in m], said


def test_files_saved_at_one_step_are_never_skipped_as_moot_nor_split_by_retention(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # A GAN saves net_g_N.pth and net_d_N.pth: with keep_last_n=1 the older-by-mtime file of
    # the newest step was skipped as moot in the queue, and S3 retention deleted it.
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    url = moto_bucket.join("run/")
    up = CheckpointUploader(
        root, url, transfer=wrapped, keep_last_n=1, local_keep_last_n=1, retry=FAST_RETRY  # type: ignore[arg-type]
    )
    try:
        up.submit(write(root / "net_g_100.pth", b"g1"))
        assert gate.entered.wait(30)  # net_g_100 is in flight; the rest queue behind it
        for name in ("net_d_100.pth", "net_g_200.pth", "net_d_200.pth"):
            time.sleep(0.01)  # distinct mtimes: the older file of a step ranked below the newer
            up.submit(write(root / name, name.encode()))
        gate.open()
        up.flush(timeout=60)
    finally:
        up.close(timeout=60)
    assert sorted(keys_under(boto_transfer, url)) == ["net_d_200.pth", "net_g_200.pth"]
    assert sorted(p.name for p in root.glob("*.pth")) == ["net_d_200.pth", "net_g_200.pth"]
    # net_d_100.pth goes up beside net_g_100.pth, which was in flight: let go as moot, it left
    # S3 with net_g_100 alone had the run died before the 200 pair landed (the second-terminal
    # pass: a watcher and `download --latest` saw a step with no optimizer).
    assert (up.status().uploaded, up.status().skipped) == (4, 0)


def test_moot_leftovers_in_s3_go_even_after_local_retention_took_the_local_copy(
    root: Path, moto_bucket: S3URL, boto_transfer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The S3 pass found its lock held while the local one ran: deleted_local then hid the moot
    # line, and the killed run's unmarked files stayed in S3 for good (review).
    import runctl.uploader as uploader_module
    from runctl.locking import s3_lock_path

    monkeypatch.setattr(uploader_module, "LOCK_RETRY_EVERY", 0.2)
    url = moto_bucket.join("run/")
    for step in (1, 2):  # a killed run left both queued, and part of checkpoint-2 in S3
        write(root / f"checkpoint-{step}" / "model.bin", b"m" * 10)
        write(root / f"checkpoint-{step}" / "trainer_state.json", b"{}")
        Journal(root).record(f"checkpoint-{step}", "queued")
    boto_transfer.put_files([(root / "checkpoint-2" / "model.bin", url.join("checkpoint-2/model.bin"))])
    wrapped = Wrapped(boto_transfer)
    gate = Gate(wrapped)
    with held_elsewhere(s3_lock_path(url, boto_transfer.config.endpoint_url)):
        up = CheckpointUploader(
            root, url, transfer=wrapped, keep_last_n=1, local_keep_last_n=1, retry=FAST_RETRY  # type: ignore[arg-type]
        )
        assert gate.entered.wait(30)  # checkpoint-1 uploads; checkpoint-2 waits, then is moot
        for step in (3, 4):
            write(root / f"checkpoint-{step}" / "model.bin", b"m" * step)
            write(root / f"checkpoint-{step}" / "trainer_state.json", b"{}")
            up.submit(root / f"checkpoint-{step}")
        gate.open()
        up.flush(timeout=60)
        assert Journal(root).replay()["checkpoint-2"].state == "deleted_local"
        assert "checkpoint-2/model.bin" in keys_under(boto_transfer, url)
    deadline = time.monotonic() + 20  # the lock is free: the idle worker's retry cleans up
    while any(k.startswith("checkpoint-2/") for k in keys_under(boto_transfer, url)):
        assert time.monotonic() < deadline, sorted(keys_under(boto_transfer, url))
        time.sleep(0.2)
    up.close(timeout=30)


def test_a_pin_outlives_a_run_that_never_reached_s3(tmp_path: Path, root: Path) -> None:
    # The pin was written only after the pinned checkpoint's upload landed: a run killed while
    # S3 was down left no pin anywhere, and the next run's retention deleted the checkpoint.
    with stoppable_s3(tmp_path) as (server, url, transfer):
        server.stop()
        first = uploader(root, url, transfer, keep_last_n=2, retry=BRIEF_RETRY)
        first.submit(write(root / "step_0.pt", b"zero"), protect=True)
        assert (root / ".runctl" / "pinned" / "step_0.pt").exists()  # at once, on submit
        for step in (100, 200, 300):
            first.submit(write(root / f"step_{step}.pt", b"x"))
        first._abort.set()  # as killed: nothing more is tried
        with pytest.raises(UploadError):
            first.close(timeout=10)
        server.start()
        second = uploader(root, url, transfer, keep_last_n=2)
        second.submit(write(root / "step_400.pt", b"four")).result(60)
        second.close(timeout=60)
        in_s3 = keys_under(transfer, url.join("run/"))
        assert sorted(k for k in in_s3 if k.startswith("step_")) == ["step_0.pt", "step_300.pt", "step_400.pt"]
        assert ".runctl/pinned/step_0.pt" in in_s3  # sent by the next run


def test_a_protection_for_this_run_only_leaves_no_pin(tmp_path: Path, root: Path, s3_server: Any, bucket: S3URL) -> None:
    # Lightning's "keep the best of the run resumed from" is for that run: it must not pin for good.
    from runctl.transfer import get_transfer

    transfer = get_transfer(s3_server.config(), use_s5cmd=False)
    try:
        up = uploader(root, bucket, transfer, keep_last_n=1)
        up.protect("step_1.pt", persist=False)
        for step in (1, 2, 3):
            up.submit(write(root / f"step_{step}.pt", b"x")).result(30)
        up.close(timeout=30)
        assert sorted(keys_under(transfer, bucket.join("run/"))) == ["step_1.pt", "step_3.pt"]
        assert not (root / ".runctl" / "pinned").exists()
    finally:
        transfer.close()


def test_pins_stay_with_their_prefix_and_an_unpin_anywhere_holds(tmp_path: Path, s3_server: Any, bucket: S3URL) -> None:
    # Every run re-sent every local pin: an unpin on another node came back with this node's
    # next run, and a directory reused for another prefix pinned the same names there too.
    from runctl.transfer import get_transfer

    transfer = get_transfer(s3_server.config(), use_s5cmd=False)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    try:
        node1 = uploader(a, bucket, transfer, keep_last_n=1)
        node1.submit(write(a / "step_0.pt", b"0"), protect=True).result(30)
        node1.close(timeout=30)
        assert ".runctl/pinned/step_0.pt" in keys_under(transfer, bucket.join("run/"))
        node2 = uploader(b, bucket, transfer, keep_last_n=1)
        node2.unprotect("step_0.pt")
        node2.submit(write(b / "step_1.pt", b"1")).result(30)
        node2.close(timeout=30)
        assert sorted(keys_under(transfer, bucket.join("run/"))) == ["step_1.pt"]
        old = time.time() - 60  # node 1's pin was sent a while before its next run lists
        os.utime(a / ".runctl" / "pinned" / "step_0.pt", (old, old))
        again = uploader(a, bucket, transfer, keep_last_n=1)  # node 1's next run
        again.submit(write(a / "step_2.pt", b"2")).result(30)
        again.close(timeout=30)
        assert sorted(keys_under(transfer, bucket.join("run/"))) == ["step_2.pt"]
        assert not (a / ".runctl" / "pinned" / "step_0.pt").exists()
        # A pin of directory a for run/ is no pin for other/.
        node1_pin = uploader(a, bucket, transfer, keep_last_n=1)
        node1_pin.protect("step_2.pt")
        node1_pin.close(timeout=30)
        other = CheckpointUploader(a, bucket.join("other/"), transfer=transfer, keep_last_n=1, retry=FAST_RETRY)
        for step in (2, 3):
            other.submit(write(a / f"step_{step}.pt", b"x")).result(30)
        other.close(timeout=30)
        assert sorted(keys_under(transfer, bucket.join("other/"))) == ["step_3.pt"]
    finally:
        transfer.close()


def test_an_unpin_outlives_a_run_that_never_reached_s3(tmp_path: Path, root: Path) -> None:
    with stoppable_s3(tmp_path) as (server, url, transfer):
        first = uploader(root, url, transfer, keep_last_n=1)
        first.submit(write(root / "step_0.pt", b"0"), protect=True).result(30)
        first.close(timeout=30)
        server.stop()
        second = uploader(root, url, transfer, keep_last_n=1, retry=BRIEF_RETRY)
        second.unprotect("step_0.pt")
        second._abort.set()  # as killed before its unpin reached S3
        second.close(timeout=10)
        server.start()
        assert ".runctl/pinned/step_0.pt" in keys_under(transfer, url.join("run/"))
        third = uploader(root, url, transfer, keep_last_n=1)
        third.submit(write(root / "step_1.pt", b"1")).result(60)
        third.close(timeout=60)
        assert sorted(keys_under(transfer, url.join("run/"))) == ["step_1.pt"]


def test_two_uploaders_on_one_directory_never_bring_back_an_unpin(tmp_path: Path, root: Path, s3_server: Any, bucket: S3URL) -> None:
    # Each uploader kept the pins it read at start and sent them at close: `runctl local`'s
    # watcher beside a script's uploader put back in S3 a pin the script had just unpinned.
    from runctl.pins import pin_locally
    from runctl.transfer import get_transfer

    transfer = get_transfer(s3_server.config(), use_s5cmd=False)
    try:
        pin_locally(root, "step_0.pt")  # left unsent (a CheckpointManager without S3, a kill)
        write(root / "step_0.pt", b"0")
        watcher = uploader(root, bucket, transfer, keep_last_n=1)
        script = uploader(root, bucket, transfer, keep_last_n=1)
        script.submit(root / "step_0.pt").result(30)
        assert wait_for(lambda: ".runctl/pinned/step_0.pt" in keys_under(transfer, bucket.join("run/")))
        script.unprotect("step_0.pt")
        script.submit(write(root / "step_1.pt", b"1")).result(30)
        script.close(timeout=30)
        watcher.close(timeout=30)
        assert sorted(keys_under(transfer, bucket.join("run/"))) == ["step_1.pt"]
        assert not (root / ".runctl" / "pinned").exists() or not list((root / ".runctl" / "pinned").iterdir())
    finally:
        transfer.close()


def test_a_pin_made_while_idle_reaches_s3_at_once(root: Path, s3_server: Any, bucket: S3URL) -> None:
    # It waited for the next upload (an hour away, perhaps), while other nodes' retention and
    # `runctl s3 cleanup` could not see it.
    from runctl.transfer import get_transfer

    transfer = get_transfer(s3_server.config(), use_s5cmd=False)
    try:
        up = uploader(root, bucket, transfer, keep_last_n=1)
        up.submit(write(root / "step_1.pt", b"1")).result(30)
        up.protect("step_1.pt")
        assert wait_for(lambda: ".runctl/pinned/step_1.pt" in keys_under(transfer, bucket.join("run/")))
        up.unprotect("step_1.pt")
        assert wait_for(lambda: ".runctl/pinned/step_1.pt" not in keys_under(transfer, bucket.join("run/")))
        up.close(timeout=30)
    finally:
        transfer.close()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_pin_file_that_cannot_be_rewritten_never_fails_the_upload(
    root: Path, s3_server: Any, bucket: S3URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An OSError recording a pin as sent (a full or read-only disk) escaped the worker's pin
    # pass: the checkpoint that had just landed was reported failed.
    from runctl.pins import LocalPins
    from runctl.transfer import get_transfer

    def refused(self: LocalPins, name: str) -> bool:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LocalPins, "mark_sent", refused)
    transfer = get_transfer(s3_server.config(), use_s5cmd=False)
    try:
        up = uploader(root, bucket, transfer, keep_last_n=1)
        assert up.submit(write(root / "step_0.pt", b"0"), protect=True).result(30).state == "verified"
        assert up.submit(write(root / "step_1.pt", b"1")).result(30).state == "verified"
        up.close(timeout=30)
        assert sorted(keys_under(transfer, bucket.join("run/"))) == [".runctl/pinned/step_0.pt", "step_0.pt", "step_1.pt"]
    finally:
        transfer.close()


@pytest.mark.parametrize("how", ["submit", "protect"])
def test_a_pin_whose_file_cannot_be_written_still_holds_for_the_run(
    root: Path, moto_bucket: S3URL, boto_transfer: Any, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # "The run keeps the name either way", said the log; the next retention re-read the pin
    # files, found none, and deleted the pinned checkpoint in S3 and locally.
    from runctl.pins import LocalPins

    def full(self: LocalPins, name: str) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as disk:
        disk.setattr(LocalPins, "pin", full)
        up = uploader(root, moto_bucket, boto_transfer, keep_last_n=1, local_keep_last_n=1)
        first = write(root / "step_1.pt", b"1")
        if how == "protect":
            up.protect("step_1.pt")
        handle = up.submit(first, protect=how == "submit")
    try:
        assert handle.result(30).state == "verified"
        for step in (2, 3):
            assert up.submit(write(root / f"step_{step}.pt", b"x")).result(30).state == "verified"
        up.flush(timeout=30)
    finally:
        up.close(timeout=30)
    assert {"step_1.pt", "step_3.pt"} <= set(keys_under(boto_transfer, moto_bucket.join("run/")))
    assert sorted(p.name for p in root.glob("*.pt")) == ["step_1.pt", "step_3.pt"]


def test_a_resumed_upload_goes_up_when_the_journal_cannot_be_read_again(
    root: Path, moto_bucket: S3URL, boto_transfer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker re-reads the journal before a resumed upload (another process may have sent
    # it). A failed read (EMFILE) dropped the job: flush() and close() passed, its handle never
    # finished, and the checkpoint never reached S3.
    import threading

    from runctl.exceptions import JournalError

    step = write(root / "step_1.pt", b"x" * 100)
    st = step.stat()
    Journal(root).record("step_1.pt", "queued", size=st.st_size, mtime=st.st_mtime)  # a killed run's
    readable = Journal.snapshot

    def unreadable_to_the_worker(self: Journal) -> Any:
        if threading.current_thread().name == "runctl-uploader":
            raise JournalError("cannot read the journal: [Errno 24] Too many open files")
        return readable(self)

    monkeypatch.setattr(Journal, "snapshot", unreadable_to_the_worker)
    up = uploader(root, moto_bucket, boto_transfer)
    try:
        (resumed,) = up.resumed
        assert resumed.result(timeout=30).state == "verified"
    finally:
        up.close(timeout=30)
    assert "step_1.pt" in keys_under(boto_transfer, moto_bucket.join("run/"))


def test_the_journal_thread_never_waits_for_another_jobs_staging(
    root: Path, moto_bucket: S3URL, boto_transfer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A queued last.ckpt superseded while step_1.pt's staging (a copy of GBs) still ran: the
    # journal thread waited for that staging before it could release the slot, and every
    # journal fsync (which each landed upload waits for, 60 s at most) waited behind it.
    import threading

    from runctl.staging import StagingArea

    staging_may_go = threading.Event()
    link = StagingArea.link_open_file

    def slow(self: StagingArea, fd: int, source: Path, token: str) -> Any:
        if source.name == "step_1.pt":
            staging_may_go.wait(30)
        return link(self, fd, source, token)

    monkeypatch.setattr(StagingArea, "link_open_file", slow)
    up = uploader(root, moto_bucket, boto_transfer)
    try:
        up.submit(write(root / "step_1.pt", b"1"))
        up.submit(write(root / "last.ckpt", b"a"))
        up.submit(write(root / "last.ckpt", b"b"))  # supersedes the queued one
        journal_free = threading.Event()
        up._journal.later(journal_free.set)
        assert journal_free.wait(10), "the journal thread waits for step_1.pt's staging"
        staging_may_go.set()
        up.flush(timeout=30)
    finally:
        staging_may_go.set()
        up.close(timeout=30)
    assert boto_transfer.get_bytes(moto_bucket.join("run/last.ckpt")) == b"b"


def test_a_submit_interrupted_after_its_job_was_let_go_leaves_the_journal_thread_free(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # Ctrl-C in submit()'s wait for queue space, after that wait's pruning had let the job go
    # as moot: its staging was never asked for, and the journal thread waited for it for good.
    import threading

    up = uploader(root, moto_bucket, boto_transfer)
    enqueue = up._enqueue

    def let_go_then_interrupted(job: Any, wake: bool = True) -> None:
        enqueue(job, wake=False)
        up._cancel(job, "moot (newer checkpoints queued)")
        raise KeyboardInterrupt

    up._enqueue = let_go_then_interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            up.submit(write(root / "step_1.pt", b"1"))
        journal_free = threading.Event()
        up._journal.later(journal_free.set)
        assert journal_free.wait(10), "the journal thread waits for a staging no one asked for"
    finally:
        up._enqueue = enqueue  # type: ignore[method-assign]
        up.close(timeout=30)


def test_a_with_block_that_raises_does_not_wait_out_every_retry_of_a_down_s3(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # __exit__ closed with no failing_timeout: a training error inside `with CheckpointUploader`
    # waited for every retry of every pending upload before it could surface.
    import runctl.uploader as uploader_module

    monkeypatch.setattr(uploader_module, "FAILING_TIMEOUT", 1.0)
    patient = RetryPolicy(attempts=100, backoff_factor=0.2, backoff_max=0.2, jitter=0)
    with stoppable_s3(tmp_path) as (server, url, transfer):
        server.stop()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="training failed"):
            with uploader(root, url, transfer, retry=patient) as up:
                up.submit(write(root / "step_1.pt", b"1"))
                raise RuntimeError("training failed")
        assert time.monotonic() - started < 15  # 100 tries at 0.2 s would take 20 s and more
    assert Journal(root).replay()["step_1.pt"].state == "queued"  # left for the next run


def test_the_step_before_stays_in_s3_until_every_file_of_the_next_has_landed(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # keep_last_n=1: once net_g_5000.pth landed, retention deleted the 4000 pair while
    # net_d_5000.pth still waited its turn; a preemption then left S3 without a whole step.
    import threading

    wrapped = Wrapped(boto_transfer)
    d_may_go = threading.Event()

    def hold_net_d_5000(count: int, pairs: list[tuple[Path, S3URL]]) -> None:
        if any(u.key.endswith("net_d_5000.pth") for _, u in pairs):
            assert d_may_go.wait(30)

    wrapped.before_put = hold_net_d_5000
    url = moto_bucket.join("run/")
    up = CheckpointUploader(root, url, transfer=wrapped, keep_last_n=1, retry=FAST_RETRY)  # type: ignore[arg-type]
    try:
        for name in ("net_g_4000.pth", "net_d_4000.pth"):
            assert up.submit(write(root / name, b"4")).result(30).state == "verified"
        g = up.submit(write(root / "net_g_5000.pth", b"5"))
        d = up.submit(write(root / "net_d_5000.pth", b"5"))
        assert g.result(30).state == "verified"
        assert wait_for(lambda: up.status().in_flight == "net_d_5000.pth")  # g5000's retention is over
        assert sorted(keys_under(boto_transfer, url)) == ["net_d_4000.pth", "net_g_4000.pth", "net_g_5000.pth"]
        d_may_go.set()
        assert d.result(30).state == "verified"
        up.flush(timeout=30)
    finally:
        d_may_go.set()
        up.close(timeout=30)
    assert sorted(keys_under(boto_transfer, url)) == ["net_d_5000.pth", "net_g_5000.pth"]


def test_latest_checkpoint_brings_every_file_saved_at_the_newest_step(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # It brought net_g_5.pth alone: a GAN resumed without its discriminator.
    url = moto_bucket.join("run/")
    for step in (4, 5):
        for part in ("g", "d"):
            boto_transfer.put_files([(write(root / f"net_{part}_{step}.pth", b"%d" % step), url.join(f"net_{part}_{step}.pth"))])
    restore = root.parent / "restore"
    got = latest_checkpoint(url, restore, transfer=boto_transfer)
    assert got is not None and got.name in ("net_g_5.pth", "net_d_5.pth")
    assert sorted(p.name for p in restore.iterdir()) == ["net_d_5.pth", "net_g_5.pth"]


def test_a_step_with_a_file_left_out_as_torn_does_not_count_in_s3(
    root: Path, moto_bucket: S3URL, boto_transfer: Any
) -> None:
    # runctl local left optim_step_3.pt out as cut short; model_step_3.pt landed alone, and
    # keep-last-1 deleted step 2, the last whole step: no whole step was left anywhere.
    from runctl.journal import TORN

    url = moto_bucket.join("run/")
    up = CheckpointUploader(root, url, transfer=boto_transfer, keep_last_n=1, retry=FAST_RETRY)  # type: ignore[arg-type]
    try:
        for step in (1, 2):
            for part in ("model", "optim"):
                assert up.submit(write(root / f"{part}_step_{step}.pt", b"x")).result(30).state == "verified"
        torn = write(root / "optim_step_3.pt", b"cut")
        Journal(root).record(torn.name, "skipped", detail=f"{TORN}: cut short", size=3, mtime=torn.stat().st_mtime)
        assert up.submit(write(root / "model_step_3.pt", b"x")).result(30).state == "verified"
        up.flush(timeout=30)
    finally:
        up.close(timeout=30)
    assert sorted(keys_under(boto_transfer, url)) == ["model_step_2.pt", "model_step_3.pt", "optim_step_2.pt"]


@pytest.mark.parametrize("partner", ["being written", "written earlier", "saved again"])
def test_a_step_whose_other_file_is_not_in_s3_yet_does_not_count_there(
    root: Path, moto_bucket: S3URL, boto_transfer: Any, partner: str
) -> None:
    # runctl local submits each file once it settles: net_g_5000.pth landed while
    # net_d_5000.pth was still being written (or written first but not yet handed over, or a
    # resumed run's new version of a name that landed before), and keep-last-1 deleted the
    # 4000 pair.
    url = moto_bucket.join("run/")
    earlier = ("net_g_4000.pth", "net_d_4000.pth")
    if partner == "saved again":  # an earlier run's pair of step 5000 landed too
        earlier += ("net_g_5000.pth", "net_d_5000.pth")
    with CheckpointUploader(root, url, transfer=boto_transfer, retry=FAST_RETRY) as first:  # type: ignore[arg-type]
        for name in earlier:
            assert first.submit(write(root / name, b"old")).result(30).state == "verified"
    up = CheckpointUploader(root, url, transfer=boto_transfer, keep_last_n=1, retry=FAST_RETRY)  # type: ignore[arg-type]
    try:
        write(root / "net_d_5000.pth", b"half")  # not handed over yet
        if partner == "written earlier":
            then = time.time() - 60
            os.utime(root / "net_d_5000.pth", (then, then))
        assert up.submit(write(root / "net_g_5000.pth", b"new")).result(30).state == "verified"
        up.flush(timeout=30)
        assert {"net_d_4000.pth", "net_g_4000.pth"} <= set(keys_under(boto_transfer, url)), partner
        assert up.submit(write(root / "net_d_5000.pth", b"whole")).result(30).state == "verified"
        up.flush(timeout=30)
    finally:
        up.close(timeout=30)
    assert sorted(keys_under(boto_transfer, url)) == ["net_d_5000.pth", "net_g_5000.pth"]
