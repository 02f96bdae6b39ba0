"""The least a Typer CLI can do to upload a directory and keep runctl's promises: row 3c's floor.

Not runctl: a baseline, timed beside ``runctl s3 upload --recursive`` and the bare ``s5cmd cp``.
It starts as a one-command Typer app does, then does only what those promises need:

- a walk of the directory (``os.scandir``) that sends regular files only: a symlink, a special
  file or a name s5cmd would read as a wildcard makes it refuse (runctl sends such a tree file
  by file instead);
- each file's size and modification time taken before the copy and again after it: a file
  written to while it went up fails the command (runctl sends it again once it is still);
- one ``s5cmd --json cp DIR/ PREFIX/``, its output read as it comes;
- every walked file must be reported copied to its own key, or the command fails;
- one output line per file, with its size.

It skips what a tool for users also does: configuration and credentials, failure messages and
retries by name, files that appeared during the copy, progress, ``--json``.

Example:
    python benchmarks/least_upload.py S5CMD http://127.0.0.1:9000 data/small/ s3://bench/up/x/
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import typer

app = typer.Typer(add_completion=False)

#: What s5cmd reads as a wildcard in a path it is given.
_GLOB = set("*?[]{}")
PART_SIZE_MIB = 50


def _walk(root: str, rel: str = "") -> list[tuple[str, str]]:
    """``(relative path, path)`` of every file under ``root``; exits on anything but plain files."""
    found: list[tuple[str, str]] = []
    with os.scandir(root) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()) or not _GLOB.isdisjoint(entry.name):
            sys.exit(f"{entry.path}: not a plain file or directory")
        if entry.is_dir():
            found.extend(_walk(entry.path, rel + entry.name + "/"))
        else:
            found.append((rel + entry.name, entry.path))
    return found


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@app.command()
def upload(s5cmd: str, endpoint: str, source: str, dest: str) -> None:
    """Upload every file under SOURCE (a directory) to DEST (``s3://bucket/prefix/``)."""
    root = os.path.abspath(source)
    files = _walk(root)
    before = [_stamp(path) for _, path in files]
    copy = subprocess.Popen(
        [
            s5cmd, "--json", "--endpoint-url", endpoint,
            "cp", "--part-size", str(PART_SIZE_MIB), root + os.sep, dest,
        ],
        stdout=subprocess.PIPE,
    )
    copied: set[str] = set()
    assert copy.stdout is not None
    for line in copy.stdout:
        record = json.loads(line)
        if record.get("success"):
            copied.add(record["destination"])
    if copy.wait():
        raise typer.Exit(1)
    lines = []
    for (rel, path), stamp in zip(files, before, strict=True):
        url = dest + rel
        if url not in copied:
            sys.exit(f"{path} was not copied to {url}")
        if _stamp(path) != stamp:
            sys.exit(f"{path} changed while it went up")
        lines.append(f"upload: {path} -> {url} ({stamp[0]} B)\n")
    sys.stdout.write("".join(lines))


if __name__ == "__main__":
    app()
