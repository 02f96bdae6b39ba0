"""Start-up stays light: `runctl s3 list --help` must not drag in heavy modules (benchmark row 6)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

PROBE = """
import json, sys
from runctl.cli.app import main
sys.argv = ["runctl", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = ("pydantic", "boto3", "botocore", "torch", "lightning", "transformers")
sys.stderr.write(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def loaded(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60, check=False
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


def test_help_imports_no_heavy_module() -> None:
    assert loaded("--help") == []
    assert loaded("s3", "list", "--help") == []
    assert loaded("s3", "cleanup", "--help") == []


def test_only_the_program_skips_the_final_collection() -> None:
    # As the program (no argv), main() freezes the collector just before exiting; called
    # with arguments (tests, embedding code), it must leave the caller's collector alone.
    import gc

    from runctl.cli.app import main

    before = gc.get_freeze_count()
    try:
        main(["--version"])
    except SystemExit:
        pass
    assert gc.get_freeze_count() == before
    probe = (
        "import atexit, gc, sys\n"
        "from runctl.cli.app import main\n"
        "atexit.register(lambda: sys.stderr.write(str(gc.get_freeze_count() > 0)))\n"
        "sys.argv = ['runctl', '--version']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stderr.strip().endswith("True")


def _paths(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name in getattr(group, "commands", {}):
        yield from _paths(group.commands[name], (*prefix, name))


def _describe(param: Any) -> tuple[Any, ...]:
    fields = ("name", "opts", "secondary_opts", "required", "multiple", "nargs", "hidden")
    extra = ("help", "envvar", "is_flag", "count", "metavar", "is_eager", "expose_value")
    return (
        *(getattr(param, f) for f in fields),
        *(getattr(param, f, None) for f in extra),
        repr(param.default) if not callable(param.default) else "callable",
        type(param.type).__name__,
        getattr(param.type, "name", None),
    )


def _help(root: Any, path: tuple[str, ...]) -> str:
    from typer import _click

    command, ctx = root, _click.Context(root, info_name="runctl", terminal_width=100)
    for name in path:
        command = command.commands[name]
        ctx = _click.Context(command, info_name=name, parent=ctx, terminal_width=100)
    return str(command.get_help(ctx))


def _settings(node: Any) -> dict[str, str]:
    """Every attribute of a command or group but its children, options and callback."""
    skip = {"commands", "params", "callback"}
    return {k: repr(v) for k, v in vars(node).items() if k not in skip}


def _resolve(group: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        group = group.commands[name]
    return group


def test_the_lazy_tree_is_typers_tree() -> None:
    # main() runs cli_command(), which builds each subcommand only when it is used; every
    # command, group and option must come out as typer's own eager build makes them.
    from typer.main import get_command

    from runctl.cli.app import app, cli_command

    eager, lazy = get_command(app), cli_command()
    paths = list(_paths(eager))
    assert len(paths) > 15 and paths == list(_paths(lazy))
    for path in paths:
        a, b = _resolve(eager, path), _resolve(lazy, path)
        assert type(a) is type(b), path
        assert _settings(a) == _settings(b), path
        assert [_describe(p) for p in a.params] == [_describe(p) for p in b.params], path
        help_text = _help(eager, path)
        assert help_text.startswith("Usage: runctl") and help_text == _help(lazy, path), path


def test_a_command_builds_only_what_it_uses() -> None:
    from runctl.cli.app import cli_command

    group = cli_command()
    assert group.commands.built == []  # type: ignore[attr-defined]
    try:
        group.main(["s3", "list", "--help"], prog_name="runctl", standalone_mode=False)
    except SystemExit:
        pass
    assert group.commands.built == ["s3"]  # type: ignore[attr-defined]
    assert group.commands["s3"].commands.built == ["list"]  # type: ignore[attr-defined]


def test_a_mistyped_command_still_gets_a_suggestion() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runctl", "s3", "uplod"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "No such command 'uplod'. Did you mean 'upload'?" in done.stderr


def test_an_error_while_building_a_command_is_not_no_such_command() -> None:
    # Mapping.get turns any KeyError into "missing": one raised while building must surface.
    from typer.core import TyperGroup

    from runctl.cli.app import _LazyCommands

    def broken() -> Any:
        return {}["missing"]

    group = TyperGroup(name="g")
    group.commands = _LazyCommands({"x": broken})
    assert "x" in group.commands and "y" not in group.commands
    assert group.commands.get("y") is None
    try:
        group.main(["x"], prog_name="g", standalone_mode=False)
    except KeyError as exc:
        assert exc.args == ("missing",)
    else:
        raise AssertionError("the builder's KeyError was swallowed")
