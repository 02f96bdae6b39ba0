"""Transfers as real processes with real pipes and signals: stdin/stdout streams (`-`), and Ctrl-C.

`runctl s3 upload - URL` and `runctl s3 download URL -` work as aws s3 cp's do, against real
servers on both transfer backends.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from runctl.s3url import S3URL
from tests.cli.cli_support import ROOT, of_type, records
from tests.servers import S3Server


def runctl(
    server: S3Server, backend: str, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **server.env(), "PYTHONPATH": str(ROOT)}
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    return subprocess.run(
        [sys.executable, "-m", "runctl", "s3", *args, flag],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
        cwd=tempfile.gettempdir(),  # never the repository, whatever the command writes
    )


def write_big(path: Path, mib: int = 300) -> Path:
    """``mib`` MiB of random bytes: long enough to interrupt midway."""
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))
    return path


def start_runctl(server: S3Server, backend: str, *args: str, cwd: Path) -> subprocess.Popen[bytes]:
    """``runctl s3 ARGS`` as a real child process, to be interrupted."""
    env = {**os.environ, **server.env(), "PYTHONPATH": str(ROOT)}
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    return subprocess.Popen(
        [sys.executable, "-m", "runctl", "s3", *args, flag],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
    )


def wait_for_a_multipart_upload(server: S3Server, bucket: S3URL, proc: subprocess.Popen[bytes]) -> None:
    client = server.client()
    deadline = time.monotonic() + 60
    while not client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads"):
        assert proc.poll() is None and time.monotonic() < deadline, "no multipart upload began"
        time.sleep(0.02)


def test_a_stream_goes_up_and_comes_back_byte_for_byte(
    s3_server: S3Server, bucket: S3URL, backend: str
) -> None:
    # Over 50 MiB, so the upload is multipart on both backends; every byte value appears.
    data = os.urandom(1 << 20) * 56 + bytes(range(256))
    url = f"{bucket}stream/run-7.tar"
    up = runctl(s3_server, backend, "upload", "-", url, "--json", stdin=data)
    assert up.returncode == 0, up.stderr
    (record,) = of_type(up.stdout.decode(), "upload")
    assert (record["source"], record["destination"], record["size"]) == ("-", url, len(data))
    stored = s3_server.client().get_object(Bucket=bucket.bucket, Key="stream/run-7.tar")
    assert stored["ContentLength"] == len(data)

    down = runctl(s3_server, backend, "download", url, "-")
    assert down.returncode == 0, down.stderr
    # stdout is the object and nothing else.
    assert hashlib.sha256(down.stdout).digest() == hashlib.sha256(data).digest()
    assert down.stderr == b""


def test_an_empty_stream_and_a_key_with_glob_characters(
    s3_server: S3Server, bucket: S3URL, backend: str
) -> None:
    for key, data in (("s/empty", b""), ("s/odd [1]*?.bin", b"literal key")):
        url = f"{bucket}{key}"
        up = runctl(s3_server, backend, "upload", "-", url, stdin=data)
        assert up.returncode == 0, up.stderr
        assert f"upload: - -> {url}" in up.stdout.decode()
        quiet = runctl(s3_server, backend, "upload", "-", url, "--quiet", stdin=data)
        assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, b"", b"")
        down = runctl(s3_server, backend, "download", url, "-")
        assert (down.returncode, down.stdout) == (0, data), down.stderr


def test_a_missing_object_is_one_line_and_nothing_on_stdout(
    moto_server: S3Server, backend: str
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    missing = runctl(moto_server, backend, "download", f"{bucket}nope.bin", "-")
    assert missing.returncode == 2 and missing.stdout == b""
    assert missing.stderr.decode().count("\n") == 1 and "NoSuchKey" in missing.stderr.decode()
    no_bucket = runctl(moto_server, backend, "download", "s3://no-such-bucket-x/a.bin", "-")
    assert no_bucket.returncode == 2 and "NoSuchBucket" in no_bucket.stderr.decode()


def test_a_missing_bucket_upload_and_a_dry_run_download_name_the_cause(
    moto_server: S3Server, backend: str
) -> None:
    # s5cmd's pipe says only "exit code 1"; the cause is found and named as boto3 names it.
    up = runctl(moto_server, backend, "upload", "-", "s3://no-such-bucket-x/a.bin", stdin=b"x")
    assert up.returncode == 2 and "NoSuchBucket" in up.stderr.decode(), up.stderr
    bucket = S3URL(moto_server.new_bucket())
    dry = runctl(moto_server, backend, "download", f"{bucket}nope.bin", "-", "--dry-run")
    assert dry.returncode == 2 and "NoSuchKey" in dry.stderr.decode(), dry.stderr


def test_a_closed_stdin_or_stdout_is_one_line_and_exit_2(moto_server: S3Server) -> None:
    bucket = S3URL(moto_server.new_bucket())
    env = {**os.environ, **moto_server.env(), "PYTHONPATH": str(ROOT)}
    for args, closed in (
        (["upload", "-", f"{bucket}a.bin"], "stdin"),
        (["download", f"{bucket}a.bin", "-"], "stdout"),
    ):
        # `runctl ... <&-` / `>&-`: Python then has no sys.stdin / sys.stdout at all.
        shell = f"{sys.executable} -m runctl s3 {' '.join(args)} {'<&-' if closed == 'stdin' else '>&-'}"
        done = subprocess.run(
            ["sh", "-c", shell], capture_output=True, env=env, timeout=60, cwd=tempfile.gettempdir()
        )
        err = done.stderr.decode()
        assert done.returncode == 2 and f"{closed}, which is closed" in err, err
        assert err.count("\n") == 1


def test_a_reader_that_stops_early_ends_the_download(moto_server: S3Server, backend: str) -> None:
    # As the README has `| head`: exit 1, silently (it said "its reader closed the pipe").
    bucket = S3URL(moto_server.new_bucket())
    moto_server.client().put_object(Bucket=bucket.bucket, Key="big.bin", Body=os.urandom(32 << 20))
    env = {**os.environ, **moto_server.env(), "PYTHONPATH": str(ROOT)}
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "s3", "download", f"{bucket}big.bin", "-", flag],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(1000)) == 1000  # `| head -c 1000`
    proc.stdout.close()
    assert proc.wait(60) == 1
    assert proc.stderr.read() == b""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("upload", "-", "s3://bkt/dir/"), "needs the object's key"),
        (("upload", "-", "s3://bkt/a.tar", "--recursive"), "one stream (stdin)"),
        (("download", "s3://bkt/a.tar", "-", "--json"), "--json writes its records to stdout"),
        (("download", "s3://bkt/run/", "-", "--recursive"), "takes one object"),
        (("download", "s3://bkt/run/", "-"), "only one object can go to stdout"),
    ],
)
def test_streams_refuse_what_cannot_be_one_object(
    moto_server: S3Server, args: tuple[str, ...], needle: str
) -> None:
    result = runctl(moto_server, "boto3", *args, stdin=b"x")
    assert result.returncode == 2
    out = result.stdout.decode()
    if "--json" in args:  # the error is also a record on stdout, as for every command
        assert [r["type"] for r in records(out)] == ["error"]
    else:
        assert out == ""
    err = result.stderr.decode()
    assert err.count("\n") == 1 and needle in err, err


def test_ctrl_c_during_a_streamed_upload_leaves_no_parts_behind(
    moto_server: S3Server, backend: str
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    client = moto_server.client()
    env = {**os.environ, **moto_server.env(), "PYTHONPATH": str(ROOT)}
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "s3", "upload", "-", f"{bucket}stream.bin", flag],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    assert proc.stdin is not None
    chunk = os.urandom(1 << 20)
    deadline = time.monotonic() + 60
    while not client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads"):
        assert proc.poll() is None and time.monotonic() < deadline, "no multipart upload began"
        for _ in range(8):
            proc.stdin.write(chunk)  # the stream goes on: a producer still at work
    proc.send_signal(signal.SIGINT)
    # The producer has not closed the stream: boto3's reader thread read on until its end, and
    # runctl waited for it (a `tar | runctl s3 upload -` given SIGTERM ran until tar was done).
    proc.wait(timeout=15)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads", []) == []


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
@pytest.mark.parametrize("server_kind", ["moto", "rclone"])
def test_ctrl_c_during_a_multipart_upload_leaves_no_parts_behind(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, server_kind: str
) -> None:
    # S3 keeps (and bills) the parts of a multipart upload nobody completes or aborts; s5cmd,
    # killed on Ctrl-C, aborts nothing itself. (rclone cannot list multipart uploads: it has
    # none to show, and runctl must not warn about one it could not abort.)
    moto_server: S3Server = request.getfixturevalue(f"{server_kind}_server")
    bucket = S3URL(moto_server.new_bucket())
    big = write_big(tmp_path / "big.bin")
    client = moto_server.client()
    proc = start_runctl(moto_server, backend, "upload", str(big), f"{bucket}big.bin", cwd=tmp_path)
    if server_kind == "moto":
        wait_for_a_multipart_upload(moto_server, bucket, proc)
    else:
        time.sleep(0.7)  # rclone lists none: started and sending, far from done with 300 MiB
    assert proc.poll() is None, "the upload ended before Ctrl-C"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"could not abort" not in err, err
    if server_kind == "moto":
        assert client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads", []) == []
    # Nothing, or (when S3 had completed it as Ctrl-C came, which a loaded CI host once saw)
    # the whole object: never a part of it.
    landed = client.list_objects_v2(Bucket=bucket.bucket).get("Contents", [])
    assert [(o["Key"], o["Size"]) for o in landed] in ([], [("big.bin", big.stat().st_size)])


def test_ctrl_c_during_a_tree_upload_leaves_no_parts_behind(
    moto_server: S3Server, tmp_path: Path, backend: str
) -> None:
    # boto3's batch no longer waits out its requests on Ctrl-C (minutes against a hung
    # endpoint), so its own abort of the unfinished multipart uploads is runctl's to do.
    bucket = S3URL(moto_server.new_bucket())
    tree = tmp_path / "tree"
    tree.mkdir()
    write_big(tree / "big.bin")
    (tree / "small.json").write_text("{}")
    client = moto_server.client()
    proc = start_runctl(moto_server, backend, "upload", "-r", str(tree), f"{bucket}run/", cwd=tmp_path)
    wait_for_a_multipart_upload(moto_server, bucket, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads", []) == []


def _s5cmd_children_of(server: S3Server) -> list[str]:
    """Every running s5cmd whose command line names this server's endpoint."""
    endpoint = server.endpoint_url.encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"s5cmd") and endpoint in argv:
            found.append(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds s5cmd children in /proc")
@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_sigterm_stops_an_upload_as_ctrl_c_does(
    moto_server: S3Server, tmp_path: Path, backend: str
) -> None:
    # `kill` or `timeout` sends SIGTERM, whose default would end runctl at once and leave its
    # s5cmd child (in its own session) sending on, the object landing after runctl "stopped".
    bucket = S3URL(moto_server.new_bucket())
    big = write_big(tmp_path / "big.bin")
    client = moto_server.client()
    proc = start_runctl(moto_server, backend, "upload", str(big), f"{bucket}big.bin", cwd=tmp_path)
    wait_for_a_multipart_upload(moto_server, bucket, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.decode().strip() == "runctl: error: terminated"
    assert _s5cmd_children_of(moto_server) == []
    assert client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads", []) == []
    time.sleep(0.5)  # an orphan would go on sending: give it the time to show
    assert "Contents" not in client.list_objects_v2(Bucket=bucket.bucket)


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
@pytest.mark.parametrize("command", ["download", "sync"])
def test_an_interrupted_download_leaves_no_temporary_file_behind(
    moto_server: S3Server, tmp_path: Path, backend: str, command: str
) -> None:
    # The object goes to a temporary name beside its destination, and s5cmd and boto3 each
    # write to a name of their own derived from it: stopped midway, none may stay.
    bucket = S3URL(moto_server.new_bucket())
    with open(write_big(tmp_path / "big.bin"), "rb") as fh:
        moto_server.client().put_object(Bucket=bucket.bucket, Key="big.bin", Body=fh)
    dest = tmp_path / "dest"
    dest.mkdir()
    args = (
        ["download", f"{bucket}big.bin", str(dest)]
        if command == "download"
        else ["sync", str(dest), str(bucket), "--direction", "down"]
    )
    proc = start_runctl(moto_server, backend, *args, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 0 for p in dest.iterdir() if p.is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, "no download began"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert sorted(p.name for p in dest.iterdir()) == []


def test_an_interrupted_download_of_many_files_on_boto3_leaves_no_temporary_file_behind(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # boto3's download threads went on after the interrupted command had removed its temporary
    # files, and created or renamed more before the process exited: 4 interrupted syncs in 10
    # left one (sync pass). They stop, and remove their own, before the command ends.
    bucket = S3URL(moto_server.new_bucket())
    client = moto_server.client()
    body = os.urandom(3 * 1024 * 1024)
    for i in range(24):
        client.put_object(Bucket=bucket.bucket, Key=f"r/f{i:02d}.bin", Body=body)
    for attempt in range(6):
        dest = tmp_path / f"dest{attempt}"
        dest.mkdir()
        proc = start_runctl(moto_server, "boto3", "sync", str(dest), f"{bucket}r/", "-d", "down", cwd=tmp_path)
        deadline = time.monotonic() + 60
        while not any(dest.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "no download began"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        left = [p.name for p in dest.iterdir() if p.name.startswith(".runctl-tmp-")]
        assert left == [], (attempt, left)


def test_a_download_onto_a_device_or_a_fifo_writes_into_it(
    moto_server: S3Server, backend: str, tmp_path: Path
) -> None:
    # A rename put a regular file in their place: as root, `download URL /dev/null` replaced
    # /dev/null, and `download URL /dev/stdout` wrote nothing to the pipe. aws writes into them.
    bucket = S3URL(moto_server.new_bucket())
    moto_server.client().put_object(Bucket=bucket.bucket, Key="f.txt", Body=b"payload")
    env = {**os.environ, **moto_server.env(), "PYTHONPATH": str(ROOT)}
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    out = tmp_path / "out"
    out.symlink_to("/proc/self/fd/1")  # what /dev/stdout is
    null = tmp_path / "null"
    null.symlink_to(os.devnull)
    done = subprocess.run(
        [sys.executable, "-m", "runctl", "s3", "download", f"{bucket}f.txt", str(out), flag],
        capture_output=True, env=env, timeout=60, cwd=tempfile.gettempdir(),
    )
    # The object alone on stdout, as for '-' (no "download: ..." line mixed into it).
    assert (done.returncode, done.stdout, done.stderr) == (0, b"payload", b"")
    assert out.is_symlink()
    # stdout redirected to a file: /proc/self/fd/1 names a regular file, still written through
    # (a rename replaced the link, and as root the real /dev/stdout).
    redirected = tmp_path / "redirected.txt"
    with open(redirected, "wb") as sink:
        done = subprocess.run(
            [sys.executable, "-m", "runctl", "s3", "download", f"{bucket}f.txt", str(out), flag],
            stdout=sink, stderr=subprocess.PIPE, env=env, timeout=60, cwd=tempfile.gettempdir(),
        )
    assert done.returncode == 0, done.stderr
    assert out.is_symlink() and redirected.read_bytes() == b"payload"
    done = subprocess.run(
        [sys.executable, "-m", "runctl", "s3", "download", f"{bucket}f.txt", str(null), "--json", flag],
        capture_output=True, env=env, timeout=60, cwd=tempfile.gettempdir(),
    )
    assert done.returncode == 0, done.stderr
    assert null.is_symlink() and Path(os.devnull).is_char_device()
    # What went through is the object's size (a device keeps none: it said 0 B).
    records = {r["type"]: r for r in map(json.loads, done.stdout.decode().splitlines())}
    assert (records["download"]["size"], records["summary"]["bytes"]) == (7, 7)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "s3", "download", f"{bucket}f.txt", str(fifo), "-q", flag],
        stderr=subprocess.PIPE, env=env, cwd=tempfile.gettempdir(),
    )
    with open(fifo, "rb") as reader:
        assert reader.read() == b"payload"
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    assert stat.S_ISFIFO(fifo.stat().st_mode)
