"""Bad input, table-driven, across the CLI and the API: one clear line, the documented exit code, no change."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runctl.checkpoints import MARKER_NAME, build_manifest
from runctl.exceptions import EXIT_FAILED, EXIT_USAGE, RunctlError
from tests.cli.cli_support import assert_one_line_error, run
from tests.reliability.conftest import put_object, s3_snapshot, tree_snapshot
from tests.servers import S3Server, free_port

USAGE, FAILED = EXIT_USAGE, EXIT_FAILED


@pytest.fixture(scope="module")
def world(rclone_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bucket with checkpoints (one with a corrupted marker) and a local dir with a journal."""
    bucket = rclone_server.new_bucket("bad")
    for i in (1, 2):
        put_object(rclone_server, bucket, f"run/step_{i}.pt", os.urandom(1000))
    local = tmp_path_factory.mktemp("world")
    shard = local / "src" / "checkpoint-3"
    shard.mkdir(parents=True)
    (shard / "a.bin").write_bytes(b"a" * 100)
    put_object(rclone_server, bucket, "run/checkpoint-3/a.bin", b"a" * 100)
    manifest = build_manifest(shard, "checkpoint-3", 3)
    put_object(rclone_server, bucket, f"run/checkpoint-3/{MARKER_NAME}", manifest.to_bytes())
    # Only a marker that is garbage: the checkpoint must read as incomplete.
    put_object(rclone_server, bucket, "bad/checkpoint-9/a.bin", b"a" * 100)
    put_object(rclone_server, bucket, f"bad/checkpoint-9/{MARKER_NAME}", b"{not json")
    ckpt = local / "ckpt"
    ckpt.mkdir()
    for i in (1, 2, 3):
        (ckpt / f"step_{i}.pt").write_bytes(b"c" * (10 + i))
    (ckpt / ".runctl").mkdir()
    (ckpt / ".runctl" / "journal.jsonl").write_bytes(b'\x00\xff garbage\n{"name": 5}\n{torn')
    (local / "afile.txt").write_text("hello")
    (local / "adir").mkdir()
    (local / "adir" / "x.pt").write_bytes(b"x")
    os.mkfifo(local / "fifo")
    (local / "dangling").symlink_to(local / "nowhere")
    noexec = local / "s5cmd-noexec"
    noexec.write_text("#!/bin/sh\nexit 0\n")
    noexec.chmod(0o644)
    broken = local / "s5cmd-broken"
    broken.write_text("#!/bin/sh\necho 'boom' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    return {
        "server": rclone_server,
        "bucket": bucket,
        "local": local,
        "vars": {
            "url": f"s3://{bucket}/run/",
            "bad": f"s3://{bucket}/bad/",
            "root": f"s3://{bucket}",
            "nobucket": "s3://no-such-bucket-runctl/run/",
            "tmp": str(local),
            "file": str(local / "afile.txt"),
            "dir": str(local / "adir"),
            "ckpt": str(ckpt),
            "closed": f"http://127.0.0.1:{free_port()}",
            "noexec": str(noexec),
            "broken": str(broken),
        },
    }


