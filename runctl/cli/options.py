"""Options every runctl command shares (Annotated aliases), their parsers, and the session they resolve to."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from runctl.cli.output import Output
from runctl.exceptions import S3URLError, UsageError
from runctl.s3url import S3URL

if TYPE_CHECKING:
    from runctl.config import S3Config
    from runctl.transfer.base import Transfer

_CONN = "Connection"
_OUT = "Output"

EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url",
        metavar="URL",
        help="S3 endpoint (MinIO, GCS, rclone, ...). Default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, $S3_ENDPOINT_URL, else AWS.",
        rich_help_panel=_CONN,
        show_default=False,
    ),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        metavar="NAME",
        help="AWS profile. Default: $AWS_DEFAULT_PROFILE, then $AWS_PROFILE (as aws reads them).",
        rich_help_panel=_CONN,
    ),
]
RegionOpt = Annotated[
    str | None,
    typer.Option(
        "--region",
        metavar="REGION",
        help="Region. Default: $AWS_REGION, $AWS_DEFAULT_REGION, the profile's, else each bucket's own.",
        rich_help_panel=_CONN,
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Newline-delimited JSON on stdout: one object per line.",
        rich_help_panel=_OUT,
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress bars and no chatter; errors still go to stderr.",
        rich_help_panel=_OUT,
    ),
]
UseS5cmdOpt = Annotated[
    bool,
    typer.Option(
        "--use-s5cmd/--no-use-s5cmd",
        help="Transfer with s5cmd (default; fast, parallel) or with boto3.",
        rich_help_panel=_CONN,
    ),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")
]
RecursiveOpt = Annotated[
    bool,
    typer.Option("--recursive", "-r", help="Every object / file below the prefix / directory."),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        metavar="GLOB",
        help=(
            "Only paths matching GLOB (relative to the top; repeatable). An --exclude match"
            " wins, in any order (as s5cmd; unlike aws, which applies filters in order)."
        ),
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        metavar="GLOB",
        help="Skip paths matching GLOB (relative to the top; repeatable; wins over --include).",
    ),
]
ProtectOpt = Annotated[
    list[str] | None,
    typer.Option("--protect", metavar="NAME", help="Never delete this checkpoint (repeatable; a name that is not there is refused)."),
]


def protected_names(
    protect: list[str] | None, prefix: S3URL | None = None, directory: Path | None = None
) -> tuple[str, ...]:
    """``--protect`` values, refusing one that names a checkpoint somewhere else.

    A value protects the checkpoint of its last part. So an S3 URL must be of a checkpoint
    directly under ``prefix``, a path with directories one directly in ``directory`` (a local
    cleanup), or a key directly under ``prefix`` (an S3 cleanup): another bucket's, prefix's or
    directory's would protect its namesake here, which is not what it says.

    Example:
        >>> protected_names(["step_5.pt", "s3://bkt/run/step_6.pt"], S3URL.parse("s3://bkt/run/"))
        ('step_5.pt', 's3://bkt/run/step_6.pt')
    """
    values = tuple(protect or ())
    for value in values:
        if value.startswith("s3://"):
            if prefix is None:
                raise UsageError(f"--protect {value!r}: give the name of a checkpoint in DIR, not an S3 URL")
            url = parse_s3url(value, "--protect")
            parent = url.key.rstrip("/").rpartition("/")[0]
            if url.bucket != prefix.bucket or (parent + "/" if parent else "") != prefix.as_prefix().key:
                raise UsageError(f"--protect {value!r} is not a checkpoint directly under {prefix.as_prefix()}")
            continue
        parent = value.rstrip("/").rpartition("/")[0]
        if not parent:
            continue
        if directory is not None:
            if Path(parent).resolve() != directory.resolve():
                raise UsageError(f"--protect {value!r} is not a checkpoint directly in {str(directory)!r}")
        elif prefix is not None and parent + "/" != prefix.as_prefix().key:
            raise UsageError(f"--protect {value!r} is not a checkpoint directly under {prefix.as_prefix()}")
    return values


@dataclass(frozen=True)
class GlobalOptions:
    """Connection and output options; the root callback's values, overridden per command."""

    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    json: bool = False
    quiet: bool = False


