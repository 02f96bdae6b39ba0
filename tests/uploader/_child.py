"""A training process for the crash tests: submits checkpoints, then hangs mid-upload or just exits."""

from __future__ import annotations

import os
import sys
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
