"""The background uploader: hand over a checkpoint in a millisecond, get it durable in S3, then prune."""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import hashlib
import itertools
import logging
import os
import queue
import stat as stat_module
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runctl import journal as journal_module
from runctl.checkpoints import (
    HF_ARGS,
    HF_SIGN,
    MARKER_NAME,
    PIN_DIR,
    RUNCTL_DIR,
    Checkpoint,
    Manifest,
    build_manifest,
    dir_awaits_hf_sign,
    group_s3,
    is_alias,
    is_recognised,
    local_checkpoint,
    newest_state,
    parse_step,
    pin_url,
    step_order,
    unlisted_files,
)
from runctl.config import S3Config, resolve_config, scrub
from runctl.exceptions import (
    BinaryNotFoundError,
    FlushTimeout,
    JournalError,
    LockTimeout,
    NoSuchKeyError,
    PartialTransferError,
    RunctlError,
    TransferError,
    UploadError,
    UsageError,
)
from runctl.journal import MOOT, Journal, JournalEntry, JournalSnapshot
from runctl.locking import mark_uploader, other_uploaders, upload_turn
from runctl.pins import LocalPins
from runctl.retention import (
    RetentionPlan,
    apply_local_retention,
    apply_s3_retention,
    check_keep_last_n,
    strays,
)
from runctl.retry import RENEWED_CODES, RetryPolicy
from runctl.s3url import NOT_UTF8, S3URL, not_utf8
from runctl.staging import (
    FD_LINKS,
    FileStamp,
    Snapshot,
    SnapshotError,
    StagingArea,
    Superseded,
    open_for_staging,
    stamp_or_none,
    tree_inventory,
)
from runctl.transfer import get_transfer
from runctl.transfer.base import ObjectInfo, Transfer, kernel_abspath

log = logging.getLogger("runctl.uploader")

FAILURE_POLICIES = ("warn", "raise")
#: How often flush() logs what it is still waiting for.
PROGRESS_EVERY = 10.0
#: The atexit safety net never waits longer than this.
ATEXIT_TIMEOUT = 600.0
#: At exit, or while a training error propagates, stop waiting once nothing has reached S3 for
#: this long (failing or hung): what is pending stays in the journal for the next run.
FAILING_TIMEOUT = 30.0
#: Clock skew allowed when deciding that an object a retry finds already landed in this upload.
LANDED_SKEW = 5.0
#: While another process holds a prefix's retention lock (a ``runctl s3 cleanup``, perhaps one
#: stopped with Ctrl-Z), the idle worker tries it again this often; uploads never wait for it.
LOCK_RETRY_EVERY = 5.0
#: At close, retention still waiting for that lock waits at most this long more.
FINAL_LOCK_WAIT = 10.0
#: A checkpoint whose upload failed (S3 down for longer than its retries) gets at most this many
#: more rounds of them in the same run, each once a later checkpoint lands (S3 is back).
FAILED_ROUNDS = 3
#: ETags are compared with a local MD5 only up to this size (a cheap check on the worker).
MD5_CHECK_MAX = 64 * 1024 * 1024
_ids = itertools.count(1)


@dataclass(frozen=True)
class UploadOutcome:
    """How one submitted checkpoint ended: ``state`` is "verified" or "skipped".

    Example:
        >>> UploadOutcome("step_1.pt", "verified", "s3://b/run/step_1.pt", 10, 0.5, 1).state
        'verified'
    """

    name: str
    state: str
    url: str
    size: int
    seconds: float
    attempts: int
    detail: str | None = None


class UploadHandle:
    """A future for one submitted checkpoint: ``done()``, ``result(timeout)``, ``exception(timeout)``.

    Example:
        >>> handle = uploader.submit("checkpoints/step_1.pt")  # doctest: +SKIP
        >>> handle.result(timeout=60).state  # doctest: +SKIP
        'verified'
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._event = threading.Event()
        self._outcome: UploadOutcome | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        if not self.done():
            state = "pending"
        else:
            state = (
                "failed"
                if self._error is not None or self._outcome is None
                else self._outcome.state
            )
        return f"UploadHandle({self.name!r}, {state})"

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> UploadOutcome:
        """The outcome; raises the upload's error, or ``FlushTimeout`` if not done in time."""
        if not self._event.wait(timeout):
            raise FlushTimeout([self.name])
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The upload's error, or None if it succeeded or was skipped."""
        if not self._event.wait(timeout):
            raise FlushTimeout([self.name])
        return self._error

    def _finish(self, outcome: UploadOutcome | None, error: BaseException | None = None) -> None:
        self._outcome, self._error = outcome, error
        self._event.set()


@dataclass(frozen=True)
class UploaderStatus:
    """Counters for integrations to log.

    Example:
        >>> s = UploaderStatus(2, 100, 1.0, 100.0, 0, None, 1, 0, 0, ())
        >>> s.to_dict()["bytes_uploaded"]
        100.0
    """

    uploaded: int
    bytes_uploaded: int
    seconds: float
    throughput: float
    queue_depth: int
    in_flight: str | None
    retries: int
    failures: int
    skipped: int
    pending: tuple[str, ...]
    retention_errors: int = 0

    def to_dict(self) -> dict[str, float]:
        return {
            "uploaded": float(self.uploaded),
            "bytes_uploaded": float(self.bytes_uploaded),
            "seconds": float(self.seconds),
            "throughput": float(self.throughput),
            "queue_depth": float(self.queue_depth),
            "retries": float(self.retries),
            "failures": float(self.failures),
            "skipped": float(self.skipped),
            "pending": float(len(self.pending)),
            "retention_errors": float(self.retention_errors),
        }


@dataclass(eq=False)
class _Job:
    token: str
    name: str
    source: Path
    is_dir: bool
    step: int | None
    epoch: int | None
    queued_at: float
    stamp: FileStamp | None
    handle: UploadHandle
    staged: Path | None = None
    resumed: bool = False
    #: A staging slot of an earlier process this job resumes from (released when it ends).
    adopted: str | None = None
    cancelled: str | None = None
    snapshot: Snapshot | None = field(default=None, repr=False)
    #: Saved under a name that is written again (an alias, or submitted before): a file goes up
    #: from a private copy, not the link; a rewrite overtaking it is routine (said at INFO).
    rewritable: bool = False
    copy_token: str | None = None
    #: A directory's files at submit (``tree_inventory``); its snapshot must match it.
    inventory: Mapping[str, tuple[int, int]] | None = field(default=None, repr=False)
    #: A resumed directory's (size, mtime) as ``scan_local`` saw it when this run resumed it:
    #: it has no inventory, and a skip must still name the version it let go.
    resumed_version: tuple[int, float] | None = None
    #: Set once the file opened at submit is staged, or staging it failed (``_stage_open``).
    staging_done: threading.Event | None = field(default=None, repr=False)
    #: Why staging failed, if it did.
    staging_error: OSError | None = field(default=None, repr=False)
    #: Rounds of attempts after the first failed (``FAILED_ROUNDS``).
    rounds: int = 0
    #: A directory's files as they were when a put of them began (rel -> stamp): a retry may
    #: skip one that landed only while it is still that version.
    tried: dict[str, FileStamp] = field(default_factory=dict, repr=False)

    def version(self) -> tuple[int, float] | None:
        """(size, mtime) as ``scan_local`` reports this checkpoint at submit; None if unknown."""
        if not self.is_dir:
            return None if self.stamp is None else (self.stamp.size, self.stamp.mtime)
        if not self.inventory:
            return self.resumed_version
        return (
            sum(size for size, _ in self.inventory.values()),
            max(mtime_ns for _, mtime_ns in self.inventory.values()) / 1e9,
        )

    def order_key(self) -> tuple[int, int, float]:
        mtime = self.stamp.mtime if self.stamp else self.queued_at
        return (
            -1 if self.step is None else self.step,
            -1 if self.epoch is None else self.epoch,
            mtime,
        )


def _newer(n: int | None) -> str:
    return f"{n} newer checkpoint{'' if n == 1 else 's'}"


class _LiveNames(Collection[str]):
    """A set of names read anew each time it is used (``get()``): retention reads it after its
    listing, so what changed while S3 was listed counts."""

    def __init__(self, get: Callable[[], set[str]]) -> None:
        self._get = get

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, name: object) -> bool:
        return name in self._get()


def _position(key: tuple[int, int, float]) -> tuple[float, ...]:
    """An order key's place in the run: its (step, epoch), shared by every checkpoint saved at
    that step; the whole key without either. Coarser than ``retention.positions``, which also
    tells Lightning's ``-vN`` versions apart: here they share a step, so fewer go as moot."""
    return key if key[:2] == (-1, -1) else key[:2]


def _ahead(key: tuple[int, int, float], of: tuple[int, int, float]) -> bool:
    """``key`` stands at a later position than ``of`` (never at the same step)."""
    return _position(key) > _position(of) if of[:2] == (-1, -1) else key[:2] > of[:2]


#: Wait before staging a directory checkpoint again that changed since submit() (seconds).
DIR_RESTAGE_WAIT = 0.2
#: How long a directory checkpoint that is losing files may take to be gone (a slow rmtree).
DIR_DELETE_WAIT = 5.0


class _Skip(Exception):
    """End a job without uploading it (superseded, vanished); the reason is logged and counted.

    ``warn``: said at WARNING (something the caller did not mean to happen), not INFO.
    """

    def __init__(self, reason: str, *, warn: bool = False) -> None:
        super().__init__(reason)
        self.warn = warn


class _Aborted(Exception):
    """close() gave up waiting: the job stays pending in the journal for the next process."""


class _Rewritten(Exception):
    """A staged file changed during the upload: the job is skipped (the version handed over is
    gone), and what it sent, if ``sent``, deleted."""

    def __init__(self, detail: str, *, sent: bool = True) -> None:
        super().__init__(detail)
        self.sent = sent


def _drained(thread: threading.Thread, ask: Callable[[threading.Event], None], timeout: float | None) -> bool:
    """Queue a marker on ``thread``'s work (``ask(done)``) and wait up to ``timeout`` seconds for
    it; False when it was not reached in time. A thread that is not running, or stops meanwhile
    (a ``close()`` may stop it before it gets to the marker), or is the caller, is waited no
    longer: what it was asked before is done, or never will be.
    """
    if not thread.is_alive() or threading.current_thread() is thread:
        return True
    done = threading.Event()
    ask(done)
    deadline = None if timeout is None else time.monotonic() + max(0.01, timeout)
    while not done.wait(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))):
        if not thread.is_alive():
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
    return True


class _JournalWriter:
    """Writes each journal line at once (it survives SIGKILL) and leaves the fsync to a thread.

    A plain append costs the caller microseconds; the fsync (milliseconds, sometimes tens) only
    matters for a power loss, so it runs on its own thread and the caller never waits for it.
    Fsyncs asked for while one runs are done as one. The thread also runs ``later(fn)``
    housekeeping that the training thread should not wait for, in order.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="runctl-journal", daemon=True)
        self._thread.start()

    def record(
        self, name: str, state: str, *, wait: bool = False, sync: bool = True, **fields: Any
    ) -> None:
        """Append the line now; fsync it on the thread (``sync=False``: the caller asks later)."""
        try:
            self.journal.record(name, state, sync=False, **fields)
        except Exception as exc:
            log.error("cannot record %s as %s in the journal: %s", name, state, exc)
            if wait:
                raise
            return
        if wait:
            done = threading.Event()
            self._queue.put(("sync", done))
            if not done.wait(60.0):
                raise JournalError(f"journal sync after {name} ({state}) did not finish within 60 s")
        elif sync:
            self.request_sync()

    def request_sync(self) -> None:
        """fsync the lines written so far, on the thread; the caller does not wait."""
        self._queue.put(("sync", None))

    def later(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the journal thread, after everything asked for before it."""
        self._queue.put(("call", fn))

    def drain(self, timeout: float | None) -> None:
        """Wait (up to ``timeout`` seconds) until everything asked for so far is done."""
        if not _drained(self._thread, lambda done: self._queue.put(("sync", done)), timeout):
            log.error("journal thread still busy after %s s", timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            waiting: list[threading.Event | None] = []
            for item in batch:
                if item is None:
                    continue
                kind, arg = item
                if kind == "call":
                    try:
                        arg()
                    except Exception:  # noqa: BLE001 - housekeeping must not stop the journal
                        log.exception("runctl background housekeeping failed")
                else:
                    waiting.append(arg)
            if waiting:
                try:
                    self.journal.sync()
                except Exception as exc:  # noqa: BLE001 - the lines are written; log and go on
                    log.error("cannot sync the journal: %s", exc)
                finally:
                    for done in waiting:
                        if done is not None:
                            done.set()
            if None in batch:
                return

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)


class _Stager:
    """Stages each file opened by ``submit()`` on its own thread, in order (``later(fn)``).

    Not the journal thread: staging may copy a large file (when it cannot be linked), and the
    journal thread's fsyncs, which uploads wait for, must not queue behind that copy.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="runctl-stage", daemon=True)
        self._thread.start()

    def later(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def drain(self, timeout: float | None) -> None:
        """Wait (up to ``timeout`` seconds) until everything asked for so far is done."""
        _drained(self._thread, lambda done: self._queue.put(done.set), timeout)

    def _run(self) -> None:
        while (fn := self._queue.get()) is not None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - one job's staging must not stop the others'
                log.exception("runctl staging failed")

    def close(self, timeout: float = 30.0) -> None:
        """Finish what was asked for, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)


def _overwritten(job: _Job, exc: Superseded) -> _Skip:
    """The skip of a job whose file was written in place since ``submit()`` (``Superseded``).

    Routine for a name saved again and again (the next submit carries the new save); a name
    handed over once and then overwritten is said aloud.
    """
    if job.rewritable:
        return _Skip(f"superseded: {exc}")
    return _Skip(f"{exc}; submit() it again to upload it", warn=True)


