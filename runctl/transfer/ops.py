"""Upload, download and sync on any Transfer, with one meaning for both backends."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import itertools
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from runctl.exceptions import (
    NoSuchKeyError,
    PartialTransferError,
    TransferError,
    UnsafeKeyError,
    UsageError,
)
from runctl.s3url import NOT_UTF8, S3URL, not_utf8
from runctl.transfer.base import (
    ObjectInfo,
    PrefixInfo,
    ProgressCallback,
    Transfer,
    failure_summary,
)

log = logging.getLogger("runctl.transfer")

#: Files handed to a backend per call: bounds memory for huge trees, and s5cmd runs once per chunk.
CHUNK = 1_000
#: Why a key named like a prefix of other keys (``x`` beside ``x/y``) is not downloaded.
SHARED_NAME = "other keys are below it as a prefix, and a file and a directory cannot share its path"
#: A directory upload of at most this many files goes to the backend whole (``put_tree``).
TREE_MAX_FILES = 50_000
#: The name a download is written under before it is put in place (``CheckpointManager``
#: removes one a killed process left).
TMP_PREFIX = ".runctl-tmp-"
_TMP_HEX = 16  # hex digits after the prefix in a temporary file's name
#: runctl's own state directory inside a checkpoint root (journal, staging, locks).
STATE_DIR = ".runctl"
#: How a walk names a directory it could not read (``holes``): a failure, where other holes warn.
_UNREADABLE = "cannot read the directory"
_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096


# -- containment ------------------------------------------------------------------------------


def _limit(path: Path, name: str, default: int) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return int(os.pathconf(probe, name))
    except (OSError, ValueError, AttributeError):
        return default


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def safe_local_path(dest_root: Path, rel_key: str) -> Path:
    """The local path for ``rel_key`` under ``dest_root``, or ``UnsafeKeyError`` if it could escape.

    Rejected: empty keys, NUL, absolute keys, ``.``/``..``/empty components,
    components or paths too long for the filesystem, and any path whose existing parent
    directories (symlinks included) resolve outside ``dest_root``.

    Example:
        >>> safe_local_path(Path("/data"), "ckpt/step_1.pt")
        PosixPath('/data/ckpt/step_1.pt')
        >>> safe_local_path(Path("/data"), "../etc/passwd")
        Traceback (most recent call last):
        ...
        runctl.exceptions.UnsafeKeyError: unsafe key '../etc/passwd': component '..' would leave the destination (UnsafeKey)
    """
    return _Destination(dest_root).path_for(rel_key)


class _Destination:
    """``safe_local_path`` for many keys under one root.

    The filesystem limits and the resolved root are read once, and each parent directory is
    resolved once (a tree of 2,000 files in 20 directories resolved 2,000 parents before).
    Fresh per batch: ``_fetch`` checks again after creating the directories.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._limits: tuple[int, int] | None = None
        self._real_root: Path | None = None
        #: relative parent directory -> (its path, the byte length of its resolved path)
        self._parents: dict[str, tuple[Path, int]] = {}

    def path_for(self, rel_key: str) -> Path:
        def unsafe(reason: str) -> UnsafeKeyError:
            return UnsafeKeyError(f"unsafe key {rel_key!r}: {reason}", code="UnsafeKey")

        if not rel_key:
            raise unsafe("empty relative key")
        if "\x00" in rel_key:
            raise unsafe("contains a NUL character")
        if rel_key.startswith("/") or os.path.isabs(rel_key):
            raise unsafe("is an absolute path")
        if self._limits is None:
            self._limits = (
                _limit(self.root, "PC_NAME_MAX", _DEFAULT_NAME_MAX),
                _limit(self.root, "PC_PATH_MAX", _DEFAULT_PATH_MAX),
            )
        name_max, path_max = self._limits
        parts = rel_key.split("/")
        for part in parts:
            if part in ("", ".", ".."):
                shown = part or "(empty, from '//' or a trailing '/')"
                raise unsafe(
                    f"component {shown!r} would leave the destination"
                    if part == ".."
                    else f"component {shown!r} is not a file name"
                )
            if os.sep != "/" and os.sep in part:  # Windows: a backslash would be a separator
                raise unsafe(f"component {part!r} contains {os.sep!r}")
            if len(os.fsencode(part)) > name_max:
                raise unsafe(
                    f"component of {len(os.fsencode(part))} bytes is longer than the filesystem allows ({name_max})"
                )
        parent_rel, _, name = rel_key.rpartition("/")
        try:
            known = self._parents.get(parent_rel)
            if known is None:
                if self._real_root is None:
                    self._real_root = self.root.resolve()
                parent = self.root.joinpath(*parts[:-1])
                real_parent = parent.resolve()
                if not _is_within(real_parent, self._real_root):
                    raise unsafe(
                        f"its directory resolves to {str(real_parent)!r}, "
                        f"outside {str(self._real_root)!r}"
                    )
                resolved = os.fsencode(str(real_parent)).rstrip(b"/")  # "/" itself: b""
                known = self._parents[parent_rel] = (parent, len(resolved))
        except (OSError, RuntimeError) as exc:  # symlink loops
            raise unsafe(f"cannot resolve its directory: {exc}") from None
        parent, parent_bytes = known
        if parent_bytes + 1 + len(os.fsencode(name)) >= path_max:
            raise unsafe("the local path is longer than the filesystem allows")
        return parent / name


# -- filters and walking ----------------------------------------------------------------------


