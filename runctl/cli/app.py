"""The ``runctl`` root command: global options, sub-apps, optional command modules, and error mapping."""

from __future__ import annotations

import copy
import functools
import gc
import importlib
import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Annotated, Any

import typer
from typer import _click
from typer.core import TyperGroup
from typer.models import TyperInfo

from runctl._version import __version__
from runctl.cli.checkpoint import checkpoint_app
from runctl.cli.options import (
    OUTPUT_META_KEY,
    EndpointOpt,
    GlobalOptions,
    JsonOpt,
    ProfileOpt,
    QuietOpt,
    RegionOpt,
)
from runctl.cli.output import Output, debug_enabled
from runctl.cli.s3 import s3_app
from runctl.exceptions import (
    EXIT_FAILED,
    EXIT_USAGE,
    PartialTransferError,
    RunctlError,
    Terminated,
    interrupted_exit_code,
)


def report_error(exc: BaseException, ctx: _click.Context | None = None) -> int:
    """Print ``exc`` as one scrubbed line on stderr (traceback with RUNCTL_DEBUG=1); return the exit code."""
    out = ctx.meta.get(OUTPUT_META_KEY) if ctx is not None else None
    if not isinstance(out, Output):
        root = ctx.find_root().obj if ctx is not None else None
        asked = isinstance(root, GlobalOptions) and root.json
        # A usage error comes before the command's own --json was taken: its words say it.
        out = Output(json=asked or (ctx is not None and _asks_for_json(ctx.meta.get(_ARGV, ()))))
    if debug_enabled() and not isinstance(exc, _click.exceptions.UsageError):
        out.traceback(exc)
    failures = None
    if isinstance(exc, RunctlError):
        code = exc.exit_code
        message = str(exc) or type(exc).__name__
        if isinstance(exc, PartialTransferError):
            failures = exc.failures
    elif isinstance(exc, _click.exceptions.UsageError):
        code = EXIT_USAGE
        message = exc.format_message()
        if exc.ctx is not None:
            message += f" (see '{exc.ctx.command_path} --help')"
    elif isinstance(exc, _click.exceptions.ClickException):
        code = exc.exit_code
        message = exc.format_message()
    elif isinstance(exc, Terminated):
        code = interrupted_exit_code(exc)
        message = "terminated"
    elif isinstance(exc, (KeyboardInterrupt, typer.Abort)):
        code = interrupted_exit_code(exc)
        message = "interrupted"
    elif isinstance(exc, OSError):
        code = EXIT_FAILED
        message = str(exc)
    else:
        code = EXIT_FAILED
        message = f"internal error: {type(exc).__name__}: {exc}"
        if not debug_enabled():
            message += " (RUNCTL_DEBUG=1 shows the traceback)"
    out.error(message, exit_code=code, failures=failures)
    return code


_ARGV = "runctl.argv"


def _asks_for_json(args: Sequence[str]) -> bool:
    """Whether the command line holds ``--json`` (before a ``--``)."""
    args = list(args)
    return "--json" in (args[: args.index("--")] if "--" in args else args)