# (id, argv, expected exit code, extra environment). {name} is filled from world["vars"].
ROWS: list[tuple[str, list[str], int, dict[str, str]]] = [
    ("url-http-scheme", ["s3", "list", "http://bucket/x"], USAGE, {}),
    ("url-empty-bucket", ["s3", "review", "s3://"], USAGE, {}),  # (s3 list s3:// lists buckets)
    ("url-uppercase-bucket", ["s3", "list", "s3://UPPER/x"], USAGE, {}),
    ("url-short-bucket", ["s3", "list", "s3://ab/x"], USAGE, {}),
    ("url-one-slash", ["s3", "list", "s3:/bucket/x"], USAGE, {}),
    ("url-double-dot-bucket", ["s3", "download", "s3://b..c/x", "{tmp}/o"], USAGE, {}),
    ("url-ip-bucket", ["s3", "upload", "{file}", "s3://10.0.0.1/x"], USAGE, {}),
    ("url-not-a-url-cleanup", ["s3", "cleanup", "not-a-url", "--keep-last-n", "1"], USAGE, {}),
    ("unknown-bucket-list", ["s3", "list", "{nobucket}"], USAGE, {}),
    ("unknown-bucket-list-boto3", ["s3", "list", "{nobucket}", "--no-use-s5cmd"], USAGE, {}),
    ("unknown-bucket-upload", ["s3", "upload", "{file}", "{nobucket}"], USAGE, {}),
    ("unknown-bucket-download", ["s3", "download", "{nobucket}x.pt", "{tmp}/new/"], USAGE, {}),
    ("missing-key-download", ["s3", "download", "{url}missing.pt", "{tmp}/new/"], USAGE, {}),
    ("wrong-secret-list", ["s3", "list", "{url}"], FAILED, {"AWS_SECRET_ACCESS_KEY": "nope-nope"}),
    (
        "wrong-secret-cleanup-boto3",
        ["s3", "cleanup", "{url}", "-n", "1", "--no-use-s5cmd"],
        FAILED,
        {"AWS_SECRET_ACCESS_KEY": "nope-nope"},
    ),
    ("unreachable-endpoint", ["--endpoint-url", "{closed}", "s3", "list", "{url}"], FAILED, {}),
    (
        "unreachable-endpoint-boto3",
        ["--endpoint-url", "{closed}", "s3", "list", "{url}", "--no-use-s5cmd"],
        FAILED,
        {},
    ),
    ("endpoint-bad-scheme", ["--endpoint-url", "ftp://x", "s3", "list", "{url}"], USAGE, {}),
    ("endpoint-bad-ipv6", ["--endpoint-url", "http://[::1", "s3", "list", "{url}"], USAGE, {}),
    ("endpoint-bad-port", ["--endpoint-url", "http://127.0.0.1:x", "s3", "list", "{url}"], USAGE, {}),
    (
        "endpoint-with-password",
        ["--endpoint-url", "http://u:pw@127.0.0.1:9", "s3", "upload", "{ckpt}", "{url}", "-r"],
        USAGE,
        {},
    ),
    ("keep-last-n-zero", ["s3", "cleanup", "{url}", "--keep-last-n", "0"], USAGE, {}),
    ("keep-last-n-negative", ["s3", "cleanup", "{url}", "--keep-last-n", "-1"], USAGE, {}),
    ("keep-last-n-text", ["s3", "cleanup", "{url}", "--keep-last-n", "abc"], USAGE, {}),
    ("local-keep-zero", ["checkpoint", "cleanup", "{ckpt}", "--keep-last-n", "0"], USAGE, {}),
    ("local-keep-negative", ["checkpoint", "cleanup", "{ckpt}", "-n", "-1"], USAGE, {}),
    ("cleanup-no-rule", ["s3", "cleanup", "{url}"], USAGE, {}),
    ("cleanup-bucket-root", ["s3", "cleanup", "{root}", "-n", "1"], USAGE, {}),
    (
        "cleanup-bad-size",
        ["s3", "cleanup", "{url}", "-n", "1", "--max-total-size", "10XB"],
        USAGE,
        {},
    ),
    (
        "cleanup-bad-duration",
        ["s3", "cleanup", "{url}", "-n", "1", "--incomplete-older-than", "soon"],
        USAGE,
        {},
    ),
    ("upload-missing-local", ["s3", "upload", "{tmp}/nope.pt", "{url}"], USAGE, {}),
    ("upload-dangling-symlink", ["s3", "upload", "{tmp}/dangling", "{url}"], USAGE, {}),
    ("upload-fifo", ["s3", "upload", "{tmp}/fifo", "{url}"], USAGE, {}),
    ("upload-dir-without-recursive", ["s3", "upload", "{dir}", "{url}"], USAGE, {}),
    ("upload-file-with-a-slash", ["s3", "upload", "{file}/", "{url}"], USAGE, {}),
    ("upload-include-on-file", ["s3", "upload", "{file}", "{url}", "--include", "*.pt"], USAGE, {}),
    (
        "upload-bad-storage-class",
        ["s3", "upload", "{file}", "{url}", "--storage-class", "GOLD"],
        USAGE,
        {},
    ),
    (
        "download-recursive-into-file",
        ["s3", "download", "{url}", "{file}", "--recursive"],
        USAGE,
        {},
    ),
    ("download-prefix-without-recursive", ["s3", "download", "{url}", "{tmp}/new"], USAGE, {}),
    # "[Errno 17] File exists: '.../afile.txt'", exit 1: the file is where a directory must be.
    ("download-below-a-file", ["s3", "download", "{url}step_1.pt", "{file}/x/y"], USAGE, {}),
    (
        "download-unmarked-without-latest",
        ["s3", "download", "{url}step_1.pt", "{tmp}/new/", "--treat-unmarked-complete"],
        USAGE,
        {},
    ),
    ("sync-file-as-dir", ["s3", "sync", "{file}", "{url}", "--direction", "up"], USAGE, {}),
    ("sync-missing-dir-up", ["s3", "sync", "{tmp}/nope", "{url}", "--direction", "up"], USAGE, {}),
    ("sync-no-direction", ["s3", "sync", "{dir}", "{url}"], USAGE, {}),
    ("sync-bad-direction", ["s3", "sync", "{dir}", "{url}", "--direction", "sideways"], USAGE, {}),
    (
        "checkpoint-cleanup-missing-dir",
        ["checkpoint", "cleanup", "{tmp}/nope", "-n", "1"],
        USAGE,
        {},
    ),
    ("checkpoint-cleanup-on-file", ["checkpoint", "cleanup", "{file}", "-n", "1"], USAGE, {}),
    ("unknown-flag", ["s3", "list", "{url}", "--frobnicate"], USAGE, {}),
    ("s5cmd-missing", ["s3", "list", "{url}"], USAGE, {"RUNCTL_S5CMD": "/nonexistent/s5cmd"}),
    ("s5cmd-not-executable", ["s3", "list", "{url}"], USAGE, {"RUNCTL_S5CMD": "{noexec}"}),
    ("s5cmd-exits-1-list", ["s3", "list", "{url}"], FAILED, {"RUNCTL_S5CMD": "{broken}"}),
    (
        "s5cmd-exits-1-upload",
        ["s3", "upload", "{file}", "{url}"],
        FAILED,
        {"RUNCTL_S5CMD": "{broken}"},
    ),
    ("corrupted-marker-latest", ["s3", "download", "{bad}", "{tmp}/new", "--latest"], FAILED, {}),
]


