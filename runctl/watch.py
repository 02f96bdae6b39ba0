"""Watch an S3 prefix by polling: a baseline, then new/changed/deleted objects and completed checkpoints."""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runctl.checkpoints import Checkpoint, batch_reader, group_s3, marker_ok
from runctl.config import scrub
from runctl.exceptions import LockTimeout, TransferError, UsageError
from runctl.s3url import S3URL
from runctl.transfer.base import ObjectInfo, Transfer

log = logging.getLogger("runctl.watch")

#: Default seconds between polls.
DEFAULT_INTERVAL = 10.0
#: Longest pause after repeated errors, whatever the interval.
MAX_BACKOFF = 300.0
#: Longest interval: a day. Polling less often than that is a slip; and ``Event.wait`` of more
#: than ``threading.TIMEOUT_MAX`` (``--interval 1e10``, ``inf``) raised OverflowError.
MAX_INTERVAL = 86400.0

#: key -> (etag, size, last modified as a POSIX time): everything a watcher remembers about
#: one object.
ObjectState = dict[str, tuple[str | None, int, float]]


@dataclass(frozen=True)
class BaselineEvent:
    """The first poll: what is already there (not reported as new)."""

    url: str
    objects: int
    checkpoints: int
    complete: int
    latest: str | None
    time: float
    kind: str = field(default="baseline", init=False)

    def describe(self) -> str:
        latest = f" (latest complete: {self.latest})" if self.latest else ""
        return (
            f"watching {self.url}: {self.objects} {_plural(self.objects, 'object')}, "
            f"{self.checkpoints} {_plural(self.checkpoints, 'checkpoint')}{latest}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "type": self.kind,
            "url": self.url,
            "objects": self.objects,
            "checkpoints": self.checkpoints,
            "complete": self.complete,
            "latest": self.latest,
            "time": self.time,
        }


@dataclass(frozen=True)
class ObjectEvent:
    """An object that appeared (``new``), was overwritten (``changed``) or went away (``deleted``)."""

    kind: str
    url: str
    size: int | None
    etag: str | None
    time: float

    def describe(self) -> str:
        size = f" ({self.size} bytes)" if self.size is not None and self.kind != "deleted" else ""
        return f"{self.kind}: {self.url}{size}"

    def to_json(self) -> dict[str, object]:
        return {"type": self.kind, "url": self.url, "size": self.size, "etag": self.etag, "time": self.time}


@dataclass(frozen=True)
class CheckpointEvent:
    """A checkpoint became complete: a directory's marker landed, or a single-file checkpoint appeared."""

    url: str
    name: str
    step: int | None
    epoch: int | None
    is_dir: bool
    files: int
    size: int
    time: float
    kind: str = field(default="checkpoint_complete", init=False)

    def describe(self) -> str:
        step = f" (step {self.step})" if self.step is not None else ""
        return f"checkpoint complete: {self.url}{step}, {self.files} {_plural(self.files, 'file')}, {self.size} bytes"

    def env(self) -> dict[str, str]:
        """The variables an ``--exec`` command gets for this checkpoint."""
        return {
            "RUNCTL_CHECKPOINT_URL": self.url,
            "RUNCTL_CHECKPOINT_NAME": self.name,
            "RUNCTL_CHECKPOINT_STEP": "" if self.step is None else str(self.step),
        }

    def to_json(self) -> dict[str, object]:
        return {
            "type": self.kind,
            "url": self.url,
            "name": self.name,
            "step": self.step,
            "epoch": self.epoch,
            "is_dir": self.is_dir,
            "files": self.files,
            "size": self.size,
            "time": self.time,
        }


