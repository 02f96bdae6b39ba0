"""A child process for the reliability suite: an uploader stopped at a chosen point, or a busy worker."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from runctl.config import resolve_config
from runctl.retry import RetryPolicy
from runctl.transfer import get_transfer
from runctl.uploader import CheckpointUploader
from tests.uploader.conftest import Wrapped

RETRY = RetryPolicy(attempts=6, backoff_factor=0.1, backoff_max=0.5, jitter=0.0)


def content(step: int, size: int = 20_000) -> bytes:
    """The bytes of checkpoint ``step`` (deterministic, so the parent can check them)."""
    seed = hashlib.sha256(str(step).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def hang(point: str) -> None:
    print(f"AT {point}", flush=True)
    time.sleep(600)


def stop_at(root: Path, url: str, backend: str, point: str, keep: str) -> None:
    """Upload everything in ``root``, stopping (for the parent's SIGKILL) at ``point``."""
    inner = get_transfer(resolve_config(), use_s5cmd=backend == "s5cmd")
    transfer = Wrapped(inner)
    if point == "between-files":
        original = inner.put_files

        def one_by_one(pairs, **kwargs):  # noqa: ANN001, ANN202
            pairs = list(pairs)
            if len(pairs) > 1:
                original(pairs[:1], **kwargs)
                hang(point)
            return original(pairs, **kwargs)

        inner.put_files = one_by_one  # type: ignore[method-assign]
    elif point == "before-marker":
        transfer.put_bytes = lambda data, u: hang(point)  # type: ignore[method-assign]
    elif point == "during-retention":
        original_delete = inner.delete_keys

        def delete_then_hang(bucket, keys):  # noqa: ANN001, ANN202
            result = original_delete(bucket, keys)
            hang(point)
            return result

        transfer.delete_keys = delete_then_hang  # type: ignore[method-assign]
    keep_n = int(keep) if keep != "none" else None
    up = CheckpointUploader(root, url, transfer=transfer, keep_last_n=keep_n, retry=RETRY)  # type: ignore[arg-type]
    for name in sorted(os.listdir(root)):
        if name != ".runctl":
            up.submit(root / name)
            if keep_n is not None:
                up.flush()  # one at a time, so retention has older complete ones to delete
    print("DONE", flush=True)
    time.sleep(600)


def uploader(root: Path, url: str, backend: str, steps: str) -> None:
    """Save and submit the given steps, like a training loop, with keep-last-3 / local keep-last-2."""
    with CheckpointUploader(
        root,
        url,
        use_s5cmd=backend == "s5cmd",
        keep_last_n=3,
        local_keep_last_n=2,
        retry=RETRY,
    ) as up:
        for step in (int(s) for s in steps.split(",")):
            path = root / f"step_{step}.pt"
            tmp = root / f".tmp-{step}-{os.getpid()}"
            tmp.write_bytes(content(step))
            os.replace(tmp, path)
            up.submit(path)
    print("DONE", flush=True)


def cleaner(root: Path, url: str, rounds: str) -> None:
    """Run `runctl s3 cleanup` and `runctl checkpoint cleanup` in a loop (the CLI app, in-process)."""
    from typer.testing import CliRunner

    import tests.cli.cli_support  # noqa: F401  (the lazy tree `runctl` runs)
    from runctl.cli.app import app

    runner = CliRunner()
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    for i in range(int(rounds)):
        backend = "--use-s5cmd" if i % 2 else "--no-use-s5cmd"
        for args in (
            ["--endpoint-url", endpoint, "s3", "cleanup", url, "-n", "3", backend],
            ["checkpoint", "cleanup", str(root), "-n", "2"],
        ):
            result = runner.invoke(app, args)
            if (
                result.exit_code != 0
                or result.exception
                and not isinstance(result.exception, SystemExit)
            ):
                print(f"FAILED {args}: {result.exit_code} {result.stderr}", flush=True)
                sys.exit(3)
    print("DONE", flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "stop-at":
        stop_at(Path(args[0]), args[1], args[2], args[3], args[4])
    elif mode == "uploader":
        uploader(Path(args[0]), args[1], args[2], args[3])
    elif mode == "cleaner":
        cleaner(Path(args[0]), args[1], args[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