def selected(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Globs on the relative path (``*`` also crosses ``/``): in an include (if any), in no exclude.

    Example:
        >>> selected("ckpt/a.pt", ["*.pt"], []), selected("ckpt/a.pt", ["*.pt"], ["*"])
        (True, False)
    """
    if not (include or exclude):  # the usual case, once per file of every walk
        return True
    if include and not any(fnmatch.fnmatchcase(rel, pat) for pat in include):
        return False
    return not any(fnmatch.fnmatchcase(rel, pat) for pat in exclude)


def _walk_files(
    root: Path, odd: list[Path] | None = None, holes: list[tuple[str, str]] | None = None
) -> Iterator[tuple[str, Path]]:
    """``(relative posix path, path)`` of every regular file under ``root``, sorted, no dir symlinks followed.

    A directory's files come before its subdirectories, each in name order. The ``.runctl/``
    state directory is skipped. ``odd`` collects every entry that is not a plain file or
    directory, or that was skipped: symlinks (to files too, which are yielded), the state
    directory, interrupted downloads, sockets, FIFOs. ``holes`` collects ``(relative path,
    why)`` of what the walk could not take whole: directories it could not read (``why``
    starts with "cannot read") or did not enter (a symlink to one; relative path ending in
    "/"), and entries that are not regular files. Without ``holes``, each is logged.
    """
    # scandir's entry types come from the directory listing itself: no stat per plain file
    # (2,000 files: 18 ms with os.walk plus an lstat each, about 6 ms this way).
    # Paths are made by joining a name to the directory's Path (a third cheaper than parsing
    # each whole path again).
    pending: list[tuple[Path, str]] = [(Path(root), "")]
    while pending:
        directory, rel_dir = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            why = f"{_UNREADABLE}: {exc.strerror or exc}"
            if holes is not None:
                holes.append((rel_dir, why))
            else:
                log.warning("skipping %s: %s", directory, why)
            continue
        subdirs: list[tuple[Path, str]] = []
        for entry in entries:
            name = entry.name
            link = _is(entry.is_symlink)
            if _is(entry.is_dir):  # follows a symlink, like os.walk: never entered, never sent
                if name == STATE_DIR or link or name.startswith(TMP_PREFIX):
                    if odd is not None:
                        odd.append(directory / name)
                    if link:
                        why = "a symlink to a directory (not followed)"
                        if holes is not None:
                            holes.append((rel_dir + name + "/", why))
                        elif odd is None:
                            log.warning("skipping %s: %s", directory / name, why)
                else:
                    subdirs.append((directory / name, rel_dir + name + "/"))
                continue
            path = directory / name
            if name.startswith(TMP_PREFIX):  # our own interrupted download
                if odd is not None:
                    odd.append(path)
                continue
            regular = _is(entry.is_file) if link else _is(entry.is_file, follow_symlinks=False)
            if odd is not None and (link or not regular):
                odd.append(path)
            if not regular:  # dangling symlink, socket, fifo
                if holes is not None:
                    holes.append((rel_dir + name, "not a regular file"))
                elif odd is None:  # a caller collecting odd entries decides what to say
                    log.warning("skipping %s: not a regular file", path)
                continue
            yield rel_dir + name, path
        pending.extend(reversed(subdirs))


def _is(test: Callable[..., bool], **kwargs: bool) -> bool:
    """A ``DirEntry`` type test, False where the entry vanished or cannot be read."""
    try:
        return test(**kwargs)
    except OSError:
        return False


def _chunks(items: Iterable, size: int = CHUNK) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _raise_collected(
    failures: dict[str, str], total: int, action: str, done: object = None
) -> None:
    """Raise one error naming every failure; ``done`` is what was carried out all the same."""
    if not failures:
        return
    raise PartialTransferError(
        f"{action}: {len(failures)} of {total} failed: {failure_summary(failures)}",
        failures,
        done=done,
    )


def _collect(exc: TransferError, names: Sequence[str], failures: dict[str, str]) -> None:
    """Record a backend's batch error: per item when it says, else the same cause for every item."""
    if isinstance(exc, PartialTransferError):
        failures.update(exc.failures)
    else:  # each item failed: by its own reason when the error has one (not the whole summary)
        for name in names:
            failures[name] = exc.reason_for(name)


# -- upload -----------------------------------------------------------------------------------


def _upload_pairs(
    local: Path,
    url: S3URL,
    recursive: bool,
    include: Sequence[str],
    exclude: Sequence[str],
    own_file: Callable[[str], bool] | None = None,
    holes: list[tuple[str, str]] | None = None,
) -> Iterator[tuple[Path, S3URL]]:
    if local.is_dir():
        if not recursive:
            raise UsageError(
                f"{str(local)!r} is a directory: pass recursive (--recursive) to upload a tree"
            )
        prefix = url.as_prefix()
        for rel, path in _walk_files(local, holes=holes):
            if selected(rel, include, exclude) and not (own_file and own_file(rel)):
                if not_utf8(rel):
                    if holes is None:
                        raise UsageError(f"cannot upload {str(path)!r}: {NOT_UTF8}")
                    holes.append((rel, NOT_UTF8))
                    continue
                yield path, prefix.join(rel)
    elif local.is_file():
        if url.is_prefix and not_utf8(local.name):
            raise UsageError(
                f"cannot upload {str(local)!r} to {url}: {NOT_UTF8}, or give the key in the URL"
            )
        yield local, (url.join(local.name) if url.is_prefix else url)
    elif local.exists():
        raise UsageError(f"cannot upload {str(local)!r}: not a regular file or directory")
    else:
        raise UsageError(f"cannot upload {str(local)!r}: no such file or directory")


def _plain_tree(
    local: Path,
    url: S3URL,
    include: Sequence[str],
    exclude: Sequence[str],
    own_file: Callable[[str], bool] | None = None,
) -> list[tuple[Path, S3URL]] | None:
    """Every pair of a directory upload, when the directory holds exactly those files, else None.

    Exactly: no symlink, state directory, special file, filtered-out or ``own_file``, at most
    ``TREE_MAX_FILES`` files. Such a tree may go up as one directory copy (``put_tree``).
    """
    if not local.is_dir():
        return None
    odd: list[Path] = []
    holes: list[tuple[str, str]] = []
    prefix = url.as_prefix()
    pairs: list[tuple[Path, S3URL]] = []
    for rel, path in _walk_files(local, odd, holes):
        if odd or holes or len(pairs) >= TREE_MAX_FILES or not selected(rel, include, exclude):
            return None
        if (own_file is not None and own_file(rel)) or not_utf8(rel):
            return None
        pairs.append((path, prefix.join(rel)))
    return None if odd or holes else pairs


def upload(
    transfer: Transfer,
    local: Path,
    url: S3URL,
    *,
    recursive: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    storage_class: str | None = None,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    own_file: Callable[[str], bool] | None = None,
) -> list[tuple[Path, S3URL]]:
    """Upload a file (to ``url``, or ``url/<name>`` when ``url`` is a prefix) or a tree (recursive).

    ``own_file(rel)``: a file of the tree that is runctl's own and never sent (a directory's
    marker, which is written from what landed, never copied).

    Raises:
        UsageError: ``local`` is missing, or is a directory without ``recursive``.
        PartialTransferError: naming every file that failed, after trying them all.

    Example:
        >>> upload(t, Path("ckpt/step_1.pt"), S3URL.parse("s3://bkt/run/"))  # doctest: +SKIP
        [(PosixPath('ckpt/step_1.pt'), S3URL(bucket='b', key='run/step_1.pt'))]
    """
    local = Path(local)
    done: list[tuple[Path, S3URL]] = []
    failures: dict[str, str] = {}
    holes: list[tuple[str, str]] = []
    tree = None if dry_run or not recursive else _plain_tree(local, url, include, exclude, own_file)
    chunks: Iterable[list[tuple[Path, S3URL]]]
    appeared: list[tuple[Path, S3URL, int | None]] = []
    if tree:  # the whole tree in one call, which may copy the directory at once
        chunks = [tree]

        def send(chunk: list[tuple[Path, S3URL]]) -> None:
            appeared.extend(transfer.put_tree(local, chunk, storage_class=storage_class, progress=progress))

    else:
        chunks = _chunks(_upload_pairs(local, url, recursive, include, exclude, own_file, holes))

        def send(chunk: list[tuple[Path, S3URL]]) -> None:
            transfer.put_files(chunk, storage_class=storage_class, progress=progress)

    total = 0
    for chunk in chunks:
        total += len(chunk)
        if dry_run:
            done.extend(chunk)
            continue
        before = [_stamp(path) for path, _ in chunk]
        try:
            send(chunk)
        except TransferError as exc:
            if tree and isinstance(exc, PartialTransferError) and isinstance(exc.done, list):
                appeared.extend(exc.done)  # what the directory copy sent beyond the pairs
            # The first batch failing as a whole for one typed cause (no such bucket, access
            # denied, no endpoint) is that error, as for one file: not the same cause once per file.
            if (
                total == len(chunk)
                and (len(chunk) == 1 or type(exc) is not TransferError)
                and not isinstance(exc, PartialTransferError)
            ):
                raise
            _collect(exc, [str(u) for _, u in chunk], failures)
        _changed_while_sent(transfer, chunk, before, failures, storage_class)
        done.extend(pair for pair in chunk if str(pair[1]) not in failures)
    total += len(appeared)
    done.extend(_appeared_while_sent(local, appeared, failures))
    total += _note_holes(local, holes, failures)
    _raise_collected(failures, total, "upload", done)
    return done


#: How many times a copy sends again a file that changed while it went up (``_changed_while_sent``),
#: once it has been unchanged for ``RESEND_SETTLE`` seconds (``RESEND_WAIT`` seconds at most).
RESENDS = 2
RESEND_SETTLE = 1.0
RESEND_WAIT = 10.0


def _stamp(path: Path) -> tuple[int, int] | None:
    """A file's size and mtime, which a write changes.

    Not its ctime: a hard link or a chmod moves that, and the uploader hard-links each
    checkpoint it stages (a `runctl s3 upload -r` beside it deleted good objects as changed).
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _changed_while_sent(
    transfer: Transfer,
    chunk: Sequence[tuple[Path, S3URL]],
    before: Sequence[tuple[int, int] | None],
    failures: dict[str, str],
    storage_class: str | None = None,
) -> None:
    """A file written to while it went up may have reached S3 as a mix of old and new bytes.

    Once it is still (unchanged for ``RESEND_SETTLE`` s, and, until ``RESEND_WAIT`` s have
    passed, open for writing nowhere ``/proc`` can tell: a log held open is sent as it is then,
    as aws does) it is sent again, as it is then, up to ``RESENDS`` times: S3 holds what the
    file holds, whole. A training run's uploader may have sent that newer version already, and
    the copy's object must not take its place nor leave it deleted (``last.ckpt`` beside a
    `runctl s3 sync` was gone). One that never stays still, or is gone (or no longer a file)
    before it could be sent again, has its object deleted (a checkpoint that looks whole and is
    not is worse than none) and counts as failed: aws-cli and s5cmd leave such an object
    without a word; but one a process has open for appending (a log) keeps what went up, with
    a warning, sent once more as it is then (``_appended``). A file deleted since it was sent, unchanged, is left as sent: an unlink
    tears nothing already read (local retention deletes a checkpoint once it is durable, and a
    copy beside it must not delete its object then).
    """
    pending: list[tuple[Path, S3URL]] = []
    for (path, url), stamp in zip(chunk, before, strict=True):
        if stamp is None or str(url) in failures:
            continue
        now = _stamp(path)
        if now is not None and now != stamp:
            pending.append((path, url))
    lost: list[tuple[Path, S3URL]] = []  # its object is to go
    sends: dict[str, int] = {}
    deadline = time.monotonic() + RESEND_WAIT
    while pending:
        gone = [(path, url) for path, url in pending if not _is_file(path)]
        lost.extend(gone)
        pending = [pair for pair in pending if pair not in gone]
        quiet = _quiet(pending, deadline)
        if not quiet:
            break
        log.info(
            "%d file(s) changed while they were uploading: sending them again (%s)",
            len(quiet),
            ", ".join(str(path) for path, _ in quiet[:3]),
        )
        stamps = [_stamp(path) for path, _ in quiet]
        refused: dict[str, str] = {}
        try:
            transfer.put_files(quiet, storage_class=storage_class)
        except TransferError as exc:
            _collect(exc, [str(url) for _, url in quiet], refused)
        for (path, url), stamp in zip(quiet, stamps, strict=True):
            sends[str(url)] = sends.get(str(url), 0) + 1
            if stamp is not None and str(url) not in refused and _stamp(path) == stamp:
                pending.remove((path, url))  # sent whole, as it is now
            elif sends[str(url)] >= RESENDS:
                pending.remove((path, url))
                lost.append((path, url))
    logs = _appended(lost + pending)
    if logs:
        log.warning(
            "%d file(s) were appended to while they uploaded (%s): sent as they are now",
            len(logs),
            ", ".join(str(path) for path, _ in logs[:3]),
        )
        try:
            transfer.put_files(logs, storage_class=storage_class)
        except TransferError as exc:  # what went up before is the log as it was then, whole too
            log.warning("sending them again failed (%s): their objects hold them as they were", exc)
    changed = [url for path, url in lost + pending if (path, url) not in logs]
    if not changed:
        return
    try:
        errors = transfer.delete_keys(changed[0].bucket, [url.key for url in changed]).errors
    except TransferError as exc:
        errors = {url.key: str(exc) for url in changed}
    for url in changed:
        gone_too = (
            f"deleting its object failed too ({errors[url.key]})"
            if url.key in errors
            else "its object was deleted"
        )
        failures[str(url)] = (
            f"the file changed while it was uploading and could not be sent again whole (it "
            f"kept changing, or went), so the object could mix old and new bytes: {gone_too}; "
            f"upload it again once it is written"
        )


#: Names of files written by appending as they are read (a logger's, TensorBoard's events).
_LOG_NAME = re.compile(r"\.(log|txt|out|err|jsonl|csv|tsv)(\.\d+)?$|tfevents", re.IGNORECASE)


def _appended(pairs: Sequence[tuple[Path, S3URL]]) -> list[tuple[Path, S3URL]]:
    """Those of ``pairs`` a process has open for appending, named as a log is (``_LOG_NAME``),
    and no checkpoint: their objects stay.

    Appending leaves the bytes before it as they were, so what goes up is the log as it was
    at some moment, whole: a `train.log` written to several times a second never settled,
    and `sync -d up` deleted its object and failed, on every run during training, where aws
    sends it as it is (sync pass).
    """
    from runctl.checkpoints import is_recognised
    from runctl.localrun import open_for_writing

    # Never a checkpoint, nor a file inside one: a step_2.pt grown with `>>` was kept at 23 of
    # its 40 MB, and retention took it for the newest whole checkpoint (verification pass).
    # And only a log's name: `wget -c` and resumed hub downloads append too, and a
    # model.safetensors was kept at 4.5 of its 6 MB, exit 0 (diff review).
    pairs = [
        (path, url)
        for path, url in pairs
        if _LOG_NAME.search(url.name) and not any(map(is_recognised, url.key.split("/")))
    ]
    if not pairs:
        return []
    logs = open_for_writing(None, appending=True) or set()
    return [(path, url) for path, url in pairs if _is_file(path) and os.path.realpath(path) in logs]


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _quiet(
    pending: Sequence[tuple[Path, S3URL]], deadline: float
) -> list[tuple[Path, S3URL]]:
    """Those of ``pending`` that stay unchanged for ``RESEND_SETTLE`` s and that no process has
    open for writing (past ``deadline``, open or not); waits until some are, or until
    ``deadline`` passes with none still (then: none)."""
    from runctl.localrun import open_for_writing

    while pending:
        stamps = [_stamp(path) for path, _ in pending]
        time.sleep(RESEND_SETTLE)
        still = [
            pair
            for pair, stamp in zip(pending, stamps, strict=True)
            if stamp is not None and _stamp(pair[0]) == stamp
        ]
        late = time.monotonic() >= deadline
        if late:
            return still
        writing = open_for_writing(None) or set()
        ready = [pair for pair in still if os.path.realpath(pair[0]) not in writing]
        if ready:
            return ready
    return []


def _appeared_while_sent(
    local: Path, appeared: Sequence[tuple[Path, S3URL, int | None]], failures: dict[str, str]
) -> list[tuple[Path, S3URL]]:
    """Files that appeared in ``local`` after the walk and went up with a directory copy.

    Reported as sent, with a warning (aws and s5cmd also send what their walk finds), unless
    the file now has another size than its object: then it was still being written, and it
    fails (its object is left as it is: another process, an uploader, may have sent it whole).
    """
    sent: list[tuple[Path, S3URL]] = []
    for path, url, size in appeared:
        try:
            now = os.stat(path).st_size
        except OSError:
            now = None
        if size is not None and now is not None and now != size:
            failures[str(url)] = (
                f"it appeared in {str(local)!r} during the upload and went up while it was "
                f"written ({size} of {now} bytes): upload it again once it is written"
            )
        else:
            sent.append((path, url))
    if sent:
        log.warning(
            "%d file(s) appeared in %s during the upload and went up as found (e.g. %s): "
            "upload again any that was still being written",
            len(sent), local, sent[0][0],
        )
    return sent


def _note_holes(local: Path, holes: Sequence[tuple[str, str]], failures: dict[str, str]) -> int:
    """A directory that cannot be read is a failure (as s5cmd has it); the rest, a warning.

    Returns how many failures it added.
    """
    added = 0
    for rel, why in holes:
        path = str(local / rel) if rel else str(local)
        if why.startswith(_UNREADABLE) or why == NOT_UTF8:
            failures[path] = why
            added += 1
        else:
            log.warning("skipping %s: %s", path, why)
    return added


def _refuse_emptying(
    source: str, victims: str, include: Sequence[str], exclude: Sequence[str]
) -> None:
    """Refuse a ``--delete`` whose source is empty: a mistyped path must not wipe the other side."""
    filtered = " with these --include/--exclude filters" if include or exclude else ""
    raise UsageError(
        f"{source}{filtered}: --delete would delete {victims}; refused, nothing was changed "
        "(check the path)"
    )


def _under_hole(rel: str, holes: Sequence[tuple[str, str]]) -> bool:
    """True when ``rel`` is one of ``holes``, or lies in a directory that is one."""
    return any(rel == hole or (hole.endswith("/") or not hole) and rel.startswith(hole) for hole, _ in holes)


def runctl_own(rel: str) -> bool:
    """True for a path inside a ``.runctl/`` state directory, or a ``.runctl-tmp-`` file or directory.

    Sync leaves these out both ways, and never deletes them: they are runctl's own, and the walk
    of a local tree skips them too (so what it skips is never taken for gone).

    Example:
        >>> runctl_own("run/.runctl/journal.jsonl"), runctl_own("run/.runctl-tmp-1a/x.pt")
        (True, True)
        >>> runctl_own("run/step_1.pt")
        False
    """
    return any(part == STATE_DIR or part.startswith(TMP_PREFIX) for part in rel.split("/"))


# -- download ---------------------------------------------------------------------------------


def _tmp_name(final: Path) -> Path:
    return final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:_TMP_HEX]}"


def _discard(tmps: Iterable[Path]) -> None:
    """Remove these temporary files and those a backend named after them (s5cmd's
    ``<name><digits>``, boto3's ``<name>.<hex>``), which an interrupted download leaves behind."""
    by_parent: dict[Path, set[str]] = {}
    for tmp in tmps:
        by_parent.setdefault(tmp.parent, set()).add(tmp.name)
    cut = len(TMP_PREFIX) + _TMP_HEX
    for parent, names in by_parent.items():
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            if entry.name[:cut] in names:
                try:
                    os.unlink(entry.path)
                except OSError as exc:
                    log.warning("cannot remove the temporary file %s: %s", entry.path, exc)


def _set_mtime(path: Path, obj: ObjectInfo | None) -> None:
    if obj is None:
        return
    stamp = obj.last_modified.timestamp()
    try:
        os.utime(path, (stamp, stamp))
    except OSError as exc:
        log.warning("cannot set the modification time of %s: %s", path, exc)


def _shadowed(finals: Iterable[Path]) -> set[str]:
    """The paths among ``finals`` that others need as their directory (keys ``x`` and ``x/y``).

    A file and a directory cannot share a path; the deeper keys win, as with ``aws s3 cp``,
    and the key named like their prefix fails (``SHARED_NAME``), on either backend.

    Example:
        >>> sorted(_shadowed([Path("d/x"), Path("d/x/y"), Path("d/z")]))
        ['d/x']
    """
    paths = [str(f) for f in finals]
    parents: set[str] = set()
    for path in paths:
        while (path := path.rpartition(os.sep)[0]) and path not in parents:
            parents.add(path)
    return {p for p in paths if p in parents}


def _move_into_place(staged: Path, final: Path) -> None:
    """Rename ``staged`` to ``final``; across filesystems, copy beside ``final`` first, then rename."""
    try:
        os.replace(staged, final)  # replaces a symlink itself, never writes through it
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = _tmp_name(final)
        try:
            shutil.copy2(staged, tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)


def _fetch(
    transfer: Transfer,
    items: Iterable[tuple[ObjectInfo | None, S3URL, Path]],
    dest_root: Path,
    failures: dict[str, str],
    progress: ProgressCallback | None,
    *,
    tree: S3URL | None = None,
) -> list[tuple[S3URL, Path]]:
    """Download each (info, url, final path) atomically into ``dest_root``; record failures by URL.

    Each file is written under a temporary name beside its final path, then renamed. With
    ``tree`` (``items`` are every object below that prefix the caller wants, possibly still
    being listed), they are written instead into one temporary directory inside
    ``dest_root``, given up to ``Transfer.get_tree``, and moved into place from there; the
    directory goes afterwards, and so does ``dest_root`` if it was made for nothing.
    """
    dest_root = Path(dest_root)
    stage: Path | None = None
    made: list[Path] = []  # directories created for the stage, deepest first
    if tree is not None:
        made = [p for p in (dest_root, *dest_root.parents) if not p.exists()]
        dest_root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=dest_root))
    try:
        return _fetch_into(transfer, items, dest_root.resolve(), stage, tree, failures, progress)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for directory in made:
            try:
                directory.rmdir()  # only while empty: nothing was downloaded into it
            except OSError:
                break


