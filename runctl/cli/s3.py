"""``runctl s3 ...``: upload, download, sync, list and cleanup, each a thin layer over the library."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from runctl.cli.options import (
    DryRunOpt,
    EndpointOpt,
    ExcludeOpt,
    IncludeOpt,
    JsonOpt,
    ProfileOpt,
    ProtectOpt,
    QuietOpt,
    RecursiveOpt,
    RegionOpt,
    Session,
    UseS5cmdOpt,
    check_local,
    parse_duration,
    parse_s3url,
    parse_size,
    protected_names,
    session,
)
from runctl.cli.output import human_size, render_retention
from runctl.exceptions import PartialTransferError, RunctlError, TransferError, UsageError
from runctl.s3url import S3URL

if TYPE_CHECKING:
    from runctl.marking import MarkResult
    from runctl.transfer.base import Transfer

s3_app = typer.Typer(
    name="s3",
    help=(
        "Move, list and clean up checkpoints in S3 (or any S3-compatible store).\n\n"
        "\b\nExamples:\n"
        "  runctl s3 upload checkpoints/ s3://bucket/run-7/ --recursive\n"
        "  runctl s3 download s3://bucket/run-7/ restored/ --latest\n"
        "  runctl s3 review s3://bucket/run-7/"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

#: LOCAL for a stream: stdin for upload, stdout for download (as aws s3 cp has it).
STDIO = "-"

T = TypeVar("T")

#: Storage classes S3 accepts on upload (checked before anything is sent).
STORAGE_CLASSES = (
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "GLACIER_IR",
    "OUTPOSTS",
    "SNOW",
    "EXPRESS_ONEZONE",
)

S3UrlArg = Annotated[
    str,
    typer.Argument(
        metavar="S3URL", help="s3://bucket/key or s3://bucket/prefix/", show_default=False
    ),
]
UnmarkedOpt = Annotated[
    bool,
    typer.Option(
        "--treat-unmarked-complete",
        help="Count directory checkpoints without a runctl marker (written by other tools) as complete.",
    ),
]


class Direction(str, Enum):
    up = "up"
    down = "down"


def _tree_size(path: Path) -> int:
    """Bytes below ``path`` (for a progress bar's total; only computed on a terminal)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _landed_sizes(transfer: Transfer, pairs: Sequence[tuple[S3URL, Path]]) -> dict[Path, int]:
    """Each destination's size; for one that keeps none (a device, a FIFO), the object's."""
    sizes: dict[Path, int] = {}
    for src, path in pairs:
        try:
            st = path.stat()
            if stat.S_ISREG(st.st_mode):
                sizes[path] = st.st_size
                continue
            info = transfer.stat(src)
        except (OSError, TransferError):
            sizes[path] = 0
            continue
        sizes[path] = 0 if info is None else info.size
    return sizes


def _listed_sizes(
    transfer: Transfer, url: S3URL, pairs: Sequence[tuple[S3URL, Path]], recursive: bool
) -> dict[Path, int]:
    """What each object of a dry run would bring down, as S3 lists it (a dry run's records and
    summary said 0 bytes each, where upload's give the sizes; surface pass)."""
    if not pairs:
        return {}
    if not recursive:  # one object (s3://b/run, no '/', with -r is a prefix: diff review)
        info = transfer.stat(pairs[0][0])
        return {pairs[0][1]: 0 if info is None else info.size}
    from runctl.transfer.base import ObjectInfo  # here: the CLI's start-up does not need it

    listed = {o.key: o.size for o in transfer.iter_objects(url, recursive=True) if isinstance(o, ObjectInfo)}
    return {path: listed.get(src.key, 0) for src, path in pairs}


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _check_storage_class(value: str | None) -> str | None:
    if value is None:
        return None
    upper = value.strip().upper()
    if upper not in STORAGE_CLASSES:
        raise UsageError(
            f"--storage-class must be one of {', '.join(STORAGE_CLASSES)}, got {value!r}"
        )
    return upper


@s3_app.command("upload")
def upload_files(
    ctx: typer.Context,
    local_arg: Annotated[
        str,
        typer.Argument(metavar="LOCAL", help="File or directory to upload.", show_default=False),
    ],
    s3url: S3UrlArg,
    recursive: RecursiveOpt = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    storage_class: Annotated[
        str | None,
        typer.Option(
            "--storage-class",
            metavar="CLASS",
            help="e.g. STANDARD_IA, INTELLIGENT_TIERING, GLACIER_IR.",
        ),
    ] = None,
    dry_run: DryRunOpt = False,
    use_s5cmd: UseS5cmdOpt = True,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upload a file, or a directory with --recursive.

    A file goes to the key S3URL names, or below it when S3URL ends in '/'.
    A directory's files keep their paths relative to it, below S3URL.
    LOCAL '-' reads stdin to its end into the one object S3URL names (./- is a file named '-').

    \b
    Examples:
      runctl s3 upload model.ckpt s3://bucket/run-7/
      runctl s3 upload checkpoints/ s3://bucket/run-7/ckpt/ --recursive --exclude '*.tmp'
      runctl s3 upload big.pt s3://bucket/archive/big.pt --storage-class STANDARD_IA --no-use-s5cmd
      tar c checkpoints/ | runctl s3 upload - s3://bucket/archive/run-7.tar
    """
    s = session(
        ctx,
        endpoint_url=endpoint_url,
        profile=profile,
        region=region,
        json_output=json_output,
        quiet=quiet,
    )
    url = parse_s3url(s3url)
    check_local(local_arg)
    local = Path(local_arg)
    if local_arg == STDIO:
        if recursive or include or exclude:
            raise UsageError(
                "LOCAL '-' is one stream (stdin): --recursive, --include and --exclude do not apply"
            )
        _upload_stdin(s, url, _check_storage_class(storage_class), dry_run, use_s5cmd)
        return
    if not local.exists():
        raise UsageError(f"LOCAL {str(local)!r}: no such file or directory")
    if local_arg.endswith(("/", os.sep)) and not local.is_dir():
        # As cat, aws and s5cmd: 'model.pt/' names a directory, and this is not one.
        raise UsageError(f"LOCAL {local_arg!r} ends with '/', but {str(local)!r} is not a directory")
    if local.is_dir() and not recursive:
        raise UsageError(
            f"LOCAL {str(local)!r} is a directory: add --recursive to upload everything in it"
        )
    if (include or exclude) and not local.is_dir():
        raise UsageError("--include/--exclude filter a directory upload; LOCAL is a single file")
    if not local.is_dir() and not local.is_file():
        raise UsageError(f"LOCAL {str(local)!r} is not a regular file or directory")
    storage = _check_storage_class(storage_class)

    from runctl import marking
    from runctl.transfer import ops

    total = _tree_size(local) if s.out.progress_enabled() else None
    started, began = time.monotonic(), time.time()
    dirs = marking.copied_checkpoint_dirs(local, url) if recursive else []
    dirs = marking.selected_dirs(dirs, _selector(local, include, exclude))
    with s.transfer(use_s5cmd) as transfer, s.out.progress("upload", total) as advance:
        # Only the checkpoints this copy changes lose their marker while it runs: an unchanged
        # one stays complete, also when the copy fails or is interrupted.
        listed = marking.listing(transfer, dirs)
        changed = marking.changed_dirs(dirs, listed)
        if changed and not dry_run:
            marking.clear_markers(transfer, changed)
        pairs, partial = _partly(
            lambda: ops.upload(
                transfer,
                local,
                url,
                recursive=recursive,
                include=include or (),
                exclude=exclude or (),
                storage_class=storage,
                dry_run=dry_run,
                progress=advance,
                own_file=marking.marked_anew(local, dirs),
            )
        )
        if dry_run:
            marks = marking.dry_run_marks(dirs, {d for _, d in changed}, listed, started=began)
        elif partial is None:
            marks = marking.mark_copied(
                transfer, dirs, started=began, changed={dest for _, dest in changed}
            )
        else:
            # A failed file may have left an older object of its size: its directory stays unmarked.
            marks = marking.mark_beside_failures(
                transfer, dirs, partial.failures, started=began, changed={d for _, d in changed}
            )
    seconds = time.monotonic() - started
    moved = 0
    prefix = "(dry run) " if dry_run else ""
    shown: list[str] = []
    for path, dest in pairs:
        size = _size_of(path)
        moved += size
        if s.out.json:
            s.out.record("upload", source=str(path), destination=str(dest), size=size, dry_run=dry_run)
        elif not s.out.quiet:
            shown.append(f"{prefix}upload: {path} -> {dest}")
    s.out.lines(shown)
    _report_marks(s, marks, dry_run)
    s.out.record(
        "summary",
        action="upload",
        files=len(pairs),
        bytes=moved,
        seconds=round(seconds, 3),
        dry_run=dry_run,
    )
    if not pairs and partial is None:
        s.out.info("nothing to upload (no file matched)" + _filter_hint(include, exclude))
    elif dry_run:
        s.out.info(f"dry run: would upload {_plural(len(pairs), 'file')} ({human_size(moved)})")
    elif pairs or partial is None:  # when every file failed, the error line says it all
        s.out.info(
            f"uploaded {_plural(len(pairs), 'file')} ({human_size(moved)}) in {seconds:.1f} s"
        )
    if partial is not None:
        raise partial


def _partly(call: Callable[[], T]) -> tuple[T, PartialTransferError | None]:
    """Run a copy; when part of it failed, what it did carry out and the error to raise after.

    aws and s5cmd print a line for each copy that landed beside each one that failed; so does
    runctl, and the error (exit 1) comes last.
    """
    try:
        return call(), None
    except PartialTransferError as exc:
        if exc.done is None:
            raise
        return exc.done, exc


def _report_marks(s: Session, marks: MarkResult, dry_run: bool = False) -> None:
    """A line per directory checkpoint marked complete; a warning for each one left unmarked."""
    for dest in marks.marked:
        s.out.record("marker", url=str(dest), complete=True, dry_run=dry_run)
        if not s.out.quiet:
            s.out.line(f"{'(dry run) would be ' if dry_run else ''}marked complete: {dest}")
    for dest, reason in marks.unmarked.items():
        s.out.record("marker", url=str(dest), complete=False, reason=reason)
        s.out.warn(f"{dest} is not marked complete: {reason}")


def _upload_stdin(
    s: Session, url: S3URL, storage: str | None, dry_run: bool, use_s5cmd: bool
) -> None:
    if url.is_prefix:
        raise UsageError(f"S3URL {url} ends with '/': a stream from stdin needs the object's key")
    prefix = "(dry run) " if dry_run else ""
    moved, started = 0, time.monotonic()
    if not dry_run:
        from runctl.transfer import ops

        if sys.stdin is None:
            raise UsageError("LOCAL '-' reads stdin, which is closed")
        with s.transfer(use_s5cmd) as transfer:
            moved = ops.upload_stream(transfer, sys.stdin.fileno(), url, storage_class=storage)
    seconds = time.monotonic() - started
    if not s.out.quiet:
        s.out.line(f"{prefix}upload: {STDIO} -> {url}")
    s.out.record("upload", source=STDIO, destination=str(url), size=moved, dry_run=dry_run)
    s.out.record(
        "summary", action="upload", files=1, bytes=moved, seconds=round(seconds, 3), dry_run=dry_run
    )
    if dry_run:
        s.out.info("dry run: would upload stdin")
    else:
        s.out.info(f"uploaded stdin ({human_size(moved)}) in {seconds:.1f} s")


@s3_app.command("download")
def download_files(
    ctx: typer.Context,
    s3url: S3UrlArg,
    local_arg: Annotated[
        str,
        typer.Argument(
            metavar="LOCAL",
            help="Destination file or directory (a trailing '/' means a directory).",
            show_default=False,
        ),
    ],
    recursive: RecursiveOpt = False,
    latest: Annotated[
        bool,
        typer.Option(
            "--latest",
            help=(
                "The newest complete checkpoint under the S3URL prefix, into the LOCAL directory "
                "(with every file saved at its step: net_g_N.pth and net_d_N.pth)."
            ),
        ),
    ] = False,
    treat_unmarked_complete: UnmarkedOpt = False,
    dry_run: DryRunOpt = False,
    use_s5cmd: UseS5cmdOpt = True,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download an object, a prefix (--recursive), or the newest complete checkpoint (--latest).

    Files appear atomically and never outside LOCAL, whatever the keys say
    (unsafe keys are skipped and reported). LOCAL '-' writes one object's bytes to
    stdout, and nothing else (./- is a file named '-').

    \b
    Examples:
      runctl s3 download s3://bucket/run-7/step_100.pt ./restore/
      runctl s3 download s3://bucket/run-7/ ./restore/ --recursive
      runctl s3 download s3://bucket/run-7/ckpt/ ./resume/ --latest
      runctl s3 download s3://bucket/archive/run-7.tar - | tar x
    """
    s = session(
        ctx,
        endpoint_url=endpoint_url,
        profile=profile,
        region=region,
        json_output=json_output,
        quiet=quiet,
    )
    url = parse_s3url(s3url)
    check_local(local_arg)
    if local_arg != STDIO and not (recursive or latest):
        from runctl.transfer.ops import own_descriptor

        if own_descriptor(local_arg) == 1:  # /dev/stdout: the object alone on stdout, as for '-'
            local_arg = STDIO
    if local_arg == STDIO:
        if recursive or latest or treat_unmarked_complete:
            raise UsageError("LOCAL '-' (stdout) takes one object: --recursive and --latest do not apply")
        if s.out.json:
            raise UsageError("--json writes its records to stdout, where LOCAL '-' writes the object")
        if url.is_prefix:
            raise UsageError(f"S3URL {url} is a prefix: only one object can go to stdout")
        from runctl.transfer import ops

        if sys.stdout is None:
            raise UsageError("LOCAL '-' writes to stdout, which is closed")
        sys.stdout.flush()
        with s.transfer(use_s5cmd) as transfer:
            ops.download_stream(transfer, url, sys.stdout.fileno(), dry_run=dry_run)
        if dry_run:
            s.out.line(f"(dry run) download: {url} -> {STDIO}")
        return
    local = Path(local_arg)
    into_dir = local_arg.endswith(("/", os.sep)) and not recursive and not latest
    if into_dir and local.exists() and not local.is_dir():
        raise UsageError(f"LOCAL {local_arg!r} ends with '/' but is a file")
    if local.exists() and not local.is_dir() and (recursive or latest):
        raise UsageError(f"LOCAL {str(local)!r} is a file: a prefix or --latest needs a directory")
    if latest:
        _download_latest(
            s,
            url,
            local,
            use_s5cmd=use_s5cmd,
            treat_unmarked_complete=treat_unmarked_complete,
            dry_run=dry_run,
        )
        return
    if treat_unmarked_complete:
        raise UsageError("--treat-unmarked-complete only applies with --latest")
    if url.is_prefix and not recursive:
        raise UsageError(
            f"S3URL {url} is a prefix: add --recursive to download everything below it"
        )

    from runctl.transfer import ops

    target = local
    if into_dir and not local.is_dir() and not url.is_prefix:
        # `download s3://b/a.pt restore/` means restore/a.pt, created only once the object is found
        target = ops.safe_local_path(local, url.name)
    started = time.monotonic()
    with s.transfer(use_s5cmd) as transfer, s.out.progress("download") as advance:
        pairs, partial = _partly(
            lambda: ops.download(
                transfer, url, target, recursive=recursive, dry_run=dry_run, progress=advance
            )
        )
        seconds = time.monotonic() - started
        sizes = _listed_sizes(transfer, url, pairs, recursive) if dry_run else _landed_sizes(transfer, pairs)
    moved = 0
    prefix = "(dry run) " if dry_run else ""
    shown: list[str] = []
    for src, path in pairs:
        size = sizes.get(path, 0)
        moved += size
        if s.out.json:
            s.out.record("download", source=str(src), destination=str(path), size=size, dry_run=dry_run)
        elif not s.out.quiet:
            shown.append(f"{prefix}download: {src} -> {path}")
    s.out.lines(shown)
    s.out.record(
        "summary",
        action="download",
        files=len(pairs),
        bytes=moved,
        seconds=round(seconds, 3),
        dry_run=dry_run,
    )
    if dry_run:
        s.out.info(f"dry run: would download {_plural(len(pairs), 'file')} ({human_size(moved)})")
    elif pairs or partial is None:  # when every file failed, the error line says it all
        s.out.info(
            f"downloaded {_plural(len(pairs), 'file')} ({human_size(moved)}) in {seconds:.1f} s"
        )
    if partial is not None:
        raise partial


def _download_latest(
    s: Session,
    url: S3URL,
    local: Path,
    *,
    use_s5cmd: bool,
    treat_unmarked_complete: bool,
    dry_run: bool,
) -> None:
    from runctl.uploader import latest_checkpoints

    prefix = url.as_prefix()
    started = time.monotonic()
    paths = latest_checkpoints(
        prefix,
        local,
        config=s.config(),
        use_s5cmd=use_s5cmd,
        treat_unmarked_complete=treat_unmarked_complete,
        dry_run=dry_run,
    )
    if not paths:
        raise RunctlError(f"no complete checkpoint under {prefix}")
    path, *same_step = paths
    source = str(prefix.join(path.name)) + ("/" if path.is_dir() else "")
    also = f" (and {', '.join(p.name for p in same_step)}, saved at the same step)" if same_step else ""
    extra = {"also": [p.name for p in same_step]} if same_step else {}
    where = path.parent if same_step else path
    if dry_run:
        s.out.record("latest", source=source, destination=str(path), name=path.name, dry_run=True, **extra)
        s.out.info(f"dry run: would download the latest complete checkpoint {path.name}{also} to {where}")
        return
    size = sum(_tree_size(p) for p in paths)
    seconds = time.monotonic() - started
    s.out.record(
        "latest",
        source=source,
        destination=str(path),
        name=path.name,
        size=size,
        seconds=round(seconds, 3),
        **extra,
    )
    s.out.info(
        f"downloaded the latest complete checkpoint {path.name}{also} ({human_size(size)}) to {where}"
    )
    if s.out.quiet and s.out.human:
        # A line per file of the step, by name: path=$(...) when a step is one file.
        s.out.lines(sorted(str(p) for p in paths))


@s3_app.command("sync")
def sync_tree(
    ctx: typer.Context,
    local: Annotated[
        Path, typer.Argument(metavar="LOCAL", help="Local directory.", show_default=False)
    ],
    s3url: S3UrlArg,
    direction: Annotated[
        Direction,
        typer.Option(
            "--direction",
            "-d",
            help="up: LOCAL to S3URL; down: S3URL to LOCAL.",
            case_sensitive=False,
        ),
    ],
    delete: Annotated[
        bool, typer.Option("--delete", help="Delete destination files the source does not have.")
    ] = False,
    yes_bucket_root: Annotated[
        bool,
        typer.Option(
            "--yes-bucket-root", help="Confirm --delete going up to the root of a bucket."
        ),
    ] = False,
    size_only: Annotated[
        bool, typer.Option("--size-only", help="Compare sizes only, not modification times.")
    ] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    dry_run: DryRunOpt = False,
    use_s5cmd: UseS5cmdOpt = True,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Make S3URL match LOCAL (up) or LOCAL match S3URL (down).

    Copies what is missing, differs in size, or is newer on the source side
    (whole seconds; --size-only: size alone), as s5cmd sync does; --delete also
    removes what the source lacks (inside the prefix only). It refuses an
    empty source (a mistyped path), and going up to a bucket root needs --yes-bucket-root.
    Unreadable directories fail (exit 1); symlinked directories are not followed. Neither
    loses its copy in S3 to --delete, nor does a pinned checkpoint (a warning names the pin).
    .runctl/ state directories are left out both ways.

    \b
    Examples:
      runctl s3 sync ./checkpoints s3://bucket/run-7/ckpt/ --direction up
      runctl s3 sync ./restore s3://bucket/run-7/ckpt/ --direction down --delete --dry-run
    """
    s = session(
        ctx,
        endpoint_url=endpoint_url,
        profile=profile,
        region=region,
        json_output=json_output,
        quiet=quiet,
    )
    url = parse_s3url(s3url)
    check_local(str(local))
    if local.exists() and not local.is_dir():
        raise UsageError(f"LOCAL {str(local)!r} is a file: sync needs a directory")
    if direction is Direction.up and not local.is_dir():
        raise UsageError(f"LOCAL {str(local)!r}: no such directory to sync up")
    if direction is Direction.up and delete and url.is_bucket and not yes_bucket_root:
        raise UsageError(
            f"S3URL {url} is a bucket root: --delete there may delete any object in the bucket; "
            "add --yes-bucket-root to confirm, or give a prefix"
        )

    from runctl import marking
    from runctl.transfer import ops

    started, began = time.monotonic(), time.time()
    up = direction is Direction.up
    dirs = marking.copied_checkpoint_dirs(local, url) if up else []
    dirs = marking.selected_dirs(dirs, _selector(local, include, exclude))
    with s.transfer(use_s5cmd) as transfer, s.out.progress(f"sync {direction.value}") as advance:

        touched: set[S3URL] = set()

        def clear_changed(uploads: Sequence[tuple[Path, S3URL]]) -> None:
            # Only the directories that get files: an unchanged one stays complete if this fails.
            changed = _receiving(dirs, [str(dest) for _, dest in uploads])
            touched.update(dest for _, dest in changed)
            marking.clear_markers(transfer, changed)

        plan, partial = _partly(
            lambda: ops.sync(
                transfer,
                local,
                url,
                direction.value,
                delete=delete,
                size_only=size_only,
                dry_run=dry_run,
                include=include or (),
                exclude=exclude or (),
                progress=advance,
                before_upload=clear_changed if dirs else None,
                keep_key=marking.marker_of_a_local_dir(local, url) if up else None,
                own_file=marking.marked_anew(local, dirs),
            )
        )
        # A directory that lost files to --delete gets a marker of what it holds now.
        touched.update(d for _, d in _receiving(dirs, plan.delete))
        if dry_run:
            touched.update(d for _, d in _receiving(dirs, [dst for _, dst in plan.copy]))
            listed = marking.listing(transfer, dirs)
            marks = marking.dry_run_marks(dirs, touched, listed, started=began)
        elif partial is None:
            marks = marking.mark_copied(transfer, dirs, started=began, changed=touched)
        else:
            marks = marking.mark_beside_failures(
                transfer, dirs, partial.failures, started=began, changed=touched
            )
    seconds = time.monotonic() - started
    prefix = "(dry run) " if dry_run else ""
    if s.out.json:
        for src, dst in plan.copy:
            s.out.record("copy", source=src, destination=dst, dry_run=dry_run)
        for target in plan.delete:
            s.out.record("delete", target=target, dry_run=dry_run)
    elif not s.out.quiet:
        s.out.lines(f"{prefix}copy: {src} -> {dst}" for src, dst in plan.copy)
        s.out.lines(f"{prefix}delete: {target}" for target in plan.delete)
    for skipped_url, reason in plan.skipped:
        s.out.record("skipped", url=skipped_url, reason=reason)
        s.out.warn(f"skipped {skipped_url}: {reason}")
    _report_kept(s, plan.kept, dry_run)
    _report_marks(s, marks, dry_run)
    s.out.record(
        "summary",
        action="sync",
        direction=direction.value,
        copied=len(plan.copy),
        deleted=len(plan.delete),
        unchanged=plan.unchanged,
        skipped=len(plan.skipped),
        kept=len(plan.kept),
        seconds=round(seconds, 3),
        dry_run=dry_run,
    )
    head = "dry run: would copy" if dry_run else "copied"
    matched = plan.copy or plan.unchanged or plan.delete
    s.out.info(
        f"{head} {_plural(len(plan.copy), 'file')}, "
        f"{'would delete' if dry_run else 'deleted'} {len(plan.delete)}, {plan.unchanged} unchanged"
        + ("" if matched or partial else _filter_hint(include, exclude))
    )
    if partial is not None:
        raise partial


def _report_kept(s: Session, kept: Sequence[tuple[str, str]], dry_run: bool) -> None:
    """A warning per pin whose checkpoint --delete left in place (and a record per object in --json)."""
    by_pin: dict[str, int] = {}
    for target, pin in kept:
        s.out.record("kept", target=target, pin=pin, dry_run=dry_run)
        by_pin[pin] = by_pin.get(pin, 0) + 1
    for pin, count in by_pin.items():
        verb = "would keep" if dry_run else "kept"
        s.out.warn(f"--delete {verb} {_plural(count, 'object')} of a pinned checkpoint; delete {pin} to unpin it")


def _receiving(
    dirs: Sequence[tuple[Path, S3URL]], urls: Sequence[str]
) -> list[tuple[Path, S3URL]]:
    """The checkpoint directories among ``dirs`` that one of these S3 ``urls`` is below."""
    return [(local, dest) for local, dest in dirs if any(u.startswith(str(dest)) for u in urls)]


def _selector(
    top: Path, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> Callable[[Path], bool] | None:
    """Whether --include/--exclude select a local file below ``top`` (None: no filters)."""
    if not (include or exclude):
        return None
    from runctl.transfer.ops import selected

    return lambda path: selected(path.relative_to(top).as_posix(), include or (), exclude or ())


def _filter_hint(include: Sequence[str] | None, exclude: Sequence[str] | None) -> str:
    """Why nothing matched, for aws users: there, --include after --exclude '*' takes files back."""
    if not (include and exclude):
        return ""
    return (
        " (an --exclude match always wins over --include, in any order, as with s5cmd: for"
        " aws's `--exclude '*' --include '*.pt'`, give only `--include '*.pt'`)"
    )


@s3_app.command("list")
def list_objects(
    ctx: typer.Context,
    s3url: Annotated[
        str | None,
        typer.Argument(
            metavar="[S3URL]",
            help="s3://bucket/key or s3://bucket/prefix/; none (or s3://) lists the buckets.",
            show_default=False,
        ),
    ] = None,
    recursive: RecursiveOpt = False,
    human_readable: Annotated[
        bool, typer.Option("--human-readable", "-H", help="Sizes as KiB, MiB, GiB.")
    ] = False,
    summarize: Annotated[
        bool, typer.Option("--summarize", help="End with the object count and total size.")
    ] = False,
    use_s5cmd: UseS5cmdOpt = True,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List objects: one level (prefixes shown as DIR), or everything with --recursive.

    The listing streams page by page, so a prefix with 100,000 keys lists fine.
    A prefix or key that matches nothing exits 1 (as aws s3 ls does); an empty bucket, 0.
    Without S3URL (or with s3://), it lists your buckets, as aws s3 ls and s5cmd ls do.

    \b
    Examples:
      runctl s3 list s3://bucket/run-7/
      runctl s3 list s3://bucket/run-7/ --recursive --human-readable --summarize
      runctl s3 list s3://bucket/ --json | jq -r .key
      runctl s3 list
    """
    s = session(
        ctx,
        endpoint_url=endpoint_url,
        profile=profile,
        region=region,
        json_output=json_output,
        quiet=quiet,
    )
    if s3url is None or s3url.lower() == "s3://":
        if recursive:
            raise UsageError("--recursive lists below a bucket: name one (s3://bucket/)")
        _list_buckets(s, use_s5cmd, summarize)
        return
    url = parse_s3url(s3url)

    from runctl.transfer.base import ObjectInfo, PrefixInfo

    base = url.key[: url.key.rfind("/") + 1]
    objects = prefixes = total = 0
    out = s.out
    with s.transfer(use_s5cmd) as transfer:
        for item in transfer.iter_objects(url, recursive=recursive):
            if isinstance(item, PrefixInfo):
                prefixes += 1
                out.json_line(item.to_json())
                out.line(f"{'':19}  {'DIR':>10}  {item.key[len(base) :]}")
            elif isinstance(item, ObjectInfo):
                objects += 1
                total += item.size
                out.record("object", **item.to_json())
                size = human_size(item.size) if human_readable else str(item.size)
                name = item.key if recursive else item.key[len(base) :]
                # This machine's time, as aws s3 ls and `watch` show it (it was UTC, unmarked)
                out.line(f"{item.last_modified.astimezone():%Y-%m-%d %H:%M:%S}  {size:>10}  {name}")
    if summarize:
        out.record("summary", objects=objects, prefixes=prefixes, size=total)
        out.line("")
        out.line(f"Total Objects: {objects}")
        out.line(f"   Total Size: {human_size(total) if human_readable else total}")
    out.flush()
    if url.key and not objects and not prefixes:
        # As `aws s3 ls` and `s5cmd ls`: a prefix or key that matches nothing exits 1, so a
        # script can test for it; an empty bucket lists as nothing, with exit 0.
        raise RunctlError(f"nothing found at {url}")


def _list_buckets(s: Session, use_s5cmd: bool, summarize: bool) -> None:
    """``runctl s3 list`` without a bucket: a line per bucket, its creation time and name."""
    buckets = 0
    with s.transfer(use_s5cmd) as transfer:
        for bucket in transfer.iter_buckets():
            buckets += 1
            s.out.record("bucket", **bucket.to_json())
            s.out.line(f"{bucket.created.astimezone():%Y-%m-%d %H:%M:%S}  {bucket.name}")
    if summarize:
        s.out.record("summary", buckets=buckets)
        s.out.line("")
        s.out.line(f"Total Buckets: {buckets}")
    s.out.flush()


@s3_app.command("cleanup")
def cleanup_s3(
    ctx: typer.Context,
    s3url: S3UrlArg,
    keep_last_n: Annotated[
        int | None,
        typer.Option(
            "--keep-last-n",
            "-n",
            metavar="N",
            help="Keep the newest N complete checkpoints (N >= 1).",
        ),
    ] = None,
    max_total_size: Annotated[
        str | None,
        typer.Option(
            "--max-total-size",
            metavar="SIZE",
            help="Then delete the oldest steps until the rest fit, e.g. 10GB, 512MiB (a warning says what could not go: the newest step, protected ones).",
        ),
    ] = None,
    incomplete_older_than: Annotated[
        str | None,
        typer.Option(
            "--incomplete-older-than",
            metavar="DURATION",
            help="Also delete directory checkpoints still without a marker after this long, e.g. 2h, 3d.",
        ),
    ] = None,
    protect: ProtectOpt = None,
    treat_unmarked_complete: UnmarkedOpt = False,
    yes_bucket_root: Annotated[
        bool,
        typer.Option(
            "--yes-bucket-root", help="Confirm cleaning checkpoints at the root of a bucket."
        ),
    ] = False,
    dry_run: DryRunOpt = False,
    use_s5cmd: UseS5cmdOpt = True,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Keep the last N checkpoints under a prefix and delete the older ones.

    Works on checkpoints, not objects: a directory checkpoint goes whole
    (marker first), only recognised checkpoints directly inside the prefix
    count (s3://b/ckpt/ never touches s3://b/ckpt-old/), other files stay,
    and the newest complete checkpoint always stays. Runs under the same lock
    as the uploader.

    \b
    Examples:
      runctl s3 cleanup s3://bucket/run-7/ckpt/ --keep-last-n 3 --dry-run
      runctl s3 cleanup s3://bucket/run-7/ckpt/ --keep-last-n 5 --max-total-size 50GB
      runctl s3 cleanup s3://bucket/run-7/ckpt/ -n 3 --incomplete-older-than 1d
    """
    s = session(
        ctx,
        endpoint_url=endpoint_url,
        profile=profile,
        region=region,
        json_output=json_output,
        quiet=quiet,
    )
    url = parse_s3url(s3url)
    if keep_last_n is None and max_total_size is None and incomplete_older_than is None:
        raise UsageError(
            "cleanup needs --keep-last-n N (and/or --max-total-size, --incomplete-older-than)"
        )
    if keep_last_n is not None and keep_last_n < 1:
        raise UsageError(
            f"--keep-last-n must be at least 1 (got {keep_last_n}): the newest complete checkpoint is always kept"
        )
    size_limit = parse_size(max_total_size) if max_total_size is not None else None
    age_limit = parse_duration(incomplete_older_than) if incomplete_older_than is not None else None
    if url.is_bucket and not yes_bucket_root:
        raise UsageError(
            f"S3URL {url} is a bucket root: add --yes-bucket-root to clean checkpoints there, or give a prefix"
        )
    prefix = url.as_prefix()

    from runctl.retention import apply_s3_retention

    with s.transfer(use_s5cmd) as transfer:
        plan = apply_s3_retention(
            transfer,
            prefix,
            keep_last_n,
            protected=protected_names(protect, prefix),
            protected_must_exist=True,
            max_total_size=size_limit,
            incomplete_older_than=age_limit,
            treat_unmarked_complete=treat_unmarked_complete,
            dry_run=dry_run,
        )
    render_retention(s.out, plan, location=str(prefix), dry_run=dry_run)
