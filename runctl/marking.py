"""Markers for directory checkpoints copied by hand (``runctl s3 upload -r``, ``sync --direction up``).

The uploader writes a directory checkpoint's marker last, once it has verified the files. A plain
recursive copy of a checkpoint tree would otherwise leave every ``checkpoint-N/`` unmarked, and
readers (``review``, ``download --latest``, retention) would count none of them complete. Here the
copy does what the uploader does: it clears an old marker before the files go up, then writes a
new one for each directory that is finished locally and whole in S3.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

from runctl._version import __version__
from runctl.exceptions import TransferError
from runctl.s3url import S3URL
from runctl.transfer.base import ObjectInfo, Transfer
from runctl.transfer.ops import held_in_s3

log = logging.getLogger("runctl.marking")

#: As in runctl.checkpoints, which is imported only once a copy holds a possible checkpoint
#: directory: its patterns cost milliseconds to compile, on every `runctl s3 upload -r`.
MARKER_NAME = ".runctl-manifest.json"
RUNCTL_DIR = ".runctl"

#: A directory without a framework's completion sign counts as finished once none of its files
#: changed for this long before the copy began (``runctl local``'s default ``--settle``).
SETTLE = 2.0


class MarkResult:
    """What ``mark_copied`` did: the directories it marked, and why it left the others unmarked.

    (A plain class: defining a dataclass costs 0.6 ms, on every `runctl s3 upload -r`.)

    Example:
        >>> MarkResult().marked, MarkResult().unmarked
        ((), {})
    """

    def __init__(
        self, marked: Sequence[S3URL] = (), unmarked: Mapping[S3URL, str] | None = None
    ) -> None:
        self.marked: tuple[S3URL, ...] = tuple(marked)
        self.unmarked: Mapping[S3URL, str] = dict(unmarked or {})


def copied_checkpoint_dirs(
    local: Path, url: S3URL, patterns: Sequence[str] | None = None
) -> list[tuple[Path, S3URL]]:
    """The directory checkpoints a recursive copy of ``local`` to ``url`` carries, with their S3 prefix.

    ``local`` itself when the destination's name is a recognised checkpoint name
    (``upload ckpt/checkpoint-5/ s3://b/run/checkpoint-5/ -r``), else each child directory with
    a recognised name (``upload ckpt/ s3://b/run/ -r``). Deeper directories are not looked at.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); (root / "checkpoint-5").mkdir(); (root / "logs").mkdir()
        >>> [str(u) for _, u in copied_checkpoint_dirs(root, S3URL.parse("s3://bkt/run/"))]
        ['s3://bkt/run/checkpoint-5/']
    """
    prefix = url.as_prefix()
    name = prefix.key.rstrip("/").rsplit("/", 1)[-1]
    try:
        subdirs = [
            e for e in os.scandir(local) if e.is_dir(follow_symlinks=False) and e.name != RUNCTL_DIR
        ]
    except OSError:
        return []
    if not subdirs and not any(c.isdigit() for c in name):
        return []  # a plain directory of files, to a name that no checkpoint pattern matches
    from runctl.checkpoints import is_recognised

    if name and is_recognised(name, patterns):
        return [(local, prefix)]
    found = [
        (Path(e.path), prefix.join(e.name + "/")) for e in subdirs if is_recognised(e.name, patterns)
    ]
    return sorted(found, key=lambda pair: pair[1].key)


def listing(transfer: Transfer, dirs: Sequence[tuple[Path, S3URL]]) -> dict[str, ObjectInfo]:
    """Every object now under these directories' S3 prefixes, by key (one listing per bucket).

    Example:
        >>> listing(t, copied_checkpoint_dirs(Path("ckpt"), S3URL.parse("s3://b/run/")))  # doctest: +SKIP
    """
    return _listing(transfer, [dest for _, dest in dirs]) if dirs else {}


def selected_dirs(
    dirs: Sequence[tuple[Path, S3URL]], selected: Callable[[Path], bool] | None
) -> list[tuple[Path, S3URL]]:
    """The directories with at least one file ``selected`` (by --include/--exclude) for the copy.

    A directory the filters leave out entirely is not copied, so it is neither unmarked nor
    marked (nor warned about).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "w.bin").write_bytes(b"w")
        >>> dirs = [(d, S3URL.parse("s3://bkt/run/checkpoint-1/"))]
        >>> len(selected_dirs(dirs, None)), len(selected_dirs(dirs, lambda p: p.suffix == ".pt"))
        (1, 0)
    """
    if selected is None:
        return list(dirs)
    return [d for d in dirs if any(selected(d[0] / rel) for rel in local_files(d[0]))]


def changed_dirs(
    dirs: Sequence[tuple[Path, S3URL]], listed: Mapping[str, ObjectInfo]
) -> list[tuple[Path, S3URL]]:
    """The directories a copy would change in S3: a local file is missing there, has another
    size, or is newer than its object (as ``aws s3 sync`` decides). The others' markers stay.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "w.bin").write_bytes(b"w")
        >>> dest = S3URL.parse("s3://bkt/run/checkpoint-1/")
        >>> changed_dirs([(d, dest)], {}) == [(d, dest)]  # nothing in S3 yet
        True
    """
    return [
        (local_dir, dest)
        for local_dir, dest in dirs
        if not all(
            held_in_s3(listed.get(dest.key + rel), st) for rel, st in local_files(local_dir).items()
        )
    ]


def is_marker_key(key: str) -> bool:
    """True for a directory checkpoint's marker (which no local file stands for).

    Example:
        >>> is_marker_key("run/checkpoint-5/.runctl-manifest.json"), is_marker_key("run/a.pt")
        (True, False)
    """
    return key.endswith("/" + MARKER_NAME)


def marked_anew(local: Path, dirs: Sequence[tuple[Path, S3URL]]) -> Callable[[str], bool]:
    """For ``upload -r`` and ``sync up``: true for the local marker file (relative to ``local``)
    of each directory in ``dirs``, which this copy marks itself from what landed. Such a marker
    came down with its directory; sent up as a file, it would then be rewritten, and differ again
    at every later sync. Markers of deeper directories, which no copy marks, go up as they are.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> own = marked_anew(root, [(root / "checkpoint-5", S3URL.parse("s3://bkt/checkpoint-5/"))])
        >>> own("checkpoint-5/" + MARKER_NAME), own("runs/checkpoint-5/" + MARKER_NAME)
        (True, False)
    """
    rels = set()
    for local_dir, _ in dirs:
        rel = local_dir.relative_to(local).as_posix()
        rels.add(MARKER_NAME if rel == "." else f"{rel}/{MARKER_NAME}")
    return rels.__contains__


def marker_of_a_local_dir(local: Path, url: S3URL) -> Callable[[str], bool]:
    """For ``sync --delete``: true for the marker of a directory that still holds a file under ``local``.

    A marker has no local file, so it is kept while its directory holds files; once the
    directory is gone locally, or empty, its files go from S3 and so does its marker (an emptied
    one kept it: a marker naming files that were gone, "complete with 0 files" to review, and
    kept by cleanup for good; sync pass).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); (root / "checkpoint-5").mkdir(); (root / "checkpoint-7").mkdir()
        >>> _ = (root / "checkpoint-5" / "model.bin").write_bytes(b"w")
        >>> kept = marker_of_a_local_dir(root, S3URL.parse("s3://bkt/run/"))
        >>> [kept(f"run/checkpoint-{n}/" + MARKER_NAME) for n in (5, 6, 7)]
        [True, False, False]
    """
    base = url.as_prefix().key

    def keep(key: str) -> bool:
        if not is_marker_key(key) or not key.startswith(base):
            return False
        return any(files for _, _, files in os.walk(local / key[len(base) : -len(MARKER_NAME)]))

    return keep


def clear_markers(transfer: Transfer, dirs: Iterable[tuple[Path, S3URL]]) -> None:
    """Delete these destinations' markers before new files go up: a mix of old and new files must
    not read as complete. A missing marker is not an error (one DeleteObjects per bucket).

    Example:
        >>> clear_markers(t, copied_checkpoint_dirs(Path("ckpt"), S3URL.parse("s3://b/run/")))  # doctest: +SKIP
    """
    keys: dict[str, list[str]] = {}
    for _, dest in dirs:
        keys.setdefault(dest.bucket, []).append(dest.join(MARKER_NAME).key)
    for bucket, names in keys.items():
        result = transfer.delete_keys(bucket, names)
        if result.errors:
            key, reason = next(iter(result.errors.items()))
            raise TransferError(
                f"cannot remove the old marker s3://{bucket}/{key}: {reason}",
                url=f"s3://{bucket}/{key}",
            )


def local_files(path: Path) -> dict[str, os.stat_result]:
    """Each regular file below a checkpoint directory, by posix path relative to it, with its stat.

    The marker and the top ``.runctl/`` are left out; symlinks are not followed.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "w.bin").write_bytes(b"w")
        >>> sorted(local_files(d))
        ['w.bin']
    """
    files: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != RUNCTL_DIR or dirpath != str(path))
        for fname in filenames:
            full = os.path.join(dirpath, fname)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if rel == MARKER_NAME:
                continue
            try:
                st = os.stat(full, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files[rel] = st
    return files


def why_unfinished(
    local_dir: Path,
    files: Mapping[str, os.stat_result],
    *,
    started: float,
    settle: float = SETTLE,
) -> str | None:
    """Why a copied directory may not be a finished checkpoint yet, or None when it is.

    Finished: it has its framework's completion sign, or none of its ``files`` (``local_files``)
    changed within ``settle`` seconds before ``started`` (when the copy began) or since. A
    Hugging Face Trainer's directory is finished only with its sign (``awaits_hf_sign``); a
    DeepSpeed ``global_stepN`` only once ``latest`` names it or a later step. A directory that
    came down from S3 with a marker is finished only if it still holds every file its marker
    names, at its size: one that was incomplete (or damaged) in S3 stays so through a round trip.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "w.bin").write_bytes(b"w")
        >>> why_unfinished(d, local_files(d), started=time.time() + 60) is None
        True
    """
    from runctl.checkpoints import awaits_hf_sign, dir_awaits_deepspeed_sign, has_completion_sign

    if not files:
        return "it is empty"
    if awaits_hf_sign(local_dir.name, files):
        return (
            "it holds training_args.bin but no trainer_state.json, which the Hugging Face "
            "Trainer writes last: it is still being written, or its save was cut short"
        )
    if dir_awaits_deepspeed_sign(local_dir):
        return (
            "DeepSpeed's 'latest' beside it names an earlier step: its save is still under way, "
            "or was cut short"
        )
    lacking = _unlike_its_marker(local_dir, files)
    if lacking:
        return (
            f"its marker (come down from S3) names files it lacks or holds at another size: {lacking} "
            "(it was not whole where it came from; delete the marker to copy it as it is)"
        )
    newest = max(st.st_mtime for st in files.values())
    if newest > started or (newest > started - settle and not has_completion_sign(local_dir)):
        return (
            f"a file in it changed {max(0.0, started - newest):.1f} s before the copy or during "
            "it, and it has no completion sign: it may still be being written (copy it again "
            "once it is finished)"
        )
    return None


def _unlike_its_marker(local_dir: Path, files: Mapping[str, os.stat_result]) -> str | None:
    """What a marker inside ``local_dir`` (one that came down with its files) names that the
    directory lacks, or holds at another size; None without a marker, or when all is there."""
    from runctl.checkpoints import Manifest
    from runctl.exceptions import MarkerError

    try:
        data = (local_dir / MARKER_NAME).read_bytes()
    except OSError:
        return None
    try:
        manifest = Manifest.from_bytes(data)
    except MarkerError as exc:
        return f"(the marker cannot be read: {exc})"
    problems = [
        rel if rel not in files else f"{rel} ({files[rel].st_size} bytes, not {entry.size})"
        for rel, entry in sorted(manifest.files.items())
        if rel not in files or files[rel].st_size != entry.size
    ]
    if not problems:
        return None
    return ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")


def dry_run_marks(
    dirs: Sequence[tuple[Path, S3URL]],
    changed: Collection[S3URL],
    listed: Mapping[str, ObjectInfo],
    *,
    started: float,
) -> MarkResult:
    """What ``mark_copied`` would do after a copy that changes ``changed``, as far as the local
    side and the listing ``listed`` tell (the copy itself is taken to succeed): it marks those,
    and the unchanged ones that have no marker yet.

    Example:
        >>> dry_run_marks([], set(), {}, started=time.time()).marked
        ()
    """
    marked: list[S3URL] = []
    unmarked: dict[S3URL, str] = {}
    for local_dir, dest in dirs:
        if dest not in changed and dest.key + MARKER_NAME in listed:
            continue
        unfinished = why_unfinished(local_dir, local_files(local_dir), started=started)
        if unfinished is None:
            marked.append(dest)
        else:
            unmarked[dest] = unfinished
    return MarkResult(marked, unmarked)


def mark_copied(
    transfer: Transfer,
    dirs: Sequence[tuple[Path, S3URL]],
    *,
    started: float,
    settle: float = SETTLE,
    changed: Collection[S3URL] | None = None,
) -> MarkResult:
    """Write the marker of each copied directory checkpoint that is finished and whole in S3.

    With ``changed`` (the directories whose files this copy changed), a directory outside it
    that already has a marker keeps that marker untouched: rewriting it would tell ``watch``
    (and its ``--exec``) that an old checkpoint is new.

    A directory is finished when it has its framework's completion sign (Hugging Face's
    ``trainer_state.json``, DeepSpeed's ``latest``) or none of its files changed within
    ``settle`` seconds before ``started`` (when the copy began) or since. It is whole when every
    local file is in S3 with its local size (one listing per bucket and common prefix). The
    marker lists each file with its size and S3 ETag, like the uploader's.

    Example:
        >>> dirs = copied_checkpoint_dirs(Path("ckpt"), S3URL.parse("s3://b/run/"))  # doctest: +SKIP
        >>> mark_copied(t, dirs, started=time.time() - 30).marked  # doctest: +SKIP
        (S3URL(bucket='b', key='run/checkpoint-5/'),)
    """
    if not dirs:
        return MarkResult()
    from runctl.checkpoints import FileEntry, Manifest, parse_step

    listed = _listing(transfer, [dest for _, dest in dirs])
    marked: list[S3URL] = []
    unmarked: dict[S3URL, str] = {}
    untouched: set[S3URL] = set()
    if changed is not None:
        # An unchanged directory's marker the listing did not show may be one dated after it
        # began (Transfer.unlisted): rewriting it would tell `watch` an old checkpoint is new.
        for bucket in {d.bucket for _, d in dirs}:
            unseen = [
                d.key + MARKER_NAME
                for _, d in dirs
                if d.bucket == bucket and d not in changed and d.key + MARKER_NAME not in listed
            ]
            if unseen:
                listed.update((info.key, info) for info in transfer.unlisted(S3URL(bucket), unseen).values())
        untouched = _markers_that_still_hold(
            transfer,
            [d for _, d in dirs if d not in changed and d.key + MARKER_NAME in listed],
            listed,
        )
    for local_dir, dest in dirs:
        if dest in untouched:
            continue
        files = local_files(local_dir)
        unfinished = why_unfinished(local_dir, files, started=started, settle=settle)
        if unfinished is not None:
            unmarked[dest] = unfinished
            continue
        objects = _under(listed, dest)
        unseen = [rel for rel in files if rel not in objects]
        if unseen:
            objects.update(transfer.unlisted(dest, unseen))
        problems = [
            rel
            for rel, st in files.items()
            if rel not in objects or objects[rel].size != st.st_size
        ]
        if problems:
            unmarked[dest] = (
                f"{len(problems)} of its files are not in S3 with their local size "
                f"(e.g. {sorted(problems)[0]}; left out by --include/--exclude?)"
            )
            continue
        name = dest.key.rstrip("/").rsplit("/", 1)[-1]
        manifest = Manifest(
            name,
            parse_step(name)[0],
            {
                rel: FileEntry(st.st_size, (objects[rel].etag or "").strip('"') or None)
                for rel, st in sorted(files.items())
            },
            __version__,
            time.time(),
        )
        transfer.put_bytes(manifest.to_bytes(), dest.join(MARKER_NAME))
        marked.append(dest)
    return MarkResult(marked, unmarked)


#: Why a directory a failed copy touched is not marked.
FAILED = "some of the copy failed, so it is not known to be whole"


def mark_beside_failures(
    transfer: Transfer,
    dirs: Sequence[tuple[Path, S3URL]],
    failures: Mapping[str, str],
    *,
    started: float,
    changed: Collection[S3URL],
) -> MarkResult:
    """``mark_copied`` after a copy that partly failed: only the directories no failure is in.

    A failure (keyed by URL, or by local path for a file or directory the copy could not
    read) may have left an older object of its size, so its directory stays unmarked; the
    others' files all landed. A half-written file that appeared during a periodic `upload -r`
    left every directory of it unmarked, finished ones too.

    Example:
        >>> mark_beside_failures(t, dirs, {"s3://b/run/checkpoint-6/x.bin": "..."}, started=0.0, changed=[])  # doctest: +SKIP
    """

    def spoiled(local_dir: Path, dest: S3URL) -> bool:
        here, there = str(local_dir), str(dest)
        return any(k.startswith(there) or k == here or k.startswith(here + os.sep) for k in failures)

    bad = [d for d in dirs if spoiled(*d)]
    good = [d for d in dirs if d not in bad]
    unmarked = dict.fromkeys((dest for _, dest in bad if dest in changed), FAILED)
    # One that looked unchanged kept its marker through the copy; its files went up again all
    # the same, new bytes among them where they were copied with their times (`cp -p`): with a
    # file failed, S3 held new and old files under the old marker, counted complete (fault
    # pass). A marker that no longer matches what is listed is deleted.
    kept = [(local_dir, dest) for local_dir, dest in bad if dest not in changed]
    if kept:
        try:
            listed = _listing(transfer, [dest for _, dest in kept])
            holds = _markers_that_still_hold(transfer, [dest for _, dest in kept], listed)
            stale = [(ld, d) for ld, d in kept if d not in holds and d.key + MARKER_NAME in listed]
            clear_markers(transfer, stale)
            unmarked.update(dict.fromkeys((d for _, d in stale), FAILED))
        except TransferError:  # S3 gone meanwhile: the copy's own error says it
            pass
    if not good:
        return MarkResult(unmarked=unmarked)
    try:
        done = mark_copied(transfer, good, started=started, changed=changed)
    except TransferError:  # S3 gone meanwhile: the copy's own error says it
        return MarkResult(unmarked={**unmarked, **dict.fromkeys((d for _, d in good if d in changed), FAILED)})
    return MarkResult(done.marked, {**done.unmarked, **unmarked})


def _markers_that_still_hold(
    transfer: Transfer, dests: Sequence[S3URL], listed: Mapping[str, ObjectInfo]
) -> set[S3URL]:
    """Those of ``dests`` whose marker still matches what is listed (sizes; ETags when known).

    ``upload -r`` sends every file again: a directory that looked unchanged (same sizes, no
    newer mtime) may still have new bytes (a copy made with ``cp -p``), and then new ETags.
    """
    if not dests:
        return set()
    from runctl.checkpoints import Manifest, verify_against_manifest
    from runctl.exceptions import MarkerError
    from runctl.retention import read_small_objects

    holding: set[S3URL] = set()
    bucket = dests[0].bucket
    found = read_small_objects(transfer, bucket, [d.key + MARKER_NAME for d in dests])
    for dest in dests:
        data = found.get(dest.key + MARKER_NAME)
        if not isinstance(data, bytes):
            continue
        try:
            manifest = Manifest.from_bytes(data)
        except MarkerError:
            continue
        if not verify_against_manifest(manifest, _under(listed, dest)):
            holding.add(dest)
    return holding


def _under(listed: Mapping[str, ObjectInfo], dest: S3URL) -> dict[str, ObjectInfo]:
    """The listed objects below ``dest``, keyed by path relative to it."""
    return {key[len(dest.key) :]: obj for key, obj in listed.items() if key.startswith(dest.key)}


def _listing(transfer: Transfer, dests: Sequence[S3URL]) -> dict[str, ObjectInfo]:
    """Every object under these prefixes, by key: one recursive listing per bucket's common prefix."""
    by_bucket: dict[str, list[str]] = {}
    for dest in dests:
        by_bucket.setdefault(dest.bucket, []).append(dest.key)
    found: dict[str, ObjectInfo] = {}
    for bucket, keys in by_bucket.items():
        common = os.path.commonprefix(keys)
        for obj in transfer.iter_objects(S3URL(bucket, common), recursive=True):
            if isinstance(obj, ObjectInfo):
                found[obj.key] = obj
    return found