def _losing_files(job: _Job) -> bool:
    """Whether files of the directory checkpoint handed over are gone from it (being deleted?)."""
    return any(not os.path.lexists(job.source / rel) for rel in job.inventory or ())


def _still_linked(source: Path, staged: Path) -> bool:
    """True when ``source`` is still the staged inode (so a writer could still change it)."""
    now = stamp_or_none(source)
    return now is not None and now.ino == FileStamp.of(staged).ino


def _open_or_none(path: Path) -> int | None:
    """``open_for_staging``, or None where it fails but a hard link may not (no read permission,
    no file descriptors left): ``submit`` then links at once, as on platforms without fd links."""
    try:
        return open_for_staging(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        log.debug("cannot open %s to stage it later (%s): linking it now", path, exc)
        return None


def _positive(value: float | None, argument: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UsageError(f"{argument} must be a number of seconds > 0 or None (got {value!r})")


def _count(value: int | None, argument: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{argument} must be an integer >= 1 (got {value!r})")


def make_transfer(
    config: S3Config,
    *,
    use_s5cmd: bool = True,
    s5cmd_path: str | None = None,
    stall_timeout: float | None = None,
) -> Transfer:
    """s5cmd with a stall watchdog when available, else boto3 (logged)."""
    if use_s5cmd:
        try:
            return get_transfer(config, s5cmd_path=s5cmd_path, stall_timeout=stall_timeout)
        except BinaryNotFoundError as exc:
            if s5cmd_path or os.environ.get("RUNCTL_S5CMD"):
                raise  # a binary the user named is missing: say so, never guess
            log.warning("%s; falling back to boto3", exc)
    return get_transfer(config, use_s5cmd=False)


class CheckpointUploader:
    """Uploads checkpoints in the background, one at a time in order, then applies keep-last-N.

    ``submit`` costs the caller a stat, an open and a journal line (the hard link into the
    staging area is made from the open file on a staging thread); one worker thread uploads through s5cmd
    (boto3 fallback), verifies sizes, writes a directory's marker last, records each step in
    ``<root>/.runctl/journal.jsonl`` and prunes S3 and local copies (local ones only once durable).

    Args:
        local_root: the directory the framework saves checkpoints in (direct children are submitted).
        s3_url: the prefix they go to (``s3://bucket/run-7/``).
        keep_last_n / local_keep_last_n: retention in S3 / locally (None keeps all).
        failure_policy: "warn" goes on; "raise" makes the next ``submit`` raise ``UploadError``
            after ``max_consecutive_failures`` failures in a row or a backlog above ``max_backlog``.
        retry: a ``RetryPolicy``; ``stall_timeout`` stops a transfer with no bytes moving (s5cmd);
            ``checkpoint_timeout`` abandons one attempt that runs longer and retries it.
        resume: replay the journal and re-queue what a previous process left pending.
        transfer: an explicit backend (tests); otherwise built from config/endpoint/profile/region.
        hold_retention: apply no retention (none at start, none after an upload) until
            ``release_retention()``: for a framework that learns which checkpoint the run resumed
            from only after the uploader starts, so retention never deletes it first.

    Example:
        >>> with CheckpointUploader("checkpoints/", "s3://bucket/run-7/", keep_last_n=5) as up:  # doctest: +SKIP
        ...     up.submit("checkpoints/step_100.pt")
    """

    def __init__(
        self,
        local_root: str | os.PathLike[str],
        s3_url: str | S3URL,
        *,
        keep_last_n: int | None = None,
        local_keep_last_n: int | None = None,
        config: S3Config | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        region: str | None = None,
        use_s5cmd: bool = True,
        s5cmd_path: str | None = None,
        patterns: Sequence[str] | None = None,
        max_queue: int = 64,
        retry: RetryPolicy | None = None,
        stall_timeout: float | None = 60.0,
        checkpoint_timeout: float | None = None,
        failure_policy: str = "warn",
        max_consecutive_failures: int = 3,
        max_backlog: int | None = None,
        on_uploaded: Callable[[UploadOutcome], None] | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        resume: bool = True,
        transfer: Transfer | None = None,
        hold_retention: bool = False,
    ) -> None:
        root = Path(local_root)
        if root.exists() and not root.is_dir():
            raise UsageError(f"local_root must be a directory (got {str(root)!r}, which is a file)")
        url = s3_url if isinstance(s3_url, S3URL) else S3URL.parse(str(s3_url))
        check_keep_last_n(keep_last_n, "keep_last_n")
        check_keep_last_n(local_keep_last_n, "local_keep_last_n")
        if keep_last_n is not None and url.is_bucket:
            # Retention there deleted checkpoints no run of this uploader wrote (another team's
            # step_3.pt), where the CLI asks for --yes-bucket-root (API pass).
            raise UsageError(
                f"keep_last_n at a bucket root ({url.as_prefix()}) would apply to every checkpoint "
                "in the bucket: give the run a prefix, such as "
                f"{url.as_prefix().join('run-1/')}"
            )
        _count(max_queue, "max_queue")
        _count(max_consecutive_failures, "max_consecutive_failures")
        _count(max_backlog, "max_backlog", allow_none=True)
        _positive(stall_timeout, "stall_timeout")
        _positive(checkpoint_timeout, "checkpoint_timeout")
        if failure_policy not in FAILURE_POLICIES:
            raise UsageError(f"failure_policy must be 'warn' or 'raise' (got {failure_policy!r})")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise UsageError(f"retry must be a RetryPolicy or None (got {retry!r})")
        if patterns is not None:
            is_recognised("x", patterns)  # a bad pattern fails here, naming itself

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._root_abs = kernel_abspath(root)
        self._root_real = os.path.realpath(root)
        self.prefix = url.as_prefix()
        self.keep_last_n = keep_last_n
        self.local_keep_last_n = local_keep_last_n
        self.patterns = patterns
        self.max_queue = max_queue
        self.retry = retry or RetryPolicy()
        self.checkpoint_timeout = checkpoint_timeout
        self.failure_policy = failure_policy
        self.max_consecutive_failures = max_consecutive_failures
        self.max_backlog = max_backlog
        self.on_uploaded = on_uploaded
        self.on_error = on_error
        self._pid = os.getpid()  # a fork's copy has no worker thread: submit() refuses there
        self._quiet_timeouts = False  # close(quiet=True): its caller says why it stopped waiting

        self._owns_transfer = transfer is None
        if transfer is None:
            config = config or resolve_config(endpoint_url, profile, region)
            transfer = make_transfer(
                config, use_s5cmd=use_s5cmd, s5cmd_path=s5cmd_path, stall_timeout=stall_timeout
            )
        self.transfer = transfer
        self.journal = Journal(root)
        self._journal = _JournalWriter(self.journal)
        self._journal_compacted_to = 0  # its size after this uploader last compacted it
        self._stager = _Stager()
        self.staging = StagingArea(root)

        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._in_flight: _Job | None = None
        # Pins outlive the run: files under root/.runctl/ (runctl.pins), the truth for every
        # process on the directory, and objects <prefix>.runctl/pinned/<name> that the worker
        # writes (``_send_pins``). ``_pinned`` is what the files said when last read.
        # A pin is the prefix's: the same prefix however the endpoint is spelled (see "Left").
        self._pins = LocalPins(root, str(self.prefix))
        self._pinned: set[str] = self._pins.names()
        self._pins_changed = 0  # counts protect()/unprotect() calls: a re-read never undoes one
        self._pins_due = bool(self._pins.unsent() or self._pins.unpins())  # a killed run's
        #: Kept by retention for this run only (``protect(name, persist=False)``), and pins
        #: whose file could not be written (a full disk): a re-read of the files would drop them.
        self._kept_for_run: set[str] = set()
        self._unwritten_pins: set[str] = set()
        self._best: str | None = None
        self._resumed_from: str | None = None
        self._failures: dict[str, BaseException] = {}  # not yet raised from flush/close
        #: Failed jobs held (staged copy and all) for another round once a later one lands.
        self._failed_jobs: list[_Job] = []
        #: When each name's newest version was submitted: an older one must never land after it.
        self._newest_queued: dict[str, float] = {}
        #: Names skipped as moot in this run: what an interrupted upload left of them in S3 is
        #: retention's to delete, even once the local copy is gone (the journal then forgets).
        self._moot_names: set[str] = set()
        # Steps with a file sent (or being sent) in this run: their other files are never let go
        # as moot, or S3 would show the step torn (a crash before the newer steps land).
        self._started_positions: set[tuple[float, ...]] = set()
        self._timed_out_with: list[str] = []  # what the last timed-out flush left pending
        self._last_failure: tuple[str, BaseException] | None = None
        self._consecutive = 0
        #: When a checkpoint last landed, a byte moved or a local step of an upload ended (monotonic).
        self._last_progress = time.monotonic()
        self._superseded: dict[str, tuple[int, float]] = {}
        self._submitted_names: set[str] = set()
        self._verified_keys: list[tuple[int, int, float]] = []
        self._stats: dict[str, float] = {
            "uploaded": 0,
            "bytes": 0,
            "seconds": 0.0,
            "retries": 0,
            "failures": 0,
            "skipped": 0,
            "retention_errors": 0,
        }
        self._inflight_bytes = 0
        self._stopping = False
        self._closed = False
        self._closing = False  # close() has begun: no more submits (it may still be flushing)
        self._abort = threading.Event()
        self._timed_out = threading.Event()
        self._run_retention_first = False
        # On hold, retention only notes that it is due; release_retention() has the worker run it.
        self._retention_held = hold_retention
        self._retention_due = False
        self._retention_busy = False
        #: Local deletions: held while the framework saves (pause_local_deletions), and the
        #: lock one holds while it deletes.
        self._local_paused = False
        self._local_skipped = False
        self._local_deleting = threading.Lock()
        #: What retention found locked by another process on its last pass (S3 prefix, root).
        self._retention_blocked_on: list[str] = []
        self._outranked_warned = False  # _warn_if_outranked says it once
        self._left_pending: tuple[str, ...] = ()  # after a close that gave up: for the next process
        #: Handles of the uploads resumed from the journal at start-up (left by an earlier process).
        self.resumed: tuple[UploadHandle, ...] = ()

        self._mark = mark_uploader(self.root)
        others = other_uploaders(self.root) if self._mark is not None else []
        if others:  # as Lightning's "checkpoint directory exists and is not empty"
            log.warning(
                "another process (pid %s) is uploading checkpoints from %s too: two runs saving "
                "into one directory overwrite each other's checkpoints, here and in S3; give "
                "each run a directory (and an S3 prefix) of its own",
                ", ".join(map(str, others)),
                self.root,
            )
        if resume:
            try:
                self._resume()
            except BaseException:
                if self._mark is not None:
                    self._mark.remove()
                raise
        self._worker = threading.Thread(target=self._work, name="runctl-uploader", daemon=True)
        self._worker.start()
        _register_exit_hook(self)

    # -- public API ---------------------------------------------------------------------------

    def submit(
        self, path: str | os.PathLike[str], *, step: int | None = None, protect: bool = False
    ) -> UploadHandle:
        """Hand over a checkpoint (file or directory directly inside the root); returns at once.

        The caller's thread stats it, opens a file and appends one journal line; a staging
        thread hard-links that open file into ``.runctl/staging/`` (a link can wait tens of ms
        on a busy disk), or copies it if it has been deleted or replaced by then, so the staged
        file is the version handed over, then has the line fsynced and wakes the worker: the
        caller's thread wakes that one thread only, as its last step. The worker does the rest.
        One window is left: a process killed before that link is made (normally well under a
        millisecond after ``submit`` returns) whose file was also deleted in it cannot resume
        that upload.

        Raises:
            UsageError: the path does not exist or is not directly inside the root; the uploader is closed.
            UploadError: with ``failure_policy="raise"``, after too many failures or too large a
                backlog; it names the checkpoints and the S3 error that caused it.

        Example:
            >>> handle = up.submit("checkpoints/step_100.pt", step=100)  # doctest: +SKIP
        """
        if self._closed or self._closing:
            raise UsageError("submit() called after close(): this uploader is closed")
        if os.getpid() != self._pid:
            # A forked worker's submit() was taken and journaled, and no thread there ever sent
            # it: its result() waited for good, and the parent's close() never knew (API pass).
            raise UsageError(
                f"submit() in a forked process: this uploader works in process {self._pid}; "
                "submit from there, or make an uploader in this process"
            )
        absolute = kernel_abspath(path)  # dd/l/../ckpt is where the kernel says, not dd/ckpt
        parent, name = os.path.split(absolute)
        # The same string as the root needs no lookup (realpath is an lstat per component).
        if parent != self._root_abs and os.path.realpath(parent) != self._root_real:
            raise UsageError(
                f"submit path must be directly inside the uploader's root {str(self.root)!r} (got {str(path)!r})"
            )
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise UsageError(f"step must be an integer or None (got {step!r})")
        if not_utf8(name):
            raise UsageError(f"cannot submit {str(path)!r}: {NOT_UTF8}")
        if name == ".runctl" or name.startswith(".runctl-tmp-"):
            # `for p in root.iterdir(): up.submit(p)` handed over the state directory: its
            # staging linked into itself until the path was too long, and the job failed in
            # this run and every later one that resumed it (API pass).
            raise UsageError(f"cannot submit {str(path)!r}: it is runctl's own, not a checkpoint")
        src = Path(absolute)
        self._check_failure_policy()
        try:
            st = os.stat(absolute)
        except FileNotFoundError:
            raise UsageError(f"cannot submit {str(path)!r}: it does not exist") from None
        is_dir = stat_module.S_ISDIR(st.st_mode)
        if not is_dir and not stat_module.S_ISREG(st.st_mode):
            raise UsageError(f"cannot submit {str(path)!r}: not a regular file or directory")
        if is_dir and dir_awaits_hf_sign(src):
            raise UsageError(
                f"cannot submit {str(path)!r}: it holds {HF_ARGS} but no {HF_SIGN}, which the "
                "Hugging Face Trainer writes last (its save is unfinished, or was cut short)"
            )
        token = f"{os.getpid()}-{next(_ids)}"
        staged = None
        held = None
        inventory = tree_inventory(src) if is_dir else None
        try:
            if not is_dir and FD_LINKS and stat_module.S_ISREG(st.st_mode):
                held = _open_or_none(src)
            if held is not None:
                st = os.fstat(held)  # the version that will be staged, even if src was replaced
            elif not is_dir:
                staged = self.staging.link_file(src, token)
        except FileNotFoundError:
            raise UsageError(f"cannot submit {str(path)!r}: it was deleted while submitting") from None
        parsed_step, epoch = parse_step(name)
        job = _Job(
            token=token,
            name=name,
            source=src,
            is_dir=is_dir,
            step=parsed_step if step is None else step,
            epoch=epoch,
            queued_at=time.time(),
            stamp=FileStamp.from_stat(st),
            handle=UploadHandle(name),
            staged=staged,
            inventory=inventory,
            rewritable=is_alias(name) or name in self._submitted_names,
            staging_done=None if held is None else threading.Event(),
        )
        self._submitted_names.add(name)
        # A file staged on the staging thread wakes one thread, that one, and last: it asks for
        # the journal's fsync and wakes the worker once the file is staged (the worker could
        # only wait for it anyway). A thread woken while this one still has system calls to
        # make takes the GIL, or this one's core, for milliseconds on a busy machine.
        try:
            if protect:  # before the journal line: a kill after it still finds the pin
                self._pin_file(name)
            self._journal.record(
                name,
                "queued",
                sync=held is None,
                time=job.queued_at,
                size=None if is_dir else st.st_size,
                mtime=st.st_mtime,
                s3_url=str(self._url_of(name, is_dir)),
            )
            with self._cond:
                if self._closed or self._closing:  # close() ran on another thread since the check above
                    raise UsageError(
                        f"submit() of {name!r} raced close(): this uploader is closed "
                        "(its journal line stays pending for the next run)"
                    )
                if protect:
                    self._pinned.add(name)
                    self._pins_changed += 1
                    self._pins_due = True
                try:
                    self._enqueue(job, wake=held is None)
                except BaseException:
                    # Interrupted while the queue was full (Ctrl-C in the wait): take the job
                    # back, or the worker would wait for a staging no one asked for; so would
                    # the journal thread, had the wait's pruning cancelled it meanwhile.
                    if job in self._queue:
                        self._queue.remove(job)
                    if job.staging_done is not None:
                        job.staging_done.set()
                    raise
                if held is not None:
                    # Under the lock: a close() after this stops the staging thread only once
                    # it has staged this file (and closed the descriptor, which it now owns).
                    fd, held = held, None
                    self._stager.later(lambda: self._stage_open(job, fd))
        finally:
            if held is not None:
                os.close(held)
        return job.handle

    def protect(self, name: str, *, persist: bool = True) -> None:
        """Pin a checkpoint name: retention keeps it in S3 and locally, in later runs too.

        The pin is a file ``root/.runctl/pinned/<name>``, written now, and an empty object
        ``<prefix>.runctl/pinned/<name>`` (``checkpoints.pin_url``), written by the worker at
        once when idle (else after the upload under way): from then on every later retention,
        on any node, and both cleanups keep what it names. ``persist=False`` keeps it for this
        run only.

        Example:
            >>> up.protect("step_0.pt")  # doctest: +SKIP
        """
        name = _base(name)
        if not persist:
            with self._cond:
                self._kept_for_run.add(name)
            return
        self._pin_file(name)
        with self._cond:
            self._pinned.add(name)
            self._pins_changed += 1
            self._pins_due = True
            self._cond.notify_all()

    def unprotect(self, name: str) -> None:
        """Unpin a checkpoint name (``protect``): its pin file goes now, its object in S3 as the
        worker gets to it (a later run does, if this one is killed first).

        Example:
            >>> up.unprotect("step_0.pt")  # doctest: +SKIP
        """
        name = _base(name)
        try:
            self._pins.unpin(name)
        except OSError as exc:
            log.warning("could not write the unpin of %s in %s: %s", name, self.root, exc)
        with self._cond:
            self._pinned.discard(name)
            self._kept_for_run.discard(name)
            self._unwritten_pins.discard(name)
            self._pins_changed += 1
            self._pins_due = True
            self._cond.notify_all()

    def _pin_file(self, name: str) -> None:
        """Write ``name``'s pin file, a failure only logged: the run keeps the name either way."""
        try:
            self._pins.pin(name)
        except OSError as exc:
            log.warning(
                "could not write the pin of %s in %s (%s): kept for this run only", name, self.root, exc
            )
            with self._cond:
                self._unwritten_pins.add(name)
        else:
            with self._cond:
                self._unwritten_pins.discard(name)

    def set_best(self, name: str | None) -> None:
        """The framework's best checkpoint (protected from retention); None clears it."""
        with self._cond:
            self._best = _base(name) if name else None

    def set_resumed_from(self, name: str | None) -> None:
        """The checkpoint this run resumed from (protected from retention); None clears it."""
        with self._cond:
            self._resumed_from = _base(name) if name else None

    def hold_retention(self) -> None:
        """Apply no retention until ``release_retention()``, as ``hold_retention=True`` does at start.

        For a framework that starts training again on a running uploader (a second ``train()``
        after one that raised) and learns what it resumed from only later. A retention pass
        already under way finishes.
        """
        with self._cond:
            self._retention_held = True

    def pause_local_deletions(self, timeout: float = 10.0) -> None:
        """Delete nothing locally until ``resume_local_deletions()``; a deletion under way is
        waited for (up to ``timeout`` s).

        For a framework that lists its checkpoint directories itself as it saves: the Hugging
        Face Trainer globs ``checkpoint-*`` and then reads each one's time, and a deletion of
        runctl's in between failed the save with FileNotFoundError (HF pass).

        Example:
            >>> up.pause_local_deletions(); trainer_saves(); up.resume_local_deletions()  # doctest: +SKIP
        """
        self._local_paused = True
        if self._local_deleting.acquire(timeout=timeout):
            self._local_deleting.release()

    def resume_local_deletions(self) -> None:
        """End ``pause_local_deletions``: what it put off runs on the worker thread."""
        with self._cond:
            if not self._local_paused:
                return
            self._local_paused = False
            if self._local_skipped:
                self._local_skipped = False
                self._retention_due = True
                self._cond.notify_all()

    def release_retention(self) -> None:
        """End ``hold_retention``: retention due meanwhile runs now, on the worker thread.

        Example:
            >>> up = CheckpointUploader("ckpt/", "s3://b/run/", keep_last_n=3, hold_retention=True)  # doctest: +SKIP
            >>> up.set_resumed_from("step_40.pt"); up.release_retention()  # doctest: +SKIP
        """
        with self._cond:
            if not self._retention_held:
                return
            self._retention_held = False
            self._cond.notify_all()

    def flush(self, timeout: float | None = None, *, failing_timeout: float | None = None) -> None:
        """Wait until every submitted checkpoint is uploaded, skipped or failed.

        Logs progress every ~10 s while it waits. ``failing_timeout``: stop waiting, as for
        ``timeout``, once nothing has reached S3 for that many seconds (no checkpoint landed, no
        byte moved): an unreachable or hung S3 need not hold up a training error or an exit
        for ``timeout``.

        Raises:
            FlushTimeout: ``timeout`` (or ``failing_timeout``) seconds passed; it names what is
                still pending, which stays in the journal for the next run.
            UploadError: one error naming every checkpoint that failed since the last flush.

        Example:
            >>> uploader.flush(timeout=600, failing_timeout=30)  # doctest: +SKIP
        """
        _positive(timeout, "timeout")
        _positive(failing_timeout, "failing_timeout")
        self._wait_idle(timeout, failing_timeout)
        with self._cond:
            failures, self._failures = self._failures, {}
            self._timed_out_with = []  # all done: a later timeout is news again
        if failures:
            errors: dict[str, BaseException | str] = dict(failures)
            raise UploadError(errors) from next(reversed(failures.values()))

    def wait_idle(self, timeout: float | None = None, *, failing_timeout: float | None = None) -> bool:
        """Wait as ``flush`` does, for a second waiter: True once nothing is pending (or the
        uploader is closed), False when the time ran out. Reports nothing and raises nothing:
        failures stay for ``flush`` to report.

        Example:
            >>> uploader.wait_idle(timeout=60, failing_timeout=30)  # doctest: +SKIP
            True
        """
        try:
            self._wait_idle(timeout, failing_timeout, quiet=True)
        except RunctlError:
            return self._closed or not self._worker.is_alive()
        return True

    def _wait_idle(self, timeout: float | None, failing_timeout: float | None, *, quiet: bool = False) -> None:
        """The waiting of ``flush``. Raises FlushTimeout, or UploadError if the worker died."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        next_log = time.monotonic() + PROGRESS_EVERY
        with self._cond:
            self._prune_queue()
            while (
                self._queue
                or self._in_flight is not None
                or self._retention_busy
                or self._retention_released()
            ):
                if not self._worker.is_alive():
                    raise UploadError(
                        {
                            n: "the uploader's worker thread is not running"
                            for n in self._pending_names()
                        }
                    )
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    pending = self._pending_names()
                    self._log_timeout(
                        quiet,
                        pending,
                        "flush timed out after %g s with %d pending: %s",
                        timeout,
                        len(pending),
                        ", ".join(pending),
                    )
                    raise FlushTimeout(pending, dict(self._failures))
                moved = now  # the last sign of progress, when failing_timeout asks for it
                if failing_timeout is not None:
                    moved = max(self._last_progress, started, self._transfer_active_at())
                    if now - moved >= failing_timeout:
                        pending = self._pending_names()
                        self._log_timeout(
                            quiet,
                            pending,
                            "stopped waiting: nothing has reached S3 for %.0f s (failing or "
                            "hung); %d pending stay in the journal for the next run: %s",
                            now - moved,
                            len(pending),
                            ", ".join(pending),
                        )
                        raise FlushTimeout(pending, dict(self._failures))
                if now >= next_log and not quiet:
                    self._log_progress()
                    next_log = now + PROGRESS_EVERY
                wait = next_log - now if deadline is None else min(deadline - now, next_log - now)
                if failing_timeout is not None:
                    # Woken at least every second: s5cmd's progress is only seen by asking.
                    wait = min(wait, moved + failing_timeout - now, 1.0)
                self._cond.wait(max(0.01, wait))
        # Skipped saves are finished on the journal thread, some after their staging (see
        # _cancel): wait for them too.
        self._stager.drain(None if deadline is None else deadline - time.monotonic())
        self._journal.drain(None if deadline is None else deadline - time.monotonic())

    def _log_timeout(self, quiet: bool, pending: list[str], message: str, *args: object) -> None:
        """An error line for a flush that ran out of time; a debug line when the one before
        left the same checkpoints pending (``close`` after a timed-out ``flush``); none for a
        quiet waiter (``wait_idle``)."""
        if quiet:
            return
        quiet_close = self._quiet_timeouts
        level = logging.DEBUG if quiet_close or pending == self._timed_out_with else logging.ERROR
        self._timed_out_with = pending
        log.log(level, message, *args)

    def _transfer_active_at(self) -> float:
        """When the transfer last moved a byte, as far as it can tell (0.0: it cannot).

        s5cmd reports a file only once it is done: for a large one, its process's I/O counters
        are the only sign of life (boto3's progress callbacks reach ``_progress``).
        """
        active_at = getattr(self.transfer, "active_at", None)
        return (active_at() or 0.0) if callable(active_at) else 0.0

    def close(
        self, timeout: float | None = None, *, failing_timeout: float | None = None, quiet: bool = False
    ) -> None:
        """``flush(timeout, failing_timeout=...)``, then stop the worker. Raises like ``flush``; idempotent.

        ``quiet``: no error line when the time runs out; the caller says what happened (after a
        Ctrl-C, "flush timed out after 1 s" named a timeout nobody had set; Lightning pass).

        Example:
            >>> uploader.close(timeout=600)  # doctest: +SKIP
        """
        if self._closed:
            return
        self._quiet_timeouts = quiet
        # Checked before anything stops: close(timeout=0) raised UsageError from its flush after
        # the shutdown, and the corrected close(timeout=60) then returned at once, every queued
        # checkpoint left unsent (API pass).
        _positive(timeout, "timeout")
        _positive(failing_timeout, "failing_timeout")
        with self._cond:
            # A submit() from another thread while the flush drains would be taken and then
            # abandoned at the stop, close() returning as if all had landed (uploader review).
            self._closing = True
        try:
            self.flush(timeout, failing_timeout=failing_timeout)
        finally:
            self._shutdown()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has finished: nothing more is taken or sent."""
        return self._closed

    def status(self) -> UploaderStatus:
        """The counters so far (cheap; safe from any thread)."""
        with self._cond:
            s = self._stats
            seconds = float(s["seconds"])
            return UploaderStatus(
                uploaded=int(s["uploaded"]),
                bytes_uploaded=int(s["bytes"]),
                seconds=seconds,
                throughput=(s["bytes"] / seconds) if seconds > 0 else 0.0,
                queue_depth=len(self._queue),
                in_flight=self._in_flight.name if self._in_flight else None,
                retries=int(s["retries"]),
                failures=int(s["failures"]),
                skipped=int(s["skipped"]),
                pending=tuple(self._pending_names()) if not self._closed else self._left_pending,
                retention_errors=int(s["retention_errors"]),
            )

    def __enter__(self) -> CheckpointUploader:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # The block already failed: stop without hiding its error behind ours, and without
        # waiting out every retry of an S3 that is failing or hung (the rest stays journaled).
        try:
            self.close(failing_timeout=FAILING_TIMEOUT)
        except RunctlError as err:
            log.error("while handling another error, uploads failed: %s", err)

    def __repr__(self) -> str:
        return f"CheckpointUploader({str(self.root)!r} -> {self.prefix})"

    # -- caller side --------------------------------------------------------------------------

    def _url_of(self, name: str, is_dir: bool) -> S3URL:
        return self.prefix.join(name + "/") if is_dir else self.prefix.join(name)

    def _pending_names(self) -> list[str]:
        """Each name waiting once: a save resumed from the journal and its newer save queued
        behind it read "2 pending: step_2.pt, step_2.pt" (README walkthrough)."""
        names = [self._in_flight.name] if self._in_flight else []
        return list(dict.fromkeys(names + [j.name for j in self._queue]))

    def _check_failure_policy(self) -> None:
        if self._consecutive < self.max_consecutive_failures and self.max_backlog is None:
            return  # nothing to check: no lock taken (a stale count only delays this one submit)
        with self._cond:
            backlog = len(self._queue) + (1 if self._in_flight else 0)
            too_many = self._consecutive >= self.max_consecutive_failures
            too_far = self.max_backlog is not None and backlog > self.max_backlog
            if not (too_many or too_far):
                return
            if too_many:
                why = f"{self._consecutive} consecutive checkpoint uploads failed"
            else:
                why = f"upload backlog {backlog} exceeds max_backlog={self.max_backlog}"
            if self.failure_policy == "warn":
                log.warning("%s; training goes on (failure_policy='warn')", why)
                return
            failures: dict[str, BaseException | str] = dict(self._failures)
            if self._last_failure and self._last_failure[0] not in failures:
                failures[self._last_failure[0]] = self._last_failure[1]
            if too_far:
                failures.setdefault("backlog", why)
            cause = self._last_failure[1] if self._last_failure else None
        err = UploadError(failures)
        err.args = (f"{why}: {err}",)
        raise err from cause

    def _enqueue(self, job: _Job, *, wake: bool = True) -> None:
        for old in list(self._queue):
            if old.name == job.name:
                self._cancel(old, f"superseded by a newer submit of {job.name}")
        self._newest_queued[job.name] = max(job.queued_at, self._newest_queued.get(job.name, 0.0))
        self._failures.pop(job.name, None)  # an older version's failure: this one is the news now
        for old in [j for j in self._failed_jobs if j.name == job.name]:
            # The newer version is what counts now: the old one must never land after it.
            self._failed_jobs.remove(old)
            self._failures.pop(old.name, None)
            self._journal.later(functools.partial(self._release, old))
        self._queue.append(job)
        self._prune_queue()
        if len(self._queue) > self.max_queue:
            log.warning(
                "upload queue is full (%d checkpoints, max_queue=%d): training waits for the uploader",
                len(self._queue),
                self.max_queue,
            )
            while (
                len(self._queue) > self.max_queue
                and not self._abort.is_set()
                and self._worker_alive()
            ):
                self._cond.wait(1.0)
                self._prune_queue()
        if wake:
            self._cond.notify_all()

    def _worker_alive(self) -> bool:
        worker = getattr(self, "_worker", None)
        return worker is None or worker.is_alive()

    def _pinned_names(self) -> set[str]:
        """Pinned, the best, and the one the run resumed from: never let go as moot."""
        return (
            self._pinned
            | self._kept_for_run
            | self._unwritten_pins
            | {n for n in (self._best, self._resumed_from) if n}
        )

    def _protected(self) -> set[str]:
        return self._pinned_names() | set(self._pending_names())

    def _has_newer_version(self, job: _Job) -> bool:
        """A newer version of ``job``'s name was submitted since (call under ``_cond``)."""
        return self._newest_queued.get(job.name, job.queued_at) > job.queued_at

    def _prune_queue(self) -> None:
        """Skip queued checkpoints that S3 retention would delete anyway (promise 9)."""
        if self.keep_last_n is None:
            return
        protected = self._pinned_names()
        active = [j for j in (*self._queue, *self._failed_jobs) if not is_alias(j.name)]
        if self._in_flight is not None and not is_alias(self._in_flight.name):
            active.append(self._in_flight)
        # Checkpoints saved at one step (net_g_5000.pth, net_d_5000.pth) count once, as in retention.
        positions = sorted({_position(j.order_key()) for j in active}, reverse=True)
        kept = set(positions[: self.keep_last_n])
        doomed = [j for j in active if _position(j.order_key()) not in kept]
        in_flight_at = None if self._in_flight is None else _position(self._in_flight.order_key())
        for job in doomed:
            if job is self._in_flight or job.name in protected:
                continue
            at = _position(job.order_key())
            if at == in_flight_at or at in self._started_positions:
                continue  # a partner of a file on its way or landed: the step goes up whole
            if not is_recognised(job.name, self.patterns):
                continue
            self._cancel(job, f"{MOOT} ({_newer(self.keep_last_n)} queued)")

    def _cancel(self, job: _Job, reason: str) -> None:
        # Called with the lock held (an RLock), for a job still in the queue or held after a
        # failure, often from submit() on the training thread: the counters change now, but
        # the journal line and the unlink of the staged copy (each up to ~20 ms while the disk
        # is busy) go to the journal thread. flush() waits for them.
        if job in self._failed_jobs:  # it need not wait for S3 any more
            self._failed_jobs.remove(job)
            self._failures.pop(job.name, None)
            job.handle = UploadHandle(job.name)  # the first one has its failure
        else:
            self._queue.remove(job)
        job.cancelled = reason
        if reason.startswith(MOOT):  # now, not once the journal thread writes it: a retention
            self._moot_names.add(job.name)  # under way must not count its step as whole
        self._note_skip(job)
        finish = lambda: self._journal.later(lambda: self._finish_skip(job, reason))  # noqa: E731
        if job.staging_done is not None and not job.staging_done.is_set():
            # Its staging is queued: the journal thread must not wait for it (behind another
            # job's copy), so the finish is handed over once the stager has done it.
            self._stager.later(finish)
        else:
            finish()
        self._cond.notify_all()

    def _stage_open(self, job: _Job, fd: int) -> None:
        # On the staging thread, right after submit(): link the opened file, or copy it at once
        # when it cannot be linked (deleted or replaced since submit: no name left; no space;
        # no hard links here), so a crash after this leaves a staged copy to resume from.
        assert job.staging_done is not None
        try:
            try:
                job.staged = self.staging.link_open_file(fd, job.source, job.token)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot hard-link %s into the staging area (%s): copying it", job.name, exc)
            if job.staged is None and not (job.cancelled or self._abort.is_set()):
                job.staged = self.staging.copy_open_file(fd, job.source, job.token).path
        except OSError as exc:
            job.staging_error = exc
        finally:
            os.close(fd)
            # submit() queued the job before it asked for this: have its line fsynced, wake the worker.
            self._journal.request_sync()
            with self._cond:
                job.staging_done.set()
                self._cond.notify_all()

    def _await_staging(self, job: _Job) -> None:
        """Wait for ``_stage_open``; then ``job.staged`` is the link or the copy."""
        if job.staging_done is None:
            return
        while not job.staging_done.wait(0.5):
            if self._abort.is_set():
                raise _Aborted()
        if isinstance(job.staging_error, SnapshotError):
            raise _Skip(str(job.staging_error))
        if job.staging_error is not None:
            raise job.staging_error  # reported as this checkpoint's failure, never dropped

    def _private_copy(self, job: _Job) -> Snapshot:
        # A name saved again and again (last.ckpt, latest.pt) may be rewritten in place while it
        # uploads, and a hard link shares that inode: upload from a private copy instead, so S3
        # never holds a mix of two versions.
        assert job.staged is not None
        try:
            snapshot = self.staging.copy_file(job.staged, f"{job.token}-copy", job.stamp)
        except Superseded as exc:
            raise _overwritten(job, exc) from None
        except SnapshotError as exc:
            raise _Skip(str(exc)) from None
        job.copy_token = f"{job.token}-copy"
        return snapshot

    def _release(self, job: _Job) -> None:
        if job.staging_done is not None:
            # A save cancelled while queued: its staging (one link; no copy once cancelled)
            # must be done before its slot is removed, or the slot would come back after.
            job.staging_done.wait()
        if job.copy_token:
            self.staging.release(job.copy_token)
        self.staging.release(job.token)
        if job.adopted:
            self.staging.release(job.adopted)

    # -- resume -------------------------------------------------------------------------------

    def _resume(self) -> None:
        # Failed ones too: an upload that used up its retries in an earlier process (an outage
        # during a final flush) still has its local copy, and S3 may be back.
        self._compact_if_grown()  # once past COMPACT_ABOVE: each retention re-reads it
        try:
            snapshot: JournalSnapshot | None = self.journal.snapshot()
        except JournalError as exc:
            log.error("cannot replay the journal, nothing resumed: %s", exc)
            snapshot = None
        pending = snapshot.pending(failed=True) if snapshot is not None else []
        keep: set[str] = set()
        for entry in pending:
            found = self._resume_source(entry)
            if found is None:
                continue
            source, st = found
            is_dir = source.is_dir()
            token = f"{os.getpid()}-{next(_ids)}"
            staged_link = None if is_dir else self.staging.link_file(source, token)
            adopted = source.parent.name if source.parent.parent == self.staging.dir else None
            step, epoch = parse_step(entry.name)
            job = _Job(
                token,
                entry.name,
                source,
                is_dir,
                step,
                epoch,
                entry.time if entry.version is None else entry.version,  # when it was queued
                FileStamp.from_stat(st),
                UploadHandle(entry.name),
                staged_link,
                resumed=True,
                adopted=adopted,
                resumed_version=self._dir_version(source) if is_dir else None,
            )
            keep.add(token)
            if adopted:
                keep.add(adopted)
            self._queue.append(job)
            self.resumed += (job.handle,)
            log.info("resuming the upload of %s (left pending by an earlier run)", entry.name)
        if snapshot is not None:
            self._seed_superseded(snapshot)
        removed = self.staging.cleanup_orphans(keep)
        if removed:
            log.info("removed %d stale staging slot(s) from an earlier run", removed)
        self._run_retention_first = (
            self.keep_last_n is not None or self.local_keep_last_n is not None
        )

    def _resume_source(self, entry: JournalEntry) -> tuple[Path, os.stat_result] | None:
        """Where the version a journal line left pending is now: the local file, else a staged
        copy of it; None (said, and journaled as skipped) when it is gone.

        A file must still be the size and mtime its line recorded: one written in place since (a
        run killed in the middle of its next save over it) is another version, perhaps half
        written, and never goes up for the one handed over.
        """
        local = self.root / entry.name
        candidates = [local] if os.path.lexists(local) else []
        # Every staged copy: the newest may be the hard link that shares the file written over,
        # while an older private copy still holds the version handed over (diff review).
        candidates += self.staging.find_all(entry.name)
        if not candidates:
            log.warning("cannot resume the upload of %s: the local copy is gone", entry.name)
            self._journal.record(entry.name, "skipped", detail="local copy gone before upload (resume)")
            return None
        changed = None
        for source in candidates:
            try:
                st = os.stat(source)
            except OSError as exc:
                log.warning("cannot resume the upload of %s: %s", entry.name, exc)
                return None
            if (
                stat_module.S_ISDIR(st.st_mode)
                or entry.size is None
                or entry.mtime is None
                or entry.matches(st.st_size, st.st_mtime)
            ):
                return source, st
            changed = changed or st
        assert changed is not None
        log.warning(
            "cannot resume the upload of %s: it was written over since it was handed over "
            "(%d bytes then, %d now): the version handed over is gone, and the one there now was "
            "never handed over (save it again to upload it)",
            entry.name,
            entry.size,
            changed.st_size,
        )
        self._journal.record(
            entry.name, "skipped", detail="written over since it was handed over (resume)"
        )
        return None

    def _dir_version(self, path: Path) -> tuple[int, float] | None:
        """A resumed directory's version as local retention sees it (None: not one of ours).

        Read when it is resumed, before this run can save the name again: a version read at
        skip time could be a newer save's, which a skip must never vouch for.
        """
        if path.parent != self.root:
            return None
        try:
            cp = local_checkpoint(path, self.root)
        except OSError:
            return None
        return cp.size, cp.mtime

    def _seed_superseded(self, snapshot: JournalSnapshot) -> None:
        """What earlier runs skipped, and what they made durable, as if this run had seen it.

        A checkpoint skipped because a newer one made it moot is never uploaded: local retention
        lets it go once a newer one is durable (``_superseded_and_covered``). Without this, one
        skipped before a restart would stay on disk for good.
        """
        verified = snapshot.verified_versions()
        with self._cond:
            for entry in snapshot.latest.values():
                if entry.state == "skipped" and entry.size is not None and entry.mtime is not None:
                    self._superseded[entry.name] = (entry.size, entry.mtime)
            for entry in verified:
                if entry.mtime is None:
                    continue
                self._verified_keys.append((*step_order(entry.name), entry.mtime))

    # -- worker -------------------------------------------------------------------------------

    def _work(self) -> None:
        if self._run_retention_first:
            self._retention(None)
        while True:
            with self._cond:
                retry = pins_only = False
                while (
                    not self._queue
                    and not self._stopping
                    and not self._retention_released()
                    and not self._pins_due
                ):
                    if not self._retention_blocked_on:
                        self._cond.wait()
                    elif not self._cond.wait(LOCK_RETRY_EVERY):
                        retry = True
                        break
                if (retry or self._retention_released()) and not self._abort.is_set():
                    self._retention_due = False
                    self._retention_busy = True
                    job = None
                elif self._pins_due and not self._queue and not self._stopping and not self._abort.is_set():
                    self._retention_busy = True  # (protect() or unprotect() while idle)
                    job = None
                    pins_only = True
                elif not self._queue or self._abort.is_set():
                    final = bool(self._retention_blocked_on) and not self._abort.is_set()
                    break
                else:
                    job = self._queue.popleft()
                    self._in_flight = job
                    self._inflight_bytes = 0
                    self._cond.notify_all()
            if job is None:  # the retention that came due while on hold, or found its lock held
                try:
                    if pins_only:
                        self._send_pins()
                    else:
                        self._retention(None)
                finally:
                    with self._cond:
                        self._retention_busy = False
                        self._cond.notify_all()
                continue
            try:
                with upload_turn(self.root, give_up=self._waiting_for_turn):
                    landed = self._process(job)
                if landed:
                    with self._cond:
                        self._started_positions.add(_position(job.order_key()))
                    self._send_pins()
                    self._retention(job)  # outside the turn: it takes the retention locks
                    self._compact_if_grown()
            except (_Aborted, LockTimeout):  # LockTimeout: the turn's wait, given up on abort
                job.handle._finish(
                    None,
                    UploadError(
                        {
                            job.name: "abandoned when the uploader closed (still pending in the journal)"
                        }
                    ),
                )
            except BaseException as exc:  # noqa: BLE001 - every error is reported, never lost
                self._fail(job, exc)
            finally:
                with self._cond:
                    self._in_flight = None
                    self._cond.notify_all()
        if not self._abort.is_set():
            self._send_pins()
        if final:
            self._retention(None, lock_wait=FINAL_LOCK_WAIT)
            if self._retention_blocked_on:
                log.warning(
                    "retention of %s did not run before close: another runctl process held "
                    "its lock (`runctl s3 cleanup` or `runctl checkpoint cleanup` applies it)",
                    " and ".join(self._retention_blocked_on),
                )

    def _send_pins(self) -> None:
        """Carry the directory's pins and unpins for this prefix to S3 (on the worker).

        Read afresh from the files, which every process on the directory changes under one
        lock: what another process unpinned meanwhile is not sent again. One that fails is
        tried again after the next upload; the run keeps the name either way.
        """
        with self._cond:
            self._pins_due = False
        try:
            pins, unpins = self._pins.unsent(), self._pins.unpins()
        except OSError as exc:
            log.warning("could not read the pins of %s: %s", self.root, exc)
            return
        for name in pins:
            url = pin_url(self.prefix, name)
            try:
                self.transfer.put_bytes(b"", url)
            except Exception as exc:  # noqa: BLE001 - a pin failing must not stop uploads
                log.warning("could not pin %s in S3 (tried again after the next upload): %s", name, exc)
                continue
            try:
                sent = self._pins.mark_sent(name)
            except OSError as exc:  # the object is in S3; the file says so next time
                log.warning("could not record the pin of %s as sent: %s", name, exc)
                continue
            if not sent:  # unpinned meanwhile: its unpin takes the object back
                with self._cond:
                    self._pins_due = True
        if unpins:
            keys = {pin_url(self.prefix, name).key: name for name in unpins}
            try:
                errors = self.transfer.delete_keys(self.prefix.bucket, list(keys)).errors
            except Exception as exc:  # noqa: BLE001
                errors = {key: str(exc) for key in keys}
            if errors:
                log.warning(
                    "could not unpin %s in S3 (tried again after the next upload): %s",
                    ", ".join(keys[k] for k in errors if k in keys),
                    next(iter(errors.values())),
                )
            for key, name in keys.items():
                if key not in errors:
                    with contextlib.suppress(OSError):
                        self._pins.unpin_done(name)

    def _refresh_pins(self) -> None:
        """Read the pin files again (outside the lock) into ``_pinned``, before retention.

        A ``protect()`` or ``unprotect()`` of this process while the files were read wins: the
        read is made again (its files then show it).
        """
        for _ in range(3):
            with self._cond:
                seen = self._pins_changed
            try:
                names = self._pins.names()
            except OSError:
                return
            with self._cond:
                if self._pins_changed == seen:
                    self._pinned = names
                    return

    def _waiting_for_turn(self) -> bool:
        """``upload_turn``'s poll: True gives up (this uploader is aborting).

        Another process's uploader is sending meanwhile: that is progress, not a failing S3,
        so the wait does not count against ``failing_timeout``.
        """
        self._last_progress = time.monotonic()
        return self._abort.is_set()

    def _process(self, job: _Job) -> bool:
        """Upload one job (holding the directory's upload turn); True when it landed."""
        # A job's start is not progress: with S3 refusing, each pending job would otherwise
        # restart the failing_timeout clock and spend all its attempts in turn.
        started = time.monotonic()
        url = self._url_of(job.name, job.is_dir)
        if job.resumed:
            settled = self._settled_elsewhere(job, url)
            if settled is not None:
                return settled
        try:
            snapshot = self._snapshot(job)
        except _Skip as skip:
            self._skip(job, str(skip), warn=skip.warn)
            return False
        job.snapshot = snapshot
        attempt = 0
        while True:
            attempt += 1
            if self._abort.is_set():
                raise _Aborted()
            try:
                with self._time_limit(job):
                    if job.is_dir:
                        self._upload_dir(job, snapshot, attempt)
                    else:
                        self._upload_file(job, snapshot)
                break
            except _Rewritten as changed:
                # Hard links share the inodes handed over: a save written over them during the
                # upload leaves no version handed over, and what went up may be half of each.
                # It was sent again as it stood, torn if that save was cut short, as "verified"
                # (a file: review of the day's diff; a directory, under a marker vouching for
                # each file: carried from that review).
                if changed.sent:
                    self._delete_sent(job, url)
                gone = _overwritten(job, Superseded(job.name, str(changed) if job.is_dir else ""))
                self._skip(job, str(gone), warn=gone.warn)
                return False
            except _Skip as skip:
                self._skip(job, str(skip), warn=skip.warn)
                return False
            except Exception as exc:
                if self._abort.is_set():
                    raise _Aborted() from exc
                if attempt >= self.retry.attempts or not self.retry.is_retryable(exc):
                    raise
                with self._cond:
                    self._stats["retries"] += 1
                delay = self.retry.delay(attempt)
                log.warning(
                    "upload of %s failed (attempt %d of %d): %s; retrying in %.1f s",
                    job.name,
                    attempt,
                    self.retry.attempts,
                    _cause_text(exc),
                    delay,
                )
                if self._abort.wait(delay):
                    raise _Aborted() from exc
        self._commit(job, snapshot, url, attempt, time.monotonic() - started)
        return True

    def _delete_sent(self, job: _Job, url: S3URL) -> None:
        """Delete what an upload overtaken by a rewrite sent: it may hold half of two saves, and
        S3 would count it as a whole checkpoint (a directory's marker is gone already)."""
        keys = [url.join(rel).key for rel in sorted(job.tried)] if job.is_dir else [url.key]
        try:
            result = self.transfer.delete_keys(url.bucket, keys)
            problem = "; ".join(result.errors.values())
        except Exception as exc:  # noqa: BLE001 - said; the skip stands either way
            problem = _cause_text(exc)
        if problem:
            log.warning("could not delete %s, which may hold parts of two saves: %s", url, problem)

    def _settled_elsewhere(self, job: _Job, url: S3URL) -> bool | None:
        """A resumed job that another process's uploader of this directory settled meanwhile.

        ``runctl local``'s uploader and its script's both resume what a crashed run left
        pending; whoever gets the upload turn second finds it in the journal: already verified
        (done, not sent again), or a newer version of the name queued or landed since (skipped,
        so an old copy never lands over the new one). Returns None when the job is still to
        upload, else whether it landed (True) or was skipped (False).
        """
        try:
            entry = self.journal.snapshot().latest.get(job.name)
        except JournalError as exc:  # upload it: at worst it goes up twice, never not at all
            log.warning("cannot re-read the journal before resuming %s (uploading it): %s", job.name, exc)
            return None
        if entry is None or entry.version is None:
            return None
        if entry.version != job.queued_at:
            self._skip(job, "superseded: a newer version was saved since (another process uploads it)")
            return False
        version = job.version()
        if entry.state == "verified" and (version is None or entry.matches(*version)):
            log.info("%s was uploaded by another process meanwhile: not sending it again", job.name)
            self._landed(
                job,
                UploadOutcome(
                    job.name, "verified", str(url), entry.size or 0, 0.0, 0, "uploaded by another process"
                ),
            )
            return True
        if entry.state in ("skipped", "deleting_s3", "deleted_s3"):
            self._skip(job, f"{entry.state} by another process meanwhile")
            return False
        return None

    def _snapshot(self, job: _Job) -> Snapshot:
        if not job.is_dir:
            self._await_staging(job)
            if job.staged is not None:
                if job.rewritable and _still_linked(job.source, job.staged):
                    return self._private_copy(job)
                snapshot = self.staging.snapshot_file(job.staged)
                now = snapshot.files[""]
                # A link shares the inode handed over: a save written in place over it since has
                # made it another version, perhaps half written (a copy is ours: no one writes it).
                if job.stamp is not None and now.ino == job.stamp.ino and not job.stamp.same_content(now):
                    raise _overwritten(job, Superseded(job.name))
                return snapshot
            log.info(
                "cannot hard-link %s into the staging area: copying it for upload instead", job.name
            )
            try:
                snapshot = self.staging.copy_file(job.source, job.token, job.stamp)
            except FileNotFoundError:
                raise _Skip(
                    "the file was deleted before its upload started (no hard link possible)"
                ) from None
            except Superseded as exc:
                raise _overwritten(job, exc) from None
            except SnapshotError as exc:
                raise _Skip(str(exc)) from None
            job.staged = snapshot.path
            return snapshot
        last: OSError | None = None
        deadline = time.monotonic() + DIR_DELETE_WAIT
        attempt = 0
        while attempt < 3 or (last is not None and _losing_files(job) and time.monotonic() < deadline):
            if attempt:
                # Files gone and the directory still there: an rmtree under way (the Trainer's
                # save_total_limit) is given DIR_DELETE_WAIT to finish before it is a change.
                time.sleep(DIR_RESTAGE_WAIT)
            attempt += 1
            if not job.source.is_dir():
                # The Trainer's save_total_limit deletes old checkpoint-N directories as a
                # matter of course.
                raise _Skip("the directory was deleted before its upload started")
            try:
                return self.staging.snapshot_dir(job.source, job.token, job.inventory)
            except (FileNotFoundError, SnapshotError) as exc:
                last = exc
                log.info("%s changed since it was handed over (%s); staging it again", job.name, exc)
        if not job.source.is_dir():
            raise _Skip("the directory was deleted before its upload started")
        # Still there, and not what was handed over: a file of it deleted or written since.
        raise _Skip(
            f"{job.name} is not the checkpoint handed over any more ({last}): not uploaded; "
            "submit() it again to upload it as it is now",
            warn=True,
        )

    @contextmanager
    def _time_limit(self, job: _Job) -> Iterator[None]:
        if self.checkpoint_timeout is None:
            yield
            return
        self._timed_out.clear()

        def expire() -> None:
            self._timed_out.set()
            log.warning(
                "upload of %s exceeded checkpoint_timeout=%g s: stopping this attempt",
                job.name,
                self.checkpoint_timeout,
            )
            try:
                self.transfer.close()  # kills a running s5cmd; the call below then fails
            except Exception as exc:  # noqa: BLE001
                log.debug("closing the transfer after a timeout failed: %s", exc)

        timer = threading.Timer(self.checkpoint_timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except Exception as exc:
            if self._timed_out.is_set():
                raise TransferError(
                    f"upload of {job.name} took longer than checkpoint_timeout={self.checkpoint_timeout:g} s",
                    code="CheckpointTimeout",
                ) from exc
            raise
        finally:
            timer.cancel()
        if self._timed_out.is_set():
            raise TransferError(
                f"upload of {job.name} took longer than checkpoint_timeout={self.checkpoint_timeout:g} s",
                code="CheckpointTimeout",
            )

    def _progress(self, moved: int) -> None:
        self._inflight_bytes += moved
        if moved > 0:
            self._last_progress = time.monotonic()

    def _upload_file(self, job: _Job, snapshot: Snapshot) -> None:
        url = self._url_of(job.name, False)
        staged = snapshot.path
        if snapshot.changed():
            raise _Rewritten("changed before the upload began", sent=False)
        self.transfer.put_files([(staged, url)], progress=self._progress)
        self._last_progress = time.monotonic()  # sent; the checks (an MD5) follow
        info = self.transfer.stat(url)
        want = snapshot.files[""]
        if snapshot.changed():
            raise _Rewritten("changed while it was uploading")
        if info is None:
            raise TransferError(
                f"verifying {url} failed: the object is missing after upload",
                code="VerifyFailed",
                url=str(url),
            )
        if info.size != want.size:
            raise TransferError(
                f"verifying {url} failed: size {info.size} in S3, {want.size} locally",
                code="VerifyFailed",
                url=str(url),
            )
        etag = (info.etag or "").strip('"')
        if etag and "-" not in etag and len(etag) == 32 and want.size <= MD5_CHECK_MAX:
            digest = _md5(staged)
            if snapshot.changed():
                raise _Rewritten("changed while it was verified")
            if digest != etag.lower():
                raise TransferError(
                    f"verifying {url} failed: ETag {etag} but the local MD5 is {digest}",
                    code="VerifyFailed",
                    url=str(url),
                )
        self._record(job, "uploaded", want.size, want.mtime, url)

    def _record(
        self, job: _Job, state: str, size: int, mtime: float, url: S3URL, *, wait: bool = False
    ) -> None:
        """A journal line for this version of ``job`` (``queued=`` says which version)."""
        self._journal.record(
            job.name, state, wait=wait, size=size, mtime=mtime, s3_url=str(url), queued=job.queued_at
        )

    def _pins_in_s3(self, names: list[str]) -> list[str]:
        """Of these pins, which S3's listing did not show, those whose object is there.

        When S3 cannot be asked, all of them: a pin is kept, never forgotten, on a doubt.
        """
        rels = {f"{PIN_DIR}/{name}": name for name in names}
        try:
            return [rels[rel] for rel in self.transfer.unlisted(self.prefix, list(rels))]
        except TransferError as exc:
            log.debug("could not look up %d pin(s) the listing did not show: %s", len(names), exc)
            return names

    def _list_dir(self, url: S3URL) -> dict[str, ObjectInfo]:
        found: dict[str, ObjectInfo] = {}
        for obj in self.transfer.iter_objects(url, recursive=True):
            if isinstance(obj, ObjectInfo) and obj.key.startswith(url.key):
                found[obj.key[len(url.key) :]] = obj
        return found

    def _upload_dir(self, job: _Job, snapshot: Snapshot, attempt: int) -> None:
        url = self._url_of(job.name, True)
        marker = url.join(MARKER_NAME)
        unnamable = sorted(rel for rel in snapshot.files if not_utf8(rel))
        if unnamable:  # no retry can send them: said at once, as a file refused here is
            raise TransferError(
                f"{len(unnamable)} file(s) of {job.name} cannot be uploaded: {NOT_UTF8}: "
                + ", ".join(repr(rel) for rel in unnamable[:3]),
                code="LocalNameNotUTF8",
                url=str(url),
            )
        if attempt == 1 and not job.resumed:
            # An older version under the same name must stop reading as complete before we mix in new files.
            if self.transfer.stat(marker) is not None:
                log.info(
                    "%s already exists in S3: removing its marker before uploading the new version",
                    job.name,
                )
                self.transfer.delete_keys(marker.bucket, [marker.key])
        todo = dict(snapshot.files)
        if attempt == 1:
            job.tried.clear()
        if attempt > 1 or job.resumed:
            # Re-send only what is missing: same size, written since this version was queued,
            # and (what this run sent) not rewritten since its put began: a file rewritten in
            # place to the same size would otherwise keep its old content under a new marker.
            landed = self._list_dir(url)
            since = job.queued_at - LANDED_SKEW
            for rel, st in list(todo.items()):
                obj = landed.get(rel)
                tried = job.tried.get(rel)
                if (
                    obj is not None
                    and obj.size == st.size
                    and obj.last_modified.timestamp() >= since
                    and (st.same_content(tried) if tried is not None else job.resumed)
                ):
                    del todo[rel]
            if len(todo) < len(snapshot.files):
                log.info(
                    "%s: %d of %d files already in S3, sending the other %d",
                    job.name,
                    len(snapshot.files) - len(todo),
                    len(snapshot.files),
                    len(todo),
                )
        # The manifest goes up last as one small PUT on the transfer's boto3 client. Building
        # that client on first use took 100-240 ms after the files had landed (most of row
        # 2b's overhead); started here, it is built while they upload.
        self.transfer.warm_up()
        if todo:
            job.tried.update(todo)
            self.transfer.put_files(
                [(snapshot.local(rel), url.join(rel)) for rel in sorted(todo)],
                progress=self._progress,
            )
        self._last_progress = time.monotonic()  # sent; the checks follow
        # A rewrite first: a save cut short in place shows as a size S3 does not hold, and
        # was retried as a failed verification, then reported as an upload failure.
        changed = snapshot.changed()
        if changed:
            with self._cond:
                newer = any(j.name == job.name for j in self._queue)
            if newer:
                raise _Skip(
                    f"rewritten during upload ({', '.join(changed[:3])}) and a newer version is queued"
                )
            raise _Rewritten(", ".join(changed[:3]))
        objects = self._list_dir(url)
        unseen = [rel for rel in snapshot.files if rel not in objects]
        if unseen:
            objects.update(self.transfer.unlisted(url, unseen))
        problems = []
        for rel, st in sorted(snapshot.files.items()):
            obj = objects.get(rel)
            if obj is None:
                problems.append(f"{rel}: missing")
            elif obj.size != st.size:
                problems.append(f"{rel}: size {obj.size} in S3, {st.size} locally")
        if problems:
            raise TransferError(
                f"verifying {url} failed: " + "; ".join(problems[:5]),
                code="VerifyFailed",
                url=str(url),
            )
        extra = unlisted_files(snapshot.files, objects)
        if extra:
            # An older version under this name with other files (save_only_model since, one
            # GPU fewer): its optimizer.pt stayed beside the new weights, and a restore brought
            # both back as one checkpoint (Hugging Face pass). They go before the marker.
            log.info(
                "%s: deleting %d file(s) of an older version in S3 that this one does not have (%s)",
                job.name, len(extra), ", ".join(extra[:3]),
            )  # fmt: skip
            result = self.transfer.delete_keys(url.bucket, [url.join(rel).key for rel in extra])
            if result.errors:
                raise TransferError(
                    f"could not delete {len(result.errors)} file(s) of an older version of "
                    f"{job.name} in S3: {next(iter(result.errors.values()))}",
                    url=str(url),
                )
        self._record(job, "uploaded", snapshot.size, snapshot.mtime, url)
        etags = {rel: objects[rel].etag for rel in snapshot.files if objects[rel].etag}
        manifest = build_manifest(snapshot.path, job.name, job.step, etags)  # type: ignore[arg-type]
        missing = set(snapshot.files) - set(manifest.files)
        if missing:
            raise _Rewritten(
                f"files vanished from the staged copy: {', '.join(sorted(missing)[:3])}"
            )
        body = manifest.to_bytes()
        self.transfer.put_bytes(body, marker)
        # Asked for again, as the files were listed: a PUT answered 200 and never stored (a
        # gateway in between) was recorded verified, and the local copy went (fault pass).
        stored = self.transfer.stat(marker)
        if stored is None or stored.size != len(body):
            raise TransferError(
                f"verifying {marker} failed: "
                + ("missing after its upload" if stored is None else f"size {stored.size}, {len(body)} sent"),
                code="VerifyFailed",
                url=str(marker),
            )

    def _commit(
        self, job: _Job, snapshot: Snapshot, url: S3URL, attempts: int, seconds: float
    ) -> None:
        self._record(job, "verified", snapshot.size, snapshot.mtime, url, wait=True)
        with self._cond:
            self._stats["uploaded"] += 1
            self._stats["bytes"] += snapshot.size
            self._stats["seconds"] += seconds
        log.info(
            "uploaded %s (%d bytes in %.1f s, %d attempt(s))", url, snapshot.size, seconds, attempts
        )
        self._landed(
            job, UploadOutcome(job.name, "verified", str(url), snapshot.size, seconds, attempts)
        )

    def _landed(self, job: _Job, outcome: UploadOutcome) -> None:
        """``job`` is durable in S3 (uploaded here, or by another process): finish it."""
        with self._cond:
            self._consecutive = 0
            self._last_progress = time.monotonic()
            self._superseded.pop(job.name, None)
            self._verified_keys.append(job.order_key())
        self._release(job)
        job.handle._finish(outcome)
        if self.on_uploaded is not None:
            try:
                self.on_uploaded(outcome)
            except Exception as exc:  # noqa: BLE001 - a user callback must not kill the worker
                log.error("on_uploaded callback failed for %s: %s", job.name, exc)
        self._revive_failed()

    def _revive_failed(self) -> None:
        """A checkpoint landed, so S3 is back: each that failed before gets another round.

        Unless keep-last-N newer ones have landed meanwhile: retention would delete it anyway,
        so it is skipped as moot (a flush no longer reports it, and it may go locally).
        """
        moot: list[_Job] = []
        superseded: list[_Job] = []
        with self._cond:
            if not self._failed_jobs:
                return
            jobs, self._failed_jobs = self._failed_jobs, []
            protected = self._pinned_names()
            for job in jobs:
                self._failures.pop(job.name, None)
                job.handle = UploadHandle(job.name)  # the first one has its failure
                if self._has_newer_version(job):
                    superseded.append(job)
                    continue
                if self._landed_since(job) and job.name not in protected:
                    moot.append(job)
                    continue
                job.rounds += 1
                log.info("retrying the upload of %s, which failed before (a later one has landed since)", job.name)
                self._queue.append(job)
            self._prune_queue()
            self._cond.notify_all()
        for job in moot:
            self._skip(job, f"{MOOT} ({_newer(self.keep_last_n)} landed since it failed)")
        for job in superseded:
            self._release(job)

    def _landed_since(self, job: _Job) -> bool:
        """True when keep-last-N checkpoints newer than ``job`` are durable (call under ``_cond``)."""
        if self.keep_last_n is None or is_alias(job.name) or not is_recognised(job.name, self.patterns):
            return False
        key = job.order_key()
        return len({_position(v) for v in self._verified_keys if _ahead(v, key)}) >= self.keep_last_n

    def _skip(self, job: _Job, reason: str, *, warn: bool = False) -> None:
        self._note_skip(job)
        self._finish_skip(job, reason, warn=warn)

    def _note_skip(self, job: _Job) -> None:
        with self._cond:
            self._stats["skipped"] += 1
            version = job.version()
            if version is not None:
                self._superseded[job.name] = version

    def _finish_skip(self, job: _Job, reason: str, *, warn: bool = False) -> None:
        # A superseded save is routine (every rewritten last.ckpt): logged and counted, no warning.
        log.log(logging.WARNING if warn else logging.INFO, "skipping upload of %s: %s", job.name, reason)
        if reason.startswith(MOOT):
            with self._cond:
                self._moot_names.add(job.name)
        # queued= names this version: a superseded one's line comes after the newer version's
        # "queued" line, and must not end that one (Journal.replay).
        # size= and mtime= name the version, so a restarted uploader can still let it go
        # locally once a newer one is durable (_seed_superseded).
        size, mtime = job.version() or (None, None)
        self._journal.record(
            job.name,
            "skipped",
            detail=reason,
            queued=job.queued_at,
            size=size,
            mtime=mtime,
            s3_url=str(self._url_of(job.name, job.is_dir)),
        )
        self._release(job)
        job.handle._finish(
            UploadOutcome(
                job.name, "skipped", str(self._url_of(job.name, job.is_dir)), 0, 0.0, 0, reason
            )
        )

    def _fail(self, job: _Job, exc: BaseException) -> None:
        text = _cause_text(exc)
        with self._cond:
            self._stats["failures"] += 1
            self._consecutive += 1
            # A newer version submitted meanwhile is what counts: its outcome is the news.
            if not self._has_newer_version(job):
                self._failures[job.name] = exc
            self._last_failure = (job.name, exc)
        log.error(
            "upload of %s to %s failed: %s", job.name, self._url_of(job.name, job.is_dir), text
        )
        self._journal.record(job.name, "failed", detail=scrub(text)[:500], queued=job.queued_at)
        handle = job.handle
        released: list[_Job] = [job]
        with self._cond:
            # Decided under the lock submit() takes: a newer version submitted meanwhile wins.
            if (
                job.rounds < FAILED_ROUNDS
                and isinstance(exc, Exception)
                # S3 down or slow, or credentials expired: not a refusal that recurs
                and (self.retry.is_retryable(exc) or getattr(exc, "code", None) in RENEWED_CODES)
                and not self._abort.is_set()
                and not is_alias(job.name)  # last.ckpt landing after newer steps would win a resume
                and not self._has_newer_version(job)
            ):
                released = []
                self._failed_jobs.append(job)  # staged copy and all: _revive_failed
                self._prune_queue()  # held ones that newer checkpoints make moot go now
                while len(self._failed_jobs) > self.max_queue:  # a long outage: the oldest
                    released.append(self._failed_jobs.pop(0))
        for old in released:
            self._release(old)
        handle._finish(None, exc)
        if self.on_error is not None:
            try:
                self.on_error(job.name, exc)
            except Exception as cb_exc:  # noqa: BLE001
                log.error("on_error callback failed for %s: %s", job.name, cb_exc)

    # -- retention ----------------------------------------------------------------------------

    def _retention_released(self) -> bool:
        """Retention came due while on hold, and the hold has ended (call under ``_cond``)."""
        return self._retention_due and not self._retention_held

    def _compact_if_grown(self) -> None:
        """Compact the journal once it passes ``COMPACT_ABOVE`` (256 KB), and twice its size
        after the last compaction.

        At start, and after each landed checkpoint: a long run otherwise grows it by about
        0.5 KB a checkpoint, and every retention re-reads it (10,000 checkpoints: 5 MB). The
        doubling keeps a journal that stays large (many checkpoints kept) from being rewritten
        at every checkpoint.
        """
        threshold = max(journal_module.COMPACT_ABOVE, 2 * self._journal_compacted_to)
        try:
            if self.journal.compact(min_bytes=threshold):
                self._journal_compacted_to = os.stat(self.journal.path).st_size
        except (JournalError, OSError) as exc:
            log.warning("%s; it stays as it is", exc)

    def _retention(self, job: _Job | None, *, lock_wait: float = 0.0) -> None:
        """Apply keep-last-N in S3 and locally (on the worker thread).

        Their locks are only tried (``lock_wait``): while another process holds one (a cleanup,
        perhaps stopped with Ctrl-Z), uploads go on and the worker tries again after the next
        landed checkpoint, or every ``LOCK_RETRY_EVERY`` seconds while idle.
        """
        with self._cond:
            if self._retention_held:
                self._retention_due = True
                return
        self._refresh_pins()  # another process on the directory may have pinned or unpinned
        landed = {job.name} if job is not None else set()

        def protected_now() -> set[str]:
            with self._cond:
                return self._protected() | landed

        def on_the_way() -> set[str]:
            # Queued, or held after a failure: their steps are not whole in S3 yet.
            with self._cond:
                return {j.name for j in (*self._queue, *self._failed_jobs)}

        # Read once S3's listing is in (not before it): a protect() that returns while it is
        # listed still keeps its checkpoint.
        protected = _LiveNames(protected_now)
        blocked: list[str] = []
        deadline = time.monotonic() + lock_wait  # one wait for both locks
        if self.keep_last_n is not None:
            try:
                with self._cond:
                    moot = set(self._moot_names)
                # Another process's uploader of this directory may be sending a name this one
                # let go as moot: its unmarked files are not leftovers until its turn is over.
                turn = (
                    upload_turn(self.root, give_up=self._waiting_for_turn)
                    if moot
                    else contextlib.nullcontext()
                )
                with turn:
                    listed_at = time.time()
                    journal = self.journal.snapshot()
                    # What another uploader of this directory wrote down for its own prefix is
                    # not this one's to send or to finish (read once for the whole pass).
                    theirs = self._theirs(journal)
                    left_out = journal.left_out() - theirs  # (runctl local)
                    plan = apply_s3_retention(
                        self.transfer,
                        self.prefix,
                        self.keep_last_n,
                        protected=protected,
                        # Read after the listing: queued, left out, and on this disk at the
                        # step that landed last and not in S3 (their steps are not whole).
                        unsettled=_LiveNames(
                            lambda: on_the_way() | left_out | self._never_sent(journal, theirs)
                        ),
                        patterns=self.patterns,
                        unfinished=(journal.unfinished_deletions() - theirs) | moot,
                        before_delete=self._journal_deleting,
                        lock_timeout=lock_wait,
                    )
                with self._cond:  # what is gone from S3, or never reached it, is done with
                    self._moot_names.intersection_update(cp.name for cp in plan.keep)
                for name in self._pins.forget_gone(plan.pinned, listed_at, self._pins_in_s3):  # unpinned elsewhere
                    log.info("the pin of %s is gone from %s: no longer kept", name, self.prefix)
                for cp in plan.delete:
                    self._journal.record(
                        cp.name,
                        "deleted_s3",
                        size=cp.size,
                        s3_url=str(self._url_of(cp.name, cp.is_dir)),
                    )
                self._warn_if_outranked(plan)
            except LockTimeout:
                blocked.append(str(self.prefix))
            except Exception as exc:  # noqa: BLE001 - retention failing must not stop uploads
                self._retention_failed("S3", exc)
        if self.local_keep_last_n is not None:
            try:
                with self._local_deleting:
                    if self._local_paused:  # the framework is saving: once it is done
                        self._local_skipped = True
                    else:
                        apply_local_retention(
                            self.root,
                            self.local_keep_last_n,
                            protected=protected,
                            also_durable=self._superseded_and_covered,
                            patterns=self.patterns,
                            lock_timeout=max(0.0, deadline - time.monotonic()),
                        )
            except LockTimeout:
                blocked.append(str(self.root))
            except Exception as exc:  # noqa: BLE001
                self._retention_failed("local", exc)
        if blocked and not self._retention_blocked_on:
            log.info(
                "another runctl process holds the retention lock of %s: uploads go on, "
                "retention runs once it is free",
                " and ".join(blocked),
            )
        self._retention_blocked_on = blocked

    def _never_sent(self, journal: JournalSnapshot, theirs: Collection[str]) -> set[str]:
        """Checkpoints in this directory saved at the step that landed last from it, or a later
        one, whose version never reached S3 from it: a partner still being written, not yet
        handed over (``runctl local`` submits each file once it settles), or let go. Files of
        older steps are left out, or one the user never uploads would keep every step from
        being whole; so are ``theirs`` (``_theirs``)."""
        landed = [e for e in journal.verified.values() if not is_alias(e.name)]
        if not landed:
            return set()
        last = step_order(max(landed, key=lambda e: e.time).name)
        if last == (-1, -1):
            return set()
        found: set[str] = set()
        try:
            names = os.listdir(self.root)
        except OSError:
            return set()
        for name in names:
            if name.startswith(".") or is_alias(name) or step_order(name) < last:
                continue
            if name in theirs:
                continue
            if not is_recognised(name, self.patterns):
                continue
            try:
                cp = local_checkpoint(self.root / name, self.root)
            except OSError:
                continue
            if not journal.was_verified(name, cp.size, cp.mtime):
                found.add(name)
        return found

    def _theirs(self, journal: JournalSnapshot) -> set[str]:
        """Names the journal, shared by every uploader of this directory, last wrote down for
        another prefix: never this one's to send or to finish. Two Lightning callbacks on one
        dirpath ("best" and "periodic", each with its own s3_url): the best's skipped and
        unsent files made the periodic one's steps "not whole", and S3 kept five checkpoints
        where two were asked for."""
        mine = str(self.prefix)
        return {
            e.name
            for e in journal.latest.values()
            if e.s3_url is not None
            and (not e.s3_url.startswith(mine) or e.s3_url[len(mine) :].rstrip("/") != e.name)
        }

    def _warn_if_outranked(self, plan: RetentionPlan) -> None:
        """Once: say so when retention deleted this run's checkpoints for others that rank newer.

        A fresh run uploading to a prefix that holds an older run's higher steps loses each of its
        own checkpoints to retention soon after it lands; that is keep-last-N working as written,
        but almost never what the user meant.
        """
        if self._outranked_warned:
            return
        with self._cond:
            ours = set(self._submitted_names)
        lost = [cp for cp in plan.delete if cp.name in ours]
        if not lost:
            return
        newest_lost = max(cp.order_key() for cp in lost)
        others = [
            cp.name
            for cp in plan.keep
            if cp.complete and cp.name not in ours and not is_alias(cp.name) and cp.order_key() > newest_lost
        ]
        if not others:
            return
        self._outranked_warned = True
        log.warning(
            "retention in %s deleted %s, uploaded by this run, because checkpoints it did not "
            "write rank newer (by step): %s. Another run's, or this run's own from before it was "
            "resumed from an earlier checkpoint? Upload to a fresh prefix, or delete those first.",
            self.prefix,
            ", ".join(cp.name for cp in lost),
            ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""),
        )

    def _journal_deleting(self, plan: RetentionPlan) -> None:
        # Written (and fsynced) before the first delete: a run killed half-way through a directory
        # checkpoint leaves marker-less files that the next run's retention then finishes off.
        # Each line is in the file once recorded; waiting for the last one's fsync covers them all.
        last = len(plan.delete) - 1
        for i, cp in enumerate(plan.delete):
            self._journal.record(
                cp.name,
                "deleting_s3",
                wait=i == last,
                size=cp.size,
                s3_url=str(self._url_of(cp.name, cp.is_dir)),
            )

    def _superseded_and_covered(self, cp: Checkpoint) -> bool:
        # A checkpoint skipped because retention would delete it anyway may go locally once a
        # newer one is durable: otherwise disk would grow without bound (promise 9).
        with self._cond:
            seen = self._superseded.get(cp.name)
            if seen is None or seen[0] != cp.size or abs(seen[1] - cp.mtime) > 1e-6:
                return False
            key = cp.order_key()[:3]  # (step, epoch, mtime), as _verified_keys holds them
            return any(_ahead(v, key) for v in self._verified_keys)

    def _retention_failed(self, where: str, exc: BaseException) -> None:
        with self._cond:
            self._stats["retention_errors"] += 1
        log.warning("%s retention failed (uploads go on): %s", where, _cause_text(exc))
        if self.on_error is not None:
            try:
                self.on_error(f"retention ({where})", exc)
            except Exception as cb_exc:  # noqa: BLE001
                log.error("on_error callback failed: %s", cb_exc)

    # -- shutdown -----------------------------------------------------------------------------

    def _log_progress(self) -> None:
        pending = self._pending_names()
        current = self._in_flight
        moving = ""
        if current is not None:
            # s5cmd reports a file's bytes once it is done: "0 bytes sent" 5.3 s into a 5.5 s
            # upload read as a stall (DDP pass).
            sent = self._inflight_bytes
            moving = f"; {current.name}: {f'{sent} bytes sent' if sent else 'under way'}"
        log.info(
            "waiting for %d upload(s) to finish: %s%s",
            len(pending),
            ", ".join(pending[:10]),
            moving,
        )

    def _shutdown(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            busy = bool(self._queue) or self._in_flight is not None
            if busy:
                # flush gave up: stop now; the journal keeps these pending for the next process.
                self._left_pending = tuple(self._pending_names())
                self._abort.set()
            self._cond.notify_all()
        if busy:
            try:
                self.transfer.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing the transfer failed: %s", exc)
        self._worker.join(30.0)
        if self._worker.is_alive():
            log.error("the uploader's worker did not stop within 30 s")
        with self._cond:
            left, self._queue = list(self._queue), collections.deque()
            failed, self._failed_jobs = self._failed_jobs, []
        for job in failed:  # "failed" in the journal: the next run resumes them
            self._release(job)
        for job in left:
            job.handle._finish(
                None,
                UploadError({job.name: "not uploaded before close (still pending in the journal)"}),
            )
        self._stager.close()  # links what is still queued (a resume starts from them), no copies
        if self._mark is not None:
            self._mark.remove()
        self._journal.close()
        if self._owns_transfer:
            try:
                self.transfer.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing the transfer failed: %s", exc)

    def _atexit(self) -> None:
        if self._closed:
            return
        log.warning(
            "the uploader was not closed: flushing pending uploads at exit (up to %g s)",
            ATEXIT_TIMEOUT,
        )
        try:
            self.close(timeout=ATEXIT_TIMEOUT, failing_timeout=FAILING_TIMEOUT)
        except RunctlError as exc:
            log.error("uploads did not all finish at exit: %s", exc)


def _register_exit_hook(uploader: CheckpointUploader) -> None:
    """Flush at exit, before thread pools refuse work (so a boto3 upload can still run).

    ``threading._register_atexit`` hooks run (newest first) before ``concurrent.futures`` shuts
    its executors and before ``atexit`` handlers, which would be too late for boto3.
    """
    import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours

    ref = weakref.ref(uploader)
    # A fork (a DataLoader's workers) inherits the hook, and multiprocessing runs it when the
    # worker ends: it flushed, waited and reported "failed to upload" for the parent's uploads.
    pid = os.getpid()

    def hook() -> None:
        alive = ref()
        if alive is not None and os.getpid() == pid:
            alive._atexit()

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading exit hooks")
        register(hook)
    except RuntimeError:
        atexit.register(hook)


def _base(name: str) -> str:
    """The checkpoint name a path or name gives (``ckpt/step_5.pt`` -> ``step_5.pt``).

    Example:
        >>> _base("ckpt/checkpoint-5/")
        'checkpoint-5'
    """
    base = str(name).rstrip("/").rsplit("/", 1)[-1]
    if base in ("", ".", ".."):
        # protect("") logged confusing warnings and left a temporary file in .runctl/pinned/
        # (API pass).
        raise UsageError(f"{name!r} names no checkpoint")
    return base


def _cause_text(exc: BaseException) -> str:
    text = scrub(str(exc)) or type(exc).__name__
    code = getattr(exc, "code", None)
    if code and code not in text:
        text = f"{text} ({code})"
    return text


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _MarkerUnreadable(Exception):
    """A marker S3 did not give (not a missing one): ``latest_checkpoints`` fails on it."""

    def __init__(self, key: str, cause: TransferError) -> None:
        super().__init__(key)
        self.key, self.cause = key, cause


def record_restored(path: str | os.PathLike[str], source: str | S3URL) -> None:
    """Write a checkpoint just downloaded from S3 into its directory's journal as verified.

    It is whole in S3 (it was read from there), so local keep-last-N lets it go once newer
    ones are durable, as it does the checkpoints this directory uploaded itself; otherwise the
    one a run resumed from would be "not durable" on disk for good.

    Example:
        >>> record_restored("ckpt/step_900.pt", "s3://bucket/run-7/step_900.pt")  # doctest: +SKIP
    """
    path = Path(path)
    if RUNCTL_DIR in path.parent.parts:
        return  # set aside by restore_path: not one of the directory's checkpoints
    cp = local_checkpoint(path, path.parent)
    Journal(path.parent).record(
        path.name,
        "verified",
        size=cp.size,
        mtime=cp.mtime,
        s3_url=str(source),
        detail="downloaded from S3 to resume from",
    )


def restore_path(dest_dir: Path, obj: ObjectInfo, *, warn: bool = True) -> Path:
    """Where a restore of ``obj`` may write: ``dest_dir/<name>``, unless a file there is not
    S3's copy (another size, or written a second or more after it landed), such as a
    ``last.ckpt`` saved during an outage: that one stays, with a warning, and the restore goes
    to ``dest_dir/.runctl/restored/<name>``. So does one the journal in ``dest_dir`` says was
    handed over and never landed. Otherwise local files are told apart by size and time, not
    content: a same-size file written within a second of S3's copy landing counts as that copy.

    Example:
        >>> restore_path(Path("ckpt"), obj).name  # doctest: +SKIP
        'last.ckpt'
    """
    name = obj.key.rpartition("/")[2]
    target = dest_dir / name
    try:
        st = target.stat()
    except OSError:
        return target
    landed = obj.last_modified.timestamp()
    unsent = _handed_over_unsent(dest_dir, name, st)
    if st.st_size == obj.size and st.st_mtime < landed + 1 and not unsent:
        return target
    aside = dest_dir / RUNCTL_DIR / "restored" / name
    if not warn:
        return aside
    if unsent:
        log.warning(
            "%s is not the copy in S3: the journal says it was handed over for upload and never "
            "landed (a save queued behind a slower upload?); it is left as it is, and S3's copy "
            "is downloaded to %s. To resume from the local file, pass its path instead",
            target,
            aside,
        )
        return aside
    log.warning(
        "%s is not the copy in S3 (%d bytes written %s; S3's %d bytes landed %s): it is left as it "
        "is, perhaps saved while S3 was out of reach; resuming from S3's copy, downloaded to %s. "
        "To resume from the local file, pass its path instead",
        target,
        st.st_size,
        time.strftime("%H:%M:%S", time.localtime(st.st_mtime)),
        obj.size,
        time.strftime("%H:%M:%S", time.localtime(landed)),
        aside,
    )
    return aside


def _its_own(checkpoint: Checkpoint, markers: Mapping[str, bytes]) -> tuple[str, ...]:
    """The keys of ``checkpoint`` to restore: for a directory with a marker read, those it lists.

    Files an older version left beside a newer one with fewer (``optimizer.pt`` beside weights
    saved with ``save_only_model``) came down with it, as one checkpoint (Hugging Face pass).
    """
    data = markers.get(checkpoint.marker or "")
    if not checkpoint.is_dir or data is None:
        return checkpoint.files
    base = checkpoint.marker[: -len(MARKER_NAME)]  # type: ignore[index]
    listed = Manifest.from_bytes(data).files
    return tuple(key for key in checkpoint.files if key[len(base) :] in listed)


def _handed_over_unsent(root: Path, name: str, st: os.stat_result) -> bool:
    """True when ``root``'s journal says this very version of ``name`` was handed over here and
    never landed: then it is not S3's copy, whatever its size and time say.

    Every save of a model has one size, and a ``last.ckpt`` saved while the one before was still
    uploading is dated before that one landed: a restore took the newer local file, never sent,
    for S3's older copy and wrote over it (Lightning pass: step 9 lost to step 3).
    """
    journal = Journal(root)
    if not journal.path.exists():
        return False
    try:
        snapshot = journal.snapshot()
    except (JournalError, OSError):
        return False
    entry = snapshot.latest.get(name)
    return (
        entry is not None
        and entry.matches(st.st_size, st.st_mtime)
        and not snapshot.was_verified(name, st.st_size, st.st_mtime)
    )


def _warn_of_strays(path: Path, downloaded: set[str]) -> None:
    """Say so when a restored checkpoint directory also holds files it did not bring.

    The download merges into a directory already there, as ``aws s3 cp`` does; a file left
    from an earlier copy (another run's ``scheduler.pt``) would be loaded with the rest.
    Deleting it is the user's call, not a restore's.
    """
    from runctl.marking import local_files

    base = f"{path.name}/"
    strays = sorted(rel for rel in local_files(path) if base + rel not in downloaded)
    if strays:
        shown = ", ".join(strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
        log.warning(
            "%s also holds %d file(s) that are not part of the checkpoint (%s): they were there "
            "before and are left as they were; remove them before resuming from it",
            path,
            len(strays),
            shown,
        )


def latest_checkpoint(
    s3_url: str | S3URL,
    dest: str | os.PathLike[str],
    *,
    config: S3Config | None = None,
    use_s5cmd: bool = True,
    treat_unmarked_complete: bool = False,
    transfer: Transfer | None = None,
    dry_run: bool = False,
    newer_than: str | None = None,
    keep_newer_local: bool = False,
    same_step: bool = True,
    names: Callable[[str], bool] | None = None,
) -> Path | None:
    """Download the newest complete checkpoint under ``s3_url`` into ``dest``; its local path, or None.

    With ``same_step`` (the default), every other complete checkpoint saved at its step comes
    too, beside it (a GAN's ``net_d_5000.pth`` with ``net_g_5000.pth``; ``latest_checkpoints``
    returns all their paths).

    The newest is the highest step, unless a ``last``-style alias landed after it
    (``newest_state``). A directory checkpoint counts only with a valid marker (unless
    ``treat_unmarked_complete``). Downloads are atomic and contained in ``dest``. ``dry_run``:
    find it and return the path it would have, downloading nothing. ``newer_than``: the name of
    a checkpoint already at hand; S3's newest is downloaded only if its step (then epoch) is
    higher, else None. ``keep_newer_local``: a file of the same name in ``dest`` that S3 does
    not hold (another size, or written after S3's copy landed: a ``last.ckpt`` saved during an
    outage) is left as it is, with a warning; S3's copy goes to ``dest/.runctl/restored/``.
    ``names``: only checkpoints whose name it accepts count (one model's files where two share
    the prefix, as a GAN's ``net_g_`` and ``net_d_``); None when it accepts none there.

    Example:
        >>> path = latest_checkpoint("s3://bucket/run-7/", "restore/")  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'step_900.pt'
    """
    paths = latest_checkpoints(
        s3_url,
        dest,
        config=config,
        use_s5cmd=use_s5cmd,
        treat_unmarked_complete=treat_unmarked_complete,
        transfer=transfer,
        dry_run=dry_run,
        newer_than=newer_than,
        same_step=same_step,
        keep_newer_local=keep_newer_local,
        names=names,
    )
    return paths[0] if paths else None


def latest_checkpoints(
    s3_url: str | S3URL,
    dest: str | os.PathLike[str],
    *,
    config: S3Config | None = None,
    use_s5cmd: bool = True,
    treat_unmarked_complete: bool = False,
    transfer: Transfer | None = None,
    dry_run: bool = False,
    newer_than: str | None = None,
    same_step: bool = True,
    keep_newer_local: bool = False,
    names: Callable[[str], bool] | None = None,
) -> list[Path]:
    """``latest_checkpoint``, returning the path of every checkpoint it brought (newest first).

    A GAN's ``net_g_5000.pth`` and ``net_d_5000.pth``, or ``model_step_N.pt`` beside
    ``optim_step_N.pt``, are one checkpoint to resume from, as retention keeps them. The newest
    comes first; an empty list when there is none (or none newer than ``newer_than``).

    Example:
        >>> [p.name for p in latest_checkpoints("s3://bucket/gan/", "restore/")]  # doctest: +SKIP
        ['net_g_5000.pth', 'net_d_5000.pth']
    """
    url = s3_url if isinstance(s3_url, S3URL) else S3URL.parse(str(s3_url))
    prefix = url.as_prefix()
    if os.path.exists(dest) and not os.path.isdir(dest):
        # A raw FileExistsError from deep in the download (API pass).
        raise UsageError(f"dest must be a directory (got {os.fspath(dest)!r}, which is not one)")
    owns = transfer is None
    if transfer is None:
        transfer = make_transfer(config or resolve_config(), use_s5cmd=use_s5cmd)
    try:
        for attempt in range(1, LATEST_ATTEMPTS + 1):
            try:
                found = _latest_once(
                    transfer,
                    prefix,
                    Path(dest),
                    treat_unmarked_complete=treat_unmarked_complete,
                    dry_run=dry_run,
                    newer_than=newer_than,
                    same_step=same_step,
                    keep_newer_local=keep_newer_local,
                    names=names,
                    final=attempt == LATEST_ATTEMPTS,
                )
            except _Stale as exc:
                log.info("%s: listing %s again", exc, prefix)
                continue
            if not found and not url.is_prefix and transfer.stat(url) is not None:
                # s3://b/run/step_5.pt gave None, the answer that means "nothing in S3: start
                # afresh" (API pass).
                raise UsageError(
                    f"{url} is an object, not a prefix of checkpoints: give the prefix it is in "
                    f"({S3URL(url.bucket, url.key.rpartition('/')[0] + '/' if '/' in url.key else '')})"
                )
            return found
        raise AssertionError("unreachable: the last attempt never raises _Stale")
    finally:
        if owns:
            transfer.close()


#: How many times ``latest_checkpoints`` lists again when what it listed was deleted while it
#: read it (another process's retention, once a newer checkpoint landed).
LATEST_ATTEMPTS = 4


class _Stale(Exception):
    """What ``latest_checkpoints`` listed was deleted while it read it: list again."""


def _latest_once(
    transfer: Transfer,
    prefix: S3URL,
    dest_dir: Path,
    *,
    treat_unmarked_complete: bool,
    dry_run: bool,
    newer_than: str | None,
    same_step: bool,
    keep_newer_local: bool,
    names: Callable[[str], bool] | None,
    final: bool,
) -> list[Path]:
    """One listing, choice and download of ``latest_checkpoints``; ``_Stale`` unless ``final``."""
    from runctl.retention import missing_partners, positions
    from runctl.transfer.ops import download_objects

    objects = [o for o in transfer.iter_objects(prefix, recursive=True) if isinstance(o, ObjectInfo)]
    markers: dict[str, bytes] = {}
    vanished: list[str] = []

    def read_marker(key: str) -> bytes:
        try:
            markers[key] = transfer.get_bytes(S3URL(prefix.bucket, key))
        except NoSuchKeyError:
            vanished.append(key)
            raise  # deleted since the listing: that checkpoint is going
        except TransferError as exc:
            raise _MarkerUnreadable(key, exc) from None
        return markers[key]

    try:
        grouped = group_s3(
            objects, prefix, treat_unmarked_complete=treat_unmarked_complete, read_marker=read_marker
        )
    except _MarkerUnreadable as exc:
        # Taken as "incomplete", a marker S3 failed to give (a 500, a reset, an outage just
        # after the listing) made --latest bring down an older checkpoint, exit 0, or say
        # there was none (re-run pass): a launcher would start the run afresh.
        raise TransferError(
            f"cannot read the marker {exc.key} under {prefix} ({exc.cause}): not choosing "
            "a checkpoint without knowing whether it is whole",
            url=str(prefix),
        ) from None
    if vanished and not final:
        # Retention deletes a checkpoint once a newer one is whole: this listing may predate
        # it. Taken as it was, a listing of checkpoint-97 whose marker went before it was
        # read gave "none" (4 in 58 calls beside an uploader keeping 1), which a launcher
        # takes for a fresh start (concurrency pass).
        raise _Stale(f"marker {vanished[0]} was deleted after it was listed")
    complete = [c for c in grouped.checkpoints if c.complete]
    passed_by = strays(complete)  # embeddings_4096.pt beside step_N.pt: not the newest
    complete = [c for c in complete if c.name not in passed_by]
    if names is not None:
        # The generator's manager resumed from net_d_200.pth on a fresh machine: the newest
        # step's other file (resume pass); and from it still, with no net_g_ whole in S3.
        complete = [c for c in complete if names(c.name)]
    newest = newest_state(complete)
    if newest is None:
        if vanished:
            raise TransferError(
                f"checkpoints under {prefix} were deleted as they were read ({len(vanished)} "
                f"marker(s), {LATEST_ATTEMPTS} listings): not saying there is none",
                url=str(prefix),
            )
        log.info("no complete checkpoint under %s", prefix)
        return []
    # By step: an alias (last.ckpt) has none, but is newer still when it landed later.
    highest = complete[-1]  # group_s3 lists checkpoints oldest first
    if newer_than is not None and step_order(highest.name) <= step_order(newer_than):
        log.info("S3's newest, %s, is not newer than %s", highest.name, newer_than)
        return []
    if same_step and not is_alias(newest.name):
        # A newest step without a kind of file the step before has is likely still on its
        # way (or torn by a crash): the step before is the newest to resume from whole.
        torn = missing_partners(complete)
        if newest.order_key()[:2] in torn:
            whole = newest_state([c for c in complete if c.order_key()[:2] not in torn])
            if whole is not None:
                log.warning(
                    "the newest step under %s is not whole (%s): taking %s",
                    prefix, torn[newest.order_key()[:2]], whole.name,
                )
                newest = whole
    chosen_checkpoints = [newest]
    if same_step and not is_alias(newest.name):
        at = positions(complete)
        chosen_checkpoints += [
            c
            for c in reversed(complete)
            if c is not newest and not is_alias(c.name) and at[c.name] == at[newest.name]
        ]
    by_key = {o.key: o for o in objects}
    paths = [
        restore_path(dest_dir, by_key[c.files[0]], warn=not dry_run)
        if keep_newer_local and not c.is_dir
        else dest_dir / c.name
        for c in chosen_checkpoints
    ]
    if dry_run:
        return paths
    # Each is a direct child of the prefix, so it lands in its path's directory (dest, or
    # .runctl/restored/ for one set aside) under its own name.
    into: dict[Path, list[ObjectInfo]] = {}
    for c, path in zip(chosen_checkpoints, paths, strict=True):
        into.setdefault(path.parent, []).extend(by_key[key] for key in _its_own(c, markers))
    dest_dir.mkdir(parents=True, exist_ok=True)
    # Only where nothing stood: an evaluator's earlier copy of the same checkpoint is its own.
    fresh = [path for path in paths if not os.path.lexists(path)]
    written: list[Path] = []
    try:
        for where, chosen in into.items():
            written += [path for _, path in download_objects(transfer, chosen, prefix, where)]
    except PartialTransferError as exc:
        gone = [c.name for c in chosen_checkpoints if not _still_there(transfer, prefix, c)]
        if not gone or final:
            raise
        # Deleted while it came down (6 of 20 shards were left in dest, and the run failed):
        # what it wrote goes, and the newest is chosen again.
        written += [path for _, path in (exc.done or ()) if isinstance(path, Path)]
        _remove_written(
            [w for w in written if any(w == f or f in w.parents for f in fresh)],
            [path for path in fresh if path.is_dir()],
        )
        raise _Stale(f"{', '.join(gone)} was deleted while it downloaded") from None
    log.info(
        "downloaded %s (%d file(s)) from %s to %s",
        ", ".join(c.name for c in chosen_checkpoints), sum(map(len, into.values())), prefix, dest_dir,
    )
    for c in chosen_checkpoints:
        if c.is_dir:
            _warn_of_strays(dest_dir / c.name, {k[len(prefix.key) :] for k in _its_own(c, markers)})
    return paths


def _still_there(transfer: Transfer, prefix: S3URL, checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint's marker (a directory's) or file is still in S3 (unknown: yes)."""
    key = checkpoint.marker if checkpoint.is_dir and checkpoint.marker else checkpoint.files[0]
    try:
        return transfer.stat(S3URL(prefix.bucket, key)) is not None
    except TransferError:
        return True


def _remove_written(paths: Iterable[Path], tops: Iterable[Path]) -> None:
    """Remove files a download wrote, then every empty directory in ``tops`` (each included)."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
    for top in tops:
        for where, _, _ in sorted(os.walk(top), key=lambda entry: len(entry[0]), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(where)  # only when empty
