"""A recognisable secret never shows up in logs, errors, --json output or a child's command line."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path

import psutil
import pytest

from runctl.exceptions import UploadError
from runctl.s3url import S3URL
from runctl.uploader import CheckpointUploader
from tests.cli.cli_support import run
from tests.reliability.conftest import QUICK_RETRY, config_for
from tests.reliability.faultproxy import FaultPlan, Rule
from tests.servers import S3Server

SECRET = f"FAKE-SECRET-{uuid.uuid4().hex}"


class CmdlineWatcher:
    """Reads /proc/<pid>/cmdline of every child process while it runs."""

    def __init__(self) -> None:
        #: Every command line seen per pid (a child reads as python between fork and exec).
        self.seen: dict[int, set[str]] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                children = me.children(recursive=True)
            except psutil.Error as exc:  # a process vanishing mid-walk must not end the watch
                self.errors.append(repr(exc))
                children = []
            for child in children:
                try:
                    raw = Path(f"/proc/{child.pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if raw:  # empty while a child is being reaped
                    self.seen.setdefault(child.pid, set()).add(raw.decode("utf-8", "replace"))
            self._stop.wait(0.005)

    def stop(self) -> dict[int, set[str]]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


def test_secret_not_in_logs_errors_or_s5cmd_cmdline(
    moto_server: S3Server,
    rclone_server: S3Server,
    make_proxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "step_1.pt").write_bytes(b"a" * 5000)
    (root / "step_2.pt").write_bytes(b"b" * 5000)
    # moto accepts any secret: a working upload, slowed so s5cmd lives long enough to be seen.
    proxy = make_proxy(
        moto_server, FaultPlan(rules=[Rule("stall", 2, method="PUT")], stall_seconds=1.0)
    )
    watcher = CmdlineWatcher()
    good = S3URL(moto_server.new_bucket())
    with CheckpointUploader(
        root, good.join("run/"), config=config_for(proxy.url, SECRET), retry=QUICK_RETRY
    ) as up:
        up.submit(root / "step_1.pt")
    # rclone checks it: a refused upload, with its errors.
    bad = S3URL(rclone_server.new_bucket())
    up = CheckpointUploader(
        root,
        bad.join("run/"),
        config=config_for(rclone_server.endpoint_url, SECRET),
        retry=QUICK_RETRY,
    )
    handle = up.submit(root / "step_2.pt")
    error = handle.exception(timeout=60)
    with pytest.raises(UploadError) as raised:
        up.close(timeout=30)
    seen = watcher.stop()

    assert any("s5cmd" in cmd for cmds in seen.values() for cmd in cmds), (
        "no s5cmd child was observed",
        seen,
        watcher.errors,
    )
    for pid, cmds in seen.items():
        for cmd in cmds:
            assert SECRET not in cmd, (pid, cmd)
    assert error is not None
    for text in (str(error), repr(error), str(raised.value), repr(raised.value), repr(up.status())):
        assert SECRET not in text
    assert SECRET not in getattr(error, "output", "") + " ".join(getattr(error, "cmd", []))
    assert any(r.name.startswith("runctl") for r in caplog.records), "the log capture saw runctl"
    assert SECRET not in caplog.text
    assert SECRET not in (root / ".runctl" / "journal.jsonl").read_text()
    assert SECRET not in repr(config_for(proxy.url, SECRET))


@pytest.mark.parametrize("backend", ["--use-s5cmd", "--no-use-s5cmd"])
def test_secret_not_in_cli_output(rclone_server: S3Server, backend: str, tmp_path: Path) -> None:
    bucket = S3URL(rclone_server.new_bucket())
    (tmp_path / "step_1.pt").write_bytes(b"x")
    env = {"AWS_SECRET_ACCESS_KEY": SECRET}
    endpoint = ["--endpoint-url", rclone_server.endpoint_url]
    for args in (
        ["s3", "upload", str(tmp_path / "step_1.pt"), str(bucket.join("run/")), backend],
        ["s3", "list", str(bucket), backend],
        ["s3", "cleanup", str(bucket.join("run/")), "-n", "1", backend],
        ["s3", "download", str(bucket.join("run/")), str(tmp_path / "d"), "--latest", backend],
    ):
        for extra_env in ({}, {"RUNCTL_DEBUG": "1"}):
            result = run(*endpoint, "--json", *args, env={**env, **extra_env})
            assert result.exit_code == 1, (args, result.stderr)
            assert SECRET not in result.stdout + result.stderr, (args, extra_env)
