"""The training process forks (a DataLoader's workers, fork start method) while uploads run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runctl.s3url import S3URL
from runctl.uploader import CheckpointUploader
from tests.cli.cli_support import ROOT
from tests.servers import S3Server
from tests.uploader.conftest import FAST_RETRY

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork()")


def _sleeper() -> int:
    """A forked process that lives until killed, as a persistent DataLoader worker does."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            time.sleep(120)
        finally:
            os._exit(0)
    return pid


def test_forks_during_uploads_never_stop_them(rclone_server: S3Server, tmp_path: Path) -> None:
    # A fork while the uploader's thread was inside Popen handed the new process the write end
    # of Popen's exec-status pipe: Popen waited for it as long as the worker lived, so nothing
    # uploaded for the whole run (0 of 20), and the end of training waited for flush_timeout.
    bucket = S3URL(rclone_server.new_bucket())
    root = tmp_path / "ckpt"
    root.mkdir()
    sleepers: list[int] = []
    try:
        with CheckpointUploader(
            root, bucket.join("run/"), config=rclone_server.config(), use_s5cmd=True,
            keep_last_n=3, retry=FAST_RETRY,
        ) as up:
            for step in range(12):
                (root / f"step_{step}.pt").write_bytes(os.urandom(50_000))
                up.submit(root / f"step_{step}.pt")
                sleepers.append(_sleeper())
            began = time.monotonic()
            while len(sleepers) < 150 and time.monotonic() - began < 15:
                sleepers.append(_sleeper())  # a loader's workers, forked again and again
                time.sleep(0.01)
            up.flush(timeout=60)
            status = up.status()
        assert (status.uploaded + status.skipped, status.failures) == (12, 0), status
    finally:
        for pid in sleepers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_forked_worker_leaves_the_uploader_to_its_parent(rclone_server: S3Server, tmp_path: Path) -> None:
    # multiprocessing runs the threading exit hooks when a forked worker ends: each worker
    # flushed the parent's uploader and logged "failed to upload" for checkpoints that landed.
    script = textwrap.dedent(
        """
        import logging, multiprocessing, sys
        from pathlib import Path
        from runctl.uploader import CheckpointUploader
        logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s: %(message)s")
        root = Path(sys.argv[1])
        up = CheckpointUploader(root, sys.argv[2], keep_last_n=2)
        (root / "step_1.pt").write_bytes(b"one")
        up.submit(root / "step_1.pt")
        worker = multiprocessing.get_context("fork").Process(target=print, args=("worker ran",))
        worker.start()
        worker.join()
        up.close()
        print("exit code of the worker:", worker.exitcode)
        """
    )
    bucket = rclone_server.new_bucket()
    root = tmp_path / "ckpt"
    root.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script, str(root), f"s3://{bucket}/run/"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, **rclone_server.env(), "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "worker ran" in result.stdout and "exit code of the worker: 0" in result.stdout
    assert "not closed" not in result.stderr and "failed to upload" not in result.stderr, result.stderr
    assert rclone_server.client().get_object(Bucket=bucket, Key="run/step_1.pt")["Body"].read() == b"one"


def test_a_submit_in_a_forked_process_is_refused(moto_server: S3Server, tmp_path: Path) -> None:
    # Taken and journaled, it was never sent: no thread runs in the fork, result() waited for
    # good, and the parent's close() reported success without it (API pass).
    from runctl.exceptions import UsageError

    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "step_1.pt").write_bytes(b"1")
    bucket = S3URL(moto_server.new_bucket())
    up = CheckpointUploader(root, bucket.join("run/"), config=moto_server.config(), use_s5cmd=False, resume=False)
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read)
            try:
                up.submit(root / "step_1.pt")
                said = b"taken"
            except UsageError as exc:
                said = str(exc).encode()
            os.write(write, said)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            said = fh.read().decode()
        os.waitpid(pid, 0)
        assert "forked process" in said, said
    finally:
        up.close(timeout=10)
