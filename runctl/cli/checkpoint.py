"""``runctl checkpoint ...``: keep-last-N on a local checkpoint directory, durable-in-S3 first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from runctl.cli.options import (
    DryRunOpt,
    EndpointOpt,
    JsonOpt,
    ProfileOpt,
    ProtectOpt,
    QuietOpt,
    RegionOpt,
    UseS5cmdOpt,
    parse_s3url,
    protected_names,
    session,
)
from runctl.cli.output import render_retention
from runctl.exceptions import RunctlError, UsageError

checkpoint_app = typer.Typer(
    name="checkpoint",
    help=(
        "Manage local checkpoint directories.\n\n"
        "\b\nExamples:\n"
        "  runctl checkpoint cleanup ./checkpoints --keep-last-n 3 --dry-run"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)


@checkpoint_app.command("cleanup")
def cleanup_local(
    ctx: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", help="The directory the checkpoints are saved in.", show_default=False
        ),
    ],
    keep_last_n: Annotated[
        int,
        typer.Option(
            "--keep-last-n",
            "-n",
            metavar="N",
            help="Keep the newest N complete checkpoints (N >= 1).",
        ),
    ],
    protect: ProtectOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Also delete checkpoints the journal does not show as durable in S3."
        ),
    ] = False,
    durable_in_s3: Annotated[
        str | None,
        typer.Option(
            "--durable-in",
            metavar="S3URL",
            help=(
                "Also count a checkpoint durable when S3URL holds it whole (same size; a directory"
                " complete, with its marker), as after `runctl s3 upload DIR S3URL -r`."
            ),
        ),
    ] = None,
    dry_run: DryRunOpt = False,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    use_s5cmd: UseS5cmdOpt = True,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Keep the last N checkpoints in DIR and delete the older ones.

    Files (step_100.pt) and directories (checkpoint-500/) are checkpoints;
    other files stay. A checkpoint not yet durable in S3 (per the upload
    journal in DIR/.runctl/) is kept, and the output says so; --force
    deletes it anyway. Checkpoints copied by hand are in no journal:
    --durable-in S3URL checks S3 for them. A checkpoint still being written
    (open for writing, or changed in the last 2 s; a Hugging Face directory
    without its trainer_state.json) neither counts among the newest nor goes;
    nor does a save cut short (a torch.save zip without its end, a safetensors
    file shorter than its header says).
    Runs under the same lock as the uploader.

    \b
    Examples:
      runctl checkpoint cleanup ./checkpoints --keep-last-n 2 --dry-run
      runctl checkpoint cleanup ./checkpoints -n 2 --durable-in s3://bucket/run-7/
      runctl checkpoint cleanup ./checkpoints -n 1 --force
    """
    s = session(
        ctx,
        endpoint_url=endpoint_url,
        profile=profile,
        region=region,
        json_output=json_output,
        quiet=quiet,
    )
    if keep_last_n < 1:
        raise UsageError(
            f"--keep-last-n must be at least 1 (got {keep_last_n}): the newest complete checkpoint is always kept"
        )
    if not directory.exists():
        raise UsageError(f"DIR {str(directory)!r}: no such directory")
    if not directory.is_dir():
        raise UsageError(f"DIR {str(directory)!r} is not a directory")

    from runctl.localrun import being_written
    from runctl.retention import apply_local_retention, durable_in

    # Training may be writing the next checkpoint beside this command: it must not count.
    writing = being_written(directory)
    prefix = None if durable_in_s3 is None else parse_s3url(durable_in_s3, "--durable-in")
    protected = protected_names(protect, prefix, directory)
    if prefix is None:
        plan = apply_local_retention(
            directory,
            keep_last_n,
            protected=protected,
            protected_must_exist=True,
            force=force,
            dry_run=dry_run,
            writing=writing,
        )
    else:
        with s.transfer(use_s5cmd) as transfer:
            plan = apply_local_retention(
                directory,
                keep_last_n,
                protected=protected,
                protected_must_exist=True,
                force=force,
                dry_run=dry_run,
                also_durable=durable_in(transfer, prefix, directory),
                writing=writing,
            )
    render_retention(
        s.out,
        plan,
        location=str(directory),
        dry_run=dry_run,
        durable_in=None if prefix is None else str(prefix),
    )
    if plan.failed:  # as `s3 cleanup` for a key it could not delete: named, exit 1
        raise RunctlError(
            f"could not delete {len(plan.failed)} checkpoint(s) in {str(directory)!r}: "
            + "; ".join(f"{name}: {why}" for name, why in sorted(plan.failed.items())[:10])
        )