@dataclass(frozen=True)
class RetentionEvent:
    """Retention ran after a checkpoint completed; ``deleted`` names the checkpoints removed."""

    url: str
    keep_last_n: int
    deleted: tuple[str, ...]
    kept: tuple[str, ...]
    time: float
    kind: str = field(default="retention", init=False)

    def describe(self) -> str:
        if not self.deleted:
            return f"retention (keep last {self.keep_last_n}): nothing to delete, {len(self.kept)} kept"
        return (
            f"retention (keep last {self.keep_last_n}): deleted {', '.join(self.deleted)}; "
            f"{len(self.kept)} kept"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "type": self.kind,
            "url": self.url,
            "keep_last_n": self.keep_last_n,
            "deleted": list(self.deleted),
            "kept": list(self.kept),
            "time": self.time,
        }


@dataclass(frozen=True)
class ErrorEvent:
    """A poll (or retention) failed; the watcher carries on after ``retry_in`` seconds."""

    url: str
    message: str
    attempt: int
    retry_in: float
    time: float
    kind: str = field(default="poll_error", init=False)

    def describe(self) -> str:
        return f"error (attempt {self.attempt}, retrying in {self.retry_in:.1f}s): {self.message}"

    def to_json(self) -> dict[str, object]:
        return {
            "type": self.kind,
            "url": self.url,
            "message": self.message,
            "attempt": self.attempt,
            "retry_in": self.retry_in,
            "time": self.time,
        }


WatchEvent = BaselineEvent | ObjectEvent | CheckpointEvent | RetentionEvent | ErrorEvent


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def backoff_delay(attempt: int, interval: float, cap: float = MAX_BACKOFF) -> float:
    """Seconds to wait after the ``attempt``-th consecutive error: doubling from ``interval``, capped, jittered.

    Example:
        >>> 0.5 <= backoff_delay(1, 1.0) <= 1.0
        True
    """
    # The exponent is capped: 2**1024 does not fit a float, and after ~1000 failed polls (three
    # days of outage at the 300 s cap) the product raised OverflowError and ended the watch.
    base = min(cap, max(interval, 0.1) * (2 ** min(max(attempt - 1, 0), 64)))
    # Jitter in [base/2, base] keeps many watchers from hammering an endpoint in step.
    return base / 2 + random.random() * base / 2


