"""The least a Typer CLI can do to download a prefix and keep runctl's promises: rows 3e/3f's floor.

Not runctl: a baseline, timed beside ``runctl s3 download --recursive`` and the bare ``s5cmd cp``.
It starts as a one-command Typer app does, then does only what those promises need:

- ``s5cmd ls`` of the prefix beside one wildcard ``s5cmd cp`` into a temporary directory inside
  the destination (the listing gives each object's time; the copy does not), both outputs read
  as they come;
- containment checked on strings: no key with ``..`` is copied (``--exclude '*..*'``), none with
  an empty, ``.`` or absolute component, a NUL or a backslash is accepted, and each directory
  must resolve inside the destination;
- every listed object must be reported copied to its own path, or the command fails;
- each file gets its object's time and is renamed out of the temporary directory;
- one output line per file, with the size the listing gave (runctl reads it back with ``stat``).

It skips what a tool for users also does: configuration and credentials, failure messages and
retries by name, objects written over one another, progress, ``--json``.

Example:
    python benchmarks/least_download.py S5CMD http://127.0.0.1:9000 s3://bench/src/small/ out/
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from datetime import datetime
from typing import Any

import typer

app = typer.Typer(add_completion=False)


def _unsafe(rel: str) -> bool:
    parts = rel.split("/")
    return "\x00" in rel or "\\" in rel or any(p in ("", ".", "..") for p in parts)


@app.command()
def download(s5cmd: str, endpoint: str, source: str, dest: str) -> None:
    """Download every object below SOURCE (``s3://bucket/prefix/``) into DEST."""
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    root = os.path.realpath(dest)
    os.makedirs(root, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".least-", dir=root) + os.sep
    try:
        head = [s5cmd, "--json", "--endpoint-url", endpoint]
        copy = subprocess.Popen(
            [*head, "cp", "--exclude", "*..*", source + "*", stage], stdout=subprocess.PIPE
        )
        listing = subprocess.Popen([*head, "ls", source + "*"], stdout=subprocess.PIPE)
        copied: dict[str, str] = {}

        def read_copy() -> None:
            assert copy.stdout is not None
            for line in copy.stdout:
                record: dict[str, Any] = json.loads(line)
                if record.get("success"):
                    copied[record["source"]] = record["destination"]

        reader = threading.Thread(target=read_copy)
        reader.start()
        wanted: list[tuple[str, str, int, float]] = []
        base = f"s3://{bucket}/{prefix}"
        assert listing.stdout is not None
        for line in listing.stdout:
            record = json.loads(line)
            url, rel = record["key"], record["key"][len(base) :]
            if rel.endswith("/") or not url.startswith(base) or _unsafe(rel):
                continue
            when = datetime.fromisoformat(record["last_modified"].replace("Z", "+00:00"))
            wanted.append((url, rel, int(record["size"]), when.timestamp()))
        reader.join()
        if listing.wait() or copy.wait():
            raise typer.Exit(1)
        inside: dict[str, bool] = {}
        lines = []
        for url, rel, size, when in wanted:
            staged = copied.get(url)
            if staged != stage + rel:
                sys.exit(f"{url} was not copied to its own path")
            final = os.path.join(root, rel)
            parent = os.path.dirname(final)
            if parent not in inside:
                os.makedirs(parent, exist_ok=True)
                real = os.path.realpath(parent)
                inside[parent] = real == root or real.startswith(root + os.sep)
            if not inside[parent]:
                sys.exit(f"{url}: its directory resolves outside {root}")
            os.utime(staged, (when, when))
            os.replace(staged, final)
            lines.append(f"download: {url} -> {final} ({size} B)\n")
        sys.stdout.write("".join(lines))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


if __name__ == "__main__":
    app()
