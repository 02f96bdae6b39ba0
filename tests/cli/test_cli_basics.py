"""The CLI's shape: version, help with examples, lazy imports, global options, value parsers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from runctl import __version__
from runctl.cli.app import OPTIONAL_COMMANDS, app
from runctl.cli.options import parse_duration, parse_size
from runctl.cli.output import human_size
from runctl.exceptions import UsageError
from runctl.s3url import S3URL
from tests.cli.cli_support import ROOT, of_type, put, run, run_process, run_s3
from tests.servers import S3Server, free_port

COMMANDS = [
    ["s3", "upload"],
    ["s3", "download"],
    ["s3", "sync"],
    ["s3", "list"],
    ["s3", "cleanup"],
    ["checkpoint", "cleanup"],
]
HEAVY = (
    "boto3",
    "botocore",
    "s3transfer",
    "torch",
    "lightning",
    "pytorch_lightning",
    "transformers",
)


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"runctl {__version__}"
    proc = run_process("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"runctl {__version__}"


def _command_paths() -> list[list[str]]:
    """Every command and group under ``runctl``, as argv paths ([] is runctl itself)."""
    import typer.main

    paths: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:  # typer's own (vendored) click types
        paths.append(path)
        if hasattr(command, "list_commands"):
            ctx = command.context_class(command, info_name=path[-1] if path else "runctl")
            for name in command.list_commands(ctx):  # runctl's group loads commands lazily
                sub = command.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_every_command_and_group_help_has_examples_of_real_commands() -> None:
    paths = _command_paths()
    assert ["s3", "lifecycle", "set"] in paths and ["local"] in paths and [] in paths
    known = {" ".join(p) for p in paths}
    for path in paths:
        result = run(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "Examples:" in result.stdout, path
        # Each value is named as the docs name it (N, DIR, S3URL), not by its type.
        assert not re.search(r"<(int|float|str|path|text)\b[^>]*>|\b(INTEGER|TEXT|FLOAT)\b", result.stdout), path
        examples = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("runctl ")]
        assert examples, path
        for words in examples:
            # the longest run of words that names a command: it must be this one or below it
            named = max(
                (" ".join(words[1:i]) for i in range(1, len(words) + 1) if " ".join(words[1:i]) in known),
                key=len,
            ).split()
            assert named[: len(path)] == path and (named != [] or path == []), (path, words)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_examples(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.stdout
    example_lines = [
        line.strip() for line in result.stdout.splitlines() if line.strip().startswith("runctl ")
    ]
    assert example_lines and all(
        line.startswith("runctl " + " ".join(command)) for line in example_lines
    )


@pytest.mark.parametrize(
    "args", [["--help"], ["s3", "list", "--help"], ["s3", "upload", "--help"]], ids=" ".join
)
def test_help_imports_no_boto3_and_no_framework(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from runctl.cli.app import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("HEAVY="), proc.stderr


def test_no_arguments_shows_help_and_completion_is_available() -> None:
    proc = run_process()
    assert proc.returncode == 2
    assert "Usage: runctl" in proc.stdout and "s3" in proc.stdout and "checkpoint" in proc.stdout
    assert "--install-completion" in run("--help").stdout


def test_optional_command_modules_are_registered() -> None:
    import importlib.util

    from typer.main import get_command

    group = get_command(app)
    s3 = group.commands["s3"]  # type: ignore[attr-defined]
    expected = {
        "monitor": ["watch", "review"],
        "demo": ["demo"],
        "lifecycle": ["lifecycle"],
        "local": ["local"],
    }
    for module, target in OPTIONAL_COMMANDS:
        if importlib.util.find_spec(module) is None:
            continue
        names = expected[module.rsplit(".", 1)[1]]
        commands = s3.commands if target == "s3" else group.commands  # type: ignore[attr-defined]
        assert all(name in commands for name in names), (module, sorted(commands))


def test_options_work_before_and_after_the_command(moto_server: S3Server) -> None:
    bucket = S3URL(moto_server.new_bucket())
    put(moto_server, bucket, "a.pt")
    dead = f"http://127.0.0.1:{free_port()}"
    # root --json, endpoint after the command; the command's endpoint wins over the root's
    result = run(
        "--json",
        "--endpoint-url",
        dead,
        "s3",
        "list",
        str(bucket),
        "--endpoint-url",
        moto_server.endpoint_url,
        "--no-use-s5cmd",
    )
    assert result.exit_code == 0, result.output
    assert [o["key"] for o in of_type(result.stdout, "object")] == ["a.pt"]
    # region and profile are accepted in both places
    result = run_s3(
        moto_server,
        "--region",
        "us-east-1",
        "s3",
        "list",
        str(bucket),
        "--region",
        "us-east-1",
        "--json",
    )
    assert result.exit_code == 0, result.output
    # the endpoint from the environment, as aws-cli users set it
    result = run(
        "s3", "list", str(bucket), "--json", env={"AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    )
    assert [o["key"] for o in of_type(result.stdout, "object")] == ["a.pt"]


def test_quiet_prints_only_errors(moto_server: S3Server, tmp_path: object) -> None:
    from pathlib import Path

    bucket = S3URL(moto_server.new_bucket())
    src = Path(str(tmp_path)) / "a.pt"
    src.write_bytes(b"a")
    result = run_s3(moto_server, "s3", "upload", str(src), str(bucket), "--quiet")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    as_json = run_s3(moto_server, "-q", "s3", "upload", str(src), str(bucket), "--json")
    assert [json.loads(line)["type"] for line in as_json.stdout.splitlines()] == [
        "upload",
        "summary",
    ]


def test_size_and_duration_parsers() -> None:
    assert parse_size("10GB") == 10 * 1000**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("1.5k") == 1536
    assert parse_size("2048") == parse_size("2048b") == 2048
    for bad in ("", "GB", "10 XB", "-1GB", "ten"):
        with pytest.raises(UsageError, match="--max-total-size"):
            parse_size(bad)
    assert parse_duration("2h") == 7200
    assert parse_duration("3d") == 3 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90
    for bad in ("", "h", "2 fortnights", "-1h", "1y"):
        with pytest.raises(UsageError, match="--incomplete-older-than"):
            parse_duration(bad)
    assert (
        human_size(0) == "0 B"
        and human_size(1536) == "1.5 KiB"
        and human_size(5 * 1024**4) == "5.0 TiB"
    )


def test_every_command_takes_the_connection_and_output_options() -> None:
    # The README says every command takes them; `runctl demo` lacked --profile and --region.
    from typer.main import get_command

    def leaves(command: object, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
        sub = getattr(command, "commands", None)
        if not sub:
            return [(path, command)]
        return [leaf for name, c in sub.items() for leaf in leaves(c, (*path, name))]

    missing = {}
    for path, command in leaves(get_command(app)):
        options = {o for p in command.params for o in p.opts}  # type: ignore[attr-defined]
        lacks = {"--endpoint-url", "--profile", "--region", "--json", "--quiet"} - options
        if lacks:
            missing[" ".join(path)] = sorted(lacks)
    assert missing == {}
