"""SIGKILL mid-upload, then restart with ckpt_path: the pending upload completes and retention is right."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runctl.journal import Journal
from runctl.s3url import S3URL
from tests.integrations.conftest import file_checkpoints, s3_objects
from tests.servers import S3Server

SCRIPT = Path(__file__).with_name("_train_script.py")
REPO = Path(__file__).resolve().parents[2]


def _env(server: S3Server) -> dict[str, str]:
    env = dict(os.environ)
    env.update(server.env())
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _step(name: str) -> int:
    return int(name.split("step=")[1].split(".")[0])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_mid_upload_then_resume(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    prefix = moto_bucket.join("crash/")
    dirpath = tmp_path / "ckpt"
    env = _env(moto_server)

    # Run 1: uploads sit still for 60 s, so the kill lands while the first one is in flight.
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(dirpath), str(prefix), "40", "--slow-put", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    handed: list[str] = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while len(handed) < 4 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("HANDED "):
            handed.append(line.split()[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(handed) >= 4, f"the first run handed over only {handed}"
    assert file_checkpoints(s3_objects(moto_server, prefix)) == {}, (
        "nothing should have landed before the kill"
    )
    assert Journal(dirpath).pending(), "the journal should hold the uploads the kill interrupted"

    # Run 2: resume from the newest local checkpoint; pending uploads resume from the journal.
    resumed = max((p.name for p in dirpath.glob("*.ckpt")), key=_step)
    start = _step(resumed)
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(dirpath),
            str(prefix),
            str(start + 6),
            "--resume",
            str(dirpath / resumed),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"DONE {start + 6}" in done.stdout

    in_s3 = file_checkpoints(s3_objects(moto_server, prefix))
    expected = {f"epoch=0-step={s}.ckpt" for s in (start, start + 2, start + 4, start + 6)}
    # keep_last_n=3 keeps the three newest; the checkpoint the run resumed from is protected too.
    assert set(in_s3) == expected
    for name, body in in_s3.items():
        assert body == (dirpath / name).read_bytes(), f"{name} in S3 differs from the local file"
    assert Journal(dirpath).pending() == []



@pytest.mark.timeout(180)
def test_a_second_ctrl_c_stops_the_wait_for_uploads_and_says_so(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """Lightning ignores SIGINT once it caught a Ctrl-C, before on_exception: the flush of slow
    uploads there could not be cut short, and said nothing (Lightning pass: 50 s, two more
    Ctrl-C ignored). Now it says it waits, and a second Ctrl-C ends the wait."""
    dirpath = tmp_path / "ckpt"
    said = tmp_path / "stderr.txt"
    with said.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(dirpath), str(moto_bucket.join("int/")), "400",
             "--slow-put", "60", "--step-delay", "0.02"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=_env(moto_server),
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        handed = 0
        while handed < 2:
            line = proc.stdout.readline()
            assert line, f"the run ended before two checkpoints: {said.read_text()[-2000:]}"
            handed += line.startswith("HANDED ")
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while "waiting for" not in said.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Ctrl-C again stops waiting" in said.read_text(), said.read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=25)  # the wait it cuts short is 30 s of nothing landing, or 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = said.read_text()
    assert "runctl: stopped waiting for uploads" in text, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    assert proc.returncode == 1  # Lightning's own exit after a Ctrl-C
    assert Journal(dirpath).pending(failed=True), "what did not land stays in the journal"


@pytest.mark.slow  # two ranks import torch and Lightning, and an upload held for 8 s
@pytest.mark.timeout(180)
def test_under_ddp_a_rank_that_fails_lets_rank_zero_finish_its_uploads(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """Under ``ddp``, Lightning's observer in rank zero SIGKILLs every rank within 5 s of one
    failing: rank zero's pending uploads were lost mid-flush (DDP pass). It now waits for them."""
    dirpath = tmp_path / "ckpt"
    prefix, second = moto_bucket.join("ddp/"), moto_bucket.join("ddp-b/")
    # Two callbacks, the first one's uploads slow: each is waited for (the one set up last
    # alone was, and the first one's were lost; DDP pass).
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(dirpath), str(prefix), "40",
         "--ddp", "--fail-rank-1-at", "3", "--slow-put", "8", "--second-s3-url", str(second)],
        capture_output=True, text=True, env=_env(moto_server), timeout=150,
    )  # fmt: skip
    said = proc.stderr[-3000:]
    assert proc.returncode != 0, said
    assert "HANDED epoch=0-step=2.ckpt" in proc.stdout, said
    assert "RuntimeError: rank 1 fails at step 3" in proc.stderr, said
    assert "checkpoint upload(s)" in proc.stderr and "landed; Lightning stops this process now" in proc.stderr, said
    for where, local in ((prefix, dirpath), (second, tmp_path / "ckpt-b")):
        in_s3 = file_checkpoints(s3_objects(moto_server, where))
        assert list(in_s3) == ["epoch=0-step=2.ckpt"], (where, said)
        assert in_s3["epoch=0-step=2.ckpt"] == (local / "epoch=0-step=2.ckpt").read_bytes()
        assert Journal(local).pending(failed=True) == []
