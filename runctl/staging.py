"""Snapshots of checkpoints under ``<root>/.runctl/staging/``: hard links, so deletes and renames cannot tear them."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runctl.checkpoints import MARKER_NAME, RUNCTL_DIR

log = logging.getLogger("runctl.uploader")

STAGING_DIR = ".runctl/staging"
#: Left out of a directory checkpoint at its top, as the marker's own list leaves them out: a
#: marker brought down with the files (``download -r``) is the uploader's to write anew.
_NOT_PART = (MARKER_NAME, RUNCTL_DIR)

#: errno values that mean "this filesystem will not hard-link here": copy instead.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES, errno.ENOSYS}
#: Beside a directory staged whole, in its slot: ``.whole-<name>`` (``StagingArea.find``).
_WHOLE_PREFIX = ".whole-"
_COPY_TRIES = 3
#: Linux names every open file ``/proc/self/fd/N``: linking that path stages the very inode
#: opened in ``submit()``, so the link itself (a journaled write that can wait tens of ms while
#: the disk is busy) can run on a background thread. Elsewhere ``submit()`` links at once.
FD_LINKS = os.path.isdir("/proc/self/fd")


@dataclass(frozen=True)
class FileStamp:
    """Identity and version of one file: inode, size, mtime and ctime (ns); any write changes it.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a"; _ = p.write_bytes(b"x")
        >>> FileStamp.of(p).size
        1
    """

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mtime: float

    @classmethod
    def of(cls, path: Path | str) -> FileStamp:
        st = os.stat(path)
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mtime)

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mtime)

    def same_content(self, other: FileStamp | None) -> bool:
        """True when ``other`` is this very version (ctime is ignored: linking a file changes it)."""
        return other is not None and (self.ino, self.size, self.mtime_ns) == (
            other.ino,
            other.size,
            other.mtime_ns,
        )


def stamp_or_none(path: Path) -> FileStamp | None:
    try:
        return FileStamp.of(path)
    except OSError:
        return None


@dataclass(frozen=True)
class Snapshot:
    """A staged checkpoint: ``path`` (file or tree) and the stamp of every file in it.

    ``files`` maps a path relative to the checkpoint (``""`` for a single file) to its stamp;
    ``size`` and ``mtime`` are what ``scan_local`` reports for the original (sum of sizes,
    newest mtime), so the journal's durability check can compare them later.
    """

    path: Path
    is_dir: bool
    files: Mapping[str, FileStamp]
    copied: bool = False

    @property
    def size(self) -> int:
        return sum(s.size for s in self.files.values())

    @property
    def mtime(self) -> float:
        if not self.files:
            return os.stat(self.path).st_mtime
        return max(s.mtime for s in self.files.values())

    def local(self, rel: str) -> Path:
        return self.path / rel if rel else self.path

    def changed(self) -> list[str]:
        """Relative paths whose staged file is no longer the stamped version (rewritten in place)."""
        return [
            rel
            for rel, st in self.files.items()
            if not st.same_content(stamp_or_none(self.local(rel)))
        ]


class SnapshotError(OSError):
    """The source changed or vanished while it was being staged."""


class Superseded(SnapshotError):
    """The version handed over is gone: its inode was written in place since (a new save over it)."""

    def __init__(self, name: str, files: str = "") -> None:
        which = f" ({files})" if files else ""
        super().__init__(
            f"{name} was written in place since it was handed over{which}: the version handed "
            "over no longer exists, and the one there now was never handed over"
        )


class StagingArea:
    """Hard-linked snapshots below ``<root>/.runctl/staging/<token>/<name>``.

    A hard link pins the inode: Lightning deleting the file, or ``os.replace`` of a new
    ``last.ckpt`` over it, leaves the staged version whole. An in-place rewrite (``open(..., "wb")``)
    does reach the staged inode; ``Snapshot.changed`` detects it. ``submit()`` only opens a
    file; the uploader's staging thread links that open file (``link_open_file``), or copies
    it (``copy_open_file``) when the trainer has already deleted or replaced it.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); _ = (root / "step_1.pt").write_bytes(b"abc")
        >>> area = StagingArea(root)
        >>> staged = area.link_file(root / "step_1.pt", "t1")
        >>> (root / "step_1.pt").unlink(); staged.read_bytes()
        b'abc'
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / STAGING_DIR

    def slot(self, token: str, name: str) -> Path:
        return self.dir / token / name

    def link_file(self, source: Path, token: str) -> Path | None:
        """Hard-link ``source`` into the staging area now (one link, no data copied).

        Returns None when this filesystem refuses hard links (the worker copies instead).

        Raises:
            FileNotFoundError: ``source`` vanished.
        """
        dest = self.slot(token, source.name)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, dest)
        except FileNotFoundError:
            if not source.exists():
                raise
            return None
        except OSError as exc:
            if exc.errno in _NO_LINK:
                return None
            raise
        return dest

    def link_open_file(self, fd: int, source: Path, token: str) -> Path | None:
        """Hard-link the inode open as ``fd`` (opened by ``open_for_staging``) into the staging area.

        Runs on the staging thread: a link is a metadata write, quick unless the disk is busy.
        Returns None when this filesystem refuses hard links (``copy_open_file`` then).

        Raises:
            FileNotFoundError: the inode has no name left (the trainer deleted or replaced
                ``source`` since it was opened) and Linux links only inodes that have one:
                ``copy_open_file`` copies it from ``fd`` instead.

        Example:
            >>> import tempfile
            >>> root = Path(tempfile.mkdtemp()); _ = (root / "step_1.pt").write_bytes(b"abc")
            >>> fd = open_for_staging(root / "step_1.pt")
            >>> staged = StagingArea(root).link_open_file(fd, root / "step_1.pt", "t1")
            >>> (root / "step_1.pt").unlink(); os.close(fd); staged.read_bytes()
            b'abc'
        """
        dest = self.slot(token, source.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
        try:
            # linkat(AT_SYMLINK_FOLLOW) through the fd's magic link; os.link's plain link(2) of
            # "/proc/self/fd/N" would link the symlink itself, across devices (EXDEV).
            os.link(str(fd), dest, src_dir_fd=fds)
        except OSError as exc:
            if exc.errno in _NO_LINK:
                return None
            raise
        finally:
            os.close(fds)
        return dest

    def copy_open_file(self, fd: int, source: Path, token: str) -> Snapshot:
        """Copy the file open as ``fd`` into the staging area (the staging thread: it may be large).

        Whole or not at all (``_partial``); it keeps the original's mtime, so the journal's
        durability check matches.

        Raises:
            SnapshotError: the open file changed while it was copied.

        Example:
            >>> import tempfile
            >>> root = Path(tempfile.mkdtemp()); _ = (root / "step_1.pt").write_bytes(b"abc")
            >>> fd = open_for_staging(root / "step_1.pt"); (root / "step_1.pt").unlink()
            >>> StagingArea(root).copy_open_file(fd, root / "step_1.pt", "t1").path.read_bytes()
            b'abc'
            >>> os.close(fd)
        """
        dest = self.slot(token, source.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        before = os.fstat(fd)
        with _partial(dest) as partial:
            with open(partial, "wb") as out:
                offset = 0
                while offset < before.st_size:
                    sent = os.sendfile(out.fileno(), fd, offset, before.st_size - offset)
                    if sent == 0:
                        break
                    offset += sent
            after = os.fstat(fd)
            unchanged = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
            if not unchanged or offset != before.st_size:
                raise SnapshotError(f"{source.name} changed while it was copied for upload")
            os.utime(partial, ns=(before.st_atime_ns, before.st_mtime_ns))
            os.replace(partial, dest)
        copied = FileStamp.of(dest)
        return Snapshot(dest, False, {"": copied}, copied=True)

    def copy_file(self, source: Path, token: str, expected: FileStamp | None = None) -> Snapshot:
        """Copy ``source`` (no hard links here) and make sure the copy is one whole version.

        ``expected``: the version handed over; a ``source`` that is no longer it (written in place
        since) raises ``Superseded``, copied or not.
        """
        dest = self.slot(token, source.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _partial(dest) as partial:
            for _ in range(_COPY_TRIES):
                before = FileStamp.of(source)
                if expected is not None and not expected.same_content(before):
                    raise Superseded(source.name)
                shutil.copy2(source, partial)
                after = FileStamp.of(source)
                if before.same_content(after):
                    os.replace(partial, dest)
                    copied = FileStamp.of(dest)
                    # Keep the original's mtime so the journal's durability check matches the source.
                    return Snapshot(dest, False, {"": _as_source(copied, before)}, copied=True)
        raise SnapshotError(f"{source} kept changing while it was copied for upload")

    def snapshot_file(self, staged: Path) -> Snapshot:
        """The snapshot of an already linked file."""
        return Snapshot(staged, False, {"": FileStamp.of(staged)})

    def snapshot_dir(
        self, source: Path, token: str, expected: Mapping[str, tuple[int, int]] | None = None
    ) -> Snapshot:
        """Hard-link (or, across devices, copy) every file of a directory checkpoint (worker thread).

        ``expected`` is the ``tree_inventory`` taken at submit; the snapshot must match it.

        Raises:
            FileNotFoundError: the directory, or a file of it, is gone (it is being deleted).
            SnapshotError: files vanished or changed while staging (the checkpoint was being
                deleted or rewritten).
        """
        dest = self.slot(token, source.name)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        if not source.is_dir():
            raise FileNotFoundError(errno.ENOENT, "directory checkpoint vanished", str(source))
        files: dict[str, FileStamp] = {}
        copied = False
        for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
            rel_dir = Path(dirpath).relative_to(source)
            dirnames[:] = sorted(_walked(dirpath, dirnames, rel_dir, source.name))
            (dest / rel_dir).mkdir(parents=True, exist_ok=True)
            for fname in sorted(filenames):
                src = Path(dirpath) / fname
                rel = (rel_dir / fname).as_posix()
                if rel in _NOT_PART:
                    continue
                if not _regular(src):
                    log.warning("%s: leaving out %s: not a regular file", source.name, rel)
                    continue
                target = dest / rel
                try:
                    # link() takes a symlink itself, and a relative one names nothing from here.
                    os.link(os.path.realpath(src) if os.path.islink(src) else src, target)
                    files[rel] = FileStamp.of(target)
                    continue
                except FileNotFoundError:
                    if os.path.lexists(src) and not src.exists():
                        continue  # a dangling link is not part of the checkpoint
                    raise SnapshotError(
                        f"{src} vanished while {source.name} was being staged"
                    ) from None
                except OSError as exc:
                    if exc.errno not in _NO_LINK:
                        raise
                before = FileStamp.of(src)
                shutil.copy2(src, target)
                if not before.same_content(stamp_or_none(src)):
                    raise SnapshotError(
                        f"{src} changed while {source.name} was being copied for upload"
                    )
                files[rel] = _as_source(FileStamp.of(target), before)
                copied = True
        # A concurrent rmtree (HF's save_total_limit) can remove files before the walk reaches
        # them, staging a partial tree without any error: what was staged must be exactly the
        # inventory taken at submit, else this is not the version that was handed over.
        if expected is not None:
            staged = {rel: (st.size, st.mtime_ns) for rel, st in files.items()}
            if staged != dict(expected):
                missing = sorted(set(expected) - set(staged))
                if missing:
                    raise FileNotFoundError(
                        errno.ENOENT,
                        f"{len(missing)} file(s) of the directory checkpoint were deleted since it was submitted",
                        str(source / missing[0]),
                    )
                changed = sorted(rel for rel in staged if expected.get(rel) != staged[rel])
                raise SnapshotError(f"{source.name}/{changed[0]} was written or added since it was submitted")
        if copied:
            log.info("hard links are not possible for %s: copied it for upload instead", source)
        # Written last: a tree staged link by link is whole only once this exists (``find``).
        self._whole_mark(token, source.name).touch()
        return Snapshot(dest, True, files, copied)

    def _whole_mark(self, token: str, name: str) -> Path:
        return self.dir / token / f"{_WHOLE_PREFIX}{name}"

    def release(self, token: str) -> None:
        """Remove one job's staged files (a missing slot is fine)."""
        shutil.rmtree(self.dir / token, ignore_errors=True)

    def find(self, name: str) -> Path | None:
        """The newest staged copy of ``name`` (resume after a crash), or None.

        A directory counts only once it was staged whole (``snapshot_dir`` marks it last): a
        run killed while linking its files leaves a partial tree, which is never taken for it.
        """
        found = self.find_all(name)
        return found[0] if found else None

    def find_all(self, name: str) -> list[Path]:
        """Every staged copy of ``name``, newest first (as ``find``): a hard link shares its
        file's later writes, a private copy or the link of a replaced file does not."""
        if not self.dir.is_dir():
            return []
        found = [
            p
            for p in self.dir.glob(f"*/{_glob_escape(name)}")
            if p.exists() and (not p.is_dir() or self._whole_mark(p.parent.name, name).exists())
        ]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def tokens(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir())

    def cleanup_orphans(self, keep: set[str]) -> int:
        """Remove staging slots of dead processes that nobody resumed; return how many went."""
        removed = 0
        for token in self.tokens():
            if token in keep:
                continue
            pid = _token_pid(token)
            if pid is not None and pid != os.getpid() and process_alive(pid):
                continue
            if pid == os.getpid():
                continue
            self.release(token)
            removed += 1
        return removed


def open_for_staging(source: Path) -> int:
    """Open a regular file read-only, to stage it later with ``StagingArea.link_open_file``.

    Reading metadata and opening write nothing to the disk, so this stays in microseconds
    however busy the disk is; the open file keeps its inode (and bytes) alive if the trainer
    deletes it before it is staged.

    Raises:
        FileNotFoundError: ``source`` is gone.
        IsADirectoryError: ``source`` is not a regular file.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "step_1.pt"; _ = path.write_bytes(b"abc")
        >>> fd = open_for_staging(path); path.unlink(); os.pread(fd, 3, 0)
        b'abc'
        >>> os.close(fd)
    """
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "not a regular file", str(source))
    return fd


def tree_inventory(root: Path, limit: int = 256) -> dict[str, tuple[int, int]] | None:
    """``rel path -> (size, mtime_ns)`` of every file under ``root``; None past ``limit`` files.

    Cheap enough for the caller's thread on a framework's checkpoint directory (a dozen files:
    metadata only, no data read); a huge sharded tree is left to the worker's own checks.
    """
    versions: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in _NOT_PART]
        if len(versions) + len(filenames) > limit:
            return None
        for fname in filenames:
            path = Path(dirpath) / fname
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # deleted just now, or a dangling link: absent either way
            rel = path.relative_to(root).as_posix()
            if stat.S_ISREG(st.st_mode) and rel not in _NOT_PART:  # as snapshot_dir stages it
                versions[rel] = (st.st_size, st.st_mtime_ns)
    return versions


def _walked(dirpath: str, dirnames: list[str], rel_dir: Path, name: str) -> list[str]:
    """The subdirectories of a directory checkpoint that are part of it (``snapshot_dir``).

    A symlink to a directory is not followed (as ``runctl s3 upload -r``), said aloud: a
    checkpoint that lacks a symlinked ``tokenizer/`` is otherwise verified and restored without
    it, no one told.
    """
    kept = []
    for d in dirnames:
        rel = (rel_dir / d).as_posix()
        if rel in _NOT_PART:
            continue
        if os.path.islink(os.path.join(dirpath, d)):
            log.warning("%s: leaving out %s/: a symlink to a directory (not followed)", name, rel)
            continue
        kept.append(d)
    return kept


def _regular(path: Path) -> bool:
    """A regular file, or a symlink to one; False for a FIFO, socket or device (a FIFO's open
    waits for a writer forever). One that cannot be looked at (vanished, a dangling link) is
    left to the link or copy that follows, which tells those apart."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


@contextmanager
def _partial(dest: Path) -> Iterator[Path]:
    """A temporary name beside ``dest`` for a copy, removed on the way out unless renamed to ``dest``.

    A copy is written there and renamed into place only once whole: a crash mid-copy must not
    leave a short file under the staged name, which a resume (``find``) would take for the
    checkpoint.
    """
    partial = dest.with_name(f".{dest.name}.part")
    try:
        yield partial
    finally:
        partial.unlink(missing_ok=True)


def _as_source(copy: FileStamp, source: FileStamp) -> FileStamp:
    # A copy's own inode and ctime, with the source's mtime (copy2 preserved it) for the journal.
    return FileStamp(copy.ino, copy.size, copy.mtime_ns, copy.ctime_ns, source.mtime)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _token_pid(token: str) -> int | None:
    head = token.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists (one of another user's counts too).

    Example:
        >>> process_alive(os.getpid())
        True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
