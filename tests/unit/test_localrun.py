"""The pieces of `runctl local`: command building, script environment, the finished-checkpoint watcher, run records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runctl.exceptions import UsageError
from runctl.journal import Journal
from runctl.localrun import (
    CheckpointWatcher,
    RunRecord,
    UploadRecord,
    being_written,
    build_command,
    open_for_writing,
    process_tree,
    run_local,
    script_env,
    write_run_record,
)
from runctl.s3url import S3URL

linux_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fdinfo"), reason="needs Linux /proc")


#: The smallest whole safetensors file: an 8-byte length, then an empty header.
SAFETENSORS = (2).to_bytes(8, "little") + b"{}"


def torch_zip(path: Path, *, failed: bool = False) -> None:
    """A file laid out as torch.save writes it; ``failed``: as a save that raised half-way."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        if not failed:
            archive.writestr(f"{path.stem}/data.pkl", b"pickle")
        archive.writestr(f"{path.stem}/version", b"3")
        archive.writestr(f"{path.stem}/byteorder", b"little")


def test_build_command(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    assert build_command(str(script), ["--lr", "1"]) == [sys.executable, str(script), "--lr", "1"]
    tool = tmp_path / "run.sh"
    tool.write_text("#!/bin/sh\n")
    with pytest.raises(UsageError, match="not executable"):
        build_command(str(tool))
    tool.chmod(0o755)
    assert build_command(str(tool), ["a"]) == [str(tool), "a"]
    assert build_command("sh")[0].endswith("/sh")


def test_a_script_in_the_current_directory_runs_from_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not looked up on PATH: exec of a bare "run.sh" would be, and fail (or run another one).
    tool = tmp_path / "run.sh"
    tool.write_text("#!/bin/sh\necho ran here\n")
    tool.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    for given in ("./run.sh", "run.sh"):
        command = build_command(given)
        assert command == ["./run.sh"]
        assert subprocess.run(command, capture_output=True, text=True).stdout == "ran here\n"
    with pytest.raises(UsageError, match="does not exist"):
        build_command(str(tmp_path / "missing.py"))
    with pytest.raises(UsageError, match="neither a file nor a command"):
        build_command("no-such-command-runctl-xyz")


def test_script_env_sets_only_what_is_given() -> None:
    env = script_env(
        {"PATH": "/bin"},
        checkpoint_dir=Path("/tmp/ck"),
        s3_url=S3URL.parse("s3://bkt/run"),
        keep_last_n=4,
        endpoint_url="http://127.0.0.1:9",
        watching=True,
    )
    assert env == {
        "PATH": "/bin",
        "RUNCTL_CHECKPOINT_DIR": "/tmp/ck",
        "RUNCTL_S3_URL": "s3://bkt/run/",
        "RUNCTL_KEEP_LAST_N": "4",
        "RUNCTL_ENDPOINT_URL": "http://127.0.0.1:9",
        "RUNCTL_LOCAL_WATCHING": "1",
    }
    assert script_env({"X": "1"}) == {"X": "1"}
    # runctl --profile/--region local: the script's own uploads use them too (they signed with
    # the default credentials and region, the config pass saw).
    # An inherited AWS_DEFAULT_PROFILE, which botocore reads first, had the script sign as
    # another identity than runctl's own (config pass). A key pair stays: a profile may assume
    # its role from it (credential_source = Environment; dropped, the script failed; diff review).
    inherited = {"AWS_PROFILE": "old", "AWS_DEFAULT_PROFILE": "old", "AWS_ACCESS_KEY_ID": "AK",
                 "AWS_SECRET_ACCESS_KEY": "SK"}  # fmt: skip
    assert script_env(inherited, profile="p", region="eu-west-1") == {
        "AWS_PROFILE": "p",
        "AWS_DEFAULT_PROFILE": "p",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }


class Collector:
    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, path: Path) -> None:
        self.names.append(path.name)


def test_a_file_is_handed_over_once_after_it_settles(tmp_path: Path) -> None:
    got = Collector()
    watcher = CheckpointWatcher(tmp_path, got, settle=0.3)
    path = tmp_path / "step_1.pt"
    path.write_bytes(b"a")
    (tmp_path / "train.log").write_text("not a checkpoint")
    (tmp_path / "step_2.pt.tmp").write_bytes(b"temp")
    assert watcher.poll() == []  # first sight
    path.write_bytes(b"ab")  # still growing
    time.sleep(0.35)
    assert watcher.poll() == []  # changed since the last look: the settle clock restarted
    time.sleep(0.35)
    watcher.poll()
    assert got.names == ["step_1.pt"]
    time.sleep(0.05)
    watcher.poll()
    assert got.names == ["step_1.pt"]  # once per version
    # a rewrite (last.ckpt-style) is a new version, handed over again once settled
    time.sleep(0.01)
    path.write_bytes(b"abc")
    watcher.poll()
    time.sleep(0.35)
    watcher.poll()
    assert got.names == ["step_1.pt", "step_1.pt"]


