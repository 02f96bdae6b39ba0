"""Retention locks: one path per prefix, exclusion across threads and processes, no stale locks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runctl import locking
from runctl.exceptions import LockTimeout, UsageError
from runctl.locking import local_dir_lock, lock_dir, s3_lock_path, s3_prefix_lock
from runctl.s3url import S3URL

PREFIX = S3URL("bkt", "ckpt/")
ENDPOINT = "http://127.0.0.1:9000"

HOLDER = """
import sys, time
from runctl.locking import s3_prefix_lock
from runctl.s3url import S3URL
with s3_prefix_lock(S3URL("bkt", "ckpt/"), "http://127.0.0.1:9000", timeout=10):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCTL_LOCK_DIR", str(tmp_path / "x"))
    assert lock_dir() == (tmp_path / "x").resolve() and lock_dir().is_dir()
    monkeypatch.delenv("RUNCTL_LOCK_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if sys.platform.startswith("linux"):
        assert lock_dir() == (tmp_path / "cache" / "runctl" / "locks").resolve()


def test_one_path_per_prefix_and_endpoint() -> None:
    a = s3_lock_path(S3URL("bkt", "ckpt"), ENDPOINT + "/")
    assert a == s3_lock_path(PREFIX, ENDPOINT)
    assert a.is_absolute() and a.parent == lock_dir()
    assert a != s3_lock_path(S3URL("bkt", "ckpt-old/"), ENDPOINT)
    assert a != s3_lock_path(PREFIX, "http://127.0.0.1:9001")
    assert a != s3_lock_path(PREFIX)
    assert a != s3_lock_path(S3URL("bkt2", "ckpt/"), ENDPOINT)
    # One server, however its endpoint is spelled: a cleanup given localhost did not wait for an
    # uploader's retention given 127.0.0.1.
    for same in ("http://localhost:9000", "HTTP://LOCALHOST:9000/", "http://[::1]:9000"):
        assert s3_lock_path(PREFIX, same) == a, same
    assert s3_lock_path(PREFIX, "https://localhost:9000") != a
    aws = s3_lock_path(PREFIX)
    assert s3_lock_path(PREFIX, "https://s3.us-west-2.amazonaws.com") == aws
    assert s3_lock_path(PREFIX, "https://s3.amazonaws.com:443/") == aws
    assert s3_lock_path(PREFIX, "http://minio.internal") == s3_lock_path(PREFIX, "http://minio.internal:80")


def test_reentrant_within_a_thread() -> None:
    with s3_prefix_lock(PREFIX, ENDPOINT, timeout=1):
        with s3_prefix_lock(PREFIX, ENDPOINT, timeout=1):
            pass
    with s3_prefix_lock(PREFIX, ENDPOINT, timeout=1):  # fully released
        pass


def test_excludes_other_threads() -> None:
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with s3_prefix_lock(PREFIX, ENDPOINT):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    try:
        with pytest.raises(LockTimeout, match="retention lock for s3://bkt/ckpt/"):
            with s3_prefix_lock(PREFIX, ENDPOINT, timeout=0.2):
                pass
        with s3_prefix_lock(S3URL("bkt", "other/"), ENDPOINT, timeout=0.2):  # other prefixes are free
            pass
    finally:
        release.set()
        t.join(10)
    with s3_prefix_lock(PREFIX, ENDPOINT, timeout=1):
        pass


def test_bad_timeout() -> None:
    with pytest.raises(UsageError, match="timeout"):
        with s3_prefix_lock(PREFIX, timeout=-1):
            pass


def start_holder() -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_other_process_blocks_then_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(locking, "WARN_AFTER", 0.2)
    proc = start_holder()
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="runctl"):
            with pytest.raises(LockTimeout):
                with s3_prefix_lock(PREFIX, ENDPOINT, timeout=0.8):
                    pass
        assert 0.7 < time.monotonic() - start < 5
        assert "waiting for lock" in caplog.text and str(s3_lock_path(PREFIX, ENDPOINT)) in caplog.text
    finally:
        proc.kill()
        proc.wait(10)