class RunctlGroup(TyperGroup):
    """The root group: any error below it becomes one line and an exit code, also under CliRunner."""

    def parse_args(self, ctx: _click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)  # shared with every context below this one
        return super().parse_args(ctx, args)

    def invoke(self, ctx: _click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except typer.Exit:
            raise
        except _click.exceptions.NoArgsIsHelpError:
            raise
        except BrokenPipeError:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            raise typer.Exit(report_error(exc, _innermost(ctx, exc))) from None


def _innermost(ctx: _click.Context, exc: BaseException) -> _click.Context:
    """The context the failing command ran in (for its --json choice), else the root."""
    if isinstance(exc, _click.exceptions.UsageError) and exc.ctx is not None:
        return exc.ctx
    return ctx


app = typer.Typer(
    name="runctl",
    cls=RunctlGroup,
    help=(
        "Get training checkpoints safely and quickly into S3.\n\n"
        "\b\nExamples:\n"
        "  runctl s3 upload checkpoints/ s3://bucket/run-7/ --recursive\n"
        "  runctl s3 cleanup s3://bucket/run-7/ --keep-last-n 3 --dry-run\n"
        "  runctl local --checkpoint-dir ckpt --upload-to s3://bucket/run-7/ train.py\n"
        "  runctl demo"
    ),
    epilog=(
        "Exit codes: 0 success, 1 operation failed, 2 bad usage or input, 130 interrupted,"
        " 143 terminated (SIGTERM)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(s3_app, name="s3")
app.add_typer(checkpoint_app, name="checkpoint")

#: Optional command modules, each exposing ``register(target: typer.Typer)``; one line per module.
OPTIONAL_COMMANDS: tuple[tuple[str, str], ...] = (
    ("runctl.cli.monitor", "s3"),  # runctl s3 watch, runctl s3 review
    ("runctl.cli.lifecycle", "s3"),  # runctl s3 lifecycle
    ("runctl.cli.demo", "root"),  # runctl demo
    ("runctl.cli.local", "root"),  # runctl local
)


def _register_optional(targets: dict[str, typer.Typer]) -> None:
    for module_name, target in OPTIONAL_COMMANDS:
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(targets[target])


def _version(value: bool) -> None:
    if value:
        Output().stdout.write(f"runctl {__version__}\n")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Get training checkpoints safely and quickly into S3.

    Connection and output options work here or after any command
    (the command's value wins).

    \b
    Examples:
      runctl s3 upload ckpt/ s3://bucket/run-7/ --recursive
      runctl --endpoint-url http://127.0.0.1:9000 s3 list s3://bucket/ --recursive
      runctl s3 cleanup s3://bucket/run-7/ --keep-last-n 3 --dry-run
      runctl checkpoint cleanup ./checkpoints --keep-last-n 2
    """
    ctx.obj = GlobalOptions(endpoint_url, profile, region, json_output, quiet)


_register_optional({"root": app, "s3": s3_app, "checkpoint": checkpoint_app})


class _LazyCommands(MutableMapping[str, _click.Command]):
    """A group's subcommands by name, each built by typer the first time it is looked up.

    Names are known at once (for "did you mean"); building a command (typer reads its
    signature and makes every option) waits until it is looked up, so ``runctl s3 list``
    builds ``s3`` and ``list`` rather than all sixteen. Help and completion list a group's
    children with their short help, which builds that group's children (not their own).

    Example:
        >>> from typer.core import TyperCommand
        >>> cmds = _LazyCommands({"hi": lambda: TyperCommand("hi")})
        >>> list(cmds), cmds.built, cmds["hi"].name, cmds.built
        (['hi'], [], 'hi', ['hi'])
    """

    def __init__(self, builders: dict[str, Callable[[], _click.Command]]) -> None:
        self._builders = dict(builders)
        self._built: dict[str, _click.Command] = {}

    @property
    def built(self) -> list[str]:
        """The names built so far."""
        return list(self._built)

    def __getitem__(self, name: str) -> _click.Command:
        command = self._built.get(name)
        if command is None:
            build = self._builders[name]  # KeyError: no such command
            command = self._built[name] = build()
        return command

    def get(self, name: str, default: Any = None) -> Any:
        # Mapping.get would take a KeyError raised while building for "no such command".
        return self[name] if name in self._builders else default

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __setitem__(self, name: str, command: _click.Command) -> None:
        self._built[name] = command
        self._builders.setdefault(name, lambda: command)

    def __delitem__(self, name: str) -> None:
        del self._builders[name]
        self._built.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


def _lazy_group(info: TyperInfo, options: dict[str, Any]) -> TyperGroup:
    """What ``typer.main.get_group_from_info`` builds, with subcommands built on first use."""
    from typer.main import (
        get_command_from_info,
        get_command_name,
        get_group_from_info,
        solve_typer_info_defaults,
    )

    real = info.typer_instance
    if real is None:
        raise TypeError("a typer.Typer instance is needed to build a click group")
    shell = copy.copy(real)  # the group itself (options, callback, help) without its children
    shell.registered_commands, shell.registered_groups = [], []
    shell_info = copy.copy(info)
    shell_info.typer_instance = shell
    group = get_group_from_info(shell_info, **options)
    builders: dict[str, Callable[[], _click.Command]] = {}
    for command_info in real.registered_commands:
        if command_info.callback is None:
            raise TypeError("a command must have a callback function")
        name = command_info.name or get_command_name(command_info.callback.__name__)
        builders[name] = functools.partial(
            get_command_from_info,
            command_info,
            pretty_exceptions_short=options["pretty_exceptions_short"],
            rich_markup_mode=options["rich_markup_mode"],
        )
    for group_info in real.registered_groups:
        group_name = solve_typer_info_defaults(group_info).name
        if not group_name:  # typer would merge its commands into this group; runctl names each
            raise TypeError("every sub-app of runctl is added with a name")
        builders[group_name] = functools.partial(_lazy_group, group_info, options)
    group.commands = _LazyCommands(builders)
    return group


def cli_command() -> TyperGroup:
    """The click group ``main`` runs: the same as ``typer.main.get_command(app)``, built lazily.

    Example:
        >>> cli_command().main(["s3", "list", "--help"], prog_name="runctl")  # doctest: +SKIP
    """
    from typer.main import get_install_completion_arguments

    group = _lazy_group(
        TyperInfo(app),
        {
            "pretty_exceptions_short": app.pretty_exceptions_short,
            "rich_markup_mode": app.rich_markup_mode,
            "suggest_commands": app.suggest_commands,
        },
    )
    if app._add_completion:
        group.params.extend(get_install_completion_arguments())
    return group


def _terminate_like_ctrl_c() -> None:
    """Make SIGTERM (``kill``, ``timeout``, a scheduler) stop runctl the way Ctrl-C does.

    Python's default would end the process at once and leave an s5cmd child, in its own
    session, sending on; as ``Terminated`` it kills the children, aborts their unfinished
    multipart uploads and removes temporary files first. A second SIGTERM ends runctl at once.
    """
    if not hasattr(signal, "SIGTERM") or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def terminated(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated

    signal.signal(signal.SIGTERM, terminated)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI and exit with its code: 0 ok, 1 failed, 2 bad usage, 130 interrupted, 143 terminated.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        runctl 0.1.0
    """
    from runctl.config import register_secret

    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        register_secret(os.environ.get(var))
    if argv is None:
        _terminate_like_ctrl_c()
    try:
        result = cli_command().main(
            args=list(sys.argv[1:] if argv is None else argv),
            prog_name="runctl",
            standalone_mode=False,
        )
        code = result if isinstance(result, int) else 0
    except _click.exceptions.NoArgsIsHelpError as exc:
        if exc.ctx is not None:
            sys.stdout.write(exc.ctx.get_help() + "\n")
        code = EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`runctl s3 list ... | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_FAILED
    except (Exception, KeyboardInterrupt) as exc:
        code = report_error(exc, getattr(exc, "ctx", None))
    if argv is None:
        # The process ends here: spare the interpreter's last full collection, which frees
        # nothing the OS does not (12 ms after a 2,000-file upload, 8 ms after `--help`).
        gc.freeze()
    sys.exit(code)