def _fetch_into(
    transfer: Transfer,
    items: Iterable[tuple[ObjectInfo | None, S3URL, Path]],
    real_root: Path,
    stage: Path | None,
    tree: S3URL | None,
    failures: dict[str, str],
    progress: ProgressCallback | None,
) -> list[tuple[S3URL, Path]]:
    staged: list[tuple[ObjectInfo | None, S3URL, Path, Path]] = []
    stage_dirs: set[str] = {""}  # relative directories made in the stage
    contained: dict[str, bool] = {}  # parent -> resolves inside, checked once per batch
    listing_failed = False

    def checked() -> Iterator[tuple[S3URL, Path]]:
        nonlocal listing_failed
        it = iter(items)
        while True:
            try:
                info, url, final = next(it)
            except StopIteration:
                return
            except BaseException:
                listing_failed = True
                raise
            try:
                tmp = staging_path(url, final)
            except (OSError, TransferError) as exc:
                failures[str(url)] = str(exc)
                continue
            staged.append((info, url, final, tmp))
            yield url, tmp

    def staging_path(url: S3URL, final: Path) -> Path:
        head, sep, _ = str(final).rpartition(os.sep)  # strings: cheaper than .parent
        parent = head or (os.sep if sep else ".")  # "/x": "/"; "x" (into "."): "."
        if parent not in contained:
            Path(parent).mkdir(parents=True, exist_ok=True)
            # Re-check after creating directories: nothing may have become a symlink out of the root.
            contained[parent] = _is_within(Path(parent).resolve(), real_root)
        if not contained[parent]:
            raise UnsafeKeyError(
                f"unsafe key {url.key!r}: its directory resolves outside {str(real_root)!r}"
            )
        if stage is None or tree is None:
            if final.is_dir() and not final.is_symlink():
                raise TransferError(f"cannot write {str(final)!r}: a directory is in the way")
            return _tmp_name(final)
        # A directory in the way fails the move into place (not checked here, while s5cmd
        # downloads: one stat per file on the same cores).
        # The key below the prefix, checked safe as the final path's part below the root.
        rel = url.key[len(tree.key) :]
        if rel.split("/", 1)[0] == stage.name:
            raise UnsafeKeyError(f"unsafe key {url.key!r}: it names runctl's temporary directory")
        parent_rel = rel.rpartition("/")[0]
        if parent_rel not in stage_dirs:
            try:
                (stage / parent_rel).mkdir(parents=True, exist_ok=True)
                stage_dirs.add(parent_rel)
            except (FileExistsError, NotADirectoryError):
                pass  # the copy wrote a key named like this directory: fetched again after it
        return stage / rel

    batch_failures: dict[str, str] = {}
    try:
        if stage is not None and tree is not None:
            # Lazily: the backend may download the prefix while the listing is still read.
            transfer.get_tree(tree, stage, checked(), progress=progress)
        else:
            pairs = list(checked())
            if pairs:
                transfer.get_files(pairs, progress=progress)
    except TransferError as exc:
        if listing_failed:
            _discard([tmp for *_, tmp in staged])
            raise
        _collect(exc, [str(url) for _, url, _, _ in staged], batch_failures)
    except BaseException:  # Ctrl-C, SIGTERM: nothing is moved into place, nothing left behind
        _discard([tmp for *_, tmp in staged])
        raise
    done: list[tuple[S3URL, Path]] = []
    shadowed = _shadowed(final for _, _, final, _ in staged)
    if shadowed and stage is not None:
        try:
            staged = _deeper_keys_again(transfer, staged, shadowed, batch_failures, progress)
        except BaseException:
            _discard([tmp for *_, tmp in staged])
            raise
    for info, url, final, tmp in staged:
        if str(final) in shadowed:
            batch_failures[str(url)] = SHARED_NAME
        if str(url) in batch_failures:
            with contextlib.suppress(OSError):  # a stage directory made for the deeper keys
                tmp.unlink()
            continue
        torn = changed_during(transfer, url, info)
        if torn is not None:
            tmp.unlink(missing_ok=True)
            batch_failures[str(url)] = torn
            continue
        try:
            _set_mtime(tmp, info)
            _move_into_place(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            batch_failures[str(url)] = f"cannot move into place {str(final)!r}: {exc}"
            continue
        done.append((url, final))
    failures.update(batch_failures)
    return done


def _delete_local(path: Path, failures: dict[str, str]) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        failures[str(path)] = f"cannot delete: {exc}"


def changed_during(transfer: Transfer, url: S3URL, info: ObjectInfo | None) -> str | None:
    """Why the download of ``url`` just made may hold parts of two versions, or None.

    s5cmd downloads a large object in ranged parts without If-Match: one overwritten while it
    came down (an evaluator pulling ``last.ckpt`` as training sends the next) landed as the
    old version's first part and the new one's rest, exit 0 (CLI pass: 2 runs in 5; aws fails
    on an ETag mismatch, s3transfer asks with If-Match). The object is asked for again where
    the backend says it downloads so (``unguarded_ranges_above``), and only above that size.

    Example:
        >>> changed_during(object(), S3URL("bkt", "k"), None) is None
        True
    """
    above = getattr(transfer, "unguarded_ranges_above", None)
    if above is None or info is None or info.size <= above:
        return None
    now = transfer.stat(url)
    if now is None:
        return None  # deleted after it came down whole: the parts were all of one version
    same_etag = now.etag == info.etag if now.etag and info.etag else True
    # A HEAD dates to the second, a listing may to the millisecond.
    same_time = int(now.last_modified.timestamp()) == int(info.last_modified.timestamp())
    if same_etag and now.size == info.size and same_time:
        return None
    return (
        f"the object was overwritten during its download (now {now.size} bytes, "
        f"{now.last_modified:%Y-%m-%d %H:%M:%S}), so what came down may mix two versions: "
        "not moved into place; download it again"
    )


def _deeper_keys_again(
    transfer: Transfer,
    staged: list[tuple[ObjectInfo | None, S3URL, Path, Path]],
    shadowed: set[str],
    batch_failures: dict[str, str],
    progress: ProgressCallback | None,
) -> list[tuple[ObjectInfo | None, S3URL, Path, Path]]:
    """Fetch again, in one batch, the keys below a shadowed name that a directory copy failed.

    A directory copy writes ``x`` and ``x/y`` in its own order, racing the stage's directories:
    whichever came first failed the other. The deeper keys win (``_shadowed``), so they are
    fetched again beside their final paths, whose directories exist by now.
    """
    again = [
        item
        for item in staged
        if str(item[1]) in batch_failures
        and any(str(item[2]).startswith(name + os.sep) for name in shadowed)
    ]
    if not again:
        return staged
    retry = {str(url): (info, url, final, _tmp_name(final)) for info, url, final, _ in again}
    failed: dict[str, str] = {}
    try:
        transfer.get_files([(url, tmp) for _, url, _, tmp in retry.values()], progress=progress)
    except TransferError as exc:
        _collect(exc, list(retry), failed)
    except BaseException:  # Ctrl-C: beside the final paths, out of the stage that goes
        _discard([tmp for *_, tmp in retry.values()])
        raise
    for name, reason in failed.items():
        batch_failures[name] = reason
        retry[name][3].unlink(missing_ok=True)
    for name in retry:
        if name not in failed:
            del batch_failures[name]
    return [retry.get(str(item[1]), item) for item in staged]


def _download_tree(
    transfer: Transfer,
    objects: Iterable[ObjectInfo | PrefixInfo],
    prefix: S3URL,
    dest: Path,
    *,
    dry_run: bool,
    progress: ProgressCallback | None,
    whole: bool = False,
) -> tuple[list[tuple[S3URL, Path]], dict[str, str], int]:
    """Download objects below ``prefix`` into ``dest``: atomic, contained; unsafe keys skipped.

    ``whole``: ``objects`` are the listing of everything below ``prefix``, so the backend may
    download the prefix whole (``Transfer.get_tree``) rather than object by object.
    """
    prefix = prefix.as_prefix()
    done: list[tuple[S3URL, Path]] = []
    failures: dict[str, str] = {}
    seen = 0
    destination = _Destination(dest)

    def planned() -> Iterator[tuple[ObjectInfo, S3URL, Path]]:
        nonlocal seen
        for obj in objects:
            if not isinstance(obj, ObjectInfo):
                continue
            seen += 1
            rel = obj.key[len(prefix.key) :] if obj.key.startswith(prefix.key) else None
            if rel is None:
                failures[str(obj.url)] = f"key is not inside {prefix}"
                continue
            if obj.size == 0 and (not rel or rel.endswith("/")):
                continue  # a "folder" marker object ("fm/" itself or "fm/sub/"): nothing to write
            try:
                final = destination.path_for(rel)
            except UnsafeKeyError as exc:
                log.warning("skipping %s", exc)
                failures[str(obj.url)] = str(exc)
                continue
            yield obj, obj.url, final

    if whole and not dry_run:
        # One batch, read as the listing streams in: the backend may download the prefix in
        # one command (``Transfer.get_tree``) alongside. It holds one entry per object.
        done = _fetch(transfer, planned(), dest, failures, progress, tree=prefix)
        return done, failures, seen
    for chunk in _chunks(planned()):
        if dry_run:
            done.extend((url, final) for _, url, final in chunk)
        else:
            done.extend(_fetch(transfer, chunk, dest, failures, progress))
    if dry_run:
        shadowed = _shadowed(final for _, final in done)
        failures.update((str(url), SHARED_NAME) for url, final in done if str(final) in shadowed)
        done = [(url, final) for url, final in done if str(final) not in shadowed]
    return done, failures, seen


def download(
    transfer: Transfer,
    url: S3URL,
    dest: Path,
    *,
    recursive: bool = False,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
) -> list[tuple[S3URL, Path]]:
    """Download one object, or (recursive) every object below a prefix, never outside ``dest``.

    One object goes to ``dest`` (or ``dest/<name>`` when ``dest`` is a directory). A prefix
    goes to ``dest/<key relative to the prefix>``. Files appear atomically: written under a
    temporary name inside ``dest`` (a prefix: one temporary directory, which the backend may
    fill with one command), then renamed. Unsafe keys are skipped; the rest is downloaded first.
    One object onto a device or a FIFO (``/dev/null``, ``/dev/stdout``) is written into it.

    Raises:
        UsageError: a prefix without ``recursive``.
        NoSuchKeyError: the object, or every object under the prefix, is missing.
        PartialTransferError: naming every skipped or failed key.

    Example:
        >>> download(t, S3URL.parse("s3://bkt/run/"), Path("out"), recursive=True)  # doctest: +SKIP
        [(S3URL(bucket='b', key='run/step_1.pt'), PosixPath('out/step_1.pt'))]
    """
    dest = Path(dest)
    if recursive:
        prefix = url.as_prefix()
        done, failures, seen = _download_tree(
            transfer,
            transfer.iter_objects(prefix, recursive=True),
            prefix,
            dest,
            dry_run=dry_run,
            progress=progress,
            whole=True,
        )
        if seen == 0:
            raise NoSuchKeyError(f"no objects under {prefix}", code="NoSuchKey", url=str(prefix))
        _raise_collected(failures, seen, "download", done)
        return done
    if url.is_prefix:
        raise UsageError(
            f"{url} is a prefix: pass recursive (--recursive) to download everything below it"
        )
    info = _existing(transfer, url)
    if dest.is_dir():
        final = safe_local_path(dest, url.name)
    else:
        final = dest
    if dry_run:
        return [(url, final)]
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # as aws: a file where a directory must be
        blocker = next(p for p in (final.parent, *final.parent.parents) if os.path.lexists(p))
        what = "a dangling symlink" if not blocker.exists() else "not a directory"
        raise UsageError(f"cannot download {url} to {str(final)!r}: {str(blocker)!r} is {what}") from None
    if final.is_dir():
        raise UsageError(f"cannot download {url} to {str(final)!r}: a directory is in the way")
    # /dev/stdout, /dev/fd/N, /proc/self/fd/N name this process's own descriptor, written to as
    # it is (a file stdout was redirected to included); a device or a FIFO, or a symlink to one
    # (/dev/null), is written into, as aws does. A rename would replace the link, or put a
    # regular file in the device's place (as root, in /dev).
    named = names_descriptor(final)  # one walk of the links, for both questions
    own = _open_std(named)
    if own is None and named is not None and named <= 2:
        # Closed (`>&-`): /proc/self/fd/1 is not there, and the rename below replaced the
        # /dev/stdout link itself with the object, for every process after (surface pass).
        raise UsageError(
            f"cannot download {url} to {str(final)!r}: it names this process's "
            f"{('stdin', 'stdout', 'stderr')[named]}, which is closed"
        )
    if own is not None or _is_special(final):
        fd = own if own is not None else os.open(final, os.O_WRONLY)
        try:
            transfer.get_stream(url, fd)
        finally:
            if own is None:
                os.close(fd)
        return [(url, final)]
    tmp = _tmp_name(final)
    placed = False
    try:
        transfer.get_files([(url, tmp)], progress=progress)
        torn = changed_during(transfer, url, info)
        if torn is not None:
            raise TransferError(f"download {url} failed: {torn}", code="ChangedDuringDownload", url=str(url))
        _set_mtime(tmp, info)
        os.replace(tmp, final)
        placed = True
    finally:
        if not placed:
            _discard([tmp])
    return [(url, final)]


_FD_LINK = re.compile(r"/dev/fd/(\d+)|/proc/self/fd/(\d+)|/proc/(\d+)/fd/(\d+)")
_STD_NAMES = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}  # devices, not links, on macOS