@linux_proc
def test_a_file_open_for_writing_is_not_finished(tmp_path: Path) -> None:
    got = Collector()
    watcher = CheckpointWatcher(
        tmp_path, got, settle=0.0, interval=0.1, pids=lambda: process_tree(os.getpid())
    )
    path = tmp_path / "step_5.pt"
    with open(path, "wb") as fh:
        fh.write(b"partial")
        fh.flush()
        assert str(path.resolve()) in (open_for_writing([os.getpid()]) or set())
        for _ in range(3):
            watcher.poll()
        assert got.names == []
    # Closed without a change: by its writer, or by the writer's death? One interval more, in
    # which a dead script would be seen and the final scan would leave the file out.
    watcher.poll()
    assert got.names == []
    time.sleep(0.15)
    watcher.poll()
    assert got.names == ["step_5.pt"]


@linux_proc
def test_process_tree_includes_grandchildren() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '5'])"],
    )
    try:
        deadline = time.monotonic() + 10
        while len(process_tree(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(process_tree(proc.pid)) >= 2
        assert process_tree(proc.pid)[0] == proc.pid
    finally:
        for pid in reversed(process_tree(proc.pid)):
            os.kill(pid, 9)
        proc.wait()


def test_a_directory_with_its_completion_sign_goes_at_once(tmp_path: Path) -> None:
    got = Collector()
    watcher = CheckpointWatcher(tmp_path, got, settle=60.0)
    hf = tmp_path / "checkpoint-500"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(SAFETENSORS)
    ds = tmp_path / "global_step7"
    ds.mkdir()
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"d")
    plain = tmp_path / "step-3"
    plain.mkdir()
    (plain / "shard0.pt").write_bytes(b"s")
    watcher.poll()
    watcher.poll()
    assert got.names == []  # no sign yet, and far from settled
    (hf / "trainer_state.json").write_text("{}")
    (tmp_path / "latest").write_text("global_step7")
    watcher.poll()  # the sign changed the tree: wait one more look
    watcher.poll()
    assert sorted(got.names) == ["checkpoint-500", "global_step7"]


def test_a_quiet_directory_goes_after_the_settle_time(tmp_path: Path) -> None:
    got = Collector()
    watcher = CheckpointWatcher(tmp_path, got, settle=0.2)
    d = tmp_path / "step-3"
    d.mkdir()
    (d / "a.pt").write_bytes(b"1")
    watcher.poll()
    time.sleep(0.25)
    watcher.poll()
    assert got.names == ["step-3"]


def test_a_trainer_directory_waits_for_its_sign_however_quiet(tmp_path: Path) -> None:
    # The Trainer writes the model and training_args.bin, then may gather the optimizer's state
    # for many seconds with no file open. Once that quiet spell alone made it "finished": it was
    # uploaded and marked complete without its optimizer, and retention deleted the last whole one.
    got = Collector()
    watcher = CheckpointWatcher(tmp_path, got, settle=0.1)
    hf = tmp_path / "checkpoint-10"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(SAFETENSORS)
    (hf / "training_args.bin").write_bytes(b"a")
    for _ in range(3):
        watcher.poll()
        time.sleep(0.15)
    assert got.names == []
    (hf / "optimizer.pt").write_bytes(b"o")
    (hf / "trainer_state.json").write_text("{}")
    watcher.poll()
    watcher.poll()
    assert got.names == ["checkpoint-10"]


def test_being_written_names_what_is_open_or_just_changed(tmp_path: Path) -> None:
    old = time.time() - 60
    for name in ("step_1.pt", "step_2.pt", "step_3.pt", "train.log"):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (old, old))
    hf = tmp_path / "checkpoint-4"
    hf.mkdir()
    (hf / "model.bin").write_bytes(b"m")
    with open(tmp_path / "step_2.pt", "ab") as fh:
        fh.write(b"more")
        fh.flush()
        os.utime(tmp_path / "step_2.pt", (old, old))  # quiet, but still open
        found = being_written(tmp_path)
    if os.path.isdir("/proc/self/fdinfo"):
        assert found.pop("step_2.pt") == "a process has it open for writing"
    assert list(found) == ["checkpoint-4"] and found["checkpoint-4"].startswith("it changed")


