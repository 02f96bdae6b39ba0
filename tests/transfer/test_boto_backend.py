"""The boto3 backend against an endpoint that stops answering: nothing waits out botocore's
read timeouts (60 s on each of 5 attempts) once the caller has given up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from runctl.config import Credentials, S3Config
from runctl.exceptions import TransferError
from runctl.s3url import S3URL
from runctl.transfer.boto import BotoTransfer
from runctl.transfer.threads import DaemonPool
from tests.cli.cli_support import ROOT
from tests.reliability.faultproxy import FaultPlan, FaultProxy, Rule
from tests.servers import ACCESS_KEY, REGION, SECRET_KEY, S3Server, never_answering


def config_for(endpoint: str) -> S3Config:
    return S3Config(endpoint, region=REGION, static_credentials=Credentials(ACCESS_KEY, SECRET_KEY))


def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a `runctl` child: test credentials, no endpoint (given on its line)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "RUNCTL_LOCK_DIR": str(tmp_path / "locks"),
    }


def test_a_daemon_pool_lets_go_of_work_under_way() -> None:
    release = threading.Event()
    pool = DaemonPool(1)
    busy = pool.submit(release.wait)
    deadline = time.monotonic() + 10
    while not busy.running():  # taken up by the thread (on a slow host, not at once)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued = pool.submit(lambda: "never run")
    started = time.monotonic()
    pool.shutdown(wait=False)
    assert time.monotonic() - started < 1
    assert queued.cancelled() and not busy.done()
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("runctl-io"))
    with pytest.raises(RuntimeError):
        pool.submit(len, "x")
    release.set()
    assert busy.result(5) is True
    with DaemonPool(3) as pool:
        assert list(pool.map(lambda n: n * 2, range(5))) == [0, 2, 4, 6, 8]


def test_close_ends_an_upload_waiting_on_an_endpoint_that_never_answers(tmp_path: Path) -> None:
    # s3transfer's cancel still waits for the request under way: the uploader's close() waited
    # 30 s for its worker, which went on waiting for botocore's read timeout. (A download's
    # first GetObject is one plain call, which only its read timeout ends.)
    src = tmp_path / "a.pt"
    src.write_bytes(os.urandom(200_000))
    errors: list[BaseException] = []
    with never_answering() as endpoint:
        t = BotoTransfer(config_for(endpoint))
        url = S3URL("b-u-c", "a.pt")

        def move() -> None:
            try:
                t.put_files([(src, url)])
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        worker = threading.Thread(target=move, daemon=True)
        worker.start()
        time.sleep(1.0)  # under way (or, on a slow host, still setting up: close() ends that too)
        assert worker.is_alive()
        started = time.monotonic()
        t.close()
        worker.join(10)
        assert not worker.is_alive() and time.monotonic() - started < 10
    assert errors and isinstance(errors[0], TransferError), errors


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from runctl import CheckpointUploader
    from runctl.config import Credentials, S3Config
    from runctl.exceptions import FlushTimeout

    endpoint, bucket, root = sys.argv[1:]
    config = S3Config(endpoint, region="us-east-1", static_credentials=Credentials("{key}", "{secret}"))
    up = CheckpointUploader(root, f"s3://{{bucket}}/run/", config=config, use_s5cmd=False)
    Path(root, "step_1.pt").write_bytes(b"x" * 100_000)
    up.submit(Path(root, "step_1.pt"))
    time.sleep(1.5)  # the PUT is under way, and never answered
    started = time.monotonic()
    try:
        up.close(timeout=1.0)
    except FlushTimeout:
        print(f"closed in {{time.monotonic() - started:.1f}} s", flush=True)
    """
)


