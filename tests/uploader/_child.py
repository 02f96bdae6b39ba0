"""A training process for the crash tests: submits checkpoints, then hangs mid-upload or just exits."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from runctl.config import resolve_config
from runctl.transfer import get_transfer
from runctl.uploader import CheckpointUploader
from tests.uploader.conftest import Wrapped


def main() -> None:
    root, url, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    inner = get_transfer(resolve_config(), use_s5cmd=mode.endswith("s5cmd"))
    transfer = Wrapped(inner)
    if mode.startswith("hang"):

        def half_then_hang(count: int, pairs: list) -> None:
            inner.put_files(pairs[: len(pairs) // 2])
            print("PARTIAL", flush=True)
            time.sleep(600)

        transfer.before_put = half_then_hang
    if mode.startswith("supersede"):
        # The worker is stuck on step_1.pt while last.ckpt is saved twice: the second save
        # supersedes the first while both wait, then the process dies.
        def hang(count: int, pairs: list) -> None:
            time.sleep(600)

        transfer.before_put = hang
        up = CheckpointUploader(root, url, transfer=transfer)  # type: ignore[arg-type]
        up.submit(root / "step_1.pt")
        for version in (b"v1", b"v2"):
            (root / "last.ckpt").write_bytes(version * 1000)
            up.submit(root / "last.ckpt")
            time.sleep(0.1)  # a later mtime, even with a coarse filesystem clock
        journal = root / ".runctl" / "journal.jsonl"
        while '"state":"skipped"' not in journal.read_text():
            time.sleep(0.01)
        print("SUPERSEDED", flush=True)
        time.sleep(600)
    if mode.startswith("skip"):
        # Every upload hangs while steps 1-4 are saved: keep-last-2 skips the older ones still
        # queued (retention would delete them anyway), then the process dies before 3 and 4 go up.
        def hang(count: int, pairs: list) -> None:
            time.sleep(600)

        transfer.before_put = hang
        up = CheckpointUploader(root, url, transfer=transfer, keep_last_n=2, local_keep_last_n=2)  # type: ignore[arg-type]
        for step in range(1, 5):
            up.submit(root / f"step_{step}.pt")
        journal = root / ".runctl" / "journal.jsonl"
        # step_2.pt's own line: when step_1.pt was still queued too, its line comes first.
        while not any(
            '"name":"step_2.pt"' in line and '"state":"skipped"' in line
            for line in journal.read_text().splitlines()
        ):
            time.sleep(0.01)
        print("SKIPPED", flush=True)
        time.sleep(600)
    if mode.startswith("inflight"):
        # last.ckpt is saved again while its first version uploads: the first one is verified
        # after the second was queued, then the process dies before the second goes up.
        uploading, resaved = threading.Event(), threading.Event()

        def first_waits_second_hangs(count: int, pairs: list) -> None:
            if count == 1:
                uploading.set()
                resaved.wait(60)
                return
            print("INFLIGHT", flush=True)
            time.sleep(600)

        transfer.before_put = first_waits_second_hangs
        up = CheckpointUploader(root, url, transfer=transfer)  # type: ignore[arg-type]
        (root / "last.ckpt").write_bytes(b"v1" * 1000)
        up.submit(root / "last.ckpt")
        uploading.wait(60)
        time.sleep(0.1)
        (root / "last.tmp").write_bytes(b"v2" * 1000)  # saved atomically: a new file
        os.replace(root / "last.tmp", root / "last.ckpt")
        up.submit(root / "last.ckpt")
        resaved.set()
        time.sleep(600)
    up = CheckpointUploader(root, url, transfer=transfer, keep_last_n=3)  # type: ignore[arg-type]
    for name in sorted(os.listdir(root)):
        if name != ".runctl":
            up.submit(root / name)
    if mode.startswith("hang"):
        os.unlink(root / "step_2.pt")  # the framework removes it right after the hand-over
        time.sleep(600)
    # mode "exit": leave without close(); the atexit safety net must flush.


if __name__ == "__main__":
    main()