@linux_proc
def test_a_file_its_dead_writer_left_is_left_out_now_and_in_the_next_run(tmp_path: Path) -> None:
    # A script SIGKILLed while a checkpoint was open: its descriptors close with it, the file
    # looks quiet and unused, and a poll before runctl saw the death once uploaded it; keep-last-1
    # then deleted the last whole one from S3. The next run uploaded it too.
    got = Collector()
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'wb'); f.write(b'half');"
         " f.flush(); time.sleep(30)", str(tmp_path / "step_4.pt")]
    )
    try:
        watcher = CheckpointWatcher(
            tmp_path, got, settle=0.1, interval=0.1, pids=lambda: process_tree(writer.pid)
        )
        deadline = time.monotonic() + 10
        while not (tmp_path / "step_4.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(4):
            watcher.poll()
            time.sleep(0.12)
    finally:
        writer.kill()
        writer.wait()
    watcher.poll()  # closed by the death: not handed over before runctl notices it
    assert got.names == []
    watcher.final_scan(script_failed=True, killed=True)
    assert got.names == [] and "step_4.pt" in watcher.skipped
    # Local keep-last-1 does not take it for the newest: step_3, whole and in S3, stays.
    from runctl.retention import apply_local_retention

    whole = tmp_path / "step_3.pt"
    whole.write_bytes(b"whole")
    os.utime(whole, (time.time() - 60, time.time() - 60))
    Journal(tmp_path).record("step_3.pt", "verified", size=5, mtime=whole.stat().st_mtime)
    plan = apply_local_retention(tmp_path, 1, dry_run=True)
    assert plan.reasons["step_3.pt"] == "newest complete"
    assert "possibly torn" in plan.reasons["step_4.pt"] and not plan.delete
    again = Collector()
    CheckpointWatcher(tmp_path, again, settle=0.0).final_scan(script_failed=False)
    assert again.names == []  # the journal says this version was left out
    (tmp_path / "step_4.pt").write_bytes(b"whole now")
    CheckpointWatcher(tmp_path, again, settle=0.0).final_scan(script_failed=False)
    assert again.names == ["step_4.pt"]


@pytest.mark.parametrize("killed", [True, False])
def test_what_changed_just_before_a_kill_is_left_out_unless_its_format_says_whole(
    tmp_path: Path, killed: bool
) -> None:
    # A file cut off by SIGKILL before any poll saw it open looks whole; so does one a save
    # that raised half-way closed (torch.save of an object that cannot be pickled): runctl
    # uploaded it, and keep-last-1 deleted the last whole one. A format that tells (torch.save's
    # zip, safetensors) decides; for others, what changed just before the end is left out.
    got = Collector()
    (tmp_path / "step_2.pt").write_bytes(b"just now")  # a format that cannot tell
    torch_zip(tmp_path / "step_3.pt")  # whole
    torch_zip(tmp_path / "step_4.pt", failed=True)  # the save raised half-way
    watcher = CheckpointWatcher(tmp_path, got, settle=2.0)
    watcher.final_scan(script_failed=True, killed=killed)
    assert "data.pkl" in watcher.skipped["step_4.pt"]
    if killed:
        assert got.names == ["step_3.pt"]
        assert "moments before" in watcher.skipped["step_2.pt"]
    else:  # a failed exit alone proves nothing: a script may fail right after a whole save
        assert sorted(got.names) == ["step_2.pt", "step_3.pt"]


def test_a_pickle_cut_short_is_left_out_and_a_whole_one_goes_up(tmp_path: Path) -> None:
    # A pickle.dump that raised half-way, closed by its `with`, went up as whole after the
    # script failed (local pass): pickle's own end (STOP) tells.
    import pickle

    got = Collector()
    (tmp_path / "step_2.pkl").write_bytes(pickle.dumps({"w": list(range(100))})[:-20])
    (tmp_path / "step_1.pkl").write_bytes(pickle.dumps({"w": 1}))
    watcher = CheckpointWatcher(tmp_path, got, settle=0.1)
    watcher.final_scan(script_failed=True, errored=True)
    assert got.names == ["step_1.pkl"]
    assert "a pickle without its end" in watcher.skipped["step_2.pkl"]


def test_a_save_that_failed_half_way_is_never_handed_over_however_quiet(tmp_path: Path) -> None:
    got = Collector()
    watcher = CheckpointWatcher(tmp_path, got, settle=0.1)
    torch_zip(tmp_path / "step_4.pt", failed=True)
    (tmp_path / "step_6.safetensors").write_bytes(SAFETENSORS[:-1])
    torch_zip(tmp_path / "step_5.pt")
    for _ in range(3):
        watcher.poll()
        time.sleep(0.15)
    assert got.names == ["step_5.pt"]
    watcher.final_scan(script_failed=False)  # an exit 0 does not make them whole
    assert got.names == ["step_5.pt"]
    assert sorted(watcher.skipped) == ["step_4.pt", "step_6.safetensors"]


def test_a_deepspeed_directory_waits_for_latest_to_name_it(tmp_path: Path) -> None:
    got = Collector()
    watcher = CheckpointWatcher(tmp_path, got, settle=0.1)
    for step in (200, 300):
        (tmp_path / f"global_step{step}").mkdir()
        (tmp_path / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"m")
    (tmp_path / "latest").write_text("global_step200")
    for _ in range(3):
        watcher.poll()
        time.sleep(0.15)
    assert got.names == ["global_step200"]  # global_step300 is quiet, but not named yet
    watcher.final_scan(script_failed=True)
    assert got.names == ["global_step200"]
    assert "latest" in watcher.skipped["global_step300"]


def test_without_latest_a_deepspeed_directory_goes_once_quiet(tmp_path: Path) -> None:
    # save_latest=False: there is no sign to wait for, so the quiet rule decides.
    got = Collector()
    watcher = CheckpointWatcher(tmp_path, got, settle=0.1)
    (tmp_path / "global_step100").mkdir()
    (tmp_path / "global_step100" / "mp_rank_00_model_states.pt").write_bytes(b"m")
    for _ in range(3):
        watcher.poll()
        time.sleep(0.15)
    assert got.names == ["global_step100"]


def test_the_final_scan_leaves_out_a_trainer_directory_cut_short(tmp_path: Path) -> None:
    # Even when the script exits 0: a checkpoint-N/ with training_args.bin and no
    # trainer_state.json was uploaded and marked complete, and retention deleted the whole ones.
    got = Collector()
    hf = tmp_path / "checkpoint-30"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(SAFETENSORS)
    (hf / "training_args.bin").write_bytes(b"a")
    whole = tmp_path / "checkpoint-20"  # finished: it goes, like any other
    whole.mkdir()
    for name in ("training_args.bin", "trainer_state.json"):
        (whole / name).write_bytes(b"x")
    (whole / "model.safetensors").write_bytes(SAFETENSORS)
    watcher = CheckpointWatcher(tmp_path, got, settle=0.0)
    watcher.final_scan(script_failed=False)
    assert got.names == ["checkpoint-20"]
    assert "trainer_state.json" in watcher.skipped["checkpoint-30"]


def test_the_final_scan_sends_the_rest_but_not_what_a_failed_script_was_writing(
    tmp_path: Path,
) -> None:
    got = Collector()
    watcher = CheckpointWatcher(tmp_path, got, settle=60.0)
    (tmp_path / "step_1.pt").write_bytes(b"1")
    long_ago = time.time() - 120
    os.utime(tmp_path / "step_1.pt", (long_ago, long_ago))  # finished two minutes before
    (tmp_path / "step_2.pt").write_bytes(b"2")
    watcher.poll()
    watcher._seen["step_2.pt"].writing = True  # seen open for writing just before the script died
    watcher.final_scan(script_failed=True)
    assert got.names == ["step_1.pt"]
    assert "step_2.pt" in watcher.skipped


def test_checkpoints_the_journal_knows_are_not_sent_again(tmp_path: Path) -> None:
    done = tmp_path / "step_1.pt"
    done.write_bytes(b"1")
    pending = tmp_path / "step_2.pt"
    pending.write_bytes(b"2")
    fresh = tmp_path / "step_3.pt"
    fresh.write_bytes(b"3")
    journal = Journal(tmp_path)
    st = done.stat()
    journal.record("step_1.pt", "verified", size=st.st_size, mtime=st.st_mtime)
    journal.record("step_2.pt", "queued", size=1, mtime=pending.stat().st_mtime)
    got = Collector()
    CheckpointWatcher(tmp_path, got, settle=0.0).final_scan(script_failed=False)
    assert got.names == ["step_3.pt"]


def test_bad_watcher_arguments() -> None:
    with pytest.raises(UsageError, match="settle"):
        CheckpointWatcher(Path("."), print, settle=-1)
    with pytest.raises(UsageError, match="interval"):
        CheckpointWatcher(Path("."), print, interval=0)


def test_run_record_is_json_under_runctl_runs(tmp_path: Path) -> None:
    record = RunRecord(
        ("python", "t.py"),
        100.0,
        101.5,
        1,
        0,
        uploads=(UploadRecord("step_1.pt", "failed", detail="boom"),),
    )
    assert record.upload_failed
    path = write_run_record(tmp_path, record)
    second = write_run_record(tmp_path, record)
    assert path != second and path.parent == tmp_path / ".runctl" / "runs"
    doc = json.loads(path.read_text())
    assert doc["command"] == ["python", "t.py"] and doc["exit_code"] == 1
    assert doc["uploads"] == [{"name": "step_1.pt", "state": "failed", "detail": "boom"}]
    assert doc["seconds"] == 1.5


def test_run_local_without_uploads(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(
        "import os, sys\nopen(os.environ['RUNCTL_CHECKPOINT_DIR'] + '/seen', 'w').close()\nsys.exit(7)\n"
    )
    record = run_local(build_command(str(script)), checkpoint_dir=tmp_path / "ck")
    assert record.exit_code == 7 and record.script_exit_code == 7 and record.signal is None
    assert (tmp_path / "ck" / "seen").exists()
    assert record.record_path and Path(record.record_path).is_file()


def test_run_local_reports_a_signal_death_shell_style(tmp_path: Path) -> None:
    record = run_local(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
    )
    assert record.exit_code == 128 + 15 and record.signal is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"s3_url": S3URL.parse("s3://bkt/r/")}, "--checkpoint-dir"),
        ({"checkpoint_dir": Path("ck"), "keep_last_n": 2}, "--upload-to"),
        (
            {
                "checkpoint_dir": Path("ck"),
                "s3_url": S3URL.parse("s3://bkt/r/"),
                "local_keep_last_n": 0,
            },
            "--local-keep-last-n",
        ),
        ({"settle": -1.0}, "--settle"),
    ],
)
def test_run_local_rejects_bad_arguments_before_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    with pytest.raises(UsageError, match=message):
        run_local([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], **kwargs)
    assert not marker.exists()


