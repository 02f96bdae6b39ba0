"""Plain loops: CheckpointManager saves atomically, uploads, keeps the last N, and resumes from S3."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from runctl.exceptions import FlushTimeout, UsageError
from runctl.integrations.loop import CheckpointManager
from runctl.s3url import S3URL
from tests.integrations.conftest import as_under_runctl_local, file_checkpoints, s3_objects
from tests.servers import S3Server


def _train(manager: CheckpointManager, steps: range) -> dict[int, Path]:
    model = torch.nn.Linear(4, 2)
    saved = {}
    for step in steps:
        with torch.no_grad():
            model.weight.add_(0.1)
        saved[step] = manager.save({"model": model.state_dict(), "step": step}, step)
    return saved


def test_saves_uploads_and_keeps_last_n(s3_server: S3Server, bucket: S3URL, tmp_path: Path) -> None:
    prefix = bucket.join("run/")
    with CheckpointManager(
        tmp_path / "ckpt", prefix, keep_last_n=2, config=s3_server.config()
    ) as manager:
        saved = _train(manager, range(5))
    in_s3 = file_checkpoints(s3_objects(s3_server, prefix))
    assert sorted(in_s3) == ["step_3.pt", "step_4.pt"]
    for step in (3, 4):
        assert in_s3[f"step_{step}.pt"] == saved[step].read_bytes()
        assert torch.load(saved[step], weights_only=True)["step"] == step
    # Without local_keep_last_n every local copy stays; no temp files are left behind.
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == [
        f"step_{i}.pt" for i in range(5)
    ]
    assert not list((tmp_path / "ckpt").rglob("*.tmp"))


def test_latest_prefers_local_then_downloads_from_s3(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    prefix = moto_bucket.join("run/")
    config = moto_server.config()
    with CheckpointManager(
        tmp_path / "a", prefix, keep_last_n=3, local_keep_last_n=1, config=config
    ) as manager:
        assert manager.latest() is None
        saved = _train(manager, range(4))
        manager.flush(timeout=60)
        assert manager.latest() == saved[3]
    # A new machine: empty local dir, same prefix -> the newest complete checkpoint comes from S3.
    with CheckpointManager(tmp_path / "b", prefix, keep_last_n=3, config=config) as fresh:
        latest = fresh.latest()
        assert latest is not None and latest.name == "step_3.pt"
        assert torch.load(latest, weights_only=True)["step"] == 3
        assert latest.read_bytes() == (tmp_path / "a" / "step_3.pt").read_bytes()


def test_local_only_applies_local_keep_last_n(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, local_keep_last_n=2) as manager:
        _train(manager, range(4))
        assert manager.uploader is None
        assert manager.latest() == tmp_path / "step_3.pt"
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_2.pt", "step_3.pt"]


def test_a_checkpoint_directory_removed_mid_run_is_made_again(tmp_path: Path) -> None:
    # save() made its temporary directory without its parents: once the directory was removed
    # (by hand, or a cleanup script), every later save raised FileNotFoundError.
    local = tmp_path / "ckpt"
    with CheckpointManager(local, local_keep_last_n=2) as manager:
        manager.save({"w": 1}, step=1)
        shutil.rmtree(local)
        path = manager.save({"w": 2}, step=2)
    assert path.exists() and path.parent == local


def test_defaults_come_from_the_environment(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNCTL_CHECKPOINT_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("RUNCTL_S3_URL", str(moto_bucket.join("env-run")))
    with CheckpointManager(config=moto_server.config()) as manager:
        assert manager.s3_url == moto_bucket.join("env-run/")
        _train(manager, range(1))
    assert sorted(file_checkpoints(s3_objects(moto_server, moto_bucket.join("env-run/")))) == [
        "step_0.pt"
    ]


def test_runctl_locals_keep_last_n_and_endpoint_are_defaults_too(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `runctl local --endpoint-url URL --keep-last-n N` hands its script these two as well; a
    # script that omits them must not upload to AWS itself, nor keep everything.
    monkeypatch.setenv("RUNCTL_CHECKPOINT_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("RUNCTL_S3_URL", str(moto_bucket.join("env-keep")))
    monkeypatch.setenv("RUNCTL_KEEP_LAST_N", "2")
    monkeypatch.setenv("RUNCTL_ENDPOINT_URL", moto_server.endpoint_url)
    with CheckpointManager() as manager:
        assert (manager.options.keep_last_n, manager.options.endpoint_url) == (
            2,
            moto_server.endpoint_url,
        )
        _train(manager, range(4))
    assert sorted(file_checkpoints(s3_objects(moto_server, moto_bucket.join("env-keep/")))) == [
        "step_2.pt",
        "step_3.pt",
    ]
    # Arguments win; an explicit config names its own endpoint.
    explicit = CheckpointManager(
        tmp_path / "mine", "s3://bucket/x/", keep_last_n=5, endpoint_url="http://127.0.0.1:9"
    )
    assert (explicit.options.keep_last_n, explicit.options.endpoint_url) == (5, "http://127.0.0.1:9")
    explicit.close()
    configured = CheckpointManager(tmp_path / "cfg", config=moto_server.config())
    assert configured.options.endpoint_url is None
    configured.close()
    for bad in ("0", "three", "-1", "²"):
        monkeypatch.setenv("RUNCTL_KEEP_LAST_N", bad)
        with pytest.raises(UsageError, match="RUNCTL_KEEP_LAST_N"):
            CheckpointManager(tmp_path / "bad")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"keep_last_n": 0}, "keep_last_n"),
        ({"local_keep_last_n": -1}, "local_keep_last_n"),
        ({"filename": "model.pt"}, "filename"),
        # Steps runctl cannot read back: keep-last-N kept everything and latest() found nothing.
        ({"filename": "gpt2-{step}.pt"}, "cannot read back"),
        ({"filename": "resnet50_{step}.pth"}, "cannot read back"),
        ({"filename": "{step}.pt"}, "cannot read back"),
        ({"filename": "sub/step_{step}.pt"}, "cannot read back"),
        # The step reads back; the ending is what runctl does not take (it was told the step).
        ({"filename": "checkpoint_{step}.pth.tar"}, "end it in .pt"),
        ({"on_upload_error": "ignore"}, "on_upload_error"),
        ({"s3_url": "gs://bucket/x"}, "gs://bucket/x"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        CheckpointManager(tmp_path, **kwargs)


@pytest.mark.parametrize(
    "filename", ["agent_{step}.pt", "model-{step}.pt", "ckpt_{step:08d}.pt", "epoch_{step}.pt"]
)
def test_filenames_whose_step_reads_back_are_taken(tmp_path: Path, filename: str) -> None:
    manager = CheckpointManager(tmp_path, filename=filename)
    manager.save({"step": 7}, 7)
    assert manager.latest() == tmp_path / filename.format(step=7)
    manager.close()


def test_missing_dir_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="RUNCTL_CHECKPOINT_DIR"):
        CheckpointManager()


def test_under_runctl_local_watching_the_same_directory_it_claims_it(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `runctl local --checkpoint-dir DIR --upload-to URL` watches DIR: the helper, which knows its
    # own keep-last-N, uploads, and tells runctl local to stand aside (a claim with its pid).
    from runctl.localrun import claimed_by

    watched, prefix = tmp_path / "watched", moto_bucket.join("local-run/")
    as_under_runctl_local(monkeypatch, watched, prefix, moto_server)
    monkeypatch.setenv("RUNCTL_KEEP_LAST_N", "2")
    monkeypatch.setenv("RUNCTL_LOCAL_KEEP_LAST_N", "1")
    with CheckpointManager() as manager:
        assert manager.uploader is not None
        assert claimed_by(watched, [os.getpid()]) == os.getpid()
        _train(manager, range(4))
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == ["step_2.pt", "step_3.pt"]
    assert sorted(p.name for p in watched.glob("*.pt")) == ["step_3.pt"]

    # Another directory, or another prefix, is not runctl local's: no claim.
    other = tmp_path / "other"
    with CheckpointManager(other, prefix) as manager:
        assert claimed_by(other, [os.getpid()]) is None


def test_a_save_cut_short_by_a_kill_leaves_no_temp_file_for_good(tmp_path: Path) -> None:
    # save() writes .runctl/<name>.<pid>.tmp and renames it; SIGKILL mid-write left it (232 MB
    # after three kills, once). The next manager removes those of dead processes only.
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    runctl_dir = tmp_path / ".runctl"
    runctl_dir.mkdir()
    stale = runctl_dir / f"step_4.pt.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"half")
    live = runctl_dir / f"step_5.pt.{os.getppid()}.tmp"  # a process that is still writing
    live.write_bytes(b"going")
    # One with this process's ID from before it began: a container's PID 1 in an earlier run,
    # killed mid-save (it was taken for this process's own and kept for good; loop pass).
    earlier = runctl_dir / f"step_6.pt.{os.getpid()}.tmp"
    earlier.write_bytes(b"half")
    os.utime(earlier, (time.time() - 3600, time.time() - 3600))
    ours = runctl_dir / f"step_7.pt.{os.getpid()}.tmp"  # this process's, being written
    ours.write_bytes(b"going")
    # A latest() download killed midway, and one another process is still writing.
    killed = tmp_path / ".runctl-tmp-0123abcd"
    killed.write_bytes(b"half a checkpoint")
    going = tmp_path / ".runctl-tmp-4567ef01"
    going.write_bytes(b"still coming")
    for path in (killed, going):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    with going.open("ab"):
        CheckpointManager(tmp_path, local_keep_last_n=2).close()
    assert not stale.exists() and not earlier.exists() and not killed.exists()
    assert live.exists() and ours.exists() and going.exists()


def test_latest_takes_a_newer_s3_checkpoint_protects_it_then_lets_it_go(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    prefix = moto_bucket.join("run/")
    config = moto_server.config()
    with CheckpointManager(tmp_path / "a", prefix, keep_last_n=3, config=config) as first:
        _train(first, range(6))  # S3: step_3..5
    b = tmp_path / "b"
    b.mkdir()
    torch.save({"step": 1}, b / "step_1.pt")  # a stale local copy from long ago
    # S3 has a newer one: that is where to resume from (once, the stale local one was taken).
    with CheckpointManager(b, prefix, keep_last_n=3, local_keep_last_n=2, config=config) as second:
        latest = second.latest()
        assert latest == b / "step_5.pt"
        assert torch.load(latest, weights_only=True)["step"] == 5
        _train(second, range(6, 9))
    # The one it resumed from stays in S3 for the run (keep-last-3 alone would drop it).
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == [
        "step_5.pt", "step_6.pt", "step_7.pt", "step_8.pt"
    ]
    # The next run resumes from step_8; the restored step_5 counts as durable (it came from
    # S3), so local keep-last-2 lets it go instead of keeping it for good.
    with CheckpointManager(b, prefix, keep_last_n=3, local_keep_last_n=2, config=config) as third:
        assert third.latest() == b / "step_8.pt"
        _train(third, [9])
    assert sorted(p.name for p in b.glob("step_*.pt")) == ["step_1.pt", "step_8.pt", "step_9.pt"]


def test_latest_resumes_from_the_local_checkpoint_when_s3_cannot_be_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before latest() asked S3 at all when a local checkpoint existed, an unreachable S3 did not
    # stop a resume; it still must not.
    from runctl.config import S3Config
    from tests.servers import free_port

    torch.save({"step": 3}, tmp_path / "step_3.pt")
    config = S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}")
    with CheckpointManager(tmp_path, "s3://bucket/run/", config=config, use_s5cmd=False) as manager:
        assert manager.latest() == tmp_path / "step_3.pt"
        # No run handed step_3.pt to an uploader (no journal line): it is sent, and waits for S3.
        with pytest.raises(FlushTimeout):
            manager.close(timeout=1)
    assert "cannot look in S3 for a newer checkpoint" in caplog.text


def test_latest_waits_out_a_blip_when_there_is_nothing_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no local checkpoint (a fresh node after a preemption), one refused connection to S3
    # ended the run before its first step.
    import threading

    import runctl.retry
    from tests.servers import start_rclone

    monkeypatch.setattr(runctl.retry.RetryPolicy, "delay", lambda self, retry, rng=None: 0.5)
    server = start_rclone(tmp_path / "rclone")
    try:
        prefix = S3URL(server.new_bucket()).join("run/")
        with CheckpointManager(tmp_path / "a", prefix, config=server.config()) as manager:
            _train(manager, range(2))
        server.stop()
        restart = threading.Timer(1.0, server.start)
        restart.start()
        with CheckpointManager(tmp_path / "b", prefix, config=server.config()) as manager:
            assert manager.latest() == tmp_path / "b" / "step_1.pt"
        restart.join()
    finally:
        server.stop()


def _train_pinning(manager: CheckpointManager, steps: range, pinned: int) -> None:
    model = torch.nn.Linear(4, 2)
    for step in steps:
        manager.save({"model": model.state_dict(), "step": step}, step, protect=step == pinned)


def test_a_pinned_checkpoint_stays_in_later_runs_on_any_node(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    # save(protect=True) pinned it in this process only: the first retention of the next run
    # (after a preemption, on a fresh node) deleted it.
    prefix, config = moto_bucket.join("pins/"), moto_server.config()
    with CheckpointManager(tmp_path / "a", prefix, keep_last_n=2, config=config) as manager:
        _train_pinning(manager, range(0, 600, 100), pinned=0)
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == ["step_0.pt", "step_400.pt", "step_500.pt"]
    assert s3_objects(moto_server, prefix)[".runctl/pinned/step_0.pt"] == b""
    with CheckpointManager(tmp_path / "b", prefix, keep_last_n=2, local_keep_last_n=1, config=config) as fresh:
        latest = fresh.latest()
        assert latest is not None and latest.name == "step_500.pt"
        _train_pinning(fresh, range(600, 1000, 100), pinned=-1)
    # step_500.pt is what that run resumed from (protected for the run).
    in_s3 = sorted(file_checkpoints(s3_objects(moto_server, prefix)))
    assert in_s3 == ["step_0.pt", "step_500.pt", "step_800.pt", "step_900.pt"]
    # `runctl s3 cleanup` keeps it too; unprotect() lets it go.
    from tests.cli.cli_support import of_type, run_s3

    done = run_s3(moto_server, "s3", "cleanup", str(prefix), "-n", "1", "--json")
    assert done.exit_code == 0, done.output
    (kept,) = [r for r in of_type(done.stdout, "keep") if r["name"] == "step_0.pt"]
    assert kept["reason"] == f"pinned ({prefix}.runctl/pinned/step_0.pt)"  # where to unpin it
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == ["step_0.pt", "step_900.pt"]
    with CheckpointManager(tmp_path / "a", prefix, keep_last_n=1, config=config) as again:
        assert again.uploader is not None
        again.uploader.unprotect("step_0.pt")
        _train_pinning(again, range(1000, 1100, 100), pinned=-1)
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == ["step_1000.pt"]
    assert not (tmp_path / "a" / ".runctl" / "pinned" / "step_0.pt").exists()


def test_a_pinned_checkpoint_stays_locally_without_s3(tmp_path: Path) -> None:
    # Local only, the pin lasted for the save() that made it: the next save's retention took it.
    with CheckpointManager(tmp_path, local_keep_last_n=1) as manager:
        _train_pinning(manager, range(4), pinned=0)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_0.pt", "step_3.pt"]
    with CheckpointManager(tmp_path, local_keep_last_n=1) as later:
        _train_pinning(later, range(4, 6), pinned=-1)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_0.pt", "step_5.pt"]


def test_a_checkpoint_saved_by_a_run_killed_before_it_was_handed_over_is_sent_on_resume(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    # A kill between save()'s rename and its submit() left a whole step_6.pt with no journal
    # line: the next run resumed from it and never uploaded it, and local keep-last-N kept it
    # for good as not durable in S3 (library pass, with random kills too).
    prefix = moto_bucket.join("run/")
    config = moto_server.config()
    ckpt = tmp_path / "ckpt"
    with CheckpointManager(ckpt, prefix, keep_last_n=2, local_keep_last_n=2, config=config) as first:
        _train(first, range(6))
    torch.save({"step": 6}, ckpt / "step_6.pt")  # as save() leaves it, killed before submit()
    with CheckpointManager(ckpt, prefix, keep_last_n=2, local_keep_last_n=2, config=config) as second:
        assert second.latest() == ckpt / "step_6.pt"
        second.flush(timeout=60)
        assert "step_6.pt" in file_checkpoints(s3_objects(moto_server, prefix))
        _train(second, range(7, 10))
    # Resumed from, it stays for the run; now durable, the next run's retention lets it go.
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == ["step_6.pt", "step_8.pt", "step_9.pt"]
    with CheckpointManager(ckpt, prefix, keep_last_n=2, local_keep_last_n=2, config=config) as third:
        assert third.latest() == ckpt / "step_9.pt"
        _train(third, [10])
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == ["step_10.pt", "step_9.pt"]
    assert sorted(p.name for p in ckpt.glob("step_*.pt")) == ["step_10.pt", "step_9.pt"]


def test_latest_passes_by_a_local_checkpoint_cut_short(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A torn newest local file was returned, and the resume failed in torch.load while S3
    # held a whole older checkpoint (library pass).
    prefix = moto_bucket.join("run/")
    config = moto_server.config()
    ckpt = tmp_path / "ckpt"
    with CheckpointManager(ckpt, prefix, keep_last_n=2, config=config) as first:
        _train(first, range(3))
    whole = (ckpt / "step_2.pt").read_bytes()
    (ckpt / "step_3.pt").write_bytes(whole[: len(whole) // 2])
    # And newer still, an empty file and a FIFO under checkpoint names: the empty one was taken
    # (not a zip: its format "cannot tell"), uploaded on resume, and retention then deleted
    # the one good checkpoint in S3; the FIFO made latest() raise (re-run pass).
    (ckpt / "step_4.pt").write_bytes(b"")
    os.mkfifo(ckpt / "step_5.pt")
    with CheckpointManager(ckpt, prefix, keep_last_n=1, config=config) as second:
        latest = second.latest()
        assert latest == ckpt / "step_2.pt"
        assert torch.load(latest, weights_only=True)["step"] == 2
    assert "passing by step_3.pt to resume from: a zip file without its end" in caplog.text
    assert "passing by step_4.pt to resume from: it is empty" in caplog.text
    assert "passing by step_5.pt to resume from: not a regular file" in caplog.text
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == ["step_2.pt"]  # the good one kept


def test_latest_from_s3_is_this_managers_own_file_where_two_share_a_prefix(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """A GAN's two managers on one directory and prefix: on a fresh machine each resumes from
    its own file of the newest step (the generator's got net_d_200.pth: wrong weights)."""
    prefix = moto_bucket.join("gan/")
    config = moto_server.config()
    kinds = ("g", "d")
    managers = {
        kind: CheckpointManager(tmp_path / "a", prefix, filename=f"net_{kind}_{{step}}.pth", config=config)
        for kind in kinds
    }
    for step in (100, 200):
        for kind, manager in managers.items():
            manager.save({"kind": kind, "step": step}, step)
    for manager in managers.values():
        manager.close()
    for kind in kinds:
        with CheckpointManager(
            tmp_path / f"fresh-{kind}", prefix, filename=f"net_{kind}_{{step}}.pth", config=config
        ) as fresh:
            latest = fresh.latest()
            assert latest is not None and latest.name == f"net_{kind}_200.pth"
            assert torch.load(latest, weights_only=True) == {"kind": kind, "step": 200}
    # A prefix with the discriminator's files alone: the generator has none to resume from.
    only_d = moto_bucket.join("only-d/")
    with CheckpointManager(tmp_path / "d", only_d, filename="net_d_{step}.pth", config=config) as manager:
        manager.save({"kind": "d", "step": 300}, 300)
    with CheckpointManager(tmp_path / "g", only_d, filename="net_g_{step}.pth", config=config) as fresh:
        assert fresh.latest() is None


def test_latest_finds_a_zero_padded_filename_in_s3_on_a_fresh_machine(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """``step_{step:06d}.pt`` matched none of the manager's own files: on a fresh machine
    latest() said "no complete checkpoint" with three in S3, and the run started again (loop pass)."""
    prefix = moto_bucket.join("padded/")
    config = moto_server.config()
    with CheckpointManager(tmp_path / "a", prefix, filename="step_{step:06d}.pt", config=config) as manager:
        _train(manager, range(0, 300, 100))
    with CheckpointManager(tmp_path / "b", prefix, filename="step_{step:06d}.pt", config=config) as fresh:
        latest = fresh.latest()
        assert latest is not None and latest.name == "step_000200.pt"
        assert torch.load(latest, weights_only=True)["step"] == 200
        # numpy's and torch's integers are steps too (np.int64(6) was refused)
        assert fresh.save({"step": 300}, torch.tensor(300)).name == "step_000300.pt"  # type: ignore[arg-type]


def test_latest_never_takes_another_managers_file_in_the_same_directory(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """With none of its own on disk, a manager took another's (the model's ``model_20.pt`` for
    the EMA's), passed by its own newer one in S3, and uploaded the other's to its prefix."""
    config = moto_server.config()
    ema_prefix = moto_bucket.join("ema/")
    with CheckpointManager(tmp_path / "old", ema_prefix, filename="ema_{step}.pt", config=config) as ema:
        ema.save({"kind": "ema", "step": 9}, 9)
    shared = tmp_path / "shared"
    with CheckpointManager(shared, moto_bucket.join("model/"), filename="model_{step}.pt", config=config) as model:
        model.save({"kind": "model", "step": 20}, 20)
    with CheckpointManager(shared, ema_prefix, filename="ema_{step}.pt", config=config) as ema:
        latest = ema.latest()
        assert latest is not None and latest.name == "ema_9.pt"
        assert torch.load(latest, weights_only=True) == {"kind": "ema", "step": 9}
    assert sorted(file_checkpoints(s3_objects(moto_server, ema_prefix))) == ["ema_9.pt"]


def test_latest_passes_by_a_checkpoint_in_s3_cut_short(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """S3's newest file is half a torch.save (a hand upload of a file still being written): on a
    fresh machine and on one with a whole older file, latest() resumes from the whole one (it
    returned the torn one on every try)."""
    import io

    from runctl.transfer import get_transfer

    prefix = moto_bucket.join("run/")
    config = moto_server.config()
    saves = {}
    for step in (5, 9):
        buf = io.BytesIO()
        torch.save({"step": step}, buf)
        saves[step] = buf.getvalue()
    transfer = get_transfer(config, use_s5cmd=False)
    try:
        transfer.put_bytes(saves[5], prefix.join("step_5.pt"))  # type: ignore[attr-defined]
        transfer.put_bytes(saves[9][: len(saves[9]) // 2], prefix.join("step_9.pt"))  # type: ignore[attr-defined]
    finally:
        transfer.close()
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "step_5.pt").write_bytes(saves[5])
    for where in ("fresh", "node"):
        with CheckpointManager(tmp_path / where, prefix, config=config) as manager:
            latest = manager.latest()
            assert latest is not None and latest.name == "step_5.pt", where
            assert torch.load(latest, weights_only=True) == {"step": 5}