def own_descriptor(path: str | os.PathLike[str]) -> int | None:
    """The standard stream of this process that ``path`` names (``/dev/stdout``, ``/dev/fd/1``,
    ``/proc/self/fd/1``, or a symlink to one) while it is open, else None.

    Only 0-2: another number may be any descriptor of this process by now (a socket, the
    journal), or one about to be a child's pipe.

    Example:
        >>> own_descriptor("/dev/stdout"), own_descriptor("/tmp/x")
        (1, None)
    """
    return _open_std(names_descriptor(path))


def _open_std(fd: int | None) -> int | None:
    """``fd`` when it is a standard stream (0-2) that is open, else None."""
    if fd is None or fd > 2:
        return None
    try:
        os.fstat(fd)
    except OSError:  # closed (`>&-`)
        return None
    return fd


def names_descriptor(path: str | os.PathLike[str]) -> int | None:
    """The descriptor of this process that ``path`` names (``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``, or a symlink to one), open or not; None for any other path.

    Example:
        >>> names_descriptor("/dev/stderr"), names_descriptor("/proc/self/fd/7"), names_descriptor("/tmp/x")
        (2, 7, None)
    """
    current = os.path.abspath(path)
    for _ in range(40):  # symlink hops, as the kernel allows
        fd = _STD_NAMES.get(current)
        match = _FD_LINK.fullmatch(current)
        if match and (match[3] is None or int(match[3]) == os.getpid()):
            fd = int(match[1] or match[2] or match[4])
        if fd is not None or match:
            return fd
        try:
            target = os.readlink(current)
        except OSError:
            return None
        # The directory part as the kernel resolves it (it may be reached through a symlink).
        current = os.path.normpath(os.path.join(os.path.realpath(os.path.dirname(current)), target))
    return None


