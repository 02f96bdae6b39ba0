"""`runctl s3 watch` and PrefixWatcher: a baseline, one event per change, one per completed checkpoint."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from runctl.checkpoints import MARKER_NAME
from runctl.s3url import S3URL
from runctl.watch import (
    BaselineEvent,
    CheckpointEvent,
    ObjectEvent,
    PrefixWatcher,
    RetentionEvent,
    backoff_delay,
)
from tests.cli.cli_support import put_marker
from tests.servers import S3Server


def put(server: S3Server, url: S3URL, key: str, data: bytes = b"x") -> None:
    server.client().put_object(Bucket=url.bucket, Key=url.key + key, Body=data)


def kinds(events: list[Any]) -> list[tuple[str, str]]:
    return [(e.kind, e.url) for e in events]


def test_baseline_then_one_event_per_object_and_one_per_marker(s3_server: S3Server, bucket: S3URL, transfer: Any) -> None:
    prefix = bucket.join("ckpt/")
    base = str(prefix)
    put(s3_server, prefix, "train.log", b"log")
    put(s3_server, prefix, "step_1.pt", b"one")
    put(s3_server, prefix, "checkpoint-10/model.bin", b"0123")
    put_marker(s3_server, prefix, "checkpoint-10", {"model.bin": 4})
    put(s3_server, bucket, "ckpt-old/step_9.pt")  # a sibling prefix: never watched

    watcher = PrefixWatcher(transfer, prefix)
    (baseline,) = watcher.poll()
    assert isinstance(baseline, BaselineEvent)
    assert (baseline.objects, baseline.checkpoints, baseline.complete) == (4, 2, 2)
    assert baseline.latest == "checkpoint-10"
    assert "watching" in baseline.describe() and "4 objects, 2 checkpoints" in baseline.describe()
    assert watcher.poll() == []

    put(s3_server, prefix, "step_2.pt", b"two")
    put(s3_server, bucket, "ckpt-old/step_10.pt")
    events = watcher.poll()
    assert kinds(events) == [("new", base + "step_2.pt"), ("checkpoint_complete", base + "step_2.pt")]
    assert isinstance(events[1], CheckpointEvent) and events[1].step == 2 and events[1].size == 3

    put(s3_server, prefix, "checkpoint-20/model.bin", b"abcdef")
    put(s3_server, prefix, "checkpoint-20/optim.bin", b"xy")
    events = watcher.poll()
    assert kinds(events) == [
        ("new", base + "checkpoint-20/model.bin"),
        ("new", base + "checkpoint-20/optim.bin"),
    ]

    put_marker(s3_server, prefix, "checkpoint-20", {"model.bin": 6, "optim.bin": 2})
    events = watcher.poll()
    assert kinds(events) == [
        ("new", base + f"checkpoint-20/{MARKER_NAME}"),
        ("checkpoint_complete", base + "checkpoint-20/"),
    ]
    done = events[1]
    assert isinstance(done, CheckpointEvent)
    assert (done.name, done.step, done.is_dir, done.files, done.size) == ("checkpoint-20", 20, True, 2, 8)
    assert done.env()["RUNCTL_CHECKPOINT_URL"] == base + "checkpoint-20/"
    assert json.loads(json.dumps(done.to_json()))["type"] == "checkpoint_complete"
    assert watcher.poll() == []

    put(s3_server, prefix, "train.log", b"log, longer now")
    s3_server.client().delete_object(Bucket=bucket.bucket, Key=prefix.key + "step_1.pt")
    events = watcher.poll()
    assert kinds(events) == [("deleted", base + "step_1.pt"), ("changed", base + "train.log")]
    assert isinstance(events[1], ObjectEvent) and events[1].size == len(b"log, longer now")
    assert watcher.poll() == []
    assert set(watcher.state) == {
        prefix.key + k
        for k in ("train.log", "step_2.pt", "checkpoint-10/model.bin", f"checkpoint-10/{MARKER_NAME}",
                  "checkpoint-20/model.bin", "checkpoint-20/optim.bin", f"checkpoint-20/{MARKER_NAME}")
    }


def test_a_marker_that_does_not_match_its_files_is_not_a_completion(
    s3_server: S3Server, bucket: S3URL, transfer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = bucket.join("ckpt/")
    base = str(prefix)
    put(s3_server, prefix, "checkpoint-1/model.bin", b"abc")
    put_marker(s3_server, prefix, "checkpoint-1", {"model.bin": 3})
    put(s3_server, prefix, "checkpoint-2/model.bin", b"abcd")  # its marker says 3 bytes
    put_marker(s3_server, prefix, "checkpoint-2", {"model.bin": 3})

    watcher = PrefixWatcher(transfer, prefix)
    (baseline,) = watcher.poll()
    assert isinstance(baseline, BaselineEvent) and baseline.latest == "checkpoint-1"
    said = [r.getMessage() for r in caplog.records if "does not match its marker" in r.getMessage()]
    assert len(said) == 1 and "checkpoint-2" in said[0]

    caplog.clear()
    put(s3_server, prefix, "checkpoint-3/model.bin", b"abcd")
    put_marker(s3_server, prefix, "checkpoint-3", {"model.bin": 3, "optim.bin": 2})
    events = watcher.poll()
    assert [k for k, _ in kinds(events)] == ["new", "new"]  # no checkpoint_complete
    assert watcher.poll() == []  # unchanged: not read again
    said = [r.getMessage() for r in caplog.records if "does not match its marker" in r.getMessage()]
    assert len(said) == 1 and "checkpoint-3" in said[0]

    put(s3_server, prefix, "checkpoint-3/model.bin", b"abc")  # the files catch up with the marker
    put(s3_server, prefix, "checkpoint-3/optim.bin", b"xy")
    put(s3_server, prefix, "checkpoint-2/model.bin", b"abc")
    events = watcher.poll()
    assert [(k, u) for k, u in kinds(events) if k == "checkpoint_complete"] == [
        ("checkpoint_complete", base + "checkpoint-2/"),
        ("checkpoint_complete", base + "checkpoint-3/"),
    ]


def test_baseline_of_an_empty_prefix_and_unmarked_directory(moto_server: S3Server) -> None:
    from runctl.transfer.boto import BotoTransfer

    bucket = S3URL(moto_server.new_bucket())
    prefix = bucket.join("run")  # no trailing slash: watched as a prefix, not as "run*"
    transfer = BotoTransfer(moto_server.config())
    watcher = PrefixWatcher(transfer, prefix)
    (baseline,) = watcher.poll()
    assert (baseline.objects, baseline.checkpoints, baseline.latest) == (0, 0, None)
    put(moto_server, bucket, "run-other/step_1.pt")
    put(moto_server, bucket, "run/global_step5/shard.pt")
    events = watcher.poll()
    # no marker: a new object, but not a completed checkpoint
    assert kinds(events) == [("new", f"s3://{bucket.bucket}/run/global_step5/shard.pt")]

    lenient = PrefixWatcher(transfer, prefix, treat_unmarked_complete=True)
    lenient.poll()
    put(moto_server, bucket, "run/global_step6/shard.pt")
    events = lenient.poll()
    assert [e.kind for e in events] == ["new", "checkpoint_complete"]
    assert lenient.poll() == []


def test_events_survive_transient_errors_and_stop_on_timeout(
    moto_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="runctl")
    from runctl.exceptions import EndpointError
    from runctl.transfer.boto import BotoTransfer

    bucket = S3URL(moto_server.new_bucket())
    real = BotoTransfer(moto_server.config())

    class Flaky:
        """Fails the 2nd and 3rd listings, like a network blip."""

        name = "flaky"
        config = real.config
        calls = 0

        def iter_objects(self, url: S3URL, *, recursive: bool = True) -> Iterator[Any]:
            Flaky.calls += 1
            if Flaky.calls in (2, 3):
                raise EndpointError("connection reset by peer")
            return real.iter_objects(url, recursive=recursive)

    watcher = PrefixWatcher(Flaky(), bucket)  # type: ignore[arg-type]
    put(moto_server, bucket, "step_1.pt")
    seen: list[Any] = []
    started = time.monotonic()
    for event in watcher.events(interval=0.05, timeout=3.0, max_backoff=0.2):
        seen.append(event)
        if event.kind == "poll_error" and Flaky.calls == 3:
            put(moto_server, bucket, "step_2.pt")
        if event.kind == "checkpoint_complete":
            watcher.stop()
    assert time.monotonic() - started < 3.0
    assert [e.kind for e in seen] == ["baseline", "poll_error", "poll_error", "new", "checkpoint_complete"]
    assert "connection reset" in seen[1].message and seen[2].attempt == 2
    # the events are the report: a caller printing them prints each retry once, not once more from a log
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "retrying" in r.getMessage()]

    # a timeout ends the loop even when nothing happens
    started = time.monotonic()
    assert [e.kind for e in PrefixWatcher(real, bucket).events(interval=0.1, timeout=0.5)] == ["baseline"]
    assert 0.4 < time.monotonic() - started < 2.5


def test_a_listing_without_an_etag_is_no_change(moto_server: S3Server) -> None:
    # rclone leaves an ETag out of a listing now and then (its hash not yet computed): a long
    # `watch` reported "changed" for files and markers that had not changed (soak pass), and an
    # --exec user following "changed" got false ones. A real change still shows.
    import dataclasses

    from runctl.transfer.boto import BotoTransfer

    bucket = S3URL(moto_server.new_bucket())
    real = BotoTransfer(moto_server.config())

    class Forgetful:
        name = "forgetful"
        config = real.config
        drop = False

        def iter_objects(self, url: S3URL, *, recursive: bool = True) -> Iterator[Any]:
            for item in real.iter_objects(url, recursive=recursive):
                yield dataclasses.replace(item, etag=None) if Forgetful.drop else item

        def unlisted(self, prefix: S3URL, rels: Any) -> dict[str, Any]:
            return real.unlisted(prefix, rels)

    put(moto_server, bucket, "step_1.pt", b"one")
    watcher = PrefixWatcher(Forgetful(), bucket)  # type: ignore[arg-type]
    assert [e.kind for e in watcher.poll()] == ["baseline"]
    Forgetful.drop = True
    assert watcher.poll() == []
    put(moto_server, bucket, "step_1.pt", b"ONE!")  # rewritten, another size
    assert [e.kind for e in watcher.poll()] == ["changed", "checkpoint_complete"]
    # Rewritten at the same size, listed without an ETag: its time tells (it was never seen).
    time.sleep(1.05)
    put(moto_server, bucket, "step_1.pt", b"one!")
    assert [e.kind for e in watcher.poll()] == ["changed", "checkpoint_complete"]
    assert watcher.poll() == []
    # New, listed first without its ETag (the likeliest case: just written), then with it:
    # one completion, and no "changed" (its --exec ran twice; diff review).
    put(moto_server, bucket, "step_2.pt", b"two")
    assert [e.kind for e in watcher.poll()] == ["new", "checkpoint_complete"]
    Forgetful.drop = False
    assert watcher.poll() == []


def test_backoff_is_bounded() -> None:
    assert all(0 < backoff_delay(n, 1.0, cap=30.0) <= 30.0 for n in range(1, 50))
    assert backoff_delay(3, 1.0) >= 2.0


def test_first_listing_error_is_raised(moto_server: S3Server) -> None:
    from runctl.exceptions import NoSuchBucketError, UsageError
    from runctl.transfer.boto import BotoTransfer

    watcher = PrefixWatcher(BotoTransfer(moto_server.config()), S3URL("no-such-bucket-here"))
    with pytest.raises(NoSuchBucketError):
        list(watcher.events(interval=0.1, timeout=1))
    with pytest.raises(UsageError, match="interval"):
        list(watcher.events(interval=0))
    with pytest.raises(UsageError, match="keep_last_n"):
        PrefixWatcher(BotoTransfer(moto_server.config()), S3URL("b-b"), keep_last_n=0)


def test_keep_last_n_applies_retention_when_a_checkpoint_completes(moto_server: S3Server) -> None:
    from runctl.transfer.boto import BotoTransfer

    bucket = S3URL(moto_server.new_bucket())
    prefix = bucket.join("ckpt/")
    for step in (1, 2, 3):
        put(moto_server, prefix, f"step_{step}.pt", b"w" * step)
    put(moto_server, prefix, "train.log")
    watcher = PrefixWatcher(BotoTransfer(moto_server.config()), prefix, keep_last_n=2)
    watcher.poll()
    # the baseline alone never deletes anything
    assert len(watcher.state) == 4

    put(moto_server, prefix, "checkpoint-4/model.bin", b"abcd")
    assert [e.kind for e in watcher.poll()] == ["new"]  # incomplete: no retention yet
    put_marker(moto_server, prefix, "checkpoint-4", {"model.bin": 4})
    events = watcher.poll()
    assert [e.kind for e in events] == ["new", "checkpoint_complete", "retention"]
    retention = events[-1]
    assert isinstance(retention, RetentionEvent)
    # checkpoint-4 landed in this very poll: its step may not be whole yet (a partner file on
    # its way), so it does not count until the next poll; steps 3 and 2 are the newest whole.
    assert retention.deleted == ("step_1.pt",)
    events = watcher.poll()
    assert kinds(events)[:1] == [("deleted", str(prefix) + "step_1.pt")]
    assert isinstance(events[-1], RetentionEvent) and events[-1].deleted == ("step_2.pt",)
    left = {o["Key"] for o in moto_server.client().list_objects_v2(Bucket=bucket.bucket)["Contents"]}
    assert left == {prefix.key + k for k in ("step_3.pt", "train.log", "checkpoint-4/model.bin", f"checkpoint-4/{MARKER_NAME}")}
    # the deletions show up as events on the next poll, and trigger nothing more
    assert kinds(watcher.poll()) == [("deleted", str(prefix) + "step_2.pt")]
    assert watcher.poll() == []
    # A log that keeps changing is not a checkpoint on its way: no retention run per poll.
    for i in range(3):
        put(moto_server, prefix, "train.log", b"line\n" * (i + 2))
        assert kinds(watcher.poll()) == [("changed", str(prefix) + "train.log")]


def monitor_app() -> typer.Typer:
    """The real `runctl` app (its s3 group has our watch and review registered)."""
    from runctl.cli.app import app

    return app


@pytest.fixture
def server_env(moto_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    return moto_server


def after_the_baseline(monkeypatch: pytest.MonkeyPatch, act: Callable[[], None]) -> None:
    """Run ``act`` (objects landing) right after the watcher's baseline poll."""
    original = PrefixWatcher.poll

    def poll_then_act(self: PrefixWatcher, **kwargs: Any) -> list[Any]:
        events = original(self, **kwargs)
        if events and events[0].kind == "baseline":
            act()
        return events

    monkeypatch.setattr(PrefixWatcher, "poll", poll_then_act)


