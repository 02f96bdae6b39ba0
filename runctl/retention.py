"""Keep-last-N retention: a pure planner, and applying its plan in S3 or locally under a lock."""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runctl.checkpoints import (
    PIN_DIR,
    Checkpoint,
    group_s3,
    is_alias,
    numbered_by_name_only,
    scan_local,
    step_order,
)
from runctl.exceptions import PartialTransferError, TransferError, UsageError
from runctl.journal import Journal
from runctl.locking import local_dir_lock, s3_prefix_lock
from runctl.pins import local_pins
from runctl.s3url import S3URL
from runctl.transfer.base import ObjectInfo, PrefixInfo, Transfer

log = logging.getLogger("runctl.retention")

NOT_DURABLE = "not durable in S3"


@dataclass(frozen=True)
class RetentionPlan:
    """What retention keeps and deletes (both oldest first), with a short reason per name.

    Example:
        >>> plan = plan_retention([], keep_last_n=3)
        >>> plan.delete, plan.to_json()["delete"]
        ((), [])
    """

    keep: tuple[Checkpoint, ...]
    delete: tuple[Checkpoint, ...]
    reasons: Mapping[str, str] = field(default_factory=dict)
    #: The names pinned where it looked (``checkpoints.PIN_DIR``), checkpoints or not.
    pinned: frozenset[str] = frozenset()
    #: The size cap it was asked for; what it keeps can be over it (``over_size``).
    max_total_size: int | None = None
    #: What it set out to delete and could not, each with why (local retention: these are in
    #: ``keep``, as they are still there).
    failed: Mapping[str, str] = field(default_factory=dict)

    @property
    def over_size(self) -> int:
        """Bytes kept beyond ``max_total_size``: what it never deletes for size (the newest
        whole step, protected ones, aliases, steps not yet whole) did not fit. 0 when it fits."""
        if self.max_total_size is None:
            return 0
        return max(0, sum(c.size for c in self.keep) - self.max_total_size)

    @property
    def bytes_freed(self) -> int:
        return sum(c.size for c in self.delete)

    def to_json(self) -> dict[str, Any]:
        return {
            "keep": [dict(c.to_json(), reason=self.reasons.get(c.name, "")) for c in self.keep],
            "delete": [dict(c.to_json(), reason=self.reasons.get(c.name, "")) for c in self.delete],
            "bytes_freed": self.bytes_freed,
            "failed": dict(self.failed),
        }


def check_keep_last_n(keep_last_n: int | None, argument: str = "keep_last_n") -> None:
    """Raise ``UsageError`` unless ``keep_last_n`` is None or an integer >= 1."""
    if keep_last_n is None:
        return
    if isinstance(keep_last_n, bool) or not isinstance(keep_last_n, int):
        raise UsageError(f"{argument} must be an integer >= 1 or None (got {keep_last_n!r})")
    if keep_last_n < 1:
        raise UsageError(
            f"{argument} must be at least 1 (got {keep_last_n}): the newest complete checkpoint is always kept"
        )