def test_lock_of_a_killed_process_does_not_block() -> None:
    proc = start_holder()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert s3_lock_path(PREFIX, ENDPOINT).exists()  # the file stays; the flock died with its holder
    start = time.monotonic()
    with s3_prefix_lock(PREFIX, ENDPOINT, timeout=5):
        pass
    assert time.monotonic() - start < 2


def test_local_dir_lock_path(tmp_path: Path) -> None:
    with local_dir_lock(tmp_path, timeout=1):
        assert (tmp_path / ".runctl" / "retention.lock").exists()


def test_an_unusable_lock_directory_is_named_with_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("RUNCTL_LOCK_DIR", str(tmp_path / "afile" / "locks"))
    with pytest.raises(UsageError, match=r"RUNCTL_LOCK_DIR.*Not a directory"):
        lock_dir()


def test_a_lock_file_is_made_for_every_user_sharing_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shared RUNCTL_LOCK_DIR (the README's way for users, sudo, containers): the first
    # user's lock file was 0644, and the second's cleanup failed "Permission denied"
    # (concurrency pass).
    monkeypatch.setenv("RUNCTL_LOCK_DIR", str(tmp_path))
    old = os.umask(0o022)
    try:
        with s3_prefix_lock(S3URL("bkt", "shared/"), ENDPOINT, timeout=5):
            pass
    finally:
        os.umask(old)
    assert s3_lock_path(S3URL("bkt", "shared/"), ENDPOINT).stat().st_mode & 0o777 == 0o666


def test_a_lock_directory_named_to_be_shared_is_made_for_every_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Made with the umask (0755), no other user could add the lock of a new prefix there.
    monkeypatch.setenv("RUNCTL_LOCK_DIR", str(tmp_path / "shared" / "locks"))
    old = os.umask(0o022)
    try:
        assert lock_dir().stat().st_mode & 0o7777 == 0o777
    finally:
        os.umask(old)


OTHER_USER = """
from runctl.locking import s3_prefix_lock
from runctl.s3url import S3URL
with s3_prefix_lock(S3URL("bkt", "theirs/"), "http://127.0.0.1:9000", timeout=5):
    pass
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to play two users")
@pytest.mark.parametrize(("dir_mode", "file_mode", "said"), [(0o777, 0o644, "chmod a+rw"), (0o1777, 0o666, "sticky bit")])
def test_a_lock_file_another_user_left_unwritable_is_one_line_saying_so(
    tmp_path: Path, dir_mode: int, file_mode: int, said: str
) -> None:
    # In a sticky directory (/tmp) filelock refuses another user's lock file whatever its mode,
    # and "chmod a+rw" sent users after a file that already was (verification pass).
    lock_home = tmp_path / "locks"
    lock_home.mkdir()
    lock_home.chmod(dir_mode)
    env = {**os.environ, "RUNCTL_LOCK_DIR": str(lock_home)}
    path = s3_lock_path(S3URL("bkt", "theirs/"), "http://127.0.0.1:9000")  # under this process's dir
    theirs = lock_home / path.name
    theirs.touch()
    os.chown(theirs, 1000, 1000)
    theirs.chmod(file_mode)
    # root without its capabilities checks permissions as any other user does
    proc = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", OTHER_USER],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "UsageError: cannot open the retention lock file" in proc.stderr, proc.stderr
    assert said in proc.stderr


MARKER = """
import sys, time
from pathlib import Path
from runctl.locking import mark_uploader
mark = mark_uploader(Path(sys.argv[1]))
print("marked", flush=True)
time.sleep(60)
"""


def _marking(root: Path, *, unrelated: bool, tmp_path: Path) -> int:
    """A process that marks ``root`` as uploaded by it; unrelated: not our descendant (its
    parent, a shell, exits at once). Returns its pid once the mark is made."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    script = tmp_path / "marker.py"
    script.write_text(MARKER)
    out = tmp_path / f"marker-{time.monotonic_ns()}.out"
    if unrelated:
        subprocess.run(
            ["sh", "-c", f'"{sys.executable}" "{script}" "{root}" > "{out}" 2>&1 & echo $! > "{out}.pid"'],
            env=env, check=True, timeout=30,
        )  # fmt: skip
        pid = int(Path(f"{out}.pid").read_text())
    else:
        pid = subprocess.Popen(
            [sys.executable, str(script), str(root)], env=env, stdout=out.open("w")
        ).pid
    deadline = time.monotonic() + 30
    while "marked" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, "the marking process did not start"
        time.sleep(0.05)
    return pid


def test_another_live_uploader_of_a_directory_is_seen_and_a_dead_one_forgotten(
    tmp_path: Path,
) -> None:
    # Two training runs started on one directory overwrite each other's checkpoints, locally
    # and in S3, with nothing said but INFO lines.
    root = tmp_path / "ckpt"
    root.mkdir()
    own = locking.mark_uploader(root)
    assert own is not None and locking.other_uploaders(root) == []  # this process is not another
    child = _marking(root, unrelated=False, tmp_path=tmp_path)  # as runctl local's script
    assert locking.other_uploaders(root) == []
    stranger = _marking(root, unrelated=True, tmp_path=tmp_path)
    try:
        assert locking.other_uploaders(root) == [stranger]
    finally:
        os.kill(stranger, signal.SIGKILL)
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while locking.other_uploaders(root):  # the system drops a dead process's flock
        assert time.monotonic() < deadline
        time.sleep(0.05)
    marks = [p.name for p in (root / ".runctl" / locking.UPLOADERS_DIR).iterdir()]
    assert own.path.name in marks and not [m for m in marks if m.startswith(f"{stranger}-")]
    own.remove()
    assert not own.path.exists()


CHECKER = """
import json, os, sys, time
from pathlib import Path
from runctl.locking import UPLOADERS_DIR, other_uploaders
root = Path(sys.argv[1])
while not any(n[0].isdigit() for n in os.listdir(root / ".runctl" / UPLOADERS_DIR)):
    time.sleep(0.05)
print(json.dumps(other_uploaders(root)))
"""


@pytest.mark.parametrize(("ranks", "warned"), [(("0", "1"), False), (("", ""), True), (("0", "0"), True)])
def test_ranks_of_one_run_are_not_other_runs(
    tmp_path: Path, ranks: tuple[str, str], warned: bool
) -> None:
    # torchrun starts each rank as a sibling: a CheckpointManager on every rank (as the loop
    # helper's docstring says) warned on rank 1 that rank 0 was another run. Two runs one shell
    # started are siblings too: without local ranks, or with the same one, they are two runs.
    root = tmp_path / "ckpt"
    (root / ".runctl" / locking.UPLOADERS_DIR).mkdir(parents=True)
    (tmp_path / "marker.py").write_text(MARKER)
    (tmp_path / "checker.py").write_text(CHECKER)
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    first, second = (f"LOCAL_RANK={r}" if r else "" for r in ranks)
    proc = subprocess.run(
        ["sh", "-c", f'env {first} "{sys.executable}" marker.py "{root}" > /dev/null 2>&1 & echo $! > pid; '
                     f'env {second} "{sys.executable}" checker.py "{root}"'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    marker = int((tmp_path / "pid").read_text())
    os.kill(marker, signal.SIGKILL)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ([marker] if warned else [])


def test_another_namespace_or_host_is_told_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two containers' pid 1 on one bind-mounted directory named their marks alike: no warning.
    # Another machine's marks on a shared filesystem name pids that mean nothing here.
    root = tmp_path / "ckpt"
    root.mkdir()
    child = _marking(root, unrelated=False, tmp_path=tmp_path)  # our descendant: not another run
    try:
        assert locking.other_uploaders(root) == []
        monkeypatch.setattr(locking, "_pid_namespace", lambda: "4026532999")  # seen from elsewhere
        assert locking.other_uploaders(root) == [child]
        monkeypatch.setattr(locking, "_HOST", "another-host")
        assert locking.other_uploaders(root) == []
    finally:
        os.kill(child, signal.SIGKILL)
