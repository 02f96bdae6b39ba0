"""The ``runctl local`` command: run a training script and upload the checkpoints it saves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
from runctl.cli.output import PROG, Output, human_size
from runctl.exceptions import UsageError

LOCAL_HELP = """Run a training script; with --checkpoint-dir and --upload-to, upload every checkpoint it saves.

SCRIPT is run as `python SCRIPT ARGS` when it ends in .py (with runctl's interpreter), else as an executable. Put runctl's options before SCRIPT: everything after SCRIPT (or after `--`) goes to the script. stdin, stdout and stderr are passed through (with --json, the script's stdout goes to stderr, so stdout holds runctl's JSON lines alone); runctl exits with the script's own exit code. Ctrl-C, SIGINT or SIGTERM is forwarded to the script, runctl waits for it, uploads what is finished (but stops waiting once nothing has reached S3 for 30 s: the rest goes up in the next run) and exits 130 (143 for SIGTERM). Started with SIGINT ignored (a shell's background job), runctl ignores it too, as the script does: use SIGTERM.

With --checkpoint-dir DIR --upload-to S3URL, DIR is watched while the script runs and each finished checkpoint (a recognised name: step_100.pt, epoch=3-step=1200.ckpt, checkpoint-500/, global_step500/ ...) goes to the background uploader: a file once its size and mtime have not changed for --settle seconds and the script no longer has it open for writing; a directory once its framework's completion sign exists (Hugging Face trainer_state.json, DeepSpeed `latest` naming it: until then a checkpoint-N/ with training_args.bin, or a global_stepN/ newer than the one `latest` names, waits however quiet) or it has been quiet for --settle seconds. A torch.save file (.pt, .ckpt) or .safetensors file that its format shows cut short (a save that raised half-way, or was killed) is never uploaded. When the script is killed by a signal, a checkpoint that changed in the last --settle seconds before and whose format cannot tell is left out too. When the script exits: a final scan, a flush, and a summary of what was uploaded. A failed upload makes the exit code 1 when the script itself succeeded. A run record (command, start, end, exit code, uploads) is written to DIR/.runctl/runs/<UTC time>.json.

The script gets these variables (the plain-loop helper and the callbacks use them as defaults): RUNCTL_CHECKPOINT_DIR (absolute DIR), RUNCTL_S3_URL (S3URL as a prefix), RUNCTL_KEEP_LAST_N (N), RUNCTL_ENDPOINT_URL (the S3 endpoint, when not AWS), and RUNCTL_LOCAL_WATCHING=1 while runctl itself watches DIR. A callback or CheckpointManager saving into DIR and uploading to S3URL claims DIR: runctl then stands aside, so each checkpoint goes up once, by the code that knows the best one and the one it resumed from (RUNCTL_LOCAL_KEEP_LAST_N carries --local-keep-last-n to it).


Examples:
  runctl local train.py -- --epochs 3
  runctl local --checkpoint-dir ckpt --upload-to s3://bucket/run-7/ --keep-last-n 3 train.py --lr 0.1
  runctl local --checkpoint-dir ckpt --upload-to s3://bucket/run-7/ --log train.log ./train.sh
"""


def _say(out: Output, text: str) -> None:
    """A summary line on stderr, so the script's stdout stays its own."""
    if out.human and not out.quiet:
        out.stderr.write(f"{PROG}: {text}\n")
        out.stderr.flush()