class Session:
    """What one command needs: its merged options, where to print, the S3 config and a transfer.

    Example:
        >>> s = Session(GlobalOptions(endpoint_url="http://127.0.0.1:9000"))
        >>> s.config().endpoint_url
        'http://127.0.0.1:9000'
    """

    def __init__(self, options: GlobalOptions, out: Output | None = None) -> None:
        self.options = options
        self.out = out or Output(json=options.json, quiet=options.quiet)
        self._config: S3Config | None = None

    def config(self) -> S3Config:
        """The resolved S3 configuration (flags first, then the standard variables)."""
        if self._config is None:
            from runctl.config import resolve_config

            self._config = resolve_config(
                self.options.endpoint_url, self.options.profile, self.options.region
            )
        return self._config

    @contextmanager
    def transfer(self, use_s5cmd: bool = True) -> Iterator[Transfer]:
        """A transfer backend for this session, closed on exit."""
        from runctl.transfer import get_transfer

        backend = get_transfer(self.config(), use_s5cmd=use_s5cmd)
        try:
            yield backend
        finally:
            backend.close()


#: Where the current command's Output is kept in ``ctx.meta`` (the error handler prints through it).
OUTPUT_META_KEY = "runctl.output"


def session(
    ctx: typer.Context | None,
    *,
    endpoint_url: str | None = None,
    profile: str | None = None,
    region: str | None = None,
    json_output: bool = False,
    quiet: bool = False,
) -> Session:
    """Merge a command's own options over the root's (the command's value wins) into a Session.

    Example:
        >>> session(None, region="eu-west-1").options.region
        'eu-west-1'
    """
    root = ctx.find_root().obj if ctx is not None else None
    base = root if isinstance(root, GlobalOptions) else GlobalOptions()
    merged = replace(
        base,
        endpoint_url=endpoint_url if endpoint_url is not None else base.endpoint_url,
        profile=profile if profile is not None else base.profile,
        region=region if region is not None else base.region,
        json=json_output or base.json,
        quiet=quiet or base.quiet,
    )
    result = Session(merged)
    if ctx is not None:
        ctx.meta[OUTPUT_META_KEY] = result.out
    from runctl.cli.output import configure_logging

    configure_logging(quiet=merged.quiet)
    return result


# -- value parsers ------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
    "p": 1024**5,
    "pb": 1000**5,
    "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str, option: str = "--max-total-size") -> int:
    """Bytes from ``10GB`` (10**10), ``512MiB`` (512 * 2**20), ``1.5G`` (binary), ``2048``.

    Example:
        >>> parse_size("10GB"), parse_size("512MiB"), parse_size("2048")
        (10000000000, 536870912, 2048)
    """
    match = _SIZE_RE.match(text or "")
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise UsageError(f"{option} must be a size like 10GB, 512MiB or 2048 (bytes), got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)


def parse_duration(text: str, option: str = "--incomplete-older-than") -> float:
    """Seconds from ``90`` / ``30s`` / ``15m`` / ``2h`` / ``3d`` / ``1w`` / ``1h30m``.

    Example:
        >>> parse_duration("2h"), parse_duration("1h30m"), parse_duration("45")
        (7200.0, 5400.0, 45.0)
    """
    raw = (text or "").strip()
    total = 0.0
    pos = 0
    while pos < len(raw):
        match = _DURATION_PART.match(raw, pos)
        if match is None or match.end() == pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
        pos = match.end()
    if not raw or pos != len(raw):
        raise UsageError(
            f"{option} must be a duration like 30m, 2h, 3d or 3600 (seconds), got {text!r}"
        )
    return total


def check_local(text: str) -> None:
    """Refuse a LOCAL that is a URL (``s3://...``): it was taken for a relative path, and
    ``download s3://b/x s3://b/copy/`` wrote ``./s3:/b/copy/x`` and exited 0, where ``aws s3 cp``
    copies within S3 (surface pass).

    Example:
        >>> check_local("./restore/")
        >>> check_local("s3://bucket/copy/")
        Traceback (most recent call last):
        ...
        runctl.exceptions.UsageError: LOCAL 's3://bucket/copy/' is a URL: runctl copies between S3 and this machine, not from S3 to S3 (aws s3 cp does); for a local path by that name, write ./s3://bucket/copy/
    """
    import re

    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text):
        raise UsageError(
            f"LOCAL {text!r} is a URL: runctl copies between S3 and this machine, not from S3 to S3 "
            f"(aws s3 cp does); for a local path by that name, write ./{text}"
        )


def parse_s3url(text: str, argument: str = "S3URL") -> S3URL:
    """``S3URL.parse`` whose error names the argument.

    Example:
        >>> str(parse_s3url("s3://bucket/run/"))
        's3://bucket/run/'
    """
    try:
        return S3URL.parse(text)
    except S3URLError as exc:
        raise S3URLError(f"{argument}: {exc}") from None