def _check_non_negative(value: float | None, argument: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UsageError(f"{argument} must be a number >= 0 or None (got {value!r})")


def _protected_names(protected: Collection[str] | str) -> frozenset[str]:
    """The checkpoint names ``protected`` means: "checkpoint-500/" and "runs/7/step_5.pt" name
    the checkpoints of their last part."""
    if isinstance(protected, str):
        protected = (protected,)
    return frozenset(name.rstrip("/").rsplit("/", 1)[-1] for name in protected)


def _say_pinned(plan: RetentionPlan, pins: Collection[str], location: str) -> RetentionPlan:
    """The plan, knowing the pins, with "pinned (its pin's path)" for "protected" where a pin is why."""
    pinned = {
        name: f"pinned ({location.rstrip('/')}/{PIN_DIR}/{name})"
        for name, reason in plan.reasons.items()
        if name in pins and reason == "protected"
    }
    return dataclasses.replace(plan, reasons={**plan.reasons, **pinned}, pinned=frozenset(pins))


def check_protected(
    checkpoints: Sequence[Checkpoint], protected: Collection[str], location: str
) -> None:
    """Refuse (``UsageError``) a protected name that names no checkpoint at ``location``.

    A mistyped ``--protect checkpoint-50`` (for checkpoint-500) would otherwise protect nothing,
    and the checkpoint meant could go with the rest.

    Example:
        >>> check_protected([Checkpoint("step_5.pt", False, 5, None, 0.0, 10, True)], ["step_5.pt"], "ckpt/")
        >>> check_protected([], ["step_50.pt"], "ckpt/")
        Traceback (most recent call last):
        ...
        runctl.exceptions.UsageError: --protect step_50.pt: no checkpoint of that name in ckpt/; refused, nothing was deleted
    """
    names = {cp.name for cp in checkpoints}
    unknown = sorted(_protected_names(protected) - names)
    if unknown:
        raise UsageError(
            f"--protect {', '.join(unknown)}: no checkpoint of that name in {location}; "
            "refused, nothing was deleted"
        )


#: Lightning's suffix for a save whose name was taken: ``epoch=0-step=8-v1.ckpt``.
_VERSION_RE = re.compile(r"-v\d+(?=(?:\.[^./]*)?$)")


def _written(cp: Checkpoint) -> tuple[float, int, str]:
    """Which of two versions of one name was written last: by time, then (S3 stamps whole
    seconds) by Lightning's ``-vN`` number, usually higher for a later save (Lightning takes the
    lowest free name, so not always; it decides only ties within one second)."""
    version = _VERSION_RE.search(cp.name)
    return (cp.mtime, int(version.group(0)[2:]) if version else 0, cp.name)


def positions(checkpoints: Iterable[Checkpoint]) -> dict[str, tuple[object, ...]]:
    """Where each checkpoint stands in its run (name -> a key, higher is newer).

    Checkpoints saved at one step (``net_g_5000.pth`` and ``net_d_5000.pth``; ``model_`` and
    ``optim_step_N.pt``; ``step_N.pt`` beside ``checkpoint-N/``) share their ``(step, epoch)``.
    Versions of one name at one step (Lightning's ``epoch=0-step=8.ckpt`` and ``-v1``, saved
    again by a resumed run) do not: the newest written shares it, the others stand just before
    it. A name with neither number stands alone, by its time.

    Example:
        >>> at = positions([Checkpoint("net_g_5000.pth", False, 5000, None, 0.0, 1, True),
        ...                 Checkpoint("net_d_5000.pth", False, 5000, None, 9.0, 1, True)])
        >>> at["net_g_5000.pth"] == at["net_d_5000.pth"]
        True
    """
    items = list(checkpoints)
    newest: dict[tuple[object, ...], Checkpoint] = {}
    for cp in items:
        if cp.step is not None or cp.epoch is not None:
            version_of = (cp.step, cp.epoch, _VERSION_RE.sub("", cp.name))
            seen = newest.get(version_of)
            if seen is None or _written(cp) > _written(seen):
                newest[version_of] = cp
    found: dict[str, tuple[object, ...]] = {}
    for cp in items:
        key = cp.order_key()
        if cp.step is None and cp.epoch is None:
            found[cp.name] = key
        elif newest[(cp.step, cp.epoch, _VERSION_RE.sub("", cp.name))] is cp:
            found[cp.name] = (*key[:2], 1)
        else:
            found[cp.name] = (*key[:2], 0, *_written(cp))
    return found


def _shape(name: str) -> str:
    """A name with its numbers (and Lightning's ``-vN``) blanked: ``net_g_#.pth``."""
    return re.sub(r"\d+", "#", _VERSION_RE.sub("", name))


def strays(checkpoints: Iterable[Checkpoint]) -> set[str]:
    """Files named by a word and a number that are likely not checkpoints: among checkpoints
    named by their step, one whose shape (``_shape``) no other shares.

    ``embeddings_4096.pt`` beside ``step_100.pt`` and ``step_200.pt`` ranked as step 4,096: a
    cleanup kept it as the newest and deleted both checkpoints (and one at a low number was
    deleted itself). A series (``net_g_#.pth`` at two steps) is not a stray, nor is anything
    where no name carries a step marker. Retention keeps strays and does not count them, and
    ``--latest`` passes them by.

    Example:
        >>> cps = [Checkpoint(n, False, s, None, 0.0, 1, True)
        ...        for n, s in (("step_1.pt", 1), ("step_2.pt", 2), ("embeddings_4096.pt", 4096))]
        >>> strays(cps)
        {'embeddings_4096.pt'}
    """
    items = list(checkpoints)
    by_name = {c.name for c in items if numbered_by_name_only(c.name)}
    if not any((c.step is not None or c.epoch is not None) and c.name not in by_name for c in items):
        return set()
    shapes = collections.Counter(_shape(c.name) for c in items)
    return {name for name in by_name if shapes[_shape(name)] == 1}


def missing_partners(checkpoints: Iterable[Checkpoint]) -> dict[tuple[int, int], str]:
    """The newest step, when it lacks a kind of file the step before it was saved with.

    ``{(step, epoch): why}``, or ``{}``. S3 shows no file set per step, but a run saves the same
    kinds of file at each: a newest step with ``net_g_#.pth`` and without the ``net_d_#.pth``
    of the step before is likely still arriving (its partner queued in the writer, not begun),
    or torn by a crash. A newest step that shares no kind with the one before (``step_3.pt``
    after ``checkpoint-2/``) is another kind of checkpoint, not a part of one. Only complete
    checkpoints count, and only the newest step is judged (a
    run that stops saving a kind of file holds back one step, and an older step's neighbours
    change as retention deletes: the plan would not be the same twice).

    Example:
        >>> cps = [Checkpoint(f"net_{p}_{s}.pth", False, s, None, 0.0, 1, True) for s in (1, 2) for p in "gd"]
        >>> missing_partners([*cps, Checkpoint("net_g_3.pth", False, 3, None, 0.0, 1, True)])
        {(3, -1): 'net_d_#.pth is missing, saved at step 2'}
    """
    shapes: dict[tuple[int, int], set[str]] = {}
    for cp in checkpoints:
        at = cp.order_key()[:2]
        if cp.complete and at != (-1, -1) and not is_alias(cp.name):
            shapes.setdefault(at, set()).add(_shape(cp.name))
    if len(shapes) < 2:
        return {}
    before, newest = sorted(shapes)[-2:]
    lacking = shapes[before] - shapes[newest]
    if not lacking or not shapes[before] & shapes[newest]:
        return {}  # whole, or another kind of checkpoint altogether (a file after a directory)
    where = f"step {before[0]}" if before[0] >= 0 else f"epoch {before[1]}"
    return {newest: f"{', '.join(sorted(lacking))} is missing, saved at {where}"}


def plan_retention(
    checkpoints: Sequence[Checkpoint],
    keep_last_n: int | None,
    *,
    protected: Collection[str] = (),
    max_total_size: int | None = None,
    incomplete_older_than: float | None = None,
    unfinished: Collection[str] = (),
    unsettled: Collection[str] = (),
    now: float | None = None,
) -> RetentionPlan:
    """Decide which checkpoints to keep and which to delete. Pure: touches nothing.

    Keeps the newest ``keep_last_n`` complete checkpoints (aliases do not count; checkpoints
    saved at one step count once, as one of ``positions``, and stay or go together), plus every
    protected one (with what was saved at its step), every alias, and every incomplete one
    (unless ``incomplete_older_than`` is given and it has no marker and its mtime is older than
    that many seconds before ``now``: an abandoned upload, or it is named in ``unfinished``: a deletion an earlier
    retention began and did not finish, or an upload a killed run began of a checkpoint since
    skipped as moot). A step is whole only when none of its files is incomplete, named in
    ``unfinished``, or named in ``unsettled`` (still on its way, or left out as torn), and, for
    the newest step, when it lacks no kind of file the step before it has (``missing_partners``):
    only whole steps count among the newest N. What there is of a step that is not whole is kept while it
    is newer than the N-th newest whole step (it may yet become whole), and goes after.
    Then, with ``max_total_size``, deletes the oldest deletable kept ones, a step at a time,
    until the rest fit (an incomplete one older than the newest whole step, which is not
    deleted, is not counted either). Never deletes a protected name, an alias, or the newest whole step.
    ``keep_last_n=None`` keeps every complete checkpoint.

    Raises:
        UsageError: ``keep_last_n`` below 1, or a negative size or age.

    Example:
        >>> cps = [Checkpoint(f"step_{i}.pt", False, i, None, 0.0, 1, True) for i in range(5)]
        >>> [c.name for c in plan_retention(cps, keep_last_n=2).delete]
        ['step_0.pt', 'step_1.pt', 'step_2.pt']
    """
    check_keep_last_n(keep_last_n)
    _check_non_negative(max_total_size, "max_total_size")
    _check_non_negative(incomplete_older_than, "incomplete_older_than")
    now = time.time() if now is None else now
    protected = _protected_names(protected)
    unfinished = frozenset(unfinished)  # read once (a live view reads what is true now)
    unsettled = _protected_names(unsettled)

    ordered = sorted(checkpoints, key=Checkpoint.order_key)
    stray = strays(ordered)
    at = positions(ordered)
    # A step is not whole while a file of it is incomplete, unfinished, on its way or left out:
    # what is there of it does not count among the newest (keep-last-1 deleted the 4000 pair
    # once net_g_5000 landed with net_d_5000 still queued, or cut short and never sent).
    def abandoned(cp: Checkpoint) -> bool:  # an incomplete one that goes in this plan
        # Never one with a marker: a marker that could not be read (503s, a timeout, access
        # denied) or does not match, dated long ago, had cleanup --incomplete-older-than delete
        # every complete checkpoint, the newest too, exit 0 (fault pass). An upload that never
        # finished has none.
        return cp.name in unfinished or (
            incomplete_older_than is not None and cp.marker is None and now - cp.mtime > incomplete_older_than
        )

    not_whole: dict[tuple[int, int], str] = {}
    for cp in ordered:
        if not cp.complete and not is_alias(cp.name) and not abandoned(cp) and cp.name not in stray:
            not_whole.setdefault(cp.order_key()[:2], f"{cp.name} is incomplete")
    for names, why in ((unsettled, "is on its way, or was left out"), (unfinished, "was left unfinished")):
        for name in sorted(_protected_names(names)):
            not_whole.setdefault(step_order(name), f"{name} {why}")
    for at_step, why in missing_partners(c for c in ordered if c.name not in stray).items():
        not_whole.setdefault(at_step, why)
    not_whole.pop((-1, -1), None)  # a name without numbers is a step of its own
    partial = {
        cp.name: not_whole[cp.order_key()[:2]]
        for cp in ordered
        if cp.complete and not is_alias(cp.name) and cp.order_key()[:2] in not_whole
    }
    ranked = [
        c
        for c in ordered
        if c.complete and not is_alias(c.name) and c.name not in partial and c.name not in stray
    ]
    whole = sorted({at[c.name] for c in ranked})  # oldest first
    places = {p: len(whole) - i for i, p in enumerate(whole)}
    rank = {c.name: places[at[c.name]] for c in ranked}  # 1 = newest; one rank per step
    # What was saved at a protected checkpoint's step stays with it (a pinned net_g_4000.pth
    # keeps net_d_4000.pth).
    held_by = {c.order_key()[:2]: c.name for c in ordered if c.name in protected}
    held_by.pop((-1, -1), None)  # a name without numbers holds only itself

    def held(cp: Checkpoint) -> str | None:
        return held_by.get(cp.order_key()[:2])

    reasons: dict[str, str] = {}
    doomed: set[str] = set()
    for cp in ordered:
        name = cp.name
        if is_alias(name):
            reasons[name] = "alias (always kept)"
        elif name in stray:
            reasons[name] = (
                "kept, not counted: named by a number alone, unlike every other checkpoint here"
            )
        elif name in protected:
            reasons[name] = "protected"
        elif not cp.complete:
            age = now - cp.mtime
            if name in unfinished:
                doomed.add(name)
                reasons[name] = "incomplete: left by a deletion or a moot upload that a killed run began"
            elif abandoned(cp):
                doomed.add(name)
                reasons[name] = f"incomplete for {age:.0f} s (> {incomplete_older_than:g} s): abandoned"
            elif cp.marker is not None:
                # What keep-last-N would do were it complete: it was kept for good (README).
                newer = len(whole) - bisect.bisect_right(whole, at[name])
                if keep_last_n is not None and newer >= keep_last_n and not held(cp):
                    doomed.add(name)
                    reasons[name] = (
                        "incomplete (its marker could not be read, or does not match its files), "
                        f"and the newest {keep_last_n} whole are newer"
                    )
                else:
                    reasons[name] = "incomplete: its marker could not be read, or does not match its files (kept)"
            else:
                reasons[name] = "incomplete (upload in progress or abandoned)"
        elif held(cp):
            reasons[name] = f"saved at the step of {held(cp)} (protected)"
        elif name in partial:
            newer = len(whole) - bisect.bisect_right(whole, at[name])  # whole steps newer than it
            if keep_last_n is not None and newer >= keep_last_n:
                doomed.add(name)
                reasons[name] = f"its step is not whole ({partial[name]}), and the newest {keep_last_n} whole are newer"
            else:
                reasons[name] = f"its step is not whole yet ({partial[name]})"
        elif rank[name] == 1:
            reasons[name] = "newest complete"
        elif keep_last_n is None:
            reasons[name] = "kept (no keep-last-N limit)"
        elif rank[name] <= keep_last_n:
            reasons[name] = f"among the newest {keep_last_n} complete (#{rank[name]})"
        else:
            doomed.add(name)
            reasons[name] = f"older than the newest {keep_last_n} complete (#{rank[name]})"

    if max_total_size is not None:
        # An incomplete one older than the newest whole step is neither deleted nor counted: one
        # whose marker could not be read had a newer complete checkpoint deleted in its place
        # (retention pass). One newer (an upload under way) counts: room is made for it.
        newest = max((c.order_key()[:2] for c in ranked), default=None)
        total = sum(
            c.size
            for c in ordered
            if c.name not in doomed and (c.complete or newest is None or c.order_key()[:2] >= newest)
        )
        steps: dict[tuple[object, ...], list[Checkpoint]] = {}
        for cp in ranked:
            steps.setdefault(at[cp.name], []).append(cp)
        for position in sorted(steps)[:-1]:  # oldest first, a whole step at a time, never the newest
            if total <= max_total_size:
                break
            for cp in steps[position]:
                if cp.name not in doomed and cp.name not in protected and not held(cp):
                    doomed.add(cp.name)
                    total -= cp.size
                    reasons[cp.name] = f"over max_total_size={max_total_size} bytes"

    keep = tuple(c for c in ordered if c.name not in doomed)
    delete = tuple(c for c in ordered if c.name in doomed)
    return RetentionPlan(keep, delete, reasons, max_total_size=max_total_size)


def _delete_s3(transfer: Transfer, bucket: str, plan: RetentionPlan) -> None:
    doomed_dirs = [c for c in plan.delete if c.is_dir]
    singles = [c for c in plan.delete if not c.is_dir]
    failures: dict[str, str] = {}

    # Markers first, in one batch: from here on no reader sees these directories as complete.
    markers = {c.marker: c for c in doomed_dirs if c.marker}
    if markers:
        result = transfer.delete_keys(bucket, list(markers))
        failures.update(result.errors)
    # A directory whose marker survived stays whole, so it still reads as complete next time.
    dir_keys = [
        key for c in doomed_dirs if not (c.marker and c.marker in failures) for key in c.files
    ]
    if dir_keys:
        failures.update(transfer.delete_keys(bucket, dir_keys).errors)
    single_keys = [key for c in singles for key in c.files]
    if single_keys:
        failures.update(transfer.delete_keys(bucket, single_keys).errors)
    if failures:
        raise PartialTransferError(
            f"retention could not delete {len(failures)} object(s) in s3://{bucket}/: "
            + "; ".join(f"{k}: {v}" for k, v in sorted(failures.items())[:10]),
            failures,
        )


def read_small_objects(
    transfer: Transfer, bucket: str, keys: Iterable[str]
) -> dict[str, bytes | TransferError]:
    """Read many small objects (markers) in one batch: each key's bytes, or why it was not read.

    One ``get_files`` into a temporary directory: with s5cmd, a single process reads them
    all in parallel. 100 markers one GET at a time on the boto3 client cost 0.1-0.2 s of
    CPU under the GIL (and 0.2 s to import botocore and build the client), most of the time
    a 100-checkpoint cleanup spent beyond its listing and its deletes. ``keys`` may be lazy
    (still coming from a listing): each is read as it arrives, while the listing goes on.

    Raises:
        TransferError: the batch failed as a whole (endpoint, credentials, bucket): no key
            is reported unread for a reason that is not its own.

    Example:
        >>> read_small_objects(t, "bkt", ["run/c-1/.runctl-manifest.json"])  # doctest: +SKIP
        {'run/c-1/.runctl-manifest.json': b'{...}'}
    """
    failures: dict[str, TransferError] = {}
    asked: list[tuple[str, S3URL, Path]] = []
    with tempfile.TemporaryDirectory(prefix="runctl-read-") as tmp:

        def pairs() -> Iterator[tuple[S3URL, Path]]:
            for i, key in enumerate(keys):
                asked.append((key, S3URL(bucket, key), Path(tmp, str(i))))
                yield asked[-1][1:]

        try:
            transfer.get_files(pairs() if not isinstance(keys, Sequence) else list(pairs()))
        except PartialTransferError as exc:
            failures = {url: TransferError(why) for url, why in exc.failures.items()}
        found: dict[str, bytes | TransferError] = {}
        for key, url, path in asked:
            failed = failures.get(str(url))
            if failed is not None:
                found[key] = failed
                continue
            try:
                found[key] = path.read_bytes()
            except OSError as exc:
                found[key] = TransferError(f"reading {url} back failed: {exc}")
    return found


def apply_s3_retention(
    transfer: Transfer,
    prefix: S3URL,
    keep_last_n: int | None,
    *,
    protected: Collection[str] = (),
    max_total_size: int | None = None,
    incomplete_older_than: float | None = None,
    patterns: Sequence[str] | None = None,
    treat_unmarked_complete: bool = False,
    unfinished: Collection[str] = (),
    unsettled: Collection[str] = (),
    before_delete: Callable[[RetentionPlan], None] | None = None,
    dry_run: bool = False,
    lock_timeout: float = 600.0,
    protected_must_exist: bool = False,
) -> RetentionPlan:
    """Apply keep-last-N to the checkpoints directly under an S3 prefix; return the plan.

    Runs under the host-wide lock of the prefix and lists inside it, so two cleanups at once never
    delete more than one would. Deletes every doomed directory's marker first (readers stop seeing
    it as complete), then its files, then single-file checkpoints, in batches; a key already gone is
    fine. ``dry_run`` only plans.

    ``before_delete(plan)`` runs under the lock before the first key is deleted (the uploader
    journals each doomed name there); ``unfinished`` names checkpoints whose deletion an earlier,
    interrupted run began: an incomplete one of those is deleted rather than kept as in progress.
    ``unsettled`` names checkpoints still on their way (``plan_retention``). ``protected`` and
    ``unsettled`` are read once the listing is in: a live view sees what changed meanwhile.
    ``protected_must_exist``: refuse (``UsageError``, nothing deleted) a protected name that
    names no checkpoint there (``check_protected``), as the CLI's ``--protect`` does. Names
    pinned under the prefix (``checkpoints.PIN_DIR``) are protected too.

    Raises:
        LockTimeout: the lock was held elsewhere for longer than ``lock_timeout``.
        PartialTransferError: some keys could not be deleted (the rest were).

    Example:
        >>> apply_s3_retention(transfer, S3URL.parse("s3://bkt/ckpt/"), 3, dry_run=True)  # doctest: +SKIP
    """
    check_keep_last_n(keep_last_n)
    _check_non_negative(max_total_size, "max_total_size")
    _check_non_negative(incomplete_older_than, "incomplete_older_than")
    prefix = prefix.as_prefix()

    with s3_prefix_lock(prefix, transfer.config.endpoint_url, timeout=lock_timeout):
        grouped = group_s3(
            transfer.iter_objects(prefix, recursive=True),
            prefix,
            patterns,
            treat_unmarked_complete=treat_unmarked_complete,
            read_markers=lambda keys: read_small_objects(transfer, prefix.bucket, keys),
        )
        if protected_must_exist:
            check_protected(grouped.checkpoints, protected, str(prefix))

        def planned(pinned: Collection[str]) -> RetentionPlan:
            return _say_pinned(
                plan_retention(
                    grouped.checkpoints,
                    keep_last_n,
                    protected=(*protected, *pinned),
                    max_total_size=max_total_size,
                    incomplete_older_than=incomplete_older_than,
                    unfinished=unfinished,
                    unsettled=unsettled,
                ),
                pinned,
                str(prefix),
            )

        plan = planned(grouped.pinned)
        # s5cmd's listing leaves out a pin dated after it began (a pin another node put just
        # before, on a server whose clock runs ahead): S3 is asked about the pins of what the
        # plan deletes, and only of those (Transfer.unlisted; boto3's listing: no request).
        unseen = {f"{PIN_DIR}/{c.name}": c.name for c in plan.delete if c.name not in grouped.pinned}
        found = [unseen[rel] for rel in transfer.unlisted(prefix, list(unseen))] if unseen else []
        if found:
            plan = planned({*grouped.pinned, *found})
        if dry_run or not plan.delete:
            return plan
        if before_delete is not None:
            before_delete(plan)
        log.info(
            "retention in %s: deleting %d checkpoint(s) (%s), keeping %d",
            prefix,
            len(plan.delete),
            ", ".join(c.name for c in plan.delete),
            len(plan.keep),
        )
        _delete_s3(transfer, prefix.bucket, plan)
    return plan


def _remove_local(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def durable_in(transfer: Transfer, prefix: S3URL, root: Path) -> Callable[[Checkpoint], bool]:
    """Whether ``prefix`` holds a checkpoint under ``root`` whole: one listing (and its markers).

    Every local file of it must be there with its size and be no newer than its object (whole
    seconds, as sync compares): same-size rewrites and extra local files do not count. A
    directory must also be complete there (a marker that matches what is listed). For
    checkpoints copied by hand (``runctl s3 upload DIR S3URL -r``), which no journal records.

    Example:
        >>> check = durable_in(transfer, S3URL.parse("s3://bkt/run-7/"), Path("ckpt"))  # doctest: +SKIP
        >>> check(scan_local(Path("ckpt"))[0])  # doctest: +SKIP
        True
    """
    from runctl.marking import local_files
    from runctl.transfer.ops import held_in_s3

    prefix = prefix.as_prefix()
    listed: dict[str, ObjectInfo] = {}
    complete: set[str] | None = None

    def objects() -> Iterator[ObjectInfo | PrefixInfo]:
        for obj in transfer.iter_objects(prefix, recursive=True):
            if isinstance(obj, ObjectInfo):
                listed[obj.key] = obj
            yield obj

    def check(cp: Checkpoint) -> bool:
        nonlocal complete
        if complete is None:
            grouped = group_s3(
                objects(),
                prefix,
                read_markers=lambda keys: read_small_objects(transfer, prefix.bucket, keys),
            )
            complete = {c.name for c in grouped.checkpoints if c.complete}
        if cp.name not in complete:
            return False
        path = Path(root) / cp.name
        if cp.is_dir:
            files = {prefix.key + cp.name + "/" + rel: st for rel, st in local_files(path).items()}
        else:
            try:
                files = {prefix.key + cp.name: path.stat()}
            except OSError:
                return False
        return bool(files) and all(held_in_s3(listed.get(key), st) for key, st in files.items())

    return check


#: Why a local Hugging Face directory without its trainer_state.json is not counted.
WITHOUT_HF_SIGN = "no trainer_state.json yet (the Hugging Face Trainer writes it last)"


def apply_local_retention(
    root: Path,
    keep_last_n: int | None,
    *,
    protected: Collection[str] = (),
    force: bool = False,
    also_durable: Callable[[Checkpoint], bool] | None = None,
    dry_run: bool = False,
    lock_timeout: float = 600.0,
    patterns: Sequence[str] | None = None,
    writing: Mapping[str, str] | None = None,
    protected_must_exist: bool = False,
) -> RetentionPlan:
    """Apply keep-last-N to the checkpoints directly under a local directory; return the plan.

    A checkpoint the plan would delete but that is not durable in S3 is kept (reason
    ``"not durable in S3"``) unless ``force``. Durability comes from the journal
    (``Journal(root).was_verified`` with the checkpoint's size and mtime), read under the
    lock; ``also_durable`` may vouch for a checkpoint the journal does not (one S3 holds whole
    though no uploader wrote it down). Each deletion is recorded in the journal as
    ``deleted_local``. ``writing`` maps the names of checkpoints still being written to why
    (``localrun.being_written``): like a Hugging Face directory still without its
    ``trainer_state.json``, they are neither counted among the newest nor deleted.
    ``protected_must_exist`` and pins (``root/.runctl/pinned/<name>``): as for ``apply_s3_retention``.
    A checkpoint it could not delete (permissions, an immutable file) is in the plan's ``keep``
    and its ``failed``, and the rest go on.

    Raises:
        UsageError: ``root`` is not a directory, or ``keep_last_n`` is below 1.
        LockTimeout: the directory's lock was held for longer than ``lock_timeout``.

    Example:
        >>> apply_local_retention(Path("checkpoints"), 2, dry_run=True)  # doctest: +SKIP
    """
    check_keep_last_n(keep_last_n)
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"checkpoint directory {str(root)!r} does not exist or is not a directory")
    journal = Journal(root)
    writing = dict(writing or {})
    # A dry run changes nothing, so it takes no lock: it writes nothing into the directory,
    # which may be read-only (a mounted copy).
    with contextlib.nullcontext() if dry_run else local_dir_lock(root, timeout=lock_timeout):
        snapshot = journal.snapshot()
        found = scan_local(root, patterns)
        if protected_must_exist:
            check_protected(found, protected, str(root))
        pins = local_pins(root)
        protected = _protected_names(protected) | pins
        torn = set()
        for cp in found:
            if not cp.is_dir and snapshot.torn(cp.name, cp.size, cp.mtime):
                writing[cp.name] = "left out of S3 as possibly torn (runctl local)"
                torn.add(cp.name)
        found = [dataclasses.replace(cp, complete=False) if cp.name in writing else cp for cp in found]
        plan = _say_pinned(plan_retention(found, keep_last_n, protected=protected), pins, str(root))

        def in_s3(cp: Checkpoint) -> bool:
            if snapshot.was_verified(cp.name, cp.size, cp.mtime):
                return True
            return also_durable is not None and also_durable(cp)

        def durable(cp: Checkpoint) -> bool:
            return force or in_s3(cp)

        reasons = dict(plan.reasons)
        for cp in found:
            if not cp.complete and reasons[cp.name].startswith("incomplete"):
                reasons[cp.name] = f"incomplete: {writing.get(cp.name) or WITHOUT_HF_SIGN}"
        keep = list(plan.keep)
        delete: list[Checkpoint] = []
        at = positions(found)
        # A step goes whole or not at all: model_step_3.pt durable beside an optim_step_3.pt
        # that is not stays too.
        held_back = {at[cp.name]: cp.name for cp in plan.delete if not durable(cp)}
        for cp in plan.delete:
            if not durable(cp):
                keep.append(cp)
                reasons[cp.name] = NOT_DURABLE
            elif at[cp.name] in held_back:
                keep.append(cp)
                reasons[cp.name] = f"saved at the step of {held_back[at[cp.name]]}, which is {NOT_DURABLE}"
            else:
                delete.append(cp)
        if torn and keep_last_n is not None:
            # A file left out as possibly torn never goes to S3: once keep-last-N newer ones are
            # durable, it is older than anything retention keeps, and goes (each preemption
            # otherwise left one more on disk for good).
            whole = {at[cp.name] for cp in found if cp.complete and not is_alias(cp.name) and in_s3(cp)}
            for cp in list(keep):
                newer = sum(1 for place in whole if place > at[cp.name])
                if cp.name in torn and cp.name not in protected and newer >= keep_last_n:
                    keep.remove(cp)
                    delete.append(cp)
                    reasons[cp.name] = (
                        f"possibly torn (left out of S3), and {newer} newer checkpoints are durable"
                    )
        keep.sort(key=Checkpoint.order_key)
        final = dataclasses.replace(plan, keep=tuple(keep), delete=tuple(delete), reasons=reasons)
        if dry_run:
            return final
        failed: dict[str, str] = {}
        for cp in delete:
            try:
                _remove_local(root / cp.name)
            except OSError as exc:
                log.warning("retention could not delete %s: %s", root / cp.name, exc)
                failed[cp.name] = str(exc)
                continue
            log.info("retention deleted local checkpoint %s (%s)", cp.name, reasons[cp.name])
            journal.record(cp.name, "deleted_local", size=cp.size, mtime=cp.mtime)
    if not failed:
        return final
    # Still there: reported as kept, with why, not as freed; a directory that lost some of its
    # files is no longer complete.
    for name, why in failed.items():
        reasons[name] = f"could not delete: {why}"
    left = tuple(
        dataclasses.replace(c, complete=False) if c.is_dir else c for c in delete if c.name in failed
    )
    return dataclasses.replace(
        final,
        keep=tuple(sorted(final.keep + left, key=Checkpoint.order_key)),
        delete=tuple(c for c in delete if c.name not in failed),
        reasons=reasons,
        failed=failed,
    )