def test_after_a_failed_script_runctl_stops_waiting_for_a_hung_s3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Against an endpoint that accepts and never answers, runctl waited out every attempt of
    # every upload (5 of 60 s) after the script had failed or been signalled; now it stops
    # once nothing has reached S3 for FAILING_TIMEOUT, as the callbacks do.
    import socket

    import runctl.uploader as uploader_module
    from runctl.config import resolve_config

    monkeypatch.setattr(uploader_module, "FAILING_TIMEOUT", 2.0)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # never accepted: every request waits
    try:
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}"
        script = tmp_path / "s.py"
        script.write_text(
            "import os, sys, time\n"
            "open(os.environ['RUNCTL_CHECKPOINT_DIR'] + '/step_1.pt', 'wb').write(b'w')\n"
            "time.sleep(1.0)\n"
            "sys.exit(3)\n"
        )
        started = time.monotonic()
        record = run_local(
            build_command(str(script)),
            checkpoint_dir=tmp_path / "ck",
            s3_url=S3URL.parse("s3://bkt/run/"),
            settle=0.2,
            interval=0.1,
            config=resolve_config(endpoint),
        )
        assert time.monotonic() - started < 45, "waited for the hung S3 as for a healthy one"
    finally:
        hung.close()
    assert record.exit_code == 3
    assert record.upload_error is not None
    assert [e.name for e in Journal(tmp_path / "ck").pending()] == ["step_1.pt"]