def test_cli_watch_once_prints_only_a_baseline(server_env: S3Server) -> None:
    bucket = S3URL(server_env.new_bucket())
    for key in ("run/step_1.pt", "run/step_2.pt", "run/notes.txt"):
        put(server_env, bucket, key)
    result = CliRunner().invoke(monitor_app(), ["s3", "watch", str(bucket.join("run/")), "--once", "--json", "--no-use-s5cmd"])
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.strip().splitlines()
    assert json.loads(line) | {"time": 0} == {
        "type": "baseline", "url": str(bucket.join("run/")), "objects": 3, "checkpoints": 2, "complete": 2,
        "latest": "step_2.pt", "time": 0,
    }
    result = CliRunner().invoke(monitor_app(), ["s3", "watch", str(bucket.join("run/")), "--once", "--no-use-s5cmd"])
    assert result.exit_code == 0 and "watching" in result.stdout and "3 objects, 2 checkpoints" in result.stdout
    # the global --json works too
    result = CliRunner().invoke(monitor_app(), ["--json", "s3", "watch", str(bucket.join("run/")), "--once", "--no-use-s5cmd"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["type"] == "baseline"


def test_cli_watch_exec_and_keep_last_n(
    server_env: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bucket = S3URL(server_env.new_bucket())
    prefix = bucket.join("run/")
    put(server_env, prefix, "step_1.pt")
    put(server_env, prefix, "train.log")

    def land_two_checkpoints() -> None:
        """Right after the baseline, so the next poll must report them."""
        put(server_env, prefix, "step_2.pt", b"22")
        put(server_env, prefix, "checkpoint-3/model.bin", b"333")
        put_marker(server_env, prefix, "checkpoint-3", {"model.bin": 3})

    after_the_baseline(monkeypatch, land_two_checkpoints)
    seen = tmp_path / "seen.txt"
    hook = f"{sys.executable} -c \"import os,sys; open(sys.argv[1], 'a').write(os.environ['RUNCTL_CHECKPOINT_URL'] + ' ' + os.environ['RUNCTL_CHECKPOINT_STEP'] + chr(10))\" {seen}"
    result = CliRunner().invoke(
        monitor_app(),
        ["s3", "watch", str(prefix), "--interval", "0.1", "--timeout", "6", "--exec", hook,
         "--keep-last-n", "1", "--json", "--no-use-s5cmd"],
    )
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.strip().splitlines()]
    done = [e for e in events if e["type"] == "checkpoint_complete"]
    assert [e["url"] for e in done] == [str(prefix) + "step_2.pt", str(prefix) + "checkpoint-3/"]
    assert seen.read_text().splitlines() == [f"{prefix}step_2.pt 2", f"{prefix}checkpoint-3/ 3"]
    # The poll that saw them land counts neither as whole yet; the next one does.
    retentions = [e for e in events if e["type"] == "retention"]
    assert [r["deleted"] for r in retentions] == [[], ["step_1.pt", "step_2.pt"]]
    left = {o["Key"] for o in server_env.client().list_objects_v2(Bucket=bucket.bucket)["Contents"]}
    assert left == {"run/train.log", "run/checkpoint-3/model.bin", f"run/checkpoint-3/{MARKER_NAME}"}
    # retention's own deletions are reported once, as deletions, and complete nothing
    assert sorted(e["url"] for e in events if e["type"] == "deleted") == [f"{prefix}step_1.pt", f"{prefix}step_2.pt"]
    assert [e["type"] for e in events].count("checkpoint_complete") == 2


def test_cli_watch_reports_a_failing_exec_once(server_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = S3URL(server_env.new_bucket()).join("run/")
    after_the_baseline(monkeypatch, lambda: put(server_env, prefix, "step_2.pt", b"22"))
    result = CliRunner().invoke(
        monitor_app(),
        ["s3", "watch", str(prefix), "--interval", "0.1", "--timeout", "3", "--no-use-s5cmd",
         "--exec", f"{sys.executable} -c 'raise SystemExit(5)'"],
    )
    assert result.exit_code == 0, result.output
    assert "checkpoint complete" in result.stdout
    assert result.stderr.count("exited with") == 1 and "exited with code 5" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["s3://bucket-x/run/", "--exec", "'unclosed"], "--exec"),
        # checked before watching, not at the first checkpoint hours later
        (["s3://bucket-x/run/", "--exec", "no-such-command-xyz --flag"], "--exec cannot run 'no-such-command-xyz'"),
        (["s3://bucket-x/run/", "--exec", "./no/such/script.sh"], "--exec cannot run './no/such/script.sh'"),
        (["s3://bucket-x/run/", "--keep-last-n", "0"], "--keep-last-n"),
        (["s3:/bucket-x"], "must start with s3://"),
    ],
)
def test_cli_watch_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(monitor_app(), ["s3", "watch", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("stop", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_watch_subprocess_events_then_ctrl_c(
    moto_server: S3Server, tmp_path: Path, stop: signal.Signals, code: int, word: str
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    prefix = bucket.join("run/")
    put(moto_server, prefix, "step_1.pt")
    env = {**os.environ, **moto_server.env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "s3", "watch", str(prefix), "--interval", "0.2", "--timeout", "60", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[dict[str, Any]] = []
    timer = threading.Timer(30, proc.kill)  # never hang the suite
    timer.start()
    try:
        assert proc.stdout is not None
        lines.append(json.loads(proc.stdout.readline()))
        assert lines[0]["type"] == "baseline" and lines[0]["objects"] == 1
        put(moto_server, prefix, "checkpoint-2/model.bin", b"ab")
        put_marker(moto_server, prefix, "checkpoint-2", {"model.bin": 2})
        while len(lines) < 4:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            lines.append(json.loads(line))
        proc.send_signal(stop)
        rest, err = proc.communicate(timeout=20)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    assert [e["type"] for e in lines] == ["baseline", "new", "new", "checkpoint_complete"]
    assert lines[3]["url"] == str(prefix) + "checkpoint-2/"
    assert proc.returncode == code
    # As every other command: "runctl: error: ...", and a record with --json (CLI pass).
    assert err.strip().splitlines()[-1].startswith(f"runctl: error: {word}") and "Traceback" not in err
    assert json.loads(rest.strip().splitlines()[-1]) == {
        "type": "error", "message": f"{word}: stopped watching {prefix}", "exit_code": code
    }


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_reaches_a_running_exec_hook_before_runctl_exits(
    moto_server: S3Server, tmp_path: Path, stop: signal.Signals, code: int
) -> None:
    # The hook (an evaluation, say) gets the signal too and may clean up; it is not SIGKILLed
    # a quarter of a second later with its own children left running. (runctl runs in a
    # session of its own: no terminal has delivered a Ctrl-C to the hook already.)
    bucket = S3URL(moto_server.new_bucket())
    prefix = bucket.join("run/")
    hook = tmp_path / "hook.sh"
    hook.write_text(
        "#!/bin/sh\n"
        "sleep 30 & pid=$!\n"
        "trap 'kill $pid; echo cleaned-up > \"$0.done\"; exit 3' TERM INT\n"
        "echo started > \"$0.started\"\n"
        "wait\n"
    )
    hook.chmod(0o755)
    env = {**os.environ, **moto_server.env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "s3", "watch", str(prefix), "--interval", "0.2",
         "--timeout", "60", "--exec", str(hook), "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        # After the baseline: on a loaded host runctl once listed the checkpoint in it, and no
        # completion (so no hook) followed.
        assert proc.stdout is not None and json.loads(proc.stdout.readline())["type"] == "baseline"
        put(moto_server, prefix, "checkpoint-2/model.bin", b"ab")
        put_marker(moto_server, prefix, "checkpoint-2", {"model.bin": 2})
        started = tmp_path / "hook.sh.started"
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the hook never ran"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert (tmp_path / "hook.sh.done").read_text().strip() == "cleaned-up"
    assert time.monotonic() - sent < 5  # not the 10 s a hook that never heard gets


def test_an_exec_hooks_output_stays_out_of_the_json_records(moto_server: S3Server) -> None:
    """`watch --json --exec` let the hook write to stdout between the records: a reader of them
    met a line that is not JSON (retention pass). Its output goes to stderr, as `local --json`'s."""
    prefix = S3URL(moto_server.new_bucket()).join("run/")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "s3", "watch", str(prefix), "--interval", "0.2", "--timeout", "8",
         "--exec", f"{sys.executable} -c \"print('hook says hi'); raise SystemExit(3)\"", "--json",
         "--no-use-s5cmd"],
        env={**os.environ, **moto_server.env()}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and json.loads(proc.stdout.readline())["type"] == "baseline"
        put(moto_server, prefix, "step_2.pt", b"22")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]  # every line a record
    assert [r["type"] for r in records].count("checkpoint_complete") == 1
    assert "hook says hi" in err
    # A hook that failed is a record too (a warning on stderr was its only trace; surface pass).
    (failed,) = [r for r in records if r["type"] == "exec_failed"]
    assert failed["exit_code"] == 3 and failed["url"] == f"{prefix}step_2.pt"


def _keys(server: S3Server, bucket: S3URL) -> set[str]:
    return {o["Key"] for o in server.client().list_objects_v2(Bucket=bucket.bucket).get("Contents", [])}


def _watching(server: S3Server, *names: str, **options: Any) -> tuple[S3URL, S3URL, PrefixWatcher]:
    """A new bucket's ``run/`` holding ``names``, and a keep-last-1 watcher of it (boto3)."""
    from runctl.transfer.boto import BotoTransfer

    bucket = S3URL(server.new_bucket())
    prefix = bucket.join("run/")
    for name in names:
        put(server, prefix, name)
    return bucket, prefix, PrefixWatcher(BotoTransfer(server.config()), prefix, **{"keep_last_n": 1, **options})


def test_a_hook_gets_its_checkpoint_before_retention_may_delete_it(moto_server: S3Server) -> None:
    # Two checkpoints landing in one interval with keep-last-1: retention ran inside the poll,
    # and step_2.pt was reported complete (and --exec ran on it) after it had been deleted.
    bucket, prefix, watcher = _watching(moto_server, "step_1.pt")
    events = watcher.events(interval=0.05, timeout=20)
    assert isinstance(next(events), BaselineEvent)
    put(moto_server, prefix, "step_2.pt")
    put(moto_server, prefix, "step_3.pt")
    handed: list[str] = []
    for event in events:
        if isinstance(event, CheckpointEvent):
            assert prefix.key + event.name in _keys(moto_server, bucket), f"{event.name} was gone when handed over"
            handed.append(event.name)
        if isinstance(event, RetentionEvent) and event.deleted:
            break
    assert handed == ["step_2.pt", "step_3.pt"]
    assert _keys(moto_server, bucket) == {"run/step_3.pt"}


def test_a_step_whose_large_file_is_still_landing_does_not_count_as_whole(moto_server: S3Server) -> None:
    # A GAN-like pair beside a live uploader: model_step_2 landed while optim_step_2 was still a
    # multipart upload, and keep-last-1 deleted the step 1 pair: S3 held no whole step.
    client = moto_server.client()
    # moto dates every multipart upload in 2010: "abandoned" only after a century here.
    century = 100 * 365 * 86400.0
    bucket, prefix, watcher = _watching(moto_server, "model_step_1.pt", "optim_step_1.pt", abandoned_after=century)
    watcher.poll()
    upload = client.create_multipart_upload(Bucket=bucket.bucket, Key="run/optim_step_2.pt")
    put(moto_server, prefix, "model_step_2.pt")
    for _ in range(3):  # the poll that saw it land, then polls with the large file still landing
        retention = [e for e in watcher.poll() if isinstance(e, RetentionEvent)]
        assert all(not r.deleted for r in retention)
        assert {"run/model_step_1.pt", "run/optim_step_1.pt"} <= _keys(moto_server, bucket)
    etag = client.upload_part(
        Bucket=bucket.bucket, Key="run/optim_step_2.pt", UploadId=upload["UploadId"], PartNumber=1, Body=b"o"
    )["ETag"]
    client.complete_multipart_upload(
        Bucket=bucket.bucket, Key="run/optim_step_2.pt", UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]},
    )
    watcher.poll()  # it lands: not whole until the next poll
    assert {"run/model_step_1.pt", "run/optim_step_1.pt"} <= _keys(moto_server, bucket)
    (retention,) = [e for e in watcher.poll() if isinstance(e, RetentionEvent)]
    assert sorted(retention.deleted) == ["model_step_1.pt", "optim_step_1.pt"]
    assert _keys(moto_server, bucket) == {"run/model_step_2.pt", "run/optim_step_2.pt"}


def test_a_retention_lock_held_elsewhere_does_not_stop_the_watch(
    moto_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    # A stopped `s3 cleanup` holding the prefix's lock left `watch --keep-last-n` waiting up to
    # 600 s inside one poll: no event, no --exec, and the checkpoints of that spell never reported.
    from runctl.locking import s3_prefix_lock

    bucket, prefix, watcher = _watching(moto_server, "step_1.pt", retention_lock_timeout=0.2)
    watcher.poll()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with s3_prefix_lock(prefix, moto_server.endpoint_url, timeout=5):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        for step in (2, 3, 4):
            put(moto_server, prefix, f"step_{step}.pt")
            started = time.monotonic()
            events = watcher.poll()
            assert time.monotonic() - started < 5
            assert ("checkpoint_complete", f"{prefix}step_{step}.pt") in kinds(events)
            assert not [e for e in events if e.kind == "poll_error"]  # nothing failed
        said = [r for r in caplog.records if "retention waits" in r.getMessage()]
        assert len(said) == 1 and said[0].levelname == "WARNING"  # once per spell
    finally:
        release.set()
        holder.join()
    watcher.poll()  # step_4 landed in the poll before: it is whole now
    watcher.poll()
    assert _keys(moto_server, bucket) == {"run/step_4.pt"}


def test_cli_watch_once_with_keep_last_n_is_refused(server_env: S3Server) -> None:
    # It applied nothing and said nothing: retention runs after a completion, --once sees none.
    bucket = S3URL(server_env.new_bucket())
    for step in (1, 2):
        put(server_env, bucket, f"run/step_{step}.pt")
    result = CliRunner().invoke(
        monitor_app(), ["s3", "watch", str(bucket.join("run/")), "--once", "--keep-last-n", "1", "--no-use-s5cmd"]
    )
    assert result.exit_code == 2, result.output
    assert "runctl s3 cleanup" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _keys(server_env, bucket) == {"run/step_1.pt", "run/step_2.pt"}


def test_a_file_landing_while_a_hook_runs_never_leaves_s3_without_a_whole_step(moto_server: S3Server) -> None:
    # Retention ran after the hooks with its own, later listing: net_g_5000 landing during the
    # hook (net_d_5000 still queued) counted as a whole step, and both older pairs went.
    bucket, prefix, watcher = _watching(moto_server, "net_g_3000.pth", "net_d_3000.pth")
    events = watcher.events(interval=0.05, timeout=20)
    assert isinstance(next(events), BaselineEvent)
    for part in ("g", "d"):
        put(moto_server, prefix, f"net_{part}_4000.pth")
    deleted: list[str] = []
    for event in events:
        if isinstance(event, CheckpointEvent) and event.name == "net_d_4000.pth":
            put(moto_server, prefix, "net_g_5000.pth")  # lands while the hook runs
        if isinstance(event, RetentionEvent):
            deleted += event.deleted
            if deleted:
                break
        steps = {key.rsplit("_", 1)[1] for key in _keys(moto_server, bucket)}
        pairs = [s for s in steps if {f"run/net_g_{s}", f"run/net_d_{s}"} <= _keys(moto_server, bucket)]
        assert pairs, f"no whole step left in S3: {sorted(_keys(moto_server, bucket))}"
    assert sorted(deleted) == ["net_d_3000.pth", "net_g_3000.pth"]
    assert _keys(moto_server, bucket) == {"run/net_g_4000.pth", "run/net_d_4000.pth", "run/net_g_5000.pth"}


def test_a_newest_step_without_its_partner_never_counts_as_whole(moto_server: S3Server) -> None:
    # model_step_2.pt landed, optim_step_2.pt still queued in the writer (nothing S3 shows):
    # one poll later keep-last-1 deleted the step 1 pair, and S3 held no whole step.
    bucket, prefix, watcher = _watching(moto_server, "model_step_1.pt", "optim_step_1.pt")
    watcher.poll()
    put(moto_server, prefix, "model_step_2.pt")
    for _ in range(4):
        watcher.poll()
        assert _keys(moto_server, bucket) == {"run/model_step_1.pt", "run/optim_step_1.pt", "run/model_step_2.pt"}
    put(moto_server, prefix, "optim_step_2.pt")
    watcher.poll()
    watcher.poll()
    assert _keys(moto_server, bucket) == {"run/model_step_2.pt", "run/optim_step_2.pt"}


def test_cli_watch_goes_on_when_the_exec_program_is_gone(
    server_env: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The hook script was deleted after watch started (a redeploy): the next checkpoint ended
    # the watch with exit code 2, "--exec cannot run './evalhook.sh'", and retention with it.
    prefix = S3URL(server_env.new_bucket()).join("run/")
    hook, seen = tmp_path / "evalhook.sh", tmp_path / "seen.txt"
    script = f'#!/bin/sh\necho "$RUNCTL_CHECKPOINT_NAME" >> {seen}\n'
    hook.write_text(script)
    hook.chmod(0o755)
    original = PrefixWatcher.poll
    polls = 0

    def poll_then_write(self: PrefixWatcher, **kwargs: Any) -> list[Any]:
        nonlocal polls
        polls += 1
        if polls == 3:  # after step_2's hook failed: the script is back, and step_3 lands
            hook.write_text(script)
            hook.chmod(0o755)
            put(server_env, prefix, "step_3.pt", b"33")
        events = original(self, **kwargs)
        if polls == 1:
            hook.unlink()
            put(server_env, prefix, "step_2.pt", b"22")
        return events

    monkeypatch.setattr(PrefixWatcher, "poll", poll_then_write)
    result = CliRunner().invoke(
        monitor_app(),
        ["s3", "watch", str(prefix), "--interval", "0.1", "--timeout", "3", "--exec", str(hook), "--json",
         "--no-use-s5cmd"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["url"] for r in records if r["type"] == "checkpoint_complete"] == [f"{prefix}step_2.pt", f"{prefix}step_3.pt"]
    # The same record a hook exiting non-zero gives; the code a shell gives for "not found".
    assert [r for r in records if r["type"] == "exec_failed"] == [
        {"type": "exec_failed", "command": str(hook), "exit_code": 127, "url": f"{prefix}step_2.pt"}
    ]
    assert "No such file or directory" in result.stderr and "watching goes on" in result.stderr
    assert seen.read_text().splitlines() == ["step_3.pt"]


@pytest.mark.parametrize(
    ("option", "value"),
    [("--interval", "nan"), ("--interval", "inf"), ("--interval", "1e10"), ("--interval", "86401"),
     ("--timeout", "nan"), ("--timeout", "inf")],
)  # fmt: skip
def test_cli_watch_refuses_intervals_and_timeouts_no_wait_can_take(server_env: S3Server, option: str, value: str) -> None:
    # --interval nan got past min=0.1 and polled back to back; inf and 1e10 ended in "internal
    # error: OverflowError" (Event.wait over threading.TIMEOUT_MAX); --timeout nan never came.
    prefix = S3URL(server_env.new_bucket()).join("run/")
    result = CliRunner().invoke(monitor_app(), ["s3", "watch", str(prefix), "--once", option, value, "--no-use-s5cmd"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"runctl: error: {option} must be") and len(result.stderr.strip().splitlines()) == 1

    from runctl.exceptions import UsageError
    from runctl.transfer.boto import BotoTransfer

    watcher = PrefixWatcher(BotoTransfer(server_env.config()), prefix)
    number = float(value)
    kwargs = {"interval": number} if option == "--interval" else {"interval": 0.1, "timeout": number}
    with pytest.raises(UsageError, match=option.lstrip("-")):
        list(watcher.events(once=True, **kwargs))
    assert not watcher.has_baseline


def test_backoff_after_days_of_failures_is_still_capped() -> None:
    # 2 ** attempt stopped fitting a float after ~1000 failed polls: OverflowError ended the watch.
    assert 150.0 <= backoff_delay(5000, 1.0) <= 300.0


def test_cli_watch_timeout_stops_a_running_hook(
    server_env: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # --timeout was checked only between polls: with --timeout 5 a 25 s hook kept watch running
    # 28 s. The hook is stopped as SIGTERM to runctl stops it, and may clean up.
    prefix = S3URL(server_env.new_bucket()).join("run/")
    hook = tmp_path / "hook.sh"
    hook.write_text(
        "#!/bin/sh\n"
        "sleep 20 & pid=$!\n"
        "trap 'kill $pid; echo cleaned-up > \"$0.done\"; exit 3' TERM\n"
        "wait\n"
    )
    hook.chmod(0o755)
    after_the_baseline(monkeypatch, lambda: put(server_env, prefix, "step_2.pt", b"22"))
    started = time.monotonic()
    result = CliRunner().invoke(
        monitor_app(),
        ["s3", "watch", str(prefix), "--interval", "0.1", "--timeout", "2", "--exec", str(hook), "--json",
         "--no-use-s5cmd"],
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert took < 8, f"watch --timeout 2 ran {took:.1f}s"
    assert (tmp_path / "hook.sh.done").read_text().strip() == "cleaned-up"
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r for r in records if r["type"] == "exec_failed"] == [
        {"type": "exec_failed", "command": str(hook), "exit_code": 3, "url": f"{prefix}step_2.pt"}
    ]
    assert "stopped at --timeout" in result.stderr


def test_cli_watch_timeout_stops_what_the_hook_started_too(
    server_env: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An eval.sh that ran python: the script was stopped at --timeout, python went on and
    # wrote its result after watch had ended (verification pass).
    prefix = S3URL(server_env.new_bucket()).join("run/")
    late = tmp_path / "late.txt"
    hook = tmp_path / "eval.sh"
    hook.write_text(
        "#!/bin/sh\n"
        f"{sys.executable} -c 'import time; time.sleep(4); open(\"{late}\", \"w\").write(\"late\")'\n"
    )
    hook.chmod(0o755)
    after_the_baseline(monkeypatch, lambda: put(server_env, prefix, "step_2.pt", b"22"))
    result = CliRunner().invoke(
        monitor_app(),
        ["s3", "watch", str(prefix), "--interval", "0.1", "--timeout", "1.5", "--exec", str(hook), "--json",
         "--no-use-s5cmd"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    time.sleep(5)  # past the python's own time
    assert not late.exists()


def test_watch_help_says_hooks_hold_up_polling() -> None:
    # A slow hook held up polling, and a checkpoint created and deleted meanwhile (the writer's
    # keep-last-N) was never reported: a user of --exec believed every checkpoint was evaluated.
    from runctl.cli.monitor import WATCH_HELP

    assert "Hooks run one at a time and polling waits for them" in " ".join(WATCH_HELP.split())