def _is_special(path: Path) -> bool:
    """True for a character or block device or a FIFO, or a symlink to one."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)


def _existing(transfer: Transfer, url: S3URL) -> ObjectInfo:
    """The object's metadata; NoSuchKeyError, or NoSuchBucketError, when it is not there."""
    info = transfer.stat(url)
    if info is None:
        # A HEAD answers a bare 404 for a missing bucket too: a listing tells the two apart.
        for _ in transfer.iter_objects(url, recursive=False):  # NoSuchBucketError if it is that
            break
        raise NoSuchKeyError(f"no such object: {url}", code="NoSuchKey", url=str(url))
    return info


def download_stream(
    transfer: Transfer, url: S3URL, fd: int, *, dry_run: bool = False
) -> ObjectInfo:
    """Write one object's bytes to the file descriptor ``fd`` (``runctl s3 download URL -``).

    The object is looked up first, so a missing one is a typed error before a byte is written
    (``dry_run``: only that).

    Raises:
        UsageError: ``url`` is a prefix.
        NoSuchKeyError: the object is missing (NoSuchBucketError: its bucket).
        StreamClosedError: the reader closed ``fd`` first.

    Example:
        >>> download_stream(t, S3URL.parse("s3://bkt/run/data.tar"), sys.stdout.fileno())  # doctest: +SKIP
        ObjectInfo(bucket='bkt', key='run/data.tar', size=10240, ...)
    """
    if url.is_bucket or url.is_prefix:
        raise UsageError(f"{url} is a prefix: only one object can be written to stdout")
    info = _existing(transfer, url)
    if not dry_run:
        transfer.get_stream(url, fd)
    return info


