"""Crash-safe, append-only record of what was queued, uploaded, verified and deleted."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from runctl.exceptions import JournalError, UsageError

try:
    import fcntl
except ImportError:  # Windows: no flock; a line another process is writing may be seen torn
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("runctl.journal")


#: How long an append waits for another writer's lock before it writes without one. A writer
#: holds it for a stat, a one-byte read and a write (microseconds; on NFS, a flush): only a
#: writer stopped inside it (Ctrl-Z) or a lock left by a dead NFS client holds it longer, and
#: the training thread must not wait on that.
LOCK_WAIT = 0.05
#: How long a writer waits for a compaction (``Journal.compact``) to finish.
COMPACT_WAIT = 2.0


def _lock_file(fd: int, wait: float = LOCK_WAIT) -> bool:
    """Take the journal's lock between processes; False where there is none or it stays taken.

    Without the lock (no flock on Windows, ENOLCK on some network filesystems, or a holder
    past ``LOCK_WAIT``) the journal still works, one ``os.write`` per line, with a small chance
    that a line another process is writing at that moment is taken for a torn one (an empty
    line then, skipped on replay).
    """
    if fcntl is None:
        return False
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                log.debug("journal line written without the lock: held for over %g s", wait)
                return False
            time.sleep(0.0005)
        except OSError as exc:
            log.debug("journal line written without the lock: flock refused (%s)", exc)
            return False


JOURNAL_DIR = ".runctl"
JOURNAL_NAME = "journal.jsonl"
STATES = (
    "queued",
    "uploaded",
    "verified",
    "skipped",
    "failed",
    "deleting_s3",
    "deleted_s3",
    "deleted_local",
)
PENDING_STATES = ("queued", "uploaded")
_FIELDS = ("time", "size", "mtime", "s3_url", "detail", "queued")
#: One encoder for every line: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
#: The ``detail`` a ``skipped`` line starts with for a checkpoint left out as possibly torn
#: (``runctl local``): neither uploaded nor counted among the newest, by any later run either.
TORN = "possibly torn"
#: The ``detail`` a ``skipped`` line starts with for a checkpoint that retention would delete
#: anyway: files an earlier, interrupted upload of it left in S3 are retention's to delete.
MOOT = "retention would delete it anyway"
#: ``Journal.compact`` rewrites a journal past this size (about 300 checkpoints' history; each
#: retention reads it twice, 6 ms at this size).
COMPACT_ABOVE = 256 << 10
#: Two mtimes closer than this are the same (they come from the same stat, through JSON).
_MTIME_TOLERANCE = 1e-6


@dataclass(frozen=True)
class JournalEntry:
    """One line of the journal: a checkpoint name reaching a state.

    Example:
        >>> JournalEntry("step_5.pt", "verified", 1.0, size=10).state
        'verified'
    """

    name: str
    state: str
    time: float
    size: int | None = None
    mtime: float | None = None
    s3_url: str | None = None
    detail: str | None = None
    #: On a line after ``queued``: the ``time`` of the ``queued`` line of the version it is about.
    queued: float | None = None

    def skipped_as(self, why: str) -> bool:
        """A ``skipped`` line whose detail begins with ``why`` (``MOOT``, ``TORN``)."""
        return self.state == "skipped" and (self.detail or "").startswith(why)

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict, which deep-copies each field: submit() writes a line on the
        # training thread, where every call counts (benchmark row 1b).
        doc = {
            "name": self.name,
            "state": self.state,
            "time": self.time,
            "size": self.size,
            "mtime": self.mtime,
            "s3_url": self.s3_url,
            "detail": self.detail,
            "queued": self.queued,
        }
        return {k: v for k, v in doc.items() if v is not None}

    @classmethod
    def from_json(cls, doc: object) -> JournalEntry:
        if not isinstance(doc, dict):
            raise ValueError(f"expected an object, got {type(doc).__name__}")
        name, state, when = doc.get("name"), doc.get("state"), doc.get("time")
        if not isinstance(name, str) or not name:
            raise ValueError(f"invalid name {name!r}")
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        if not _is_number(when):
            raise ValueError(f"invalid time {when!r}")
        size, mtime = doc.get("size"), doc.get("mtime")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise ValueError(f"invalid size {size!r}")
        if mtime is not None and not _is_number(mtime):
            raise ValueError(f"invalid mtime {mtime!r}")
        s3_url, detail, queued = doc.get("s3_url"), doc.get("detail"), doc.get("queued")
        if queued is not None and not _is_number(queued):
            raise ValueError(f"invalid queued time {queued!r}")
        return cls(
            name,
            state,
            float(when),
            size,
            None if mtime is None else float(mtime),
            None if s3_url is None else str(s3_url),
            None if detail is None else str(detail),
            None if queued is None else float(queued),
        )

    @property
    def version(self) -> float | None:
        """Which submitted version this line is about: the time it was queued (None if unknown)."""
        return self.time if self.state == "queued" else self.queued

    def matches(self, size: int | None, mtime: float | None) -> bool:
        """True when the given size and mtime (those given) equal the recorded ones."""
        if size is not None and self.size != size:
            return False
        if mtime is not None and (self.mtime is None or abs(self.mtime - mtime) > _MTIME_TOLERANCE):
            return False
        return True


def _line(entry: JournalEntry) -> bytes:
    """One journal line, newline included: what ``record`` appends and ``compact`` rewrites."""
    return _ENCODER.encode(entry.to_json()).encode("utf-8") + b"\n"


def _replaced(fd: int, path: Path) -> bool:
    """True when ``path`` no longer names the file open on ``fd`` (a compaction replaced it)."""
    try:
        return os.fstat(fd).st_ino != os.stat(path).st_ino
    except FileNotFoundError:
        return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class JournalSnapshot:
    """One replay of a journal, for asking several questions of the same read (``Journal.snapshot``).

    Example:
        >>> import tempfile
        >>> j = Journal(Path(tempfile.mkdtemp()))
        >>> j.record("step_1.pt", "verified", size=3, mtime=1.5); j.record("step_2.pt", "failed")
        >>> snap = j.snapshot()
        >>> [e.name for e in snap.pending(failed=True)], [e.name for e in snap.verified_versions()]
        (['step_2.pt'], ['step_1.pt'])
    """

    #: The latest entry per name, in file order (see ``Journal.replay``).
    latest: dict[str, JournalEntry]
    #: The last "verified" entry per name, kept past later "deleted_s3" entries.
    verified: dict[str, JournalEntry]

    def torn(self, name: str, size: int | None, mtime: float | None) -> bool:
        """True when this version of ``name`` was left out as possibly torn (``TORN``)."""
        entry = self.latest.get(name)
        return (
            entry is not None
            and entry.skipped_as(TORN)
            and size is not None
            and entry.matches(size, mtime)
        )

    def unfinished_deletions(self) -> set[str]:
        """As ``Journal.unfinished_deletions``, from this snapshot."""
        return {
            e.name
            for e in self.latest.values()
            if e.state == "deleting_s3" or e.skipped_as(MOOT)
        }

    def left_out(self) -> set[str]:
        """Names whose latest version was left out of S3 as possibly torn (``TORN``): their step
        is not whole in S3, and does not count there as one.

        Example:
            >>> import tempfile
            >>> j = Journal(Path(tempfile.mkdtemp()))
            >>> j.record("optim_step_3.pt", "skipped", detail=f"{TORN}: cut short")
            >>> j.snapshot().left_out()
            {'optim_step_3.pt'}
        """
        return {e.name for e in self.latest.values() if e.skipped_as(TORN)}

    def pending(self, *, failed: bool = False) -> list[JournalEntry]:
        """As ``Journal.pending``: queued or uploaded (and failed, with ``failed=True``), oldest first."""
        states = (*PENDING_STATES, "failed") if failed else PENDING_STATES
        entries = [e for e in self.latest.values() if e.state in states]
        return sorted(entries, key=lambda e: (e.time, e.name))

    def was_verified(self, name: str, size: int | None = None, mtime: float | None = None) -> bool:
        """As ``Journal.was_verified``, over this replay."""
        return _was_verified(self, name, size, mtime)

    def verified_versions(self) -> list[JournalEntry]:
        """As ``Journal.verified_versions``: each name's verified line whose version still counts."""
        return [e for name, e in self.verified.items() if _was_verified(self, name, e.size, e.mtime)]


