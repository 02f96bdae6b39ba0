"""Helpers for the CLI tests: run the app in-process or as a real subprocess, parse --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer.testing
from typer.testing import CliRunner, Result

from runctl.cli.app import app, cli_command
from runctl.s3url import S3URL
from tests.servers import S3Server

ROOT = Path(__file__).resolve().parents[2]

# In-process tests run the command tree `runctl` runs: main() builds it lazily (cli_command),
# while typer's CliRunner would build typer's eager one. test_startup checks the two agree.
_typer_get_command = typer.testing._get_command
typer.testing._get_command = lambda given: (  # type: ignore[assignment]
    cli_command() if given is app else _typer_get_command(given)
)


def run(*args: str, env: Mapping[str, str] | None = None) -> Result:
    """The CLI in-process (Typer's CliRunner); stdout and stderr are kept apart."""
    return CliRunner().invoke(app, list(args), env=dict(env or {}))


def run_s3(server: S3Server, *args: str, env: Mapping[str, str] | None = None) -> Result:
    """``runctl --endpoint-url <server> <args>`` in-process."""
    return run("--endpoint-url", server.endpoint_url, *args, env=env)


def run_process(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m runctl <args>`` as a real child process (credentials come from the test env)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "runctl", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


def records(stdout: str) -> list[dict[str, Any]]:
    """Every line of --json output, parsed (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def of_type(stdout: str, type_: str) -> list[dict[str, Any]]:
    return [r for r in records(stdout) if r["type"] == type_]


def keys(server: S3Server, bucket: S3URL) -> dict[str, bytes]:
    """Every key in the bucket with its content (small test objects only)."""
    client = server.client()
    found: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = client.get_object(Bucket=bucket.bucket, Key=obj["Key"])[
                "Body"
            ].read()
    return found


def backend_flag(backend: str) -> str:
    """The CLI flag that picks a transfer backend ("s5cmd" or "boto3")."""
    return "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"


def put(server: S3Server, bucket: S3URL, key: str, data: bytes = b"x") -> None:
    server.client().put_object(Bucket=bucket.bucket, Key=key, Body=data)


def put_marker(server: S3Server, prefix: S3URL, name: str, files: dict[str, int]) -> None:
    """A marker for directory checkpoint ``prefix/name/`` naming ``files`` (relative name -> size)."""
    from runctl.checkpoints import MARKER_NAME, FileEntry, Manifest

    manifest = Manifest(name, None, {rel: FileEntry(size) for rel, size in files.items()}, "test", 0.0)
    put(server, prefix, f"{prefix.key}{name}/{MARKER_NAME}", manifest.to_bytes())


def assert_one_line_error(stderr: str, *, contains: str = "") -> str:
    """stderr ends with exactly one ``runctl: error: ...`` line (warnings may precede it), no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("runctl: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert all(line.startswith("runctl: warning: ") for line in lines[:-1]), stderr
    assert "Traceback" not in stderr
    assert contains in errors[0], (contains, errors[0])
    return errors[0]
