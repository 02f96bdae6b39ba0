"""``runctl demo``: train a tiny Lightning model against an embedded S3 server and review what landed."""

from __future__ import annotations

import logging
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runctl.cli.options import (
    EndpointOpt,
    JsonOpt,
    ProfileOpt,
    QuietOpt,
    RegionOpt,
    UseS5cmdOpt,
    parse_s3url,
    session,
)
from runctl.cli.output import Output, human_size
from runctl.exceptions import UsageError

if TYPE_CHECKING:
    from runctl.config import S3Config
    from runctl.s3url import S3URL

log = logging.getLogger("runctl.cli.demo")

DEMO_PREFIX = "demo-run/"


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to the root ``runctl`` app.

    Example:
        >>> register(typer.Typer())
    """
    app.command("demo")(demo)


def demo(
    ctx: typer.Context,
    fast: Annotated[
        bool, typer.Option("--fast", help="A short run for CI: 20 steps, no progress bar.")
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1, metavar="N", help="Training steps (default 60; 20 with --fast).", show_default=False
        ),
    ] = None,
    every: Annotated[int, typer.Option(min=1, metavar="N", help="Save a checkpoint every N steps.")] = 5,
    keep_last_n: Annotated[
        int, typer.Option("--keep-last-n", min=1, metavar="N", help="Checkpoints kept in S3 and locally.")
    ] = 3,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            metavar="DIR",
            help="Local checkpoint directory (default: a temporary one).",
            show_default=False,
        ),
    ] = None,
    s3_url: Annotated[
        str | None,
        typer.Option(
            "--s3-url",
            metavar="S3URL",
            help="Upload to this prefix instead of an embedded server.",
            show_default=False,
        ),
    ] = None,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    use_s5cmd: UseS5cmdOpt = True,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a tiny model with RunctlCheckpoint (keep-last-N in S3), then review what landed.

    With no --s3-url an embedded S3 server (moto, in memory, on 127.0.0.1) is started.

    \b
    Examples:
      runctl demo
      runctl demo --fast --json
      runctl demo --s3-url s3://my-bucket/runctl-demo/ --dir ./ckpt
    """
    s = session(
        ctx,
        endpoint_url=endpoint_url,
        profile=profile,
        region=region,
        json_output=json_output,
        quiet=quiet,
    )
    out = s.out
    try:
        from runctl.integrations.demo import train_demo
        from runctl.integrations.lightning import RunctlCheckpoint  # noqa: F401  (fail early and politely)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in ("lightning", "torch", "lightning_utilities"):
            # Not the framework: said as it is, not "needs Lightning" to a user who has it
            # (a clone's runctl/ without its integrations, packaging pass).
            raise UsageError(f"runctl demo cannot import {exc.name or 'a module'}: {exc}") from None
        raise UsageError(f"runctl demo needs Lightning: pip install 'runctl[demo]' ({exc})") from None

    steps = steps or (20 if fast else 60)
    with ExitStack() as stack:
        if s3_url is None:
            try:
                from runctl.embedded import embedded_s3

                server = stack.enter_context(embedded_s3())
            except ImportError as exc:
                raise UsageError(str(exc)) from None
            url, config = server.url(DEMO_PREFIX), server.config()
            where = f"embedded S3 server at {server.endpoint_url}"
        else:
            url, config = parse_s3url(s3_url, "--s3-url").as_prefix(), s.config()
            where = config.endpoint_url or "AWS S3"
        dirpath = directory or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="runctl-demo-"))
        )
        out.info(f"runctl demo: {steps} steps, a checkpoint every {every}, keep-last-{keep_last_n}")
        out.info(f"  local: {dirpath}")
        out.info(f"  S3:    {url}  ({where})")

        result = train_demo(
            dirpath,
            url,
            config=config,
            steps=steps,
            every=every,
            keep_last_n=keep_last_n,
            progress=not fast and out.progress_enabled(),
            use_s5cmd=use_s5cmd,
        )
        report = _review(url, config, use_s5cmd, multipart=s3_url is not None)
        local = _local_rows(dirpath)
        out.record(
            "demo",
            steps=result.steps,
            s3_url=str(url),
            local_dir=str(dirpath),
            best=result.best,
            stats=result.stats,
            review=report.to_json(),
            local=local,
        )
        if out.json:
            out.flush()
            return
        out.info(f"\nTrained {result.steps} steps. Uploads: {_stats_line(result.stats)}\n")
        _render_review(out, report)
        out.line("")
        out.table(
            ("name", "size", "in S3"),
            [
                (row["name"], human_size(row["size"]), "durable" if row["durable"] else "no")
                for row in local
            ],
            title=f"Local {dirpath}",
            right=("size",),
        )
        if s3_url is None:
            out.info("\nThe embedded server stops now. Try the same on your bucket:")
            out.info(
                "  runctl demo --s3-url s3://<bucket>/runctl-demo/   then   runctl s3 review s3://<bucket>/runctl-demo/"
            )


def _review(url: S3URL, config: S3Config, use_s5cmd: bool, *, multipart: bool) -> Any:
    """What landed in S3, audited by ``runctl.review`` (the same report as ``runctl s3 review``;
    ``multipart``: also list unfinished multipart uploads, which a fresh embedded server has none of)."""
    from runctl.review import review
    from runctl.transfer import get_transfer

    transfer = get_transfer(config, use_s5cmd=use_s5cmd)
    try:
        return review(transfer, url, include_multipart=multipart)
    finally:
        transfer.close()


def _render_review(out: Output, report: Any) -> None:
    try:
        # The exact tables of ``runctl s3 review``, when that command is installed.
        from runctl.cli.monitor import _review_tables
    except ImportError:
        pass
    else:
        _review_tables(out, report, False)
        return
    out.table(
        ("step", "name", "size", "complete"),
        [
            (
                "-" if c.step is None else c.step,
                c.name,
                human_size(c.size),
                "yes" if c.complete else "NO",
            )
            for c in report.checkpoints
        ],
        title=f"Review of {report.url}",
        right=("step", "size"),
    )


def _local_rows(dirpath: Path) -> list[dict[str, Any]]:
    from runctl.checkpoints import scan_local
    from runctl.journal import Journal

    journal = Journal(dirpath)
    return [
        {"name": c.name, "size": c.size, "durable": journal.is_durable(c.name, size=c.size)}
        for c in scan_local(dirpath)
    ]


def _stats_line(stats: dict[str, float]) -> str:
    uploaded = int(stats.get("runctl/uploaded", 0))
    size = human_size(int(stats.get("runctl/bytes_uploaded", 0)))
    skipped = int(stats.get("runctl/skipped", 0))
    failures = int(stats.get("runctl/failures", 0))
    return f"{uploaded} uploaded ({size}), {skipped} skipped as superseded, {failures} failed"