def _fill(text: str, values: dict[str, str]) -> str:
    return text.format(**values)


@pytest.mark.parametrize(("argv", "code", "env"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_cli_bad_input(
    world: dict[str, Any], argv: list[str], code: int, env: dict[str, str]
) -> None:
    server: S3Server = world["server"]
    values = world["vars"]
    args = [_fill(a, values) for a in argv]
    if not args[0].startswith("--endpoint-url"):
        args = ["--endpoint-url", server.endpoint_url, *args]
    before_s3 = s3_snapshot(server, world["bucket"])
    before_disk = tree_snapshot(world["local"])
    started = time.monotonic()
    result = run(*args, env={k: _fill(v, values) for k, v in env.items()})
    assert time.monotonic() - started < 45, "a bad input must fail in bounded time"
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert_one_line_error(result.stderr)
    assert "Traceback" not in result.stdout
    assert s3_snapshot(server, world["bucket"]) == before_s3
    assert tree_snapshot(world["local"]) == before_disk


def test_corrupted_journal_keeps_every_checkpoint(world: dict[str, Any]) -> None:
    """A journal that cannot prove durability protects everything: nothing is deleted, no traceback."""
    ckpt = world["vars"]["ckpt"]
    before = _without_locks(tree_snapshot(world["local"]))
    result = run("checkpoint", "cleanup", ckpt, "--keep-last-n", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert lines, "the plan is reported"
    assert _without_locks(tree_snapshot(world["local"])) == before


def _without_locks(snapshot: dict[str, str]) -> dict[str, str]:
    # The lock file is a sidecar that stays (by design); it is not a change to the user's data.
    return {k: v for k, v in snapshot.items() if not k.endswith(".lock")}


def _api_rows(world: dict[str, Any]) -> list[tuple[str, Callable[[], object]]]:
    from runctl.config import resolve_config
    from runctl.retention import apply_local_retention, plan_retention
    from runctl.transfer.s5cmd import S5cmdTransfer
    from runctl.uploader import CheckpointUploader, latest_checkpoint

    local: Path = world["local"]
    ckpt = Path(world["vars"]["ckpt"])
    url = world["vars"]["url"]
    server: S3Server = world["server"]

    def uploader(**kwargs: Any) -> Callable[[], object]:
        return lambda: CheckpointUploader(ckpt, url, config=server.config(), **kwargs)

    def on_an_uploader(act: Callable[[CheckpointUploader], object]) -> Callable[[], object]:
        def go() -> None:
            up = CheckpointUploader(ckpt, url, config=server.config(), resume=False)
            try:
                act(up)
            finally:
                up.close(timeout=10)

        return go

    def submit(path: Path) -> Callable[[], object]:
        return on_an_uploader(lambda up: up.submit(path))

    def protect(name: str) -> Callable[[], object]:
        return on_an_uploader(lambda up: up.protect(name))

    return [
        ("uploader-bad-url", lambda: CheckpointUploader(ckpt, "s3:/x", config=server.config())),
        ("uploader-root-is-file", lambda: CheckpointUploader(local / "afile.txt", url)),
        ("uploader-keep-zero", uploader(keep_last_n=0)),
        (
            # retention there deleted another team's checkpoints (API pass)
            "uploader-bucket-root-retention",
            lambda: CheckpointUploader(ckpt, f"s3://{world['bucket']}/", config=server.config(), keep_last_n=2),
        ),
        ("uploader-local-keep-negative", uploader(local_keep_last_n=-1)),
        ("uploader-bad-policy", uploader(failure_policy="explode")),
        ("uploader-bad-stall", uploader(stall_timeout=-1)),
        (
            "uploader-missing-s5cmd",
            uploader(s5cmd_path="/nonexistent/s5cmd", use_s5cmd=True, transfer=None),
        ),
        ("submit-missing", submit(ckpt / "nope.pt")),
        ("submit-outside-root", submit(local / "afile.txt")),
        ("submit-state-dir", submit(ckpt / ".runctl")),  # a loop over root.iterdir() (API pass)
        ("protect-dot", protect(".")),  # it left a temporary file in .runctl/pinned/ (API pass)
        ("latest-bad-url", lambda: latest_checkpoint("bucket/run", local / "new")),
        ("retention-keep-zero", lambda: plan_retention([], 0)),
        ("local-retention-negative", lambda: apply_local_retention(ckpt, -1)),
        (
            "s5cmd-missing-binary",
            lambda: S5cmdTransfer(resolve_config(), binary="/nonexistent/s5cmd"),
        ),
    ]


API_IDS = [
    "uploader-bad-url",
    "uploader-root-is-file",
    "uploader-keep-zero",
    "uploader-bucket-root-retention",
    "uploader-local-keep-negative",
    "uploader-bad-policy",
    "uploader-bad-stall",
    "uploader-missing-s5cmd",
    "submit-missing",
    "submit-outside-root",
    "submit-state-dir",
    "protect-dot",
    "latest-bad-url",
    "retention-keep-zero",
    "local-retention-negative",
    "s5cmd-missing-binary",
]


@pytest.mark.parametrize("row", API_IDS)
def test_api_bad_input(world: dict[str, Any], row: str) -> None:
    call = dict(_api_rows(world))[row]
    before_s3 = s3_snapshot(world["server"], world["bucket"])
    before_disk = {k: v for k, v in tree_snapshot(world["local"]).items() if ".runctl" not in k}
    with pytest.raises(RunctlError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message and "Traceback" not in message
    assert info.value.exit_code == USAGE, (row, message)
    assert s3_snapshot(world["server"], world["bucket"]) == before_s3
    after_disk = {k: v for k, v in tree_snapshot(world["local"]).items() if ".runctl" not in k}
    assert after_disk == before_disk
