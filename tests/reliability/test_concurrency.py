"""Four processes on one directory and prefix (two uploaders, two cleanup loops); stale locks never block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runctl.locking import local_dir_lock, s3_prefix_lock
from runctl.s3url import S3URL
from tests.cli.cli_support import run
from tests.reliability._worker import content
from tests.reliability.conftest import get_object, put_object, s3_snapshot
from tests.servers import S3Server

REPO = Path(__file__).resolve().parents[2]
STEPS = 50


def spawn(server: S3Server, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, **server.env(), PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability._worker", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_four_processes_on_one_directory_and_prefix(moto_server: S3Server, tmp_path: Path) -> None:
    bucket = S3URL(moto_server.new_bucket())
    url = str(bucket.join("run/"))
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "train.log").write_text("not a checkpoint")
    put_object(moto_server, bucket, "run/notes.txt", b"keep me")
    odd = ",".join(str(s) for s in range(1, STEPS + 1, 2))
    even = ",".join(str(s) for s in range(2, STEPS + 1, 2))
    procs = [
        spawn(moto_server, "uploader", str(root), url, "s5cmd", odd),
        spawn(moto_server, "uploader", str(root), url, "boto3", even),
        spawn(moto_server, "cleaner", str(root), url, "25"),
        spawn(moto_server, "cleaner", str(root), url, "25"),
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        outputs.append((proc.returncode, out, err))
    for code, out, err in outputs:
        assert code == 0 and "DONE" in out, (code, out, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
    # One final pass, as a single process would end: idempotent, changes nothing more in S3.
    before = s3_snapshot(moto_server, bucket.bucket)
    final = run("--endpoint-url", moto_server.endpoint_url, "s3", "cleanup", url, "-n", "3")
    assert final.exit_code == 0, final.stderr
    assert s3_snapshot(moto_server, bucket.bucket) == before
    assert set(before) == {"run/notes.txt"} | {
        f"run/step_{s}.pt" for s in (STEPS - 2, STEPS - 1, STEPS)
    }
    for s in (STEPS - 2, STEPS - 1, STEPS):
        assert get_object(moto_server, bucket, f"run/step_{s}.pt") == content(s)
    local = run("checkpoint", "cleanup", str(root), "-n", "2")
    assert local.exit_code == 0, local.stderr
    names = {p.name for p in root.iterdir() if p.name != ".runctl"}
    assert names == {"train.log", f"step_{STEPS - 1}.pt", f"step_{STEPS}.pt"}


HOLDER = """
import sys, time
from pathlib import Path
from runctl.locking import local_dir_lock, s3_prefix_lock
from runctl.s3url import S3URL
with s3_prefix_lock(S3URL.parse(sys.argv[1]), sys.argv[2]), local_dir_lock(Path(sys.argv[3])):
    print("HELD", flush=True)
    time.sleep(600)
"""


def test_stale_locks_of_a_dead_process_never_block(moto_server: S3Server, tmp_path: Path) -> None:
    bucket = S3URL(moto_server.new_bucket())
    url = bucket.join("run/")
    root = tmp_path / "ckpt"
    root.mkdir()
    for i in (1, 2, 3):
        put_object(moto_server, bucket, f"run/step_{i}.pt", b"x")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(url), moto_server.endpoint_url, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    holder.stdout.close()
    started = time.monotonic()
    with s3_prefix_lock(url, moto_server.endpoint_url, timeout=5), local_dir_lock(root, timeout=5):
        pass
    result = run("--endpoint-url", moto_server.endpoint_url, "s3", "cleanup", str(url), "-n", "1")
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - started < 15
    assert set(s3_snapshot(moto_server, bucket.bucket)) == {"run/step_3.pt"}