def test_a_process_that_gave_up_on_a_hung_upload_exits_at_once(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # The uploader gave up after its timeout, but the process lived on for minutes: s3transfer's
    # request threads were not daemons, and the interpreter joined them at exit, each waiting
    # out a read timeout of 60 s on each of botocore's 5 attempts.
    bucket = moto_server.new_bucket()
    root = tmp_path / "ckpt"
    root.mkdir()
    plan = FaultPlan(rules=[Rule("stall", 100, method="PUT")], stall_seconds=600)
    script = CHILD.format(key=ACCESS_KEY, secret=SECRET_KEY)
    with FaultProxy(moto_server.endpoint_url, plan) as proxy:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", script, proxy.url, bucket, str(root)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "closed in" in done.stdout, done.stdout
    assert took < 30, (took, done.stdout)


def test_ctrl_c_on_a_boto3_upload_to_a_hung_endpoint_ends_it_at_once(tmp_path: Path) -> None:
    # Ctrl-C took about 55 s: s3transfer's exit cancels, then waits for each request under way.
    src = tmp_path / "a.pt"
    src.write_bytes(b"x" * 200_000)
    env = cli_env(tmp_path)
    with never_answering() as endpoint:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runctl", "--endpoint-url", endpoint, "s3", "upload",
             "--no-use-s5cmd", str(src), "s3://b-u-c/a.pt"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        time.sleep(3.0)  # started, and waiting on the endpoint
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        took = time.monotonic() - started
    assert proc.returncode == 130, err
    assert err.strip() == "runctl: error: interrupted"
    assert took < 5, took


@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_ctrl_c_on_a_multipart_upload_to_a_hung_endpoint_gives_up_its_clean_up(
    tmp_path: Path, backend: str
) -> None:
    # After Ctrl-C, the abort of the unfinished multipart upload asked the same endpoint, and
    # waited out a read timeout on each of botocore's attempts: 6 minutes before the exit.
    src = tmp_path / "big.bin"
    with open(src, "wb") as fh:
        fh.truncate(60 * 1024 * 1024)  # sparse: over the part size, no disk
    env = cli_env(tmp_path)
    flag = "--use-s5cmd" if backend == "s5cmd" else "--no-use-s5cmd"
    with never_answering() as endpoint:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runctl", "--endpoint-url", endpoint, "s3", "upload",
             flag, str(src), "s3://b-u-c/big.bin"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        time.sleep(3.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        took = time.monotonic() - started
    assert proc.returncode == 130, err
    # Nothing says parts are kept: the endpoint may never have begun an upload (boto3 pass).
    assert "could not look for unfinished multipart uploads" in err, err
    assert "S3 did not answer within 15 s; if one was begun" in err, err
    assert err.strip().endswith("runctl: error: interrupted"), err
    assert took < 25, took


def test_close_under_a_multipart_upload_leaves_no_parts_behind(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # s3transfer's own abort of the unfinished upload went with the batch's threads: a run that
    # gave up on its flush and ended left the upload and its parts in S3, billed (diff review).
    bucket = moto_server.new_bucket()
    src = tmp_path / "big.bin"
    with open(src, "wb") as fh:
        fh.truncate(60 * 1024 * 1024)  # over the part size: multipart
    plan = FaultPlan(rules=[Rule("stall", 1000, method="PUT")], stall_seconds=600)  # every part
    errors: list[BaseException] = []
    with FaultProxy(moto_server.endpoint_url, plan) as proxy:
        t = BotoTransfer(config_for(proxy.url))

        def upload() -> None:
            try:
                t.put_files([(src, S3URL(bucket, "big.bin"))])
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        worker = threading.Thread(target=upload, daemon=True)
        worker.start()
        client = moto_server.client()
        deadline = time.monotonic() + 30
        while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            assert time.monotonic() < deadline, "no multipart upload began"
            time.sleep(0.05)
        t.close()
        worker.join(20)
        assert not worker.is_alive()
    assert errors and isinstance(errors[0], TransferError), errors
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.parametrize("call", ["list", "stat", "get_bytes", "put_bytes", "delete_keys"])
def test_close_ends_a_plain_request_waiting_on_an_endpoint_that_never_answers(call: str) -> None:
    # Only s3transfer's batches were let go of: the uploader's worker sat in a retention listing
    # or a HEAD, close() waited 30 s for it, and a training error was held back 62 s, not the
    # 30 s the README says (boto3 and re-run passes).
    url = S3URL("b-u-c", "run/step_1.pt")
    errors: list[BaseException] = []
    with never_answering() as endpoint:
        t = BotoTransfer(config_for(endpoint))
        requests = {
            "list": lambda: list(t.iter_objects(S3URL("b-u-c", "run/"))),
            "stat": lambda: t.stat(url),
            "get_bytes": lambda: t.get_bytes(url),
            "put_bytes": lambda: t.put_bytes(b"x", url),
            "delete_keys": lambda: t.delete_keys("b-u-c", ["run/step_1.pt"]),
        }

        def request() -> None:
            try:
                requests[call]()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        worker = threading.Thread(target=request, daemon=True)
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive()
        started = time.monotonic()
        t.close()
        worker.join(5)
        assert not worker.is_alive() and time.monotonic() - started < 5
    assert errors and isinstance(errors[0], TransferError), errors