class PrefixWatcher:
    """Poll one S3 prefix and turn each listing into events.

    The first ``poll()`` returns one ``BaselineEvent``; every later one returns an event per
    new, changed (ETag or size) and deleted object, then a ``CheckpointEvent`` for each
    checkpoint that became complete (its marker landed and, read then, matches its files; or a
    single-file checkpoint appeared or was rewritten). The baseline counts directories with a
    marker as complete, and names as latest the newest whose marker matches. Only
    ``key -> (etag, size, last modified)`` is remembered between polls.
    With ``keep_last_n``, S3 retention (same lock and rules as ``runctl s3 cleanup``) runs
    after each poll that completed a checkpoint. A checkpoint with an object new or changed in
    that poll is kept by it (its ``--exec`` hook gets it whole) and does not let its step count
    as whole (a partner file may be on its way), nor does one with a multipart upload begun in
    the last ``abandoned_after`` seconds (a day), nor a newest step without a kind of file the
    step before has (``retention.missing_partners``); retention runs again after the poll that
    follows an arrival. What S3 cannot show (a file queued, not yet begun) only that last rule
    can guess. A retention lock held elsewhere is waited on for ``retention_lock_timeout`` seconds,
    then retention stays due, a warning says so once, and the polls go on.

    Example:
        >>> watcher = PrefixWatcher(transfer, S3URL.parse("s3://bucket/run/"))   # doctest: +SKIP
        >>> for event in watcher.events(interval=5, timeout=60):                 # doctest: +SKIP
        ...     print(event.describe())
    """

    def __init__(
        self,
        transfer: Transfer,
        prefix: S3URL,
        *,
        patterns: Sequence[str] | None = None,
        treat_unmarked_complete: bool = False,
        keep_last_n: int | None = None,
        retention_lock_timeout: float = 2.0,
        abandoned_after: float | None = None,
        clock: Any = time.time,
    ) -> None:
        if keep_last_n is not None and keep_last_n < 1:
            raise UsageError(f"keep_last_n must be at least 1, got {keep_last_n!r}")
        self.transfer = transfer
        self.prefix = prefix.as_prefix()
        self.patterns = patterns
        self.treat_unmarked_complete = treat_unmarked_complete
        self.keep_last_n = keep_last_n
        self.retention_lock_timeout = retention_lock_timeout
        # A multipart upload begun longer ago is abandoned, not on its way (None: review's default).
        self.abandoned_after = abandoned_after
        self._clock = clock
        self._state: ObjectState | None = None
        # name -> identity of its completing object (marker or the single file), for completion edges.
        self._complete: dict[str, tuple[str, str | None, int, float]] = {}
        # name -> (marker identity, its files' state) of a marker read that did not match them:
        # not read again until either changes.
        self._mismatched: dict[str, tuple[object, ...]] = {}
        self._stop = threading.Event()
        self._retention_due = False
        self._lock_busy_said = False
        # Checkpoints with an object new or changed in the last poll: on their way.
        self._arriving: frozenset[str] = frozenset()
        self._boto: Any = None  # for the multipart listing, built once

    @property
    def has_baseline(self) -> bool:
        return self._state is not None

    @property
    def state(self) -> Mapping[str, tuple[str | None, int, float]]:
        """The last listing as ``key -> (etag, size, last modified)`` (empty before the first poll)."""
        return dict(self._state or {})

    def stop(self) -> None:
        """Make ``events()`` return at its next wait (thread-safe)."""
        self._stop.set()

    def _list(self) -> tuple[ObjectState, dict[str, ObjectInfo], list[Checkpoint]]:
        """The listing as state, as objects by key (for reading markers), and as checkpoints."""
        state: ObjectState = {}
        objects: dict[str, ObjectInfo] = {}
        before = self._state or {}

        def recorded(items: Iterable[object]) -> Iterator[ObjectInfo]:
            for item in items:
                if isinstance(item, ObjectInfo):
                    state[item.key] = _kept(item, before.get(item.key))
                    objects[item.key] = item
                    yield item
            # What the last poll saw and this listing did not: gone, or left out by s5cmd as
            # dated after the listing began (overwritten while it ran: Transfer.unlisted).
            base = self.prefix.key
            gone = [key[len(base) :] for key in self._state or () if key not in objects]
            for info in (self.transfer.unlisted(self.prefix, gone) if gone else {}).values():
                state[info.key] = _kept(info, before.get(info.key))
                objects[info.key] = info
                yield info

        grouped = group_s3(
            recorded(self.transfer.iter_objects(self.prefix, recursive=True)),
            self.prefix,
            self.patterns,
            treat_unmarked_complete=self.treat_unmarked_complete,
        )
        return state, objects, list(grouped.checkpoints)

    def _mismatch(
        self, candidates: Sequence[Checkpoint], state: ObjectState, objects: Mapping[str, ObjectInfo]
    ) -> set[str]:
        """The candidates whose marker, read now (one batch), does not match their listed files."""
        from runctl.retention import read_small_objects

        found: set[str] = set()
        to_read: dict[str, tuple[Checkpoint, tuple[object, ...]]] = {}  # by marker key
        for ckpt in candidates:
            if not ckpt.is_dir or ckpt.marker is None:
                continue
            seen: tuple[object, ...] = (state.get(ckpt.marker), tuple(state.get(k) for k in ckpt.files))
            if self._mismatched.get(ckpt.name) == seen:
                found.add(ckpt.name)  # unchanged since its marker was read and did not match
            else:
                self._mismatched.pop(ckpt.name, None)
                to_read[ckpt.marker] = (ckpt, seen)
        if not to_read:
            return found
        read = read_small_objects(self.transfer, self.prefix.bucket, list(to_read))
        reader = batch_reader(read)
        for marker, (ckpt, seen) in to_read.items():
            files = [objects[k] for k in ckpt.files if k in objects]
            dir_key = self.prefix.join(ckpt.name).key + "/"
            if not marker_ok(objects[marker], files, dir_key, reader):
                found.add(ckpt.name)
                if isinstance(read.get(marker), bytes):  # a read that failed is tried next poll
                    self._mismatched[ckpt.name] = seen
        return found

    def _identity(self, ckpt: Checkpoint, state: ObjectState) -> tuple[str, str | None, int, float] | None:
        """What marks ``ckpt`` complete: its marker's or its file's (key, etag, size, last
        modified); None if incomplete."""
        if not ckpt.complete:
            return None
        key = ckpt.marker if ckpt.is_dir else (ckpt.files[0] if ckpt.files else None)
        if key is None:
            # An unmarked directory treated as complete: it completes once, when first seen.
            return (self.prefix.join(ckpt.name).key + "/", None, 0, 0.0)
        return (key, *state.get(key, (None, 0, 0.0)))

    def _checkpoint_url(self, ckpt: Checkpoint) -> str:
        url = self.prefix.join(ckpt.name)
        return str(url.as_prefix() if ckpt.is_dir else url)

    def poll(self) -> list[WatchEvent]:
        """List the prefix once and return what changed since the last poll (retention's event last).

        Raises:
            TransferError: the listing failed (``events()`` retries; a direct caller decides).
        """
        new_state, objects, checkpoints = self._list()
        now = self._clock()
        identities = {c.name: self._identity(c, new_state) for c in checkpoints}
        complete_now = {name: ident for name, ident in identities.items() if ident is not None}
        old_state = self._state
        self._state = new_state
        if old_state is None:
            done = [c for c in checkpoints if c.complete]
            latest = None
            for ckpt in sorted(done, key=lambda c: c.order_key(), reverse=True):
                if not self._mismatch([ckpt], new_state, objects):  # read the newest marker(s) only
                    latest = ckpt.name
                    break
                complete_now.pop(ckpt.name, None)  # it completes once its files match
            self._complete = complete_now
            return [BaselineEvent(str(self.prefix), len(new_state), len(checkpoints), len(done), latest, now)]

        events: list[WatchEvent] = []
        arriving: set[str] = set()
        for key in sorted(new_state.keys() | old_state.keys()):
            url = str(S3URL(self.prefix.bucket, key))
            before, after = old_state.get(key), new_state.get(key)
            if before is None and after is not None:
                events.append(ObjectEvent("new", url, after[1], after[0], now))
            elif after is None and before is not None:
                events.append(ObjectEvent("deleted", url, before[1], before[0], now))
            elif before is not None and after is not None and not _same(before, after):
                events.append(ObjectEvent("changed", url, after[1], after[0], now))
            if after is not None and (before is None or not _same(before, after)):
                arriving.add(self._name_of(key))
        self._arriving = frozenset(arriving & {c.name for c in checkpoints})

        completed = [
            c
            for c in checkpoints
            if c.name in complete_now
            and (
                (was := self._complete.get(c.name)) is None
                or was[0] != complete_now[c.name][0]
                or not _same(was[1:], complete_now[c.name][1:])
            )
        ]
        # A new marker is read and checked against the files before it is reported (and --exec
        # runs): one that does not match them is not a completion until either changes.
        mismatched = self._mismatch(completed, new_state, objects)
        for name in mismatched:
            complete_now.pop(name, None)
        completed = [c for c in completed if c.name not in mismatched]
        self._complete = complete_now
        for ckpt in sorted(completed, key=lambda c: c.order_key()):
            events.append(
                CheckpointEvent(
                    url=self._checkpoint_url(ckpt),
                    name=ckpt.name,
                    step=ckpt.step,
                    epoch=ckpt.epoch,
                    is_dir=ckpt.is_dir,
                    files=len(ckpt.files),
                    size=ckpt.size,
                    time=now,
                )
            )
        if completed and self.keep_last_n is not None:
            self._retention_due = True
        events.extend(self.retain())
        return events

    def _name_of(self, key: str) -> str:
        """The checkpoint name a key below the prefix belongs to (its first path part)."""
        return key[len(self.prefix.key) :].split("/", 1)[0]

    def retain(self) -> list[WatchEvent]:
        """Run retention if a completion made it due: its event, or an error event; [] if not due.

        Retention stays due after a poll in which a checkpoint landed (it runs again after the
        next), after it failed, and while another process holds the lock (a warning says so once
        per spell, not once per poll).
        """
        if not self._retention_due or self.keep_last_n is None:
            return []
        arriving = self._arriving
        landing = self._multipart_names()
        try:
            event = self.apply_retention(unsettled=arriving | landing, protected=arriving)
        except LockTimeout:
            if not self._lock_busy_said:
                self._lock_busy_said = True
                log.warning(
                    "watch %s: retention waits: another process holds this prefix's retention "
                    "lock; it runs at a later poll",
                    self.prefix,
                )
            return []
        except (TransferError, OSError) as exc:
            # Retried after the next poll: the completion itself was already reported.
            message = f"retention failed, will retry: {scrub(str(exc))}"
            log.warning("watch %s: %s", self.prefix, message)
            return [ErrorEvent(str(self.prefix), message, 1, 0.0, self._clock())]
        self._lock_busy_said = False
        # Again after the next poll, once what landed in this one has had a poll to settle (not
        # for a multipart upload: one abandoned would have retention run at every poll).
        self._retention_due = bool(arriving)
        return [event]

    def _multipart_names(self) -> frozenset[str]:
        """Names with a multipart upload under way (a large file landing); none if S3 will not say."""
        from runctl.review import DEFAULT_ABANDONED_AFTER, uploads_under_way

        within = DEFAULT_ABANDONED_AFTER if self.abandoned_after is None else self.abandoned_after
        try:
            if self._boto is None:
                self._boto = self.transfer.config.boto_client()
            keys = uploads_under_way(self.transfer, self.prefix, within=within, now=self._clock(), client=self._boto)
        except Exception as exc:  # noqa: BLE001 - a hint: a server that cannot say holds nothing back
            log.debug("watch %s: multipart uploads not listed: %s", self.prefix, exc)
            return frozenset()
        return frozenset(self._name_of(key) for key in keys)  # a log's (no step) holds nothing back

    def apply_retention(
        self, *, unsettled: Iterable[str] = (), protected: Iterable[str] = ()
    ) -> RetentionEvent:
        """Run S3 retention on the prefix now (under the shared prefix lock).

        ``unsettled`` names checkpoints still on their way: their step does not count as whole.
        ``protected`` ones are kept, with what was saved at their step.

        Raises:
            TransferError, LockTimeout: retention could not run.
        """
        from runctl.retention import apply_s3_retention

        assert self.keep_last_n is not None
        plan = apply_s3_retention(
            self.transfer,
            self.prefix,
            self.keep_last_n,
            patterns=self.patterns,
            treat_unmarked_complete=self.treat_unmarked_complete,
            lock_timeout=self.retention_lock_timeout,
            unsettled=tuple(unsettled),
            protected=tuple(protected),
        )
        deleted = tuple(c.name for c in plan.delete)
        if deleted:
            log.info("retention on %s deleted %s", self.prefix, ", ".join(deleted))
        return RetentionEvent(
            str(self.prefix), self.keep_last_n, deleted, tuple(c.name for c in plan.keep), self._clock()
        )

    def events(
        self,
        *,
        interval: float = DEFAULT_INTERVAL,
        timeout: float | None = None,
        once: bool = False,
        max_backoff: float = MAX_BACKOFF,
    ) -> Iterator[WatchEvent]:
        """Poll every ``interval`` seconds and yield events until ``timeout``, ``stop()`` or ``once``.

        The first listing's errors are raised (a wrong bucket is bad input); later ones are
        yielded as ``ErrorEvent`` (logged at DEBUG only: the event is the report) and retried
        with capped exponential backoff.

        Raises:
            UsageError: ``interval`` is not in (0, ``MAX_INTERVAL``], or ``timeout`` is not a
                positive finite number.
            TransferError: the baseline listing failed.
        """
        # Written so that NaN fails them: ``nan <= 0`` is False, and an interval of NaN polled
        # back to back (Event.wait(nan) returns at once), a timeout of NaN never came.
        if not 0 < interval <= MAX_INTERVAL:
            raise UsageError(
                f"interval must be a number of seconds above 0 and at most {MAX_INTERVAL:g}, got {interval!r}"
            )
        if timeout is not None and not (0 < timeout and math.isfinite(timeout)):
            raise UsageError(f"timeout must be a positive number of seconds, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.has_baseline:
            yield from self.poll()
            if once:
                return
        failures = 0
        while True:
            wait = interval if failures == 0 else backoff_delay(failures, interval, max_backoff)
            if deadline is not None:
                wait = min(wait, max(deadline - time.monotonic(), 0.0))
            if self._stop.wait(wait) or (deadline is not None and time.monotonic() >= deadline):
                return
            try:
                batch = self.poll()
            except (TransferError, LockTimeout, OSError) as exc:
                failures += 1
                retry_in = backoff_delay(failures, interval, max_backoff)
                message = scrub(str(exc))
                log.debug("watch %s: %s (attempt %d, retrying in %.1fs)", self.prefix, message, failures, retry_in)
                yield ErrorEvent(str(self.prefix), message, failures, retry_in, self._clock())
                continue
            failures = 0
            yield from batch
            if once:
                return


@dataclass(frozen=True)
class HookResult:
    """How one ``--exec`` run ended.

    ``code`` is its exit code (negative: the signal that ended it), or 127 (not found) / 126
    (any other reason) when it could not be started, as a shell gives; ``error`` then says
    why. ``stopped``: the deadline came while it ran, and it was stopped (see ``_stop_hook``).

    Example:
        >>> HookResult(0).ok, HookResult(127, error="cannot run './eval.sh': No such file or directory").ok
        (True, False)
    """

    code: int
    error: str | None = None
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.stopped


def run_exec(
    argv: Sequence[str],
    event: CheckpointEvent,
    *,
    env: Mapping[str, str] | None = None,
    stdout_to_stderr: bool = False,
    deadline: float | None = None,
) -> HookResult:
    """Run ``argv`` (no shell) for a completed checkpoint, its URL in ``RUNCTL_CHECKPOINT_URL``; say how it ended.

    ``stdout_to_stderr``: the command's output goes to stderr (``watch --json`` keeps stdout
    for its records, as ``runctl local --json`` does with its script's). ``deadline`` (a
    ``time.monotonic()`` value, ``watch --timeout``): a command still running then gets
    SIGTERM, and SIGKILL ``HOOK_GRACE`` seconds later.

    A command that cannot be started is a failed run, not an error: ``watch`` checks it once
    at start-up, and one deleted or renamed hours later (a redeploy) ended the watch with
    exit code 2, its retention and reporting with it.

    Example:
        >>> run_exec(["sh", "-c", 'test -n "$RUNCTL_CHECKPOINT_URL"'], event)   # doctest: +SKIP
        HookResult(code=0, error=None, stopped=False)

    Raises:
        UsageError: ``argv`` is empty.
    """
    if not argv:
        raise UsageError("--exec got an empty command")
    child_env = dict(os.environ if env is None else env)
    child_env.update(event.env())
    try:
        proc = subprocess.Popen(list(argv), env=child_env, stdout=2 if stdout_to_stderr else None)
    except OSError as exc:
        code = 127 if exc.errno == errno.ENOENT else 126
        return HookResult(code, error=f"cannot run {argv[0]!r}: {exc.strerror or exc}")
    stopped = False
    try:
        if deadline is None:
            proc.wait()
        else:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                # A 25 s hook kept `watch --timeout 5` running 28 s: stopped as SIGTERM stops it.
                _stop_hook(proc, _signal_for(proc))
                stopped = True
    except KeyboardInterrupt as exc:
        _stop_hook(proc, _signal_for(proc, exc))
        raise
    code = proc.returncode
    if code != 0:  # the caller reports it: logged at DEBUG only
        log.debug("--exec %s exited with %d for %s", argv[0], code, event.url)
    return HookResult(code, stopped=stopped)


#: How long an --exec command has to finish its own clean-up once runctl is stopped.
HOOK_GRACE = 10.0


def _signal_for(proc: subprocess.Popen[bytes], exc: KeyboardInterrupt | None = None) -> int | None:
    """The signal an --exec command gets when runctl stops it: SIGTERM (a deadline, or runctl
    got SIGTERM), SIGINT for a SIGINT sent with ``kill``, none for a Ctrl-C at a terminal: it
    already reached the command (the same foreground process group), and a second SIGINT would
    cut its own clean-up short."""
    import signal

    from runctl.exceptions import Terminated
    from runctl.localrun import terminal_delivers_to

    if exc is None or isinstance(exc, Terminated):
        return signal.SIGTERM
    return None if terminal_delivers_to(proc.pid) else signal.SIGINT


def _stop_hook(proc: subprocess.Popen[bytes], forward: int | None) -> None:
    """runctl is stopping: let the --exec command stop too, cleanly, before it is killed.

    The signal goes to the command and every process it started, as a terminal's Ctrl-C
    reaches its whole group: an `eval.sh` that ran python went on after `watch --timeout`
    had stopped the script, and wrote its result after watch had ended (verification pass).
    """
    import signal

    from runctl.localrun import process_tree

    tree = {pid: _started(pid) for pid in process_tree(proc.pid)}
    if forward is not None:
        _signal_each(tree, forward)
    try:
        proc.wait(HOOK_GRACE)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()
    tree.pop(proc.pid, None)
    _signal_each(tree, signal.SIGKILL)


def _started(pid: int) -> bytes | None:
    """When the process began (``/proc/PID/stat``'s start time), to know a reused PID."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _signal_each(tree: Mapping[int, bytes | None], signum: int) -> None:
    """Signal each process still the one seen (its start time unchanged: not a PID reused)."""
    for pid, started in tree.items():
        if started is None or _started(pid) != started:
            continue
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def _same(before: tuple[str | None, int, float], after: tuple[str | None, int, float]) -> bool:
    """Whether two ``(etag, size, last modified)`` are one version: the same size, and the same
    ETag where both listings gave one, else the same time. rclone leaves an ETag out now and
    then (its hash not yet computed, most often for an object just written): the object was
    "changed", and completed twice; a same-size rewrite listed so was not seen at all.

    >>> t = 1700000000.0
    >>> _same(("a", 3, t), ("a", 3, t + 5)), _same(("a", 3, t), (None, 3, t)), _same(("a", 3, t), (None, 3, t + 1))
    (True, True, False)
    """
    if before[1] != after[1]:
        return False
    if before[0] is not None and after[0] is not None:
        return before[0] == after[0]
    return before[2] == after[2]


def _kept(item: ObjectInfo, before: tuple[str | None, int, float] | None) -> tuple[str | None, int, float]:
    """``(etag, size, last modified)`` of a listed object; one listed without the ETag it was
    last seen with, as the same version, keeps it (for the next listing that gives one)."""
    # Whole seconds: s5cmd dates what it finds by HEAD (Transfer.unlisted) to the second, and
    # its listing to the millisecond (a time compared exactly gave false "changed"; diff review).
    now = (item.etag, item.size, float(int(item.last_modified.timestamp())))
    if item.etag is None and before is not None and before[0] is not None and _same(before, now):
        return before
    return now