def upload_stream(
    transfer: Transfer, fd: int, url: S3URL, *, storage_class: str | None = None
) -> int:
    """Upload what ``fd`` yields, to its end, as the one object ``url`` (``runctl s3 upload - URL``).

    The object appears only once the stream has ended and every part is in (multipart).

    Returns:
        The object's size in S3.

    Example:
        >>> upload_stream(t, sys.stdin.fileno(), S3URL.parse("s3://bkt/run/data.tar"))  # doctest: +SKIP
        10240
    """
    if url.is_bucket or url.is_prefix:
        raise UsageError(f"{url} is a prefix: a stream from stdin needs the object's full key")
    transfer.put_stream(fd, url, storage_class=storage_class)
    info = transfer.stat(url)
    return 0 if info is None else info.size


def download_objects(
    transfer: Transfer,
    objects: Iterable[ObjectInfo],
    prefix: S3URL,
    dest: Path,
    *,
    progress: ProgressCallback | None = None,
) -> list[tuple[S3URL, Path]]:
    """Download an explicit list of objects below ``prefix`` into ``dest`` (atomic, contained).

    Raises:
        PartialTransferError: naming every skipped or failed key, after the others are written.

    Example:
        >>> objs = [o for o in t.iter_objects(S3URL.parse("s3://bkt/run/checkpoint-5/"))]  # doctest: +SKIP
        >>> download_objects(t, objs, S3URL.parse("s3://bkt/run/"), Path("out"))  # doctest: +SKIP
    """
    done, failures, seen = _download_tree(
        transfer, objects, prefix, Path(dest), dry_run=False, progress=progress
    )
    _raise_collected(failures, seen, "download", done)
    return done


