"""The `runctl s3 watch` and `runctl s3 review` commands (thin: parse, call runctl.watch / runctl.review, print)."""

from __future__ import annotations

import math
import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from runctl.cli.options import (
    EndpointOpt,
    JsonOpt,
    ProfileOpt,
    QuietOpt,
    RegionOpt,
    UseS5cmdOpt,
    parse_duration,
    parse_s3url,
    session,
)
from runctl.cli.output import Output, debug_enabled, human_size
from runctl.exceptions import RunctlError, Terminated, UsageError, interrupted_exit_code

if TYPE_CHECKING:
    from runctl.review import Review
    from runctl.watch import WatchEvent

WATCH_HELP = """Watch an S3 prefix: a baseline, then new, changed and deleted objects and completed checkpoints.

The first poll prints one baseline line ("watching ...: 37 objects, 5 checkpoints"), not one line per existing object. A directory checkpoint is reported complete when its marker (.runctl-manifest.json) lands; a single-file checkpoint when it appears. Transient errors are retried with backoff; Ctrl-C stops cleanly (exit code 130).

--exec runs a command (split like a shell would, but never run through one) for each completed checkpoint, with RUNCTL_CHECKPOINT_URL, RUNCTL_CHECKPOINT_NAME and RUNCTL_CHECKPOINT_STEP set; one that exits non-zero, or can no longer be started (its program deleted or renamed since watch began), is warned about (an exec_failed record with --json) and watching goes on. Hooks run one at a time and polling waits for them: a checkpoint created and deleted (by the writer's keep-last-N, say) while a hook runs is never reported. --timeout stops a hook still running then (SIGTERM, SIGKILL 10 s later). --keep-last-n applies the same retention as `runctl s3 cleanup` after each completion.

A watch started in the background by a script (`runctl s3 watch ... &`) ignores SIGINT, as every background job of a non-interactive shell does: stop it with SIGTERM (`kill PID`; exit code 143).


Examples:
  runctl s3 watch s3://bucket/run-7/ --interval 30
  runctl s3 watch s3://bucket/run-7/ --exec "python eval.py" --keep-last-n 3
  runctl s3 watch s3://bucket/run-7/ --once --json
"""

REVIEW_HELP = """Audit an S3 prefix: checkpoints, other artifacts, unfinished multipart uploads, monthly cost.

Lists each checkpoint (step, files, size, age, complete or not, pinned or not, storage class; a directory checkpoint is complete when it has a marker, and with --verify only when its marker also matches its listed files, as cleanup checks), other objects, totals, directory checkpoints without a marker, pinned names (and pins whose checkpoint is gone), in-progress and abandoned multipart uploads (their parts are billed), and an estimated monthly storage cost per storage class from a price table (USD per GB-month, AWS us-east-1 list prices; override with --prices FILE or RUNCTL_PRICES, a JSON object such as {"STANDARD": 0.021}).


Examples:
  runctl s3 review s3://bucket/run-7/
  runctl s3 review s3://bucket/run-7/ --detailed --abandoned-after 6h
  runctl s3 review s3://bucket/run-7/ --verify
  runctl s3 review s3://bucket/run-7/ --json --prices prices.json
"""

UnmarkedOpt = Annotated[
    bool,
    typer.Option("--treat-unmarked-complete", help="Treat directory checkpoints without a runctl marker as complete."),
]


