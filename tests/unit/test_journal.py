"""The append-only journal: records, replay, torn and corrupt lines, many writers at once."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from runctl import journal as journal_module
from runctl.exceptions import UsageError
from runctl.journal import JOURNAL_DIR, JOURNAL_NAME, Journal, JournalEntry


def test_record_and_replay_latest_per_name(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.record("step_1.pt", "queued", size=3, mtime=1.5, time=10)
    j.record("step_1.pt", "uploaded", size=3, mtime=1.5, time=11, s3_url="s3://bkt/c/step_1.pt")
    j.record("step_2.pt", "queued", time=12)
    j.record("step_1.pt", "verified", size=3, mtime=1.5, time=13)
    replay = j.replay()
    assert replay["step_1.pt"] == JournalEntry("step_1.pt", "verified", 13.0, size=3, mtime=1.5)
    assert replay["step_2.pt"].state == "queued"
    path = tmp_path / JOURNAL_DIR / JOURNAL_NAME
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)


def test_lines_are_compact_sorted_json_and_the_directory_comes_back(tmp_path: Path) -> None:
    # The line's bytes are the format other versions read; its directory is made on the first
    # line, and again if someone removed it.
    import shutil

    j = Journal(tmp_path)
    j.record("step_1.pt", "queued", size=3, mtime=1.5, time=10, s3_url="s3://b/é")
    path = tmp_path / JOURNAL_DIR / JOURNAL_NAME
    expected = b'{"mtime":1.5,"name":"step_1.pt","s3_url":"s3://b/\\u00e9","size":3,"state":"queued","time":10.0}\n'
    assert path.read_bytes() == expected
    shutil.rmtree(tmp_path / JOURNAL_DIR)
    j.record("step_2.pt", "queued", time=11)
    assert j.replay()["step_2.pt"].state == "queued"


def test_missing_journal_replays_empty(tmp_path: Path) -> None:
    j = Journal(tmp_path / "nothing-yet")
    assert j.replay() == {} and j.pending() == [] and not j.is_durable("x")


def test_record_rejects_unknown_state_and_field(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    with pytest.raises(UsageError, match="unknown journal state 'done'"):
        j.record("a", "done")
    with pytest.raises(UsageError, match="colour"):
        j.record("a", "queued", colour="red")
    with pytest.raises(UsageError, match="name"):
        j.record("", "queued")


def test_is_durable_checks_size_and_mtime(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.record("last.ckpt", "verified", size=10, mtime=100.25)
    assert j.is_durable("last.ckpt")
    assert j.is_durable("last.ckpt", size=10, mtime=100.25)
    assert not j.is_durable("last.ckpt", size=11)
    assert not j.is_durable("last.ckpt", size=10, mtime=101.0)
    assert not j.is_durable("other.ckpt")
    j.record("last.ckpt", "queued", size=11, mtime=101.0)
    assert not j.is_durable("last.ckpt")


def test_was_verified_survives_s3_retention_only(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.record("step_1.pt", "verified", size=1, mtime=1.0)
    j.record("step_1.pt", "deleted_s3")
    assert not j.is_durable("step_1.pt")
    assert j.was_verified("step_1.pt", size=1, mtime=1.0)
    assert not j.was_verified("step_1.pt", size=2, mtime=1.0)
    j.record("step_2.pt", "verified", size=1)
    j.record("step_2.pt", "failed", detail="re-upload failed")
    assert not j.was_verified("step_2.pt")


def test_pending_oldest_first(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.record("b", "uploaded", time=5)
    j.record("a", "queued", time=3)
    j.record("c", "queued", time=1)
    j.record("c", "verified", time=6)
    j.record("d", "failed", time=2)
    j.record("e", "skipped", time=2)
    assert [e.name for e in j.pending()] == ["a", "b"]


def test_a_line_about_an_older_version_does_not_end_the_newer_pending_one(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.record("last.ckpt", "queued", time=1.0, size=10)
    j.record("last.ckpt", "queued", time=2.0, size=12)  # rewritten and submitted again
    j.record("last.ckpt", "skipped", queued=1.0, detail="superseded")  # the first, afterwards
    assert [(e.name, e.version) for e in j.pending()] == [("last.ckpt", 2.0)]
    # The first version was still uploading: its own lines come after the second's "queued".
    j.record("last.ckpt", "uploaded", queued=1.0, size=10)
    j.record("last.ckpt", "verified", queued=1.0, size=10, mtime=7.0)
    assert [e.version for e in j.pending()] == [2.0]
    assert j.was_verified("last.ckpt") is False and j.durability_check()("last.ckpt") is False
    j.record("last.ckpt", "uploaded", queued=2.0, size=12)  # the second's own lines end it
    assert [e.version for e in j.pending()] == [2.0]
    j.record("last.ckpt", "verified", queued=2.0, size=12, mtime=8.0)
    assert j.pending() == [] and j.is_durable("last.ckpt", 12, 8.0)
    j.record("step_1.pt", "queued", time=5.0)
    j.record("step_1.pt", "failed", detail="a line from an older runctl: no queued= field")
    assert j.pending() == [] and j.replay()["step_1.pt"].state == "failed"


def test_torn_and_corrupt_lines_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j = Journal(tmp_path)
    j.record("a", "verified", time=1)
    with open(j.path, "ab") as f:
        f.write(b"this is not json\n")
        f.write(b'{"name": "b", "state": "no-such-state", "time": 1}\n')
        f.write(b'{"name": "c", "time": "yesterday", "state": "queued"}\n')
        f.write(b"\xff\xfe\n")
        f.write(b"[1, 2]\n")
        f.write(b'{"name": "d", "state": "queued", "ti')  # torn by a crash
    with caplog.at_level(logging.DEBUG, logger="runctl"):
        assert set(j.replay()) == {"a"}
    assert "unfinished last line" in caplog.text and "corrupt line 2" in caplog.text
    # A corrupt line is said once, not at every read (each start read it 5-7 times); a last
    # line being appended while it is read is no news (the soak pass saw 3 in 2,500 saves).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runctl"):
        assert set(j.replay()) == {"a"}
    assert caplog.text == ""
    # The next record starts on a fresh line, so only the torn one is lost.
    j.record("e", "queued", time=2)
    assert set(j.replay()) == {"a", "e"}


def _hammer(root: str, worker: int, count: int, sync: bool = True) -> None:
    j = Journal(Path(root))
    for i in range(count):
        j.record(f"w{worker}-{i}", "queued", detail="x" * 200, time=i, sync=sync)


def test_many_processes_and_threads_never_interleave(tmp_path: Path) -> None:
    # The processes skip the fsync so that their writes overlap often: a line another process
    # is still writing must not look torn (that used to add an empty line now and then).
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, 2000, False)) for w in range(3)]
    threads = [threading.Thread(target=_hammer, args=(str(tmp_path), 10 + w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for t in threads:
        t.join(60)
    lines = (tmp_path / JOURNAL_DIR / JOURNAL_NAME).read_bytes().splitlines()
    assert b"" not in lines
    assert len(lines) == 6120
    assert all(json.loads(line)["state"] == "queued" for line in lines)
    assert len(Journal(tmp_path).replay()) == 6120


def test_a_filesystem_that_refuses_flock_still_gets_its_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    import runctl.journal as journal_module

    calls: list[int] = []

    class NoLocks:
        LOCK_EX, LOCK_NB, LOCK_UN = 2, 4, 8

        @staticmethod
        def flock(fd: int, op: int) -> None:
            calls.append(op)
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(journal_module, "fcntl", NoLocks)
    j = Journal(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="runctl.journal"):
        j.record("a", "queued", time=1)
        j.record("b", "verified", time=2, size=1)
    assert calls == [6, 6]  # asked each time, once; never unlocked what it did not hold
    assert "flock refused" in caplog.text
    assert list(j.replay()) == ["a", "b"]
    monkeypatch.setattr(journal_module, "fcntl", None)  # Windows
    j.record("c", "queued", time=3)
    assert list(j.replay()) == ["a", "b", "c"]


def test_another_writers_lock_is_waited_for_but_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fcntl

    import runctl.journal as journal_module

    j = Journal(tmp_path)
    j.record("a", "queued", time=1)

    def hold(seconds: float | None) -> int:
        fd = os.open(j.path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if seconds is not None:
            threading.Timer(seconds, os.close, [fd]).start()
        return fd

    with caplog.at_level(logging.DEBUG, logger="runctl.journal"):
        # A writer that finishes within the wait is waited for (a roomy wait: timers run late
        # on a busy machine).
        monkeypatch.setattr(journal_module, "LOCK_WAIT", 10.0)
        hold(0.02)
        started = time.monotonic()
        j.record("b", "queued", time=2, sync=False)
        assert 0.015 <= time.monotonic() - started < 10.0
        assert "without the lock" not in caplog.text

        # A writer stopped inside the lock is not waited on for longer than LOCK_WAIT.
        monkeypatch.setattr(journal_module, "LOCK_WAIT", 0.05)
        stuck = hold(None)
        try:
            started = time.monotonic()
            j.record("c", "queued", time=3, sync=False)
            waited = time.monotonic() - started
        finally:
            os.close(stuck)
    assert 0.05 <= waited < 1.05
    assert "held for over" in caplog.text
    assert list(j.replay()) == ["a", "b", "c"]


def _history(j: Journal) -> None:
    """Every kind of history a name can have, each written as the uploader writes it."""
    for i in range(40):  # the long run: up, verified, gone from S3 and then from disk
        name = f"step_{i}.pt"
        j.record(name, "queued", size=i, mtime=float(i), time=100.0 + i, sync=False)
        j.record(name, "uploaded", size=i, mtime=float(i), queued=100.0 + i, sync=False)
        j.record(name, "verified", size=i, mtime=float(i), queued=100.0 + i, sync=False)
        if i < 30:
            j.record(name, "deleted_s3", size=i, sync=False)
        if i < 20:
            j.record(name, "deleted_local", size=i, mtime=float(i), sync=False)
    # last.ckpt: verified, then rewritten and queued, then a late line about the old version
    j.record("last.ckpt", "queued", size=1, mtime=1.0, time=200.0)
    j.record("last.ckpt", "verified", size=1, mtime=1.0, queued=200.0)
    j.record("last.ckpt", "queued", size=2, mtime=2.0, time=210.0)
    j.record("last.ckpt", "uploaded", size=1, mtime=1.0, queued=200.0)
    j.record("step_90.pt", "queued", size=9, mtime=9.0, time=300.0)
    j.record("step_91.pt", "failed", size=9, mtime=9.0, queued=301.0)
    j.record("step_92.pt", "skipped", size=9, mtime=9.0, detail="superseded")
    j.record("checkpoint-7", "deleting_s3")


def test_compaction_keeps_every_answer_and_drops_what_is_gone(tmp_path: Path) -> None:
    # A run of thousands of checkpoints re-read its whole history at every retention.
    j = Journal(tmp_path)
    _history(j)
    for i in range(20, 25):  # deleted from S3, still on this disk (no local retention)
        (tmp_path / f"step_{i}.pt").write_bytes(b"x")
    before = j.snapshot()
    size = j.path.stat().st_size
    assert j.compact(min_bytes=size + 1) is False  # small enough: left alone
    assert j.compact(min_bytes=0) is True
    after = j.snapshot()
    # Gone from this disk, or from S3 with no file here (local retention went first): the run
    # of the soak pass kept two lines for every checkpoint it ever saved.
    gone = {
        n
        for n, e in before.latest.items()
        if e.state == "deleted_local" or (e.state == "deleted_s3" and not (tmp_path / n).exists())
    }
    assert len(gone) == 25 and not gone & set(after.latest)
    assert after.latest == {n: e for n, e in before.latest.items() if n not in gone}
    assert after.verified == {n: e for n, e in before.verified.items() if n not in gone}
    assert after.pending(failed=True) == before.pending(failed=True)
    assert after.verified_versions() == [e for e in before.verified_versions() if e.name not in gone]
    for name in before.latest:
        for size_, mtime in [(None, None), (1, 1.0), (2, 2.0), (25, 25.0), (35, 35.0)]:
            if name not in gone:
                assert after.was_verified(name, size_, mtime) == before.was_verified(name, size_, mtime)
    assert j.unfinished_deletions() == {"checkpoint-7"}
    assert j.path.stat().st_size < size / 2
    assert sorted(p.name for p in j.path.parent.iterdir()) == [JOURNAL_NAME]  # no leftovers


def test_lines_written_during_a_compaction_are_never_lost(tmp_path: Path) -> None:
    # Another process (runctl local's script, a cleanup) may append while one compacts.
    _history(Journal(tmp_path))
    stop = threading.Event()
    written: list[str] = []

    def append() -> None:
        writer = Journal(tmp_path)  # its own descriptor and lock, as another process has
        i = 0
        while not stop.is_set():
            name = f"w_{i}.pt"
            writer.record(name, "queued", sync=False)
            written.append(name)
            i += 1

    thread = threading.Thread(target=append)
    thread.start()
    try:
        compactor = Journal(tmp_path)
        for _ in range(20):
            compactor.compact(min_bytes=0)
    finally:
        stop.set()
        thread.join()
    latest = Journal(tmp_path).snapshot().latest
    assert written and all(latest[name].state == "queued" for name in written)


def test_a_compaction_that_finds_the_lock_taken_leaves_the_holders_marker(tmp_path: Path) -> None:
    # The marker tells writers that a compaction holds the lock, and to wait for it rather than
    # write without it; a second compactor that gave up must not take the first one's away.
    import fcntl

    journal = Journal(tmp_path)
    _history(journal)
    marker = journal.path.with_name(journal.path.name + ".compacting")
    holder = os.open(journal.path, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        marker.touch()
        assert Journal(tmp_path).compact(min_bytes=0) is False
        assert marker.exists()
    finally:
        os.close(holder)
        marker.unlink()


def test_a_compaction_keeps_the_lines_written_after_it_read_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The history is replayed before the lock is taken; what lands in between must still count.
    journal = Journal(tmp_path)
    _history(journal)
    real_replay = journal_module._replay
    calls = []

    def replay_then_write(data: bytes, path: Path, after: object = None) -> object:
        calls.append(after)
        if after is None:  # the unlocked pass: another writer appends meanwhile
            Journal(tmp_path).record("late.pt", "verified", size=1, mtime=1.0)
            Journal(tmp_path).record("step_35.pt", "deleted_local")
        return real_replay(data, path, after)  # type: ignore[arg-type]

    monkeypatch.setattr(journal_module, "_replay", replay_then_write)
    assert journal.compact(min_bytes=0)
    assert calls == [None]  # one replay, before the lock: the late lines go in as they are
    latest = Journal(tmp_path).replay()
    assert latest["late.pt"].state == "verified"
    assert latest["step_35.pt"].state == "deleted_local"  # (the next compaction drops it)