# -- sync -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncPlan:
    """What a sync copies and deletes; ``copy`` holds ``(source, destination)`` strings.

    ``skipped`` names remote keys a download cannot write safely, or local directories an
    upload cannot read and files gone since they were listed (with the reason). ``kept`` names
    objects an upward ``--delete`` left because a pin names their checkpoint (with the pin's
    URL).

    Example:
        >>> SyncPlan("up", (("a.pt", "s3://bkt/run/a.pt"),), (), 3).to_json()["copy"]
        [{'source': 'a.pt', 'destination': 's3://bkt/run/a.pt'}]
    """

    direction: str
    copy: tuple[tuple[str, str], ...]
    delete: tuple[str, ...]
    unchanged: int
    skipped: tuple[tuple[str, str], ...] = field(default=())
    kept: tuple[tuple[str, str], ...] = field(default=())

    def to_json(self) -> dict:
        return {
            "direction": self.direction,
            "copy": [{"source": src, "destination": dst} for src, dst in self.copy],
            "delete": list(self.delete),
            "unchanged": self.unchanged,
            "skipped": [{"url": url, "reason": reason} for url, reason in self.skipped],
            "kept": [{"url": url, "pin": pin} for url, pin in self.kept],
        }


def _remote_index(
    transfer: Transfer, prefix: S3URL, include: Sequence[str], exclude: Sequence[str]
) -> tuple[dict[str, ObjectInfo], dict[str, str]]:
    """The objects a sync compares, by relative key, and the pinned checkpoints' relative paths
    (``run/step_1.pt`` for a pin ``run/.runctl/pinned/step_1.pt``) with each pin's URL."""
    from runctl.checkpoints import PIN_DIR

    index: dict[str, ObjectInfo] = {}
    pinned: dict[str, str] = {}  # "run/step_1.pt" -> its pin's URL
    for obj in transfer.iter_objects(prefix, recursive=True):
        if not isinstance(obj, ObjectInfo) or not obj.key.startswith(prefix.key):
            continue
        rel = obj.key[len(prefix.key) :]
        if not rel or (rel.endswith("/") and obj.size == 0):
            continue  # folder markers
        if runctl_own(rel):
            head, sep, name = rel.rpartition(f"{PIN_DIR}/")
            if sep and name and "/" not in name and (not head or head.endswith("/")):
                pinned[head + name] = str(obj.url)
            continue  # never sent up, so never taken down, nor deleted
        if selected(rel, include, exclude):
            index[rel] = obj
    return index, pinned


def _markers_left_without_files(
    remote: Mapping[str, ObjectInfo], doomed: Sequence[ObjectInfo], keep_key: Callable[[str], bool]
) -> list[ObjectInfo]:
    """The markers ``keep_key`` keeps whose directory keeps no other object once ``doomed`` go.

    A marker names its directory's files: kept with none of them left, `review` showed the
    checkpoint complete with 0 files, and cleanup kept it for good; a local file `--exclude`
    leaves out, or a temporary one, had its directory look in use (diff review).
    """
    from runctl.marking import is_marker_key

    going = {obj.key for obj in doomed}
    held: set[str] = set()  # every directory that keeps an object other than a marker
    for obj in remote.values():
        if obj.key in going or is_marker_key(obj.key):
            continue
        end = obj.key.rfind("/")
        while end > 0 and obj.key[: end + 1] not in held:
            held.add(obj.key[: end + 1])
            end = obj.key.rfind("/", 0, end)
    return [
        obj
        for obj in remote.values()
        if obj.key not in going and is_marker_key(obj.key) and keep_key(obj.key)
        and obj.key.rpartition("/")[0] + "/" not in held
    ]


def _pins_unlisted(
    transfer: Transfer, prefix: S3URL, rels: Sequence[str], pinned: dict[str, str]
) -> dict[str, str]:
    """The pins of these objects' checkpoints that the listing did not show, asked for one by
    one (``Transfer.unlisted``), as ``_remote_index`` gives them.

    A pin dated ahead (a server clock running ahead, or written a moment ago on AWS) is left
    out of s5cmd's listing: `sync -d up --delete` deleted its checkpoint, exit 0 (retention
    pass), where every retention asks first.
    """
    from runctl.checkpoints import PIN_DIR, is_recognised

    wanted: set[str] = set()
    for rel in rels:
        parts = rel.split("/")
        for i, name in enumerate(parts):
            head = "/".join(parts[:i]) + "/" if i else ""
            if is_recognised(name) and head + name not in pinned:
                wanted.add(f"{head}{PIN_DIR}/{name}")
    if not wanted:
        return {}
    found = transfer.unlisted(prefix, sorted(wanted))
    return {rel.replace(f"{PIN_DIR}/", "", 1): str(info.url) for rel, info in found.items()}


def _pin_of(rel: str, pinned: dict[str, str]) -> str | None:
    """The pin's URL when ``rel`` is a pinned checkpoint, a file inside one, or a checkpoint
    saved beside it at its step (a pin keeps its step: net_d_2.pth with a pinned net_g_2.pth)."""
    from runctl.checkpoints import is_recognised, step_order

    for path, pin in pinned.items():
        if rel == path or rel.startswith(path + "/"):
            return pin
        head, _, name = path.rpartition("/")
        base = f"{head}/" if head else ""
        if rel.startswith(base) and step_order(name) != (-1, -1):
            top = rel[len(base) :].split("/", 1)[0]
            if step_order(top) == step_order(name) and is_recognised(top):
                return pin
    return None


def _newer(a: float, b: float) -> bool:
    """Whole seconds: listings differ in sub-second precision between servers and backends."""
    return int(a) > int(b)


def held_in_s3(obj: ObjectInfo | None, st: os.stat_result, *, size_only: bool = False) -> bool:
    """True when ``obj`` is this local file as uploaded: the same size, the file no newer.

    Sync's rule for "unchanged": size and time, as ``aws s3 sync``, but in whole seconds
    (listings differ below a second between servers and backends), so a file rewritten to the
    same size within the second its object was written reads as unchanged, where aws would
    send it; ``size_only`` drops the time.

    Example:
        >>> held_in_s3(None, os.stat(__file__))
        False
    """
    return (
        obj is not None
        and obj.size == st.st_size
        and (size_only or not _newer(st.st_mtime, obj.last_modified.timestamp()))
    )


@dataclass(frozen=True)
class _SyncWork:
    """A plan plus the typed values needed to carry it out (no string round-trips of keys)."""

    plan: SyncPlan
    uploads: tuple[tuple[Path, S3URL], ...] = ()
    downloads: tuple[tuple[ObjectInfo, S3URL, Path], ...] = ()
    delete_keys: tuple[str, ...] = ()
    delete_paths: tuple[Path, ...] = ()


