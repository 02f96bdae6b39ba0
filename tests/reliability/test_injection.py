"""Names with shell metacharacters, quotes, newlines, globs and unicode travel literally; no shell ever runs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from runctl.checkpoints import MARKER_NAME
from runctl.s3url import S3URL
from runctl.uploader import CheckpointUploader, latest_checkpoint
from tests.cli.cli_support import records, run
from tests.reliability.conftest import QUICK_RETRY, get_object
from tests.servers import S3Server, names_it_keeps


def hostile_names(canary: str) -> list[str]:
    return [
        "with space.pt",
        "quote'single.pt",
        'quote"double.pt',
        f"$(touch {canary}).pt",
        f"`touch {canary}`.pt",
        f"semi;touch {canary};.pt",
        f"pipe|touch {canary}&.pt",
        "new\nline.pt",
        "glob*star?.pt",
        "[brackets].pt",
        "ünïcødé-日本語.pt",
        "-leading-dash.pt",
        "tab\there.pt",
        "percent%20and+plus.pt",
    ]


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_names_are_transferred_literally(
    s3_server: S3Server,
    bucket: S3URL,
    backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    canary = f"pwned-{uuid.uuid4().hex[:8]}"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a `touch` run by a shell would land here
    names = names_it_keeps(s3_server, hostile_names(canary))  # moto keeps the tab
    if s3_server.kind == "moto":
        # moto's server cannot store a key with a newline (it answers 404); rclone covers that name.
        names = [n for n in names if "\n" not in n]
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(names):
        (src / name).write_bytes(f"content {i}".encode())
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    endpoint = ["--endpoint-url", s3_server.endpoint_url]
    url = bucket.join("inj/")

    up = run(*endpoint, "s3", "upload", str(src), str(url), "--recursive", flag)
    assert up.exit_code == 0, up.stderr
    listed = run(*endpoint, "s3", "list", str(url), "--recursive", "--json", flag)
    assert listed.exit_code == 0, listed.stderr
    keys = {r["key"] for r in records(listed.stdout) if r["type"] == "object"}
    assert keys == {f"inj/{n}" for n in names}
    for i, name in enumerate(names):
        assert get_object(s3_server, bucket, f"inj/{name}") == f"content {i}".encode()

    dest = tmp_path / "dest"
    down = run(*endpoint, "s3", "download", str(url), str(dest), "--recursive", flag)
    assert down.exit_code == 0, down.stderr
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {
        n: f"content {i}".encode() for i, n in enumerate(names)
    }

    # The uploader: a directory checkpoint full of hostile names, and back with latest_checkpoint.
    root = tmp_path / "ckpt"
    (root / "checkpoint-3").mkdir(parents=True)
    for i, name in enumerate(names):
        (root / "checkpoint-3" / name).write_bytes(f"shard {i}".encode())
    with CheckpointUploader(
        root,
        bucket.join("run/"),
        config=s3_server.config(),
        use_s5cmd=backend == "s5cmd",
        retry=QUICK_RETRY,
    ) as uploader:
        uploader.submit(root / "checkpoint-3")
    assert get_object(s3_server, bucket, f"run/checkpoint-3/{MARKER_NAME}")
    got = latest_checkpoint(
        bucket.join("run/"),
        tmp_path / "restore",
        config=s3_server.config(),
        use_s5cmd=backend == "s5cmd",
    )
    assert got is not None
    assert {p.name: p.read_bytes() for p in got.iterdir()} == {
        n: f"shard {i}".encode() for i, n in enumerate(names)
    }

    for place in (cwd, tmp_path, src, Path("/tmp"), Path.home(), Path(__file__).parents[2]):
        assert not (place / canary).exists(), f"a shell ran: {place / canary}"
