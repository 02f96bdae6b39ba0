"""Host-wide retention locks (filelock on sidecar files): one per S3 prefix, one per local directory."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from runctl.exceptions import LockTimeout, UsageError
from runctl.s3url import S3URL

log = logging.getLogger("runctl.locking")

#: After this long without the lock, say who we are waiting for.
WARN_AFTER = 3.0
LOCAL_LOCK_NAME = "retention.lock"
UPLOAD_LOCK_NAME = "upload.lock"

_locks: dict[str, FileLock] = {}
_locks_guard = threading.Lock()


def _user_cache_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def lock_dir() -> Path:
    """Where S3 prefix locks live: ``$RUNCTL_LOCK_DIR``, else ``<user cache dir>/runctl/locks``.

    Example:
        >>> lock_dir().is_dir()
        True
    """
    override = os.environ.get("RUNCTL_LOCK_DIR")
    path = Path(override).expanduser() if override else _user_cache_dir() / "runctl" / "locks"
    try:
        if override and not path.exists():
            path.mkdir(parents=True, exist_ok=True)
            # Named to be shared (users, sudo, containers): made with the umask (0755), no
            # other user could add the lock of a prefix that had none yet (verification pass).
            with contextlib.suppress(OSError):
                path.chmod(0o777)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = "$RUNCTL_LOCK_DIR" if override else "the default lock directory; set $RUNCTL_LOCK_DIR"
        raise UsageError(
            f"cannot use {str(path)!r} for retention locks ({where}): {exc.strerror or exc}"
        ) from None
    return path.resolve()


def _file_lock(path: Path) -> FileLock:
    # One FileLock object per path per process: filelock counts re-entries per thread on one object
    # (thread_local), so the same thread may nest, while other threads and processes wait on flock.
    key = os.path.abspath(path)
    with _locks_guard:
        lock = _locks.get(key)
        if lock is None:
            # Readable and writable by every user: a shared RUNCTL_LOCK_DIR is how users,
            # sudo and containers share the S3 lock, and a file made 0644 by the first user
            # refused the second (Permission denied): cleanup failed, and the uploader never
            # applied retention (concurrency pass).
            lock = _locks[key] = FileLock(key, thread_local=True, mode=0o666)
        return lock


def _why_refused(path: Path) -> str:
    """What to do about a lock file this user may not take."""
    try:
        sticky = path.parent.stat().st_mode & 0o1000 and path.stat().st_uid != os.geteuid()
    except OSError:
        sticky = False
    if sticky:
        # filelock takes no lock file another user made in a sticky directory (/tmp, or one
        # made 1777), however it is mode: "chmod a+rw" sent users after a file that already
        # was (verification pass).
        return (
            f"its directory {path.parent} has the sticky bit, as /tmp does, and another user made "
            "it: share a directory without it (mkdir -m 0777 DIR) as $RUNCTL_LOCK_DIR"
        )
    return "every user sharing its directory needs to write it: chmod a+rw, or set $RUNCTL_LOCK_DIR"


@contextmanager
def _hold(path: Path, timeout: float, what: str) -> Iterator[None]:
    if timeout < 0:
        raise UsageError(f"lock timeout must be >= 0 seconds (got {timeout!r})")
    lock = _file_lock(path)
    start = time.monotonic()
    try:
        lock.acquire(timeout=min(WARN_AFTER, timeout))
    except PermissionError as exc:
        raise UsageError(f"cannot open the retention lock file {path}: {exc.strerror or exc} ({_why_refused(path)})") from None
    except Timeout:
        remaining = timeout - (time.monotonic() - start)
        if remaining <= 0:
            raise LockTimeout(
                f"could not take the retention lock for {what} within {timeout:g} s "
                f"(lock file {path}); another runctl process holds it"
            ) from None
        log.warning("waiting for lock %s (retention of %s is running in another process)", path, what)
        try:
            lock.acquire(timeout=remaining)
        except Timeout:
            raise LockTimeout(
                f"could not take the retention lock for {what} within {timeout:g} s "
                f"(lock file {path}); another runctl process holds it"
            ) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def brief_lock(path: Path, wait: float, what: str) -> Iterator[None]:
    """Hold a lock file for a few file operations (threads and processes, as ``local_dir_lock``).

    Past ``wait`` seconds, or where the filesystem refuses locks, go on without it: a holder
    stopped with Ctrl-Z must not stop this one (said in a warning).

    Example:
        >>> import tempfile
        >>> with brief_lock(Path(tempfile.mkdtemp()) / "x.lock", 1.0, "x"):
        ...     pass
    """
    lock = _file_lock(path)
    try:
        lock.acquire(timeout=wait, poll_interval=0.005)
    except Timeout:
        log.warning("%s changed without the lock %s: held elsewhere for %g s", what, path, wait)
        yield
        return
    except OSError as exc:  # no locks on this filesystem
        log.debug("%s changed without the lock %s: %s", what, path, exc)
        yield
        return
    try:
        yield
    finally:
        lock.release()


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "0:0:0:0:0:0:0:1"})


def _endpoint_ident(endpoint_url: str | None) -> str:
    """One spelling per server: ``http://localhost:9000/`` and ``http://127.0.0.1:9000`` are
    the same one (a cleanup did not wait for an uploader's retention across the two), and
    every AWS endpoint is AWS, where a bucket name is global.

    Example:
        >>> _endpoint_ident("HTTP://localhost:9000/"), _endpoint_ident("https://s3.us-east-1.amazonaws.com")
        ('http://loopback:9000', 'aws')
    """
    from urllib.parse import urlsplit

    text = (endpoint_url or "").strip()
    if not text:
        return "aws"
    try:
        parts = urlsplit(text if "://" in text else f"https://{text}")
        host = (parts.hostname or "").lower()
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:  # not a URL: as it is written
        return text.rstrip("/").lower()
    if host == "amazonaws.com" or host.endswith(".amazonaws.com"):
        return "aws"
    if host in _LOOPBACK or host.startswith("127."):
        host = "loopback"
    path = parts.path.rstrip("/")
    return f"{parts.scheme.lower()}://{host}:{port}{path}"


def s3_lock_path(prefix: S3URL, endpoint_url: str | None = None) -> Path:
    """The lock file for one S3 prefix at one endpoint (the same path in every process).

    Example:
        >>> s3_lock_path(S3URL("bkt", "ckpt")) == s3_lock_path(S3URL("bkt", "ckpt/"))
        True
    """
    ident = "\n".join((_endpoint_ident(endpoint_url), prefix.bucket, prefix.as_prefix().key))
    digest = hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32]
    return lock_dir() / f"s3-{prefix.bucket}-{digest}.lock"


def s3_prefix_lock(
    prefix: S3URL, endpoint_url: str | None = None, timeout: float = 600.0
) -> AbstractContextManager[None]:
    """Hold the host-wide retention lock of an S3 prefix.

    Raises:
        LockTimeout: if another process holds it for longer than ``timeout`` seconds.

    Example:
        >>> with s3_prefix_lock(S3URL("bkt", "ckpt/"), "http://127.0.0.1:9000", timeout=5):
        ...     pass
    """
    return _hold(s3_lock_path(prefix, endpoint_url), timeout, str(prefix.as_prefix()))


def local_dir_lock(root: Path, timeout: float = 600.0) -> AbstractContextManager[None]:
    """Hold the retention lock of a local checkpoint directory (``<root>/.runctl/retention.lock``).

    Raises:
        LockTimeout: if another process holds it for longer than ``timeout`` seconds.

    Example:
        >>> import tempfile
        >>> with local_dir_lock(Path(tempfile.mkdtemp()), timeout=5):
        ...     pass
    """
    root = Path(root).resolve()
    lock_parent = root / ".runctl"
    lock_parent.mkdir(parents=True, exist_ok=True)
    return _hold(lock_parent / LOCAL_LOCK_NAME, timeout, str(root))


@contextmanager
def upload_turn(root: Path, *, give_up: Callable[[], bool]) -> Iterator[None]:
    """Hold the upload turn of a local checkpoint directory (``<root>/.runctl/upload.lock``).

    Uploaders of one directory in different processes (``runctl local``'s beside its script's,
    both resuming what a crashed run left) upload in turns, so no checkpoint goes up twice at
    once and an old version never lands after a newer one. Waits as long as the other's upload
    takes; ``give_up()`` is asked twice a second and ends the wait with ``LockTimeout``.

    Example:
        >>> import tempfile
        >>> with upload_turn(Path(tempfile.mkdtemp()), give_up=lambda: False):
        ...     pass
    """
    lock_parent = Path(root).resolve() / ".runctl"
    lock_parent.mkdir(parents=True, exist_ok=True)
    lock = _file_lock(lock_parent / UPLOAD_LOCK_NAME)
    waited = False
    while True:
        try:
            lock.acquire(timeout=0.5)
            break
        except Timeout:
            if give_up():
                raise LockTimeout(f"stopped waiting for another process's upload in {root}") from None
            if not waited:
                log.info("waiting for another process's upload in %s to finish", root)
                waited = True
    try:
        yield
    finally:
        lock.release()


#: ``<root>/.runctl/uploaders/<pid>-<pid namespace>-<n>-<host>``: a mark held (a shared flock) by
#: each uploader of ``root`` while it runs (``mark_uploader``).
UPLOADERS_DIR = "uploaders"


def _ancestors(pid: int) -> list[int] | None:
    """``pid``'s parent, its parent, and so on (Linux ``/proc``); None where it cannot be read."""
    chain: list[int] = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            return None if not chain else chain
        # The command name is in parentheses and may hold spaces: the fields follow its last ')'.
        pid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        chain.append(pid)
    return chain


_marks = itertools.count()
_mine: set[str] = set()  # the marks this process made
#: Marks name their host: on a shared filesystem, another machine's pids are not ours to look up.
_HOST = socket.gethostname() or "localhost"

#: The variable a launcher gives each process of one run, each its own value: torchrun's and
#: Lightning's LOCAL_RANK, Slurm's SLURM_LOCALID, Open MPI's OMPI_COMM_WORLD_LOCAL_RANK.
_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


def _pid_namespace() -> str:
    try:
        return "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit()) or "0"
    except OSError:
        return "0"


def _ranks_of_one_run(pid: int, ppid: int | None, environ: Mapping[str, str]) -> bool:
    """True when ``pid`` is another rank of this process's run: a sibling (a launcher starts
    every rank of a node) whose local rank differs from ours. Two runs a shell started are
    siblings too, but neither has a local rank, or both have the same one."""
    if ppid is None or ppid != os.getppid():
        return False
    theirs = _environ_of(pid)
    return any(
        environ.get(name) is not None
        and theirs.get(name) is not None
        and environ.get(name) != theirs.get(name)
        for name in _RANK_VARIABLES
    )


def _environ_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (``/proc/<pid>/environ``; empty if unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {os.fsdecode(k): os.fsdecode(v) for k, v in pairs}


class UploaderMark:
    """An uploader's mark in ``<root>/.runctl/uploaders/`` (``mark_uploader``); ``remove()`` it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def remove(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = -1


def mark_uploader(root: Path) -> UploaderMark | None:
    """Say that this process uploads checkpoints from ``root`` until the mark is removed.

    None where the mark cannot be made (the check is then skipped). The mark is a file
    ``<pid>-<pid namespace>-<n>-<host>`` holding a shared flock, which the system releases when
    the process dies, SIGKILL included: an unlocked mark is a stale one.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); mark = mark_uploader(root)
        >>> other_uploaders(root), mark.remove()
        ([], None)
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return None
    folder = Path(root) / ".runctl" / UPLOADERS_DIR
    # One per uploader (each holds and removes its own), named by its pid in its pid namespace:
    # two containers' pid 1 on one bind-mounted directory are two processes.
    name = f"{os.getpid()}-{_pid_namespace()}-{next(_marks)}-{_HOST}"
    _mine.add(name)
    temp = folder / f".{name}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        log.debug("cannot mark %s as uploaded by this process: %s", root, exc)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # before its name appears: never seen unlocked
        os.replace(temp, folder / name)
    except OSError as exc:
        log.debug("cannot mark %s as uploaded by this process: %s", root, exc)
        os.close(fd)
        return None
    return UploaderMark(folder / name, fd)


def other_uploaders(root: Path) -> list[int]:
    """The live processes, other than this one, its own ancestors and descendants and the other
    ranks of its run (siblings with another ``LOCAL_RANK``: torchrun, a Slurm step), that marked
    ``root`` (``mark_uploader``); stale marks are removed.

    ``runctl local`` and its script's own uploader share a directory by design; two training
    runs started on one directory do not: each overwrites the other's checkpoints, locally and
    in S3. Linux only (it reads ``/proc``); elsewhere, an empty list.

    Example:
        >>> import tempfile
        >>> other_uploaders(Path(tempfile.mkdtemp()))
        []
    """
    try:
        import fcntl
    except ImportError:
        return []
    own = os.getpid()
    related = _ancestors(own)
    if related is None:
        return []
    namespace = _pid_namespace()
    folder = Path(root) / ".runctl" / UPLOADERS_DIR
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    live: list[int] = []
    for name in sorted(names):
        fields = name.split("-", 3)  # pid, pid namespace, counter, host
        if len(fields) != 4 or not fields[0].isdigit() or name in _mine or fields[3] != _HOST:
            continue  # not a mark, ours, or another machine's (whose pids say nothing here)
        pid_text = fields[0]
        here = fields[1] == namespace  # a pid of this namespace: one we can look at
        if here and int(pid_text) == own:
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its process is alive
                pid = int(pid_text)
                # Not an ancestor of ours (runctl local, for its script), nor a descendant, nor
                # another rank of our run (torchrun starts each rank as a sibling).
                theirs = _ancestors(pid) or []
                if here and (
                    pid in related
                    or own in theirs
                    or _ranks_of_one_run(pid, theirs[0] if theirs else None, os.environ)
                ):
                    continue
                if pid not in live:
                    live.append(pid)
                continue
            except OSError:
                continue
            with contextlib.suppress(OSError):
                path.unlink()  # its process is gone
        finally:
            os.close(fd)
    return live