def _plan(
    transfer: Transfer,
    local: Path,
    url: S3URL,
    direction: str,
    *,
    delete: bool,
    size_only: bool,
    include: Sequence[str],
    exclude: Sequence[str],
    keep_key: Callable[[str], bool] | None = None,
    own_file: Callable[[str], bool] | None = None,
) -> _SyncWork:
    if direction not in ("up", "down"):
        raise UsageError(f"direction must be 'up' or 'down', got {direction!r}")
    local = Path(local)
    prefix = url.as_prefix()
    if local.exists() and not local.is_dir():
        raise UsageError(f"sync needs a local directory, got the file {str(local)!r}")
    if direction == "up" and not local.is_dir():
        raise UsageError(f"cannot sync up {str(local)!r}: no such directory")
    remote, pinned = _remote_index(transfer, prefix, include, exclude)
    holes: list[tuple[str, str]] = []
    local_files = (
        {rel: path for rel, path in _walk_files(local, holes=holes) if selected(rel, include, exclude)}
        if local.is_dir()
        else {}
    )
    unchanged = 0
    skipped: list[tuple[str, str]] = []
    if direction == "up":
        if own_file is not None:
            local_files = {rel: path for rel, path in local_files.items() if not own_file(rel)}
        uploads: list[tuple[Path, S3URL]] = []
        unreadable: dict[str, str] = {}
        for rel, path in local_files.items():
            if not_utf8(rel):
                unreadable[str(path)] = NOT_UTF8
                continue
            obj = remote.get(rel)
            try:
                st = path.stat()
            except OSError as exc:  # gone since the walk (local retention): skipped, as aws does
                unreadable[str(path)] = f"{exc.strerror or exc} since it was listed"
                continue
            if not held_in_s3(obj, st, size_only=size_only):
                uploads.append((path, prefix.join(rel)))
            else:
                unchanged += 1
        # What the walk could not see (an unreadable directory, a symlinked one) is not gone.
        doomed = [
            remote[rel]
            for rel in sorted(remote)
            if delete
            and rel not in local_files
            and not _under_hole(rel, holes)
            and not (keep_key and keep_key(remote[rel].key))
        ]
        # A pin keeps its checkpoint through every deletion runctl makes; deleting it unpins.
        if doomed:
            pinned.update(_pins_unlisted(transfer, prefix, [o.key[len(prefix.key) :] for o in doomed], pinned))
        kept = [(str(obj.url), pin) for obj in doomed if (pin := _pin_of(obj.key[len(prefix.key) :], pinned))]
        if kept:
            spared = {url for url, _ in kept}
            doomed = [obj for obj in doomed if str(obj.url) not in spared]
        if doomed and keep_key is not None:
            doomed += _markers_left_without_files(remote, doomed, keep_key)
        if doomed and not local_files:
            _refuse_emptying(f"{str(local)!r} has no files", f"every object under {prefix}", include, exclude)
        _note_holes(local, holes, unreadable)
        plan = SyncPlan(
            "up",
            tuple((str(p), str(u)) for p, u in uploads),
            tuple(str(o.url) for o in doomed),
            unchanged,
            tuple(unreadable.items()),
            tuple(kept),
        )
        return _SyncWork(plan, uploads=tuple(uploads), delete_keys=tuple(o.key for o in doomed))
    if delete:  # a file is deleted for want of its object only once S3 is asked about it
        unseen = [
            rel
            for rel in local_files
            if rel not in remote and not runctl_own(rel) and not not_utf8(rel)  # (no key spells it)
        ]
        if unseen:
            remote.update(transfer.unlisted(prefix, unseen))
    downloads: list[tuple[ObjectInfo, S3URL, Path]] = []
    destination = _Destination(local)
    for rel, obj in sorted(remote.items()):
        try:
            path = destination.path_for(rel)
        except UnsafeKeyError as exc:
            skipped.append((str(obj.url), str(exc)))
            continue
        if rel in local_files:
            try:
                st = local_files[rel].stat()
            except OSError:  # gone since the walk: fetched as a file not here
                downloads.append((obj, obj.url, path))
                continue
            if obj.size == st.st_size and (
                size_only or not _newer(obj.last_modified.timestamp(), st.st_mtime)
            ):
                unchanged += 1
                continue
        downloads.append((obj, obj.url, path))
    extras = (
        [path for rel, path in sorted(local_files.items()) if rel not in remote] if delete else []
    )
    if extras and not remote:
        _refuse_emptying(f"no object is under {prefix}", f"every file in {str(local)!r}", include, exclude)
    plan = SyncPlan(
        "down",
        tuple((str(u), str(p)) for _, u, p in downloads),
        tuple(str(p) for p in extras),
        unchanged,
        tuple(skipped),
    )
    return _SyncWork(plan, downloads=tuple(downloads), delete_paths=tuple(extras))


def plan_sync(
    transfer: Transfer,
    local: Path,
    url: S3URL,
    direction: Literal["up", "down"],
    *,
    delete: bool = False,
    size_only: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> SyncPlan:
    """Plan a one-way sync of a local directory and an S3 prefix; changes nothing.

    A file is copied when missing on the other side, different in size, or (unless
    ``size_only``) newer on the source side (whole seconds). ``delete`` removes destination
    files the source lacks, only inside the prefix / directory and only those the filters
    select; it refuses (``UsageError``) when the source has nothing, which a mistyped path
    would otherwise turn into deleting everything. Keys that cannot be written safely, and
    local directories that cannot be read, are listed in ``skipped``; what such a directory,
    or one reached by a symlink, holds in S3 is never deleted, nor is a checkpoint that a pin
    (``<prefix>.runctl/pinned/<name>``) names: it is listed in ``kept``. ``.runctl/`` state
    directories and ``.runctl-tmp-`` files are left out both ways.

    Example:
        >>> plan_sync(t, Path("ckpt"), S3URL.parse("s3://bkt/run/"), "up").copy  # doctest: +SKIP
        (('ckpt/step_1.pt', 's3://bkt/run/step_1.pt'),)
    """
    return _plan(
        transfer,
        local,
        url,
        direction,
        delete=delete,
        size_only=size_only,
        include=include,
        exclude=exclude,
    ).plan


def sync(
    transfer: Transfer,
    local: Path,
    url: S3URL,
    direction: Literal["up", "down"],
    *,
    delete: bool = False,
    size_only: bool = False,
    dry_run: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: ProgressCallback | None = None,
    before_upload: Callable[[Sequence[tuple[Path, S3URL]]], None] | None = None,
    keep_key: Callable[[str], bool] | None = None,
    own_file: Callable[[str], bool] | None = None,
) -> SyncPlan:
    """Carry out ``plan_sync`` (copies first, then deletes) and return the plan; dry-run only plans.

    ``before_upload`` sees every (file, URL) pair of an upward sync before the first is sent;
    with ``delete``, a key for which ``keep_key`` is true is never deleted (a marker in S3 has
    no local file). Going up, a local file for which ``own_file`` is true is never sent (a
    marker that came down with its directory: the one in S3 is written from what landed).

    Raises:
        PartialTransferError: naming every copy or delete that failed and every unsafe key skipped.

    Example:
        >>> sync(t, Path("ckpt"), S3URL.parse("s3://bkt/run/"), "up", delete=True)  # doctest: +SKIP
    """
    work = _plan(
        transfer,
        local,
        url,
        direction,
        delete=delete,
        size_only=size_only,
        include=include,
        exclude=exclude,
        keep_key=keep_key,
        own_file=own_file,
    )
    plan = work.plan
    total = len(plan.copy) + len(plan.delete) + len(plan.skipped)
    if dry_run:
        # As the real run would: keys it cannot write make it fail, after the rest.
        _raise_collected(dict(plan.skipped), total, f"sync {direction}", plan)
        return plan
    if before_upload is not None and work.uploads:
        before_upload(work.uploads)
    failures: dict[str, str] = dict(plan.skipped)
    for chunk in _chunks(work.uploads):
        before = [_stamp(path) for path, _ in chunk]
        try:
            transfer.put_files(chunk, progress=progress)
        except TransferError as exc:
            _collect(exc, [str(u) for _, u in chunk], failures)
        _changed_while_sent(transfer, chunk, before, failures)
    if work.downloads:
        Path(local).mkdir(parents=True, exist_ok=True)
    # A local file y that --delete removes, where S3 has y/inner: deleted before the copy,
    # which otherwise failed on it ("File exists") though --dry-run promised both (CLI pass).
    parents = {str(p) for *_, final in work.downloads for p in Path(final).parents}
    first = {path for path in work.delete_paths if str(path) in parents}
    for path in first:
        _delete_local(path, failures)
    for chunk in _chunks(work.downloads):
        _fetch(transfer, chunk, Path(local), failures, progress)
    if work.delete_keys:
        try:
            result = transfer.delete_keys(url.bucket, work.delete_keys)
            failures.update(
                {str(S3URL(url.bucket, k)): reason for k, reason in result.errors.items()}
            )
        except TransferError as exc:
            _collect(exc, list(plan.delete), failures)
    for path in work.delete_paths:
        if path not in first:
            _delete_local(path, failures)
    carried_out = replace(
        plan,
        copy=tuple(c for c in plan.copy if c[0] not in failures and c[1] not in failures),
        delete=tuple(target for target in plan.delete if target not in failures),
    )
    _raise_collected(failures, total, f"sync {direction}", carried_out)
    return plan
