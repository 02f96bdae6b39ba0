"""Soak: 50 checkpoints through the uploader while another process runs both cleanups in a loop."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runctl.checkpoints import MARKER_NAME, Manifest, group_s3
from runctl.s3url import S3URL
from runctl.transfer import get_transfer
from runctl.uploader import CheckpointUploader
from tests.servers import S3Server
from tests.uploader.conftest import FAST_RETRY

KEEP_S3 = 3
KEEP_LOCAL = 2
COUNT = 50


def _cleanup_loop(
    server: S3Server, prefix: S3URL, root: Path, stop: threading.Event, runs: list[int]
) -> None:
    env = {**os.environ, **server.env()}
    commands = [
        [
            sys.executable,
            "-m",
            "runctl",
            "s3",
            "cleanup",
            str(prefix),
            "--keep-last-n",
            str(KEEP_S3),
            "--quiet",
        ],
        [
            sys.executable,
            "-m",
            "runctl",
            "checkpoint",
            "cleanup",
            str(root),
            "--keep-last-n",
            str(KEEP_LOCAL),
            "--quiet",
        ],
    ]
    while not stop.is_set():
        for cmd in commands:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            runs.append(done.returncode)
            assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_fifty_checkpoints_with_concurrent_cli_cleanups(
    moto_server: S3Server, tmp_path: Path, backend: str
) -> None:
    bucket = S3URL(moto_server.new_bucket("soak"))
    prefix = bucket.join("run/")
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "train.log").write_text("not a checkpoint\n")
    transfer = get_transfer(moto_server.config(), use_s5cmd=backend == "s5cmd")
    submitted: dict[str, dict[str, bytes]] = {}
    stop = threading.Event()
    runs: list[int] = []
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            _cleanup_loop(moto_server, prefix, root, stop, runs)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    cleaner = threading.Thread(target=loop, daemon=True)
    cleaner.start()
    try:
        with CheckpointUploader(
            root,
            prefix,
            keep_last_n=KEEP_S3,
            local_keep_last_n=KEEP_LOCAL,
            transfer=transfer,
            retry=FAST_RETRY,
        ) as up:
            for step in range(1, COUNT + 1):
                if step % 5 == 0:  # every fifth is a directory checkpoint (HF style)
                    ckpt = root / f"checkpoint-{step}"
                    ckpt.mkdir()
                    files = {
                        "model.bin": os.urandom(20_000 + step),
                        "state.json": f'{{"step": {step}}}'.encode(),
                    }
                    for rel, data in files.items():
                        (ckpt / rel).write_bytes(data)
                    submitted[ckpt.name] = files
                else:
                    path = root / f"step_{step}.pt"
                    data = os.urandom(30_000 + step)
                    path.write_bytes(data)
                    submitted[path.name] = {"": data}
                    ckpt = path
                up.submit(ckpt)
            up.flush(timeout=300)
    finally:
        stop.set()
        cleaner.join(timeout=180)
    assert not errors, errors
    assert len(runs) >= 2, "the cleanup loop ran alongside the uploads"

    listing = group_s3(
        transfer.iter_objects(prefix),
        prefix,
        read_marker=lambda key: transfer.get_bytes(S3URL(bucket.bucket, key)),
    )
    names = sorted((c.step or 0, c.name) for c in listing.checkpoints)
    newest = [
        f"step_{s}.pt" if s % 5 else f"checkpoint-{s}"
        for s in range(COUNT - KEEP_S3 + 1, COUNT + 1)
    ]
    assert [n for _, n in names] == newest
    assert all(c.complete for c in listing.checkpoints)
    for name in newest:  # every byte in S3 is what was submitted
        for rel, data in submitted[name].items():
            key = prefix.join(name, rel) if rel else prefix.join(name)
            assert transfer.get_bytes(key) == data, key
        if name.startswith("checkpoint-"):
            manifest = Manifest.from_bytes(transfer.get_bytes(prefix.join(name, MARKER_NAME)))
            assert set(manifest.files) == set(submitted[name])
    local = sorted(p.name for p in root.iterdir() if p.name not in {".runctl", "train.log"})
    assert sorted(local) == sorted(newest[-KEEP_LOCAL:])
    assert (root / "train.log").exists()
    assert [o.key for o in listing.others] == []
    transfer.close()