def local_command(
    ctx: typer.Context,
    script: Annotated[
        str,
        typer.Argument(
            metavar="SCRIPT",
            help="A .py file (run with python) or an executable.",
            show_default=False,
        ),
    ],
    args: Annotated[
        list[str] | None,
        typer.Argument(metavar="ARGS", help="Arguments for the script.", show_default=False),
    ] = None,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-dir",
            metavar="DIR",
            help="Directory the script saves checkpoints in (watched).",
            show_default=False,
        ),
    ] = None,
    upload_to: Annotated[
        str | None,
        typer.Option(
            "--upload-to",
            metavar="S3URL",
            help="Upload finished checkpoints to this prefix.",
            show_default=False,
        ),
    ] = None,
    keep_last_n: Annotated[
        int | None,
        typer.Option(
            "--keep-last-n",
            metavar="N",
            help="Keep the newest N complete checkpoints in S3.",
            show_default=False,
        ),
    ] = None,
    local_keep_last_n: Annotated[
        int | None,
        typer.Option(
            "--local-keep-last-n",
            metavar="M",
            help="Keep the newest M locally (older ones go once durable in S3).",
            show_default=False,
        ),
    ] = None,
    settle: Annotated[
        float,
        typer.Option(
            "--settle",
            metavar="SECONDS",
            help="A checkpoint unchanged this long (and closed) is finished.",
        ),
    ] = 2.0,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log",
            metavar="FILE",
            help="Also append the script's stdout and stderr to FILE.",
            show_default=False,
        ),
    ] = None,
    flush_timeout: Annotated[
        float,
        typer.Option(
            "--flush-timeout",
            metavar="SECONDS",
            help="Wait at most this long for uploads after the script exits.",
        ),
    ] = 600.0,
    use_s5cmd: UseS5cmdOpt = True,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from runctl.localrun import build_command, run_local

    s = session(
        ctx,
        endpoint_url=endpoint_url,
        profile=profile,
        region=region,
        json_output=json_output,
        quiet=quiet,
    )
    out = s.out
    script_args = list(args or [])
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    url = parse_s3url(upload_to, "--upload-to").as_prefix() if upload_to is not None else None
    if url is not None and url.is_bucket:
        raise UsageError(
            f"--upload-to {upload_to!r} is a bucket root: give a prefix, e.g. s3://{url.bucket}/run-1/"
        )
    if flush_timeout <= 0:
        raise UsageError(f"--flush-timeout must be > 0 seconds, got {flush_timeout}")
    command = build_command(script, script_args)
    # Built for --profile or --region alone too: the script's own uploads use them (without
    # --upload-to or --endpoint-url they were dropped, and it signed as [default]; walkthrough).
    opts = s.options
    config = s.config() if url is not None or opts.endpoint_url or opts.profile or opts.region else None

    record = run_local(
        command,
        checkpoint_dir=checkpoint_dir,
        s3_url=url,
        keep_last_n=keep_last_n,
        local_keep_last_n=local_keep_last_n,
        settle=settle,
        log_file=log_file,
        config=config,
        use_s5cmd=use_s5cmd,
        flush_timeout=flush_timeout,
        script_stdout_to_stderr=out.json,  # stdout holds runctl's JSON lines alone
    )

    out.record("run", **record.to_json(), record_path=record.record_path)
    out.flush()
    if record.uploaded_by_script is not None:
        _say(out, f"the script (pid {record.uploaded_by_script}) uploads {checkpoint_dir} to {url} itself")
    elif url is not None:
        verified = [u for u in record.uploads if u.state == "verified"]
        skipped = [u for u in record.uploads if u.state == "skipped"]
        size = sum(u.size or 0 for u in verified)
        noun = "checkpoint" if len(verified) == 1 else "checkpoints"
        line = f"uploaded {len(verified)} {noun} ({human_size(size)}) to {url}"
        if verified:
            line += ": " + ", ".join(u.name for u in verified)
        _say(out, line)
        for u in skipped:
            _say(out, f"skipped {u.name}: {u.detail or 'superseded'}")
        for name, why in record.not_uploaded.items():
            out.warn(f"not uploaded: {name}: {why}")
    if record.signal is not None:
        _say(
            out,
            f"interrupted by signal {record.signal} (script exit code {record.script_exit_code})",
        )
    if record.upload_failed:
        problems = [f"{u.name} ({u.state}: {u.detail})" for u in record.failed_uploads]
        detail = "; ".join(problems) or (record.upload_error or "")
        if record.script_exit_code == 0 and record.signal is None:
            out.error(
                f"the script succeeded but uploads failed, so the exit code is 1: {detail}",
                exit_code=record.exit_code,
            )
        else:
            out.warn(f"uploads failed too: {detail}")
    if record.record_path:
        _say(out, f"run record: {record.record_path}")
    raise typer.Exit(record.exit_code)


def register(app: typer.Typer) -> None:
    """Add the top-level ``runctl local`` command.

    Example:
        >>> app = typer.Typer()
        >>> register(app)
    """
    app.command(
        "local",
        help=LOCAL_HELP,
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": False},
    )(local_command)