class Journal:
    """The journal of one checkpoint directory: ``<root>/.runctl/journal.jsonl``.

    Every record is one line written by one ``os.write`` with ``O_APPEND`` (under ``flock``)
    and then fsynced, so threads and processes can share it and a crash loses at most the line
    being written.

    Example:
        >>> import tempfile
        >>> j = Journal(Path(tempfile.mkdtemp()))
        >>> j.record("step_5.pt", "verified", size=3, mtime=1.5)
        >>> j.is_durable("step_5.pt", size=3), j.is_durable("step_5.pt", size=4)
        (True, False)
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / JOURNAL_DIR / JOURNAL_NAME
        self._compacting = self.path.with_name(JOURNAL_NAME + ".compacting")
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    def record(self, name: str, state: str, *, sync: bool = True, **fields: Any) -> None:
        """Append one entry; ``fields`` are any of time, size, mtime, s3_url, detail.

        The line is in the kernel once this returns, so it survives SIGKILL of the process;
        ``sync=False`` leaves the fsync (survival of a power loss) to a later ``sync()``.

        Raises:
            UsageError: for an unknown state or field.
            JournalError: if the journal cannot be written.
        """
        if not isinstance(name, str) or not name:
            raise UsageError(f"journal entry name must be a non-empty string (got {name!r})")
        if state not in STATES:
            raise UsageError(f"unknown journal state {state!r}; expected one of {', '.join(STATES)}")
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise UsageError(f"unknown journal field(s) {', '.join(unknown)}; expected {', '.join(_FIELDS)}")
        when = fields.pop("time", None)
        entry = JournalEntry(name, state, time.time() if when is None else float(when), **fields)
        self._append(_line(entry), sync)

    def sync(self) -> None:
        """fsync the journal file (after ``record(..., sync=False)``)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc.strerror or exc}") from None
        try:
            os.fsync(fd)
        except OSError as exc:
            raise JournalError(f"cannot sync the journal {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def _append(self, data: bytes, sync: bool = True) -> None:
        try:
            with self._lock:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                except FileNotFoundError:  # the first line (or .runctl/ removed): make its directory
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    # Another process may be mid-write: the file's size can grow a page at a
                    # time, so without the lock the check below would see a line half there.
                    locked = _lock_file(fd)
                    if not locked and self._compacting.exists():
                        # A compaction holds the lock (about 0.1 s per MB, once per uploader
                        # start): wait for it, as a line written now could land in the file it
                        # is about to replace.
                        locked = _lock_file(fd, COMPACT_WAIT)
                    while locked and _replaced(fd, self.path):  # compacted: append to the new one
                        os.close(fd)
                        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                        locked = _lock_file(fd, COMPACT_WAIT)
                    end = os.fstat(fd).st_size
                    # A writer that died mid-line left no newline: start ours on a fresh line so
                    # that only the torn one is lost.
                    if end and os.pread(fd, 1, end - 1) != b"\n":
                        data = b"\n" + data
                    written = os.write(fd, data)
                    while written < len(data):  # never for a short line on a local disk
                        written += os.write(fd, data[written:])
                    if locked:  # other writers need not wait for our fsync
                        try:
                            fcntl.flock(fd, fcntl.LOCK_UN)
                        except OSError:  # the close releases it anyway
                            pass
                    if sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise JournalError(f"cannot write the journal {self.path}: {exc.strerror or exc}") from None

    def compact(self, *, min_bytes: int = COMPACT_ABOVE) -> bool:
        """Rewrite the journal with only what a replay answers from, once it passes ``min_bytes``.

        Per name: its latest line, and its last ``verified`` line when that is another; a name
        whose latest line is ``deleted_local``, or ``deleted_s3`` with its file gone from this
        disk, goes (with S3 retention the S3 deletion comes last: a long run kept two lines per
        checkpoint it ever saved). Every question about a name that stays (``snapshot`` and all)
        gets the same answer from the result; a name that goes is one no question asks about (no
        file here, none in S3). A run that saves thousands of checkpoints otherwise re-reads its
        whole history at each retention (2,000 checkpoints: 1.8 MB, 50 ms a read). The lines
        there when it starts are read, rewritten and fsynced without the lock; under it, what
        landed meanwhile is appended as it is and the file replaced (writers wait milliseconds,
        not the rewrite).
        Returns whether it rewrote the file.

        Example:
            >>> import tempfile
            >>> j = Journal(Path(tempfile.mkdtemp()))
            >>> for state in ("queued", "uploaded", "verified"): j.record("step_1.pt", state)
            >>> j.compact(min_bytes=0), len(j.path.read_text().splitlines())
            (True, 1)
        """
        try:
            if os.stat(self.path).st_size < min_bytes:
                return False
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise JournalError(f"cannot read the journal {self.path}: {exc.strerror or exc}") from None
        # Its own name: the rewrite is built before the lock is taken, so two could overlap.
        tmp = self.path.with_name(f".{JOURNAL_NAME}.compact-{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(self.path, os.O_RDONLY)
            marked = False
            try:
                # The whole lines there now are replayed, rewritten and fsynced before the lock is
                # taken: writers (the training thread among them) wait only while what landed
                # meanwhile is appended as it is and the file is replaced.
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                data = b"".join(chunks)
                whole = data.rfind(b"\n") + 1
                state = _replay(data[:whole], self.path)
                kept: list[JournalEntry] = []
                for name, latest in state.latest.items():
                    if latest.state == "deleted_local":
                        continue
                    if latest.state == "deleted_s3" and not os.path.lexists(self.root / name):
                        continue  # gone from S3 and from this disk (local retention went first)
                    verified = state.verified.get(name)
                    if verified is not None and verified != latest:
                        kept.append(verified)
                    kept.append(latest)
                with open(tmp, "wb") as out:
                    out.writelines(_line(entry) for entry in kept)
                    out.flush()
                    os.fsync(out.fileno())
                with self._lock:
                    if not _lock_file(fd) or _replaced(fd, self.path):
                        tmp.unlink()
                        return False  # another writer holds it, or compacted it: next time
                    # Writers that find the lock taken wait for it while this exists.
                    self._compacting.touch()
                    marked = True
                    chunks = []
                    while chunk := os.pread(fd, 1 << 20, whole + sum(map(len, chunks))):
                        chunks.append(chunk)
                    if chunks:  # replayed after the kept lines, it answers as after the old ones
                        with open(tmp, "ab") as out:
                            out.writelines(chunks)
                            out.flush()
                            os.fsync(out.fileno())
                    os.replace(tmp, self.path)
                    _fsync_dir(self.path.parent)
            finally:
                if marked:  # (only its own: one that found the lock taken leaves the holder's)
                    with contextlib.suppress(OSError):
                        self._compacting.unlink()
                os.close(fd)  # releases the lock
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise JournalError(f"cannot compact the journal {self.path}: {exc.strerror or exc}") from None
        return True

    def snapshot(self) -> JournalSnapshot:
        """Read and replay the journal once (a corrupt line skipped with a warning, once)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return JournalSnapshot({}, {})
        except OSError as exc:
            raise JournalError(f"cannot read the journal {self.path}: {exc.strerror or exc}") from None
        return _replay(data, self.path)

    def replay(self) -> dict[str, JournalEntry]:
        """The latest entry per name, in file order; torn or corrupt lines are skipped (``snapshot``).

        A line about an older version (its ``queued`` names an earlier ``queued`` line) that
        comes after a newer version was queued does not end the newer one, which stays pending.
        """
        return self.snapshot().latest

    def is_durable(self, name: str, size: int | None = None, mtime: float | None = None) -> bool:
        """True when the latest entry is ``verified`` and matches the given size and mtime.

        A rewritten ``last.ckpt`` (other size or mtime) is not durable.
        """
        entry = self.snapshot().latest.get(name)
        return entry is not None and entry.state == "verified" and entry.matches(size, mtime)

    def was_verified(self, name: str, size: int | None = None, mtime: float | None = None) -> bool:
        """True when this version reached S3 verified, even if retention later deleted it there.

        Local retention uses this: a checkpoint that was durable and that S3 retention then
        removed on purpose may go locally too (it must not be kept forever).
        """
        return _was_verified(self.snapshot(), name, size, mtime)

    def durability_check(self) -> Callable[[str, int | None, float | None], bool]:
        """A ``was_verified`` predicate over one replay (for checking many checkpoints at once).

        Example:
            >>> import tempfile
            >>> j = Journal(Path(tempfile.mkdtemp()))
            >>> j.record("step_5.pt", "verified", size=3, mtime=1.5)
            >>> check = j.durability_check()
            >>> check("step_5.pt", 3, 1.5), check("step_5.pt", 4, 1.5)
            (True, False)
        """
        return self.snapshot().was_verified

    def verified_versions(self) -> list[JournalEntry]:
        """The ``verified`` line of each name whose verified version still counts (``was_verified``).

        Example:
            >>> import tempfile
            >>> j = Journal(Path(tempfile.mkdtemp()))
            >>> j.record("step_5.pt", "verified", size=3, mtime=1.5)
            >>> j.record("step_6.pt", "queued")
            >>> [e.name for e in j.verified_versions()]
            ['step_5.pt']
        """
        return self.snapshot().verified_versions()

    def unfinished_deletions(self) -> set[str]:
        """Names whose marker-less files in S3 retention is to delete.

        Those whose deletion by retention began (``deleting_s3``) but never finished: a process
        killed between deleting a directory checkpoint's marker and its files leaves marker-less
        files behind. And those skipped as moot (``MOOT``): a run killed mid-upload of a
        directory leaves part of it, and the next run skips it once newer ones are queued.

        Example:
            >>> import tempfile
            >>> j = Journal(Path(tempfile.mkdtemp()))
            >>> j.record("checkpoint-1", "deleting_s3")
            >>> j.unfinished_deletions()
            {'checkpoint-1'}
        """
        return self.snapshot().unfinished_deletions()

    def pending(self, *, failed: bool = False) -> list[JournalEntry]:
        """Entries whose latest state is queued or uploaded (not yet verified), oldest first.

        ``failed=True`` adds those whose upload failed: a new process tries them again.

        Example:
            >>> import tempfile
            >>> j = Journal(Path(tempfile.mkdtemp()))
            >>> j.record("step_1.pt", "failed"); j.record("step_2.pt", "queued")
            >>> [e.name for e in j.pending()], [e.name for e in j.pending(failed=True)]
            (['step_2.pt'], ['step_1.pt', 'step_2.pt'])
        """
        return self.snapshot().pending(failed=failed)


#: (journal, line) of each corrupt line already warned about in this process.
_CORRUPT_SEEN: set[tuple[str, bytes]] = set()


def _replay(data: bytes, path: Path, after: JournalSnapshot | None = None) -> JournalSnapshot:
    """Replay a journal's bytes: the latest line per name, and the last ``verified`` one.

    ``after``: the replay of the lines before ``data`` (which it then goes on from, unchanged).
    """
    latest: dict[str, JournalEntry] = dict(after.latest) if after else {}
    verified: dict[str, JournalEntry] = dict(after.verified) if after else {}
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            entry = JournalEntry.from_json(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as exc:
            if number == len(lines) and not data.endswith(b"\n"):
                # A line still being appended (the journal is read without its lock), or one a
                # crash cut short: its record is lost either way, and nothing else is.
                log.debug("skipping the unfinished last line %d of %s: %s", number, path, exc)
            elif (str(path), raw) not in _CORRUPT_SEEN:  # said once, not at every read
                _CORRUPT_SEEN.add((str(path), raw))
                log.warning("skipping corrupt line %d of %s: %s", number, path, exc)
            continue
        before = latest.get(entry.name)
        if (
            before is not None
            and before.state in PENDING_STATES
            and entry.state != "queued"
            and entry.queued is not None
            and before.version is not None
            and entry.queued != before.version
        ):
            # About an older version, written after a newer one was queued (a rewritten
            # last.ckpt superseded it, or it was still uploading): the newer one stays pending.
            if entry.state == "verified":
                verified[entry.name] = entry
            continue
        latest[entry.name] = entry
        if entry.state == "verified":
            verified[entry.name] = entry
    return JournalSnapshot(latest, verified)


def _was_verified(state: JournalSnapshot, name: str, size: int | None, mtime: float | None) -> bool:
    latest = state.latest.get(name)
    if latest is None:
        return False
    if latest.state == "verified":
        return latest.matches(size, mtime)
    if latest.state in ("deleting_s3", "deleted_s3"):
        last = state.verified.get(name)
        return last is not None and last.matches(size, mtime)
    return False