def human_age(seconds: float) -> str:
    """``90`` -> ``1m``; ``200000`` -> ``2d``.

    Example:
        >>> human_age(7200)
        '2h'
    """
    seconds = max(seconds, 0.0)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{int(seconds // span)}{unit}"
    return f"{int(seconds)}s"


def money(amount: float) -> str:
    """A cost with enough digits to be non-zero when it is (``0.0046``, ``3.22e-08``).

    Example:
        >>> money(12.5), money(0.0)
        ('12.5000', '0')
    """
    if amount == 0:
        return "0"
    return f"{amount:.4f}" if abs(amount) >= 0.0001 else f"{amount:.2e}"


@contextmanager
def _one_line_errors(out: Output) -> Iterator[None]:
    """A runctl error becomes one line and its exit code; Ctrl-C a line and 130."""
    try:
        yield
    except RunctlError as exc:
        if debug_enabled():
            out.traceback(exc)
        out.error(str(exc), exit_code=exc.exit_code)
        raise typer.Exit(exc.exit_code) from None


def _stopped_by(exc: BaseException) -> str:
    return "terminated" if isinstance(exc, Terminated) else "interrupted"


# -- watch -------------------------------------------------------------------------------


def _print_event(out: Output, event: WatchEvent) -> None:
    if out.json:
        out.json_line(event.to_json())
    elif event.kind == "poll_error":
        out.warn(event.describe())
    else:
        out.line(f"{time.strftime('%H:%M:%S')} {event.describe()}")
    out.flush()


def watch_command(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(metavar="S3URL", help="Prefix to watch, e.g. s3://bucket/run-7/.", show_default=False)],
    interval: Annotated[
        float, typer.Option("--interval", metavar="SECONDS", help="Seconds between polls (at most a day).", min=0.1)
    ] = 10.0,
    once: Annotated[bool, typer.Option("--once", help="Poll once (the baseline) and exit.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", metavar="SECONDS", help="Stop after this many seconds (exit code 0), a running --exec command too.", show_default=False),
    ] = None,
    exec_cmd: Annotated[
        str | None,
        typer.Option(
            "--exec",
            metavar="CMD",
            help="Command run (no shell) for each completed checkpoint; gets RUNCTL_CHECKPOINT_URL, _NAME and _STEP.",
            show_default=False,
        ),
    ] = None,
    keep_last_n: Annotated[
        int | None,
        typer.Option("--keep-last-n", metavar="N", help="Apply S3 retention (keep the last N) after each completion seen while watching (not with --once).", show_default=False),
    ] = None,
    treat_unmarked_complete: UnmarkedOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    use_s5cmd: UseS5cmdOpt = True,
) -> None:
    from runctl.watch import MAX_INTERVAL, CheckpointEvent, PrefixWatcher, run_exec

    s = session(ctx, endpoint_url=endpoint_url, profile=profile, region=region, json_output=json_output, quiet=quiet)
    out = s.out
    with _one_line_errors(out):
        prefix = parse_s3url(url).as_prefix()
        argv: list[str] = []
        if exec_cmd is not None:
            try:
                argv = shlex.split(exec_cmd)
            except ValueError as exc:
                raise UsageError(f"--exec {exec_cmd!r}: {exc}") from None
            if not argv:
                raise UsageError("--exec got an empty command")
            if shutil.which(argv[0]) is None:  # now, not at the first checkpoint hours later
                raise UsageError(f"--exec cannot run {argv[0]!r}: not found, or not an executable file")
        if keep_last_n is not None and keep_last_n < 1:
            raise UsageError(f"--keep-last-n must be at least 1, got {keep_last_n}")
        if keep_last_n is not None and once:
            # It would do nothing: retention runs after a completion, and --once sees none.
            raise UsageError(
                f"--keep-last-n applies after each checkpoint that completes while watching, and "
                f"--once only takes the baseline: run 'runctl s3 cleanup {url} --keep-last-n {keep_last_n}'"
            )
        # Typer's min=0.1 lets NaN through (nan < 0.1 is False): it polled back to back; inf and
        # 1e10 ended in "internal error: OverflowError" after the baseline, --timeout nan never came.
        if not interval <= MAX_INTERVAL:
            raise UsageError(f"--interval must be from 0.1 to {MAX_INTERVAL:g} seconds (a day), got {interval}")
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise UsageError(f"--timeout must be a positive number of seconds, got {timeout}")
        try:
            with s.transfer(use_s5cmd) as transfer:
                watcher = PrefixWatcher(
                    transfer, prefix, keep_last_n=keep_last_n, treat_unmarked_complete=treat_unmarked_complete
                )
                # --timeout holds while a hook runs too (a 25 s hook kept --timeout 5 running 28 s):
                # events() checks it only between polls.
                deadline = None if timeout is None else time.monotonic() + timeout
                for event in watcher.events(interval=interval, timeout=timeout, once=once):
                    _print_event(out, event)
                    if argv and isinstance(event, CheckpointEvent):
                        # A hook's own output amid --json records broke a reader of them.
                        hook = run_exec(argv, event, stdout_to_stderr=out.json, deadline=deadline)
                        if not hook.ok:
                            # A reader of the records saw no sign of it (surface pass).
                            out.record("exec_failed", command=argv[0], exit_code=hook.code, url=event.url)
                            if hook.error is not None:
                                out.warn(f"--exec {hook.error}, for {event.url}; watching goes on")
                            elif hook.stopped:
                                out.warn(f"--exec {argv[0]} stopped at --timeout (exit code {hook.code}) for {event.url}")
                            else:
                                out.warn(f"--exec {argv[0]} exited with code {hook.code} for {event.url}")
                        if hook.stopped:
                            break
        except KeyboardInterrupt as exc:
            # As every other command says it (`runctl: error: ...`, a record with --json).
            code = interrupted_exit_code(exc)
            out.error(f"{_stopped_by(exc)}: stopped watching {prefix}", exit_code=code)
            raise typer.Exit(code) from None


# -- review ------------------------------------------------------------------------------


def _review_tables(out: Output, result: Review, detailed: bool) -> None:
    out.line(f"Review of {result.url}")
    out.line("")
    if result.checkpoints:
        out.table(
            ("step", "name", "files", "size", "age", "complete", "pinned", "storage class"),
            [
                (
                    "-" if row.step is None else row.step,
                    row.name + ("/" if row.is_dir else ""),
                    row.files,
                    human_size(row.size),
                    human_age(row.age),
                    "yes" if row.complete else "NO",
                    "yes" if row.pinned else "-",
                    row.storage_class or "-",
                )
                for row in result.checkpoints
            ],
            title="Checkpoints",
            right=("step", "files", "size", "age"),
            styles=[None if row.complete else "yellow" for row in result.checkpoints],
        )
    else:
        out.line("Checkpoints: none")
    if detailed:
        for row in result.checkpoints:
            if row.file_list:
                out.line("")
                out.table(
                    ("key", "size", "storage class"),
                    [(f.key, human_size(f.size), f.storage_class or "-") for f in row.file_list],
                    title=f"Files of {row.name}",
                    right=("size",),
                )
    if result.others:
        shown = result.others if detailed else result.others[:20]
        out.line("")
        out.table(
            ("key", "size", "age", "storage class"),
            [(o.key, human_size(o.size), human_age(result.time - o.mtime), o.storage_class or "-") for o in shown],
            title="Other artifacts",
            right=("size", "age"),
        )
        if len(shown) < len(result.others):
            out.line(f"... and {len(result.others) - len(shown)} more (--detailed lists them all)")

    complete = len(result.checkpoints) - len(result.incomplete)
    out.line("")
    out.line(
        f"Totals: {result.objects} {'object' if result.objects == 1 else 'objects'}, {human_size(result.size)}; "
        f"{len(result.checkpoints)} {'checkpoint' if len(result.checkpoints) == 1 else 'checkpoints'}, "
        f"{human_size(result.checkpoint_size)} ({complete} complete); "
        f"{len(result.others)} other {'object' if len(result.others) == 1 else 'objects'}"
    )
    if result.incomplete:
        why = "no marker, or one that does not match" if result.markers_verified else "no marker"
        out.line(f"Incomplete directory checkpoints ({why}): " + ", ".join(c.name for c in result.incomplete))
    pinned = [c.name for c in result.checkpoints if c.pinned]
    if pinned:
        out.line("Pinned (every cleanup and retention keeps them): " + ", ".join(pinned))
    if result.stray_pins:
        from runctl.checkpoints import pin_url
        from runctl.s3url import S3URL

        out.line(
            "Pins naming no checkpoint here (deleting the pin object unpins): "
            + ", ".join(str(pin_url(S3URL.parse(result.url), name)) for name in result.stray_pins)
        )

    out.line("")
    if result.multipart_error:
        out.line(f"Multipart uploads: could not list them ({result.multipart_error})")
    elif not result.multipart_listed:
        out.line("Multipart uploads: not listed")
    elif result.multipart_uploads:
        out.table(
            ("key", "initiated (UTC)", "age", "parts", "size", "state"),
            [
                (
                    m.key,
                    time.strftime("%Y-%m-%d %H:%M", time.gmtime(m.initiated)),
                    human_age(m.age),
                    m.parts,
                    human_size(m.size),
                    "abandoned" if m.abandoned else "in progress",
                )
                for m in result.multipart_uploads
            ],
            title="Unfinished multipart uploads (their parts are billed)",
            right=("age", "parts", "size"),
            styles=["red" if m.abandoned else None for m in result.multipart_uploads],
        )
    else:
        out.line("Multipart uploads: none unfinished")

    out.line("")
    rows: list[tuple[object, ...]] = [
        (
            c.storage_class,
            c.objects,
            human_size(c.size) + (f" (incl. {human_size(c.multipart_size)} of parts)" if c.multipart_size else ""),
            "?" if c.price_per_gb_month is None else f"{c.price_per_gb_month:g}",
            "?" if c.monthly_cost is None else money(c.monthly_cost),
        )
        for c in result.costs
    ]
    rows.append(("total", "", human_size(sum(c.size for c in result.costs)), "", money(result.total_monthly_cost)))
    out.table(
        ("storage class", "objects", "size", "price/GB-month", "per month"),
        rows,
        title=f"Estimated monthly storage cost ({result.currency})",
        right=("objects", "size", "price/GB-month", "per month"),
    )
    out.flush()
    for warning in result.warnings:
        out.warn(warning)


def review_command(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(metavar="S3URL", help="Prefix to audit, e.g. s3://bucket/run-7/.", show_default=False)],
    detailed: Annotated[bool, typer.Option("--detailed", help="List every file of every checkpoint.")] = False,
    prices: Annotated[
        str | None,
        typer.Option(
            "--prices",
            metavar="FILE",
            envvar="RUNCTL_PRICES",
            help="JSON file of USD per GB-month by storage class, merged over the built-in table.",
            show_default=False,
        ),
    ] = None,
    abandoned_after: Annotated[
        str,
        typer.Option(
            "--abandoned-after", metavar="DURATION", help="A multipart upload older than this is abandoned (90, 30m, 6h, 2d)."
        ),
    ] = "24h",
    treat_unmarked_complete: UnmarkedOpt = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Read each directory checkpoint's marker and check it against the listed files (slower: one small read per checkpoint).",
        ),
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    use_s5cmd: UseS5cmdOpt = True,
) -> None:
    from runctl.review import load_prices, review

    s = session(ctx, endpoint_url=endpoint_url, profile=profile, region=region, json_output=json_output, quiet=quiet)
    out = s.out
    with _one_line_errors(out):
        prefix = parse_s3url(url).as_prefix()
        table = load_prices(prices) if prices else None
        threshold = parse_duration(abandoned_after, "--abandoned-after")
        try:
            with s.transfer(use_s5cmd) as transfer:
                result = review(
                    transfer,
                    prefix,
                    prices=table,
                    detailed=detailed,
                    abandoned_after=threshold,
                    treat_unmarked_complete=treat_unmarked_complete,
                    verify_markers=verify,
                )
        except KeyboardInterrupt as exc:
            out.stderr.write(f"{_stopped_by(exc)}\n")
            raise typer.Exit(interrupted_exit_code(exc)) from None
    if out.json:
        out.json_line({"type": "review", **result.to_json()})
        out.flush()
    else:
        _review_tables(out, result, detailed)


def register(s3_app: typer.Typer) -> None:
    """Add ``watch`` and ``review`` to the ``runctl s3`` Typer app.

    Example:
        >>> app = typer.Typer()
        >>> register(app)
    """
    s3_app.command("watch", help=WATCH_HELP)(watch_command)
    s3_app.command("review", help=REVIEW_HELP)(review_command)