def test_a_file_left_out_as_torn_goes_locally_once_keep_last_n_newer_ones_are_durable(
    tmp_path: Path,
) -> None:
    # Each preemption of `runctl local` left one more such file on disk for good.
    from runctl.journal import TORN
    from runctl.retention import apply_local_retention

    torn = tmp_path / "step_4.pt"
    torn.write_bytes(b"half")
    os.utime(torn, (time.time() - 120, time.time() - 120))
    Journal(tmp_path).record(
        "step_4.pt", "skipped", size=4, mtime=torn.stat().st_mtime, detail=f"{TORN}: killed"
    )
    for step in (5, 6):
        path = tmp_path / f"step_{step}.pt"
        path.write_bytes(b"whole")
        os.utime(path, (time.time() - 60 + step, time.time() - 60 + step))
        plan = apply_local_retention(tmp_path, 2, dry_run=True)
        assert not plan.delete  # not yet: one newer durable only, or none
        Journal(tmp_path).record(f"step_{step}.pt", "verified", size=5, mtime=path.stat().st_mtime)
    plan = apply_local_retention(tmp_path, 2)
    assert [cp.name for cp in plan.delete] == ["step_4.pt"]
    assert "possibly torn" in plan.reasons["step_4.pt"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_5.pt", "step_6.pt"]
