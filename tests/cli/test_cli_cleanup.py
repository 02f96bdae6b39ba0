"""`runctl s3 cleanup` and `runctl checkpoint cleanup`: checkpoints, not objects; siblings and logs untouched."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from runctl.checkpoints import MARKER_NAME, FileEntry, Manifest
from runctl.journal import Journal
from runctl.s3url import S3URL
from tests.cli.cli_support import backend_flag, keys, of_type, put, run, run_process, run_s3
from tests.servers import S3Server


def put_dir_checkpoint(
    server: S3Server, bucket: S3URL, prefix: str, name: str, files: dict[str, bytes]
) -> None:
    for rel, data in files.items():
        put(server, bucket, f"{prefix}{name}/{rel}", data)
    manifest = Manifest(
        name, None, {rel: FileEntry(len(data)) for rel, data in files.items()}, "test", 0.0
    )
    put(server, bucket, f"{prefix}{name}/{MARKER_NAME}", manifest.to_bytes())


def test_cleanup_touches_only_checkpoints_inside_the_prefix(
    s3_server: S3Server, bucket: S3URL, backend: str
) -> None:
    flag = backend_flag(backend)
    put_dir_checkpoint(
        s3_server, bucket, "ckpt/", "checkpoint-2", {"model.bin": b"m2", "optim.bin": b"o2"}
    )
    put(s3_server, bucket, "ckpt/step_3.pt", b"three")
    put_dir_checkpoint(
        s3_server, bucket, "ckpt/", "checkpoint-5", {"model.bin": b"m5", "optim.bin": b"o5"}
    )
    put(s3_server, bucket, "ckpt/train.log", b"log")
    # Not a checkpoint, though a word and a number: once it ranked as step 32,000.
    put(s3_server, bucket, "ckpt/vocab_32000.bin", b"tokens")
    put(s3_server, bucket, "ckpt-old/step_1.pt", b"old")
    put(s3_server, bucket, "ckpt-old/checkpoint-1/model.bin", b"old")
    before = keys(s3_server, bucket)

    dry = run_s3(
        s3_server,
        "s3",
        "cleanup",
        f"{bucket}ckpt/",
        "--keep-last-n",
        "1",
        "--dry-run",
        "--json",
        flag,
    )
    assert dry.exit_code == 0, dry.output
    assert keys(s3_server, bucket) == before
    assert [(d["name"], d["dry_run"]) for d in of_type(dry.stdout, "delete")] == [
        ("checkpoint-2", True),
        ("step_3.pt", True),
    ]
    (kept,) = of_type(dry.stdout, "keep")
    assert kept["name"] == "checkpoint-5" and kept["reason"] == "newest complete"
    assert all(d["reason"] for d in of_type(dry.stdout, "delete"))

    human = run_s3(s3_server, "s3", "cleanup", f"{bucket}ckpt/", "-n", "1", "--dry-run", flag)
    assert human.exit_code == 0, human.output
    assert (
        "would delete" in human.stdout
        and "checkpoint-2/" in human.stdout
        and "newest complete" in human.stdout
    )
    assert keys(s3_server, bucket) == before

    # s3://b/ckpt (no slash) still means the ckpt/ prefix, never ckpt-old/
    real = run_s3(s3_server, "s3", "cleanup", f"{bucket}ckpt", "--keep-last-n", "1", "--json", flag)
    assert real.exit_code == 0, real.output
    (summary,) = of_type(real.stdout, "summary")
    assert (summary["deleted"], summary["kept"], summary["dry_run"]) == (2, 1, False)
    after = keys(s3_server, bucket)
    assert set(after) == {
        "ckpt/checkpoint-5/model.bin",
        "ckpt/checkpoint-5/optim.bin",
        f"ckpt/checkpoint-5/{MARKER_NAME}",
        "ckpt/train.log",
        "ckpt/vocab_32000.bin",
        "ckpt-old/step_1.pt",
        "ckpt-old/checkpoint-1/model.bin",
    }
    assert after["ckpt/train.log"] == b"log"


def test_cleanup_size_limit_and_abandoned_uploads(
    s3_server: S3Server, bucket: S3URL, backend: str
) -> None:
    flag = backend_flag(backend)
    for step in (1, 2, 3):
        put(s3_server, bucket, f"run/step_{step}.pt", b"x" * 100)
    put(s3_server, bucket, "run/checkpoint-9/model.bin", b"partial")  # no marker: incomplete

    # a fresh incomplete upload stays; the size limit removes the oldest until the rest fit
    result = run_s3(
        s3_server,
        "s3",
        "cleanup",
        f"{bucket}run/",
        "-n",
        "3",
        "--max-total-size",
        "250B",
        "--incomplete-older-than",
        "1h",
        "--json",
        flag,
    )
    assert result.exit_code == 0, result.output
    assert [d["name"] for d in of_type(result.stdout, "delete")] == ["step_1.pt"]
    reasons = {k["name"]: k["reason"] for k in of_type(result.stdout, "keep")}
    assert reasons["checkpoint-9"].startswith("incomplete")
    assert set(keys(s3_server, bucket)) == {
        "run/step_2.pt",
        "run/step_3.pt",
        "run/checkpoint-9/model.bin",
    }

    # once older than the limit, the abandoned upload goes whole; complete ones stay
    time.sleep(1.1)
    result = run_s3(
        s3_server, "s3", "cleanup", f"{bucket}run/", "--incomplete-older-than", "1s", "--json", flag
    )
    assert result.exit_code == 0, result.output
    assert [d["name"] for d in of_type(result.stdout, "delete")] == ["checkpoint-9"]
    assert set(keys(s3_server, bucket)) == {"run/step_2.pt", "run/step_3.pt"}


def test_a_size_limit_that_cannot_be_met_is_said(
    s3_server: S3Server, bucket: S3URL, backend: str
) -> None:
    # The newest step alone is over the cap: it stays, and the cleanup says so (it exited 0
    # without a word, and the bucket stayed over the limit the user asked for).
    for step in (1, 2):
        put(s3_server, bucket, f"run/step_{step}.pt", b"x" * 100)
    result = run_s3(
        s3_server, "s3", "cleanup", f"{bucket}run/", "--max-total-size", "50B", "--json", backend_flag(backend)
    )
    assert result.exit_code == 0, result.output
    assert [d["name"] for d in of_type(result.stdout, "delete")] == ["step_1.pt"]
    (summary,) = of_type(result.stdout, "summary")
    assert summary["over_max_total_size"] == 50
    assert "kept 100 B in" in result.stderr and "50 B over --max-total-size 50 B" in result.stderr
    assert set(keys(s3_server, bucket)) == {"run/step_2.pt"}


def test_bucket_root_needs_confirmation(moto_server: S3Server) -> None:
    bucket = S3URL(moto_server.new_bucket())
    for step in (1, 2):
        put(moto_server, bucket, f"step_{step}.pt")
    refused = run_s3(moto_server, "s3", "cleanup", str(bucket), "-n", "1")
    assert refused.exit_code == 2
    assert "--yes-bucket-root" in refused.stderr
    assert set(keys(moto_server, bucket)) == {"step_1.pt", "step_2.pt"}

    done = run_s3(
        moto_server, "s3", "cleanup", f"s3://{bucket.bucket}", "-n", "1", "--yes-bucket-root", "-q"
    )
    assert done.exit_code == 0, done.output
    assert set(keys(moto_server, bucket)) == {"step_2.pt"}


def test_cleanup_protect(moto_server: S3Server) -> None:
    bucket = S3URL(moto_server.new_bucket())
    for step in (1, 2, 3):
        put(moto_server, bucket, f"run/step_{step}.pt")
    result = run_s3(
        moto_server, "s3", "cleanup", f"{bucket}run/", "-n", "1", "--protect", "step_1.pt", "--json"
    )
    assert result.exit_code == 0, result.output
    assert [d["name"] for d in of_type(result.stdout, "delete")] == ["step_2.pt"]
    assert set(keys(moto_server, bucket)) == {"run/step_1.pt", "run/step_3.pt"}


def test_a_protect_that_names_no_checkpoint_is_refused(moto_server: S3Server, tmp_path: Path) -> None:
    # A mistyped --protect (step_10.pt for step_1.pt) protected nothing, and step_1.pt went.
    bucket = S3URL(moto_server.new_bucket())
    for step in (1, 2, 3):
        put(moto_server, bucket, f"run/step_{step}.pt")
    root = tmp_path / "checkpoints"
    make_local(root)
    commands = [
        ("s3", "cleanup", f"{bucket}run/", "-n", "1"),
        ("checkpoint", "cleanup", str(root), "-n", "1", "--force"),
    ]
    for command in commands:
        for dry in ((), ("--dry-run",)):
            result = run_s3(moto_server, *command, "--protect", "step_1.pt", "--protect", "step_10.pt", *dry)
            assert result.exit_code == 2, result.output
            assert "--protect step_10.pt: no checkpoint of that name" in result.stderr
            assert "nothing was deleted" in result.stderr and len(result.stderr.splitlines()) == 1
    assert set(keys(moto_server, bucket)) == {f"run/step_{step}.pt" for step in (1, 2, 3)}
    assert len([p for p in root.iterdir() if p.name.startswith(("step_", "checkpoint-"))]) == 4
    # A directory checkpoint may be named with its trailing '/', as `list` shows it.
    result = run_s3(moto_server, *commands[1], "--protect", "checkpoint-3/", "--json")
    assert result.exit_code == 0, result.output
    assert sorted(d["name"] for d in of_type(result.stdout, "delete")) == ["step_1.pt", "step_2.pt"]


def test_a_protect_url_must_name_a_checkpoint_of_the_cleaned_prefix(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # --protect s3://other/x/step_1.pt protected step_1.pt here, a checkpoint it never named.
    bucket = S3URL(moto_server.new_bucket())
    for step in (1, 2, 3):
        put(moto_server, bucket, f"run/step_{step}.pt")
    cleanup = ("s3", "cleanup", f"{bucket}run/", "-n", "1")
    for elsewhere in (
        "s3://other-bucket/run/step_1.pt", f"{bucket}other/step_1.pt", f"{bucket}run/sub/step_1.pt", "other/step_1.pt"
    ):
        result = run_s3(moto_server, *cleanup, "--protect", elsewhere)
        assert result.exit_code == 2, result.output
        assert "is not a checkpoint directly under" in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert len(keys(moto_server, bucket)) == 3
    root = tmp_path / "checkpoints"
    make_local(root)
    local = ("checkpoint", "cleanup", str(root), "-n", "1", "--force", "--dry-run")
    refused = run("checkpoint", "cleanup", str(root), "-n", "1", "--force", "--protect", f"{bucket}run/step_1.pt")
    assert refused.exit_code == 2, refused.output
    assert "not an S3 URL" in refused.stderr
    other = tmp_path / "other-run"
    other.mkdir()
    refused = run(*local, "--protect", str(other / "step_1.pt"))
    assert refused.exit_code == 2 and "is not a checkpoint directly in" in refused.stderr, refused.output
    # Named in DIR, or (with --durable-in) as the checkpoint's URL there: protected.
    assert run(*local, "--protect", str(root / "step_1.pt")).exit_code == 0
    durable = run_s3(moto_server, *local, "--durable-in", f"{bucket}run/", "--protect", f"{bucket}run/step_1.pt", "--json")
    assert durable.exit_code == 0, durable.output
    assert "step_1.pt" in [k["name"] for k in of_type(durable.stdout, "keep")]
    # An URL of a checkpoint that is there protects it.
    result = run_s3(moto_server, *cleanup, "--protect", f"{bucket}run/step_1.pt", "--json")
    assert result.exit_code == 0, result.output
    assert set(keys(moto_server, bucket)) == {"run/step_1.pt", "run/step_3.pt"}


def make_local(root: Path) -> None:
    base = time.time() - 1000
    for i, name in enumerate(["step_1.pt", "step_2.pt", "checkpoint-3", "step_4.pt"]):
        path = root / name
        if name.startswith("checkpoint"):
            path.mkdir(parents=True)
            (path / "model.bin").write_bytes(b"m" * 10)
            os.utime(path / "model.bin", (base + i, base + i))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"w" * 10)
            os.utime(path, (base + i, base + i))
    (root / "train.log").write_text("log")


def test_local_cleanup_keeps_what_is_not_durable(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    make_local(root)

    result = run("checkpoint", "cleanup", str(root), "--keep-last-n", "1")
    assert result.exit_code == 0, result.output
    assert "not yet durable in S3" in result.stdout and "--force" in result.stdout
    assert sorted(p.name for p in root.iterdir() if p.name != ".runctl") == [
        "checkpoint-3",
        "step_1.pt",
        "step_2.pt",
        "step_4.pt",
        "train.log",
    ]

    # mark two as verified in S3 (as the uploader would): those may go now
    journal = Journal(root)
    for name in ("step_1.pt", "checkpoint-3"):
        path = root / name
        size = 10
        mtime = (path / "model.bin").stat().st_mtime if path.is_dir() else path.stat().st_mtime
        journal.record(name, "verified", size=size, mtime=mtime)
    result = run("checkpoint", "cleanup", str(root), "-n", "1", "--json")
    assert result.exit_code == 0, result.output
    assert sorted(d["name"] for d in of_type(result.stdout, "delete")) == [
        "checkpoint-3",
        "step_1.pt",
    ]
    (summary,) = of_type(result.stdout, "summary")
    assert summary["not_durable"] == ["step_2.pt"]
    assert sorted(p.name for p in root.iterdir() if p.name != ".runctl") == [
        "step_2.pt",
        "step_4.pt",
        "train.log",
    ]

    forced = run("checkpoint", "cleanup", str(root), "-n", "1", "--force", "--dry-run", "--json")
    assert [d["name"] for d in of_type(forced.stdout, "delete")] == ["step_2.pt"]
    assert (root / "step_2.pt").exists()
    forced = run("checkpoint", "cleanup", str(root), "-n", "1", "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in root.iterdir() if p.name != ".runctl") == [
        "step_4.pt",
        "train.log",
    ]


def test_a_local_checkpoint_that_cannot_be_deleted_is_named_and_fails_the_cleanup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint whose deletion failed (chattr +i, a read-only mount) was counted as deleted:
    # "deleted 1 checkpoint", exit 0, the JSON summary too, and it was still there.
    import runctl.retention

    root = tmp_path / "checkpoints"
    make_local(root)
    remove = runctl.retention._remove_local

    def refuse_some(path: Path) -> None:
        if path.name == "step_1.pt":
            raise PermissionError(1, "Operation not permitted", str(path))
        if path.name == "checkpoint-3":  # one file gone, then one that stays (chattr +i)
            (path / "model.bin").unlink()
            raise PermissionError(1, "Operation not permitted", str(path / "keep.bin"))
        remove(path)

    monkeypatch.setattr(runctl.retention, "_remove_local", refuse_some)
    result = run("checkpoint", "cleanup", str(root), "-n", "1", "--force", "--json")
    assert result.exit_code == 1, result.output
    error = result.stderr.strip().splitlines()[-1]  # after the warnings as it happened
    assert error.startswith("runctl: error: could not delete 2 checkpoint(s)"), result.stderr
    assert "step_1.pt: [Errno 1] Operation not permitted" in error
    assert "Traceback" not in result.stderr
    assert sorted(d["name"] for d in of_type(result.stdout, "delete")) == ["step_2.pt"]
    kept = {d["name"]: d for d in of_type(result.stdout, "keep")}
    assert kept["step_1.pt"]["reason"].startswith("could not delete: ")
    assert kept["checkpoint-3"]["complete"] is False  # it lost a file
    (summary,) = of_type(result.stdout, "summary")
    assert summary["deleted"] == 1 and summary["bytes_freed"] == 10
    assert (root / "step_1.pt").exists() and not (root / "step_2.pt").exists()


def test_local_cleanup_does_not_count_a_checkpoint_cut_short(tmp_path: Path) -> None:
    # A save a crash or a full disk cut off, long quiet: a torch.save zip without its end, and a
    # Trainer directory holding only the start of its weights (the save died before it wrote
    # training_args.bin). Each was counted as the newest complete, and step_4.pt, the only
    # whole one, was deleted.
    root = tmp_path / "checkpoints"
    make_local(root)
    torch_zip = b"PK\x03\x04" + b"\0" * 200  # the first bytes of a zip, no central directory
    (root / "step_5.pt").write_bytes(torch_zip)
    hf = root / "checkpoint-70"
    hf.mkdir()
    header = b'{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}'
    (hf / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 10)
    old = time.time() - 500
    for path in (root / "step_5.pt", hf / "model.safetensors", hf):
        os.utime(path, (old, old))
    result = run("checkpoint", "cleanup", str(root), "-n", "1", "--force", "--json")
    assert result.exit_code == 0, result.output
    keep = {k["name"]: k["reason"] for k in of_type(result.stdout, "keep")}
    assert keep["step_4.pt"] == "newest complete"
    assert keep["step_5.pt"].startswith("incomplete: cut short: a zip file without its end")
    assert keep["checkpoint-70"].startswith("incomplete: cut short: model.safetensors: ")
    assert (root / "step_4.pt").exists()


def test_a_local_dry_run_writes_nothing_into_the_directory(tmp_path: Path) -> None:
    # The dry run took the retention lock, creating DIR/.runctl/retention.lock: on a read-only
    # directory (a mounted copy) it failed, exit 1, "Read-only file system".
    root = tmp_path / "checkpoints"
    make_local(root)
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    result = run("checkpoint", "cleanup", str(root), "-n", "1", "--force", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert [d["name"] for d in of_type(result.stdout, "delete")]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before


def test_local_cleanup_does_not_count_what_is_still_being_written(tmp_path: Path) -> None:
    # Run beside training: step_6.pt being appended to, and a Trainer directory without its
    # trainer_state.json, once counted as the newest complete, and the finished ones went.
    root = tmp_path / "checkpoints"
    make_local(root)
    hf = root / "checkpoint-60"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"m")
    (hf / "training_args.bin").write_bytes(b"a")
    old = time.time() - 500
    os.utime(hf / "model.safetensors", (old, old))
    os.utime(hf / "training_args.bin", (old, old))
    with open(root / "step_6.pt", "wb") as writing:
        writing.write(b"half")
        writing.flush()
        result = run("checkpoint", "cleanup", str(root), "-n", "1", "--force", "--json")
    assert result.exit_code == 0, result.output
    keep = {k["name"]: k["reason"] for k in of_type(result.stdout, "keep")}
    assert keep == {
        "checkpoint-60": "incomplete: no trainer_state.json yet (the Hugging Face Trainer writes it last)",
        "step_4.pt": "newest complete",
        "step_6.pt": "incomplete: a process has it open for writing",
    }
    assert sorted(d["name"] for d in of_type(result.stdout, "delete")) == [
        "checkpoint-3", "step_1.pt", "step_2.pt"
    ]


def test_local_cleanup_counts_what_s3_holds_whole_with_durable_in(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path
) -> None:
    # Copied by hand, the checkpoints are in no journal: --durable-in checks S3 for them,
    # file by file: a local copy that differs from what S3 holds is not durable.
    root = tmp_path / "checkpoints"
    make_local(root)
    prefix = bucket.join("run/")
    flag = backend_flag(backend)
    up = run_s3(s3_server, "s3", "upload", str(root), str(prefix), "-r", flag)
    assert up.exit_code == 0, up.output
    (root / "step_2.pt").write_bytes(b"w" * 11)  # another size
    (root / "checkpoint-3" / "model.bin").write_bytes(b"n" * 5)  # the same total size, but
    (root / "checkpoint-3" / "optim.bin").write_bytes(b"o" * 5)  # a file S3 does not have
    later = time.time() + 2
    os.utime(root / "step_1.pt", (later, later))  # the same size, written after the upload
    time.sleep(4.1)  # and none of it is still being written (changed within 2 s)
    # --region after the command too, as every command takes it
    args = ("checkpoint", "cleanup", str(root), "-n", "1", "--json", "--region", "us-east-1", flag)
    result = run_s3(s3_server, *args, "--durable-in", str(prefix))
    assert result.exit_code == 0, result.output
    assert of_type(result.stdout, "delete") == []
    (summary,) = of_type(result.stdout, "summary")
    assert sorted(summary["not_durable"]) == ["checkpoint-3", "step_1.pt", "step_2.pt"]

    earlier = time.time() - 3600
    os.utime(root / "step_1.pt", (earlier, earlier))  # as it was when it went up
    result = run_s3(s3_server, *args, "--durable-in", str(prefix))
    assert result.exit_code == 0, result.output
    assert [d["name"] for d in of_type(result.stdout, "delete")] == ["step_1.pt"]
    assert sorted(p.name for p in root.iterdir() if p.name != ".runctl") == [
        "checkpoint-3",
        "step_2.pt",
        "step_4.pt",
        "train.log",
    ]
    # Another prefix holds none of them: nothing more goes.
    other = run_s3(s3_server, *args, "--durable-in", str(bucket.join("elsewhere/")))
    assert other.exit_code == 0, other.output
    assert of_type(other.stdout, "delete") == []
    # Said so: S3 was asked, not only the journal.
    human = run_s3(s3_server, *args[:5], flag, "--durable-in", str(bucket.join("elsewhere/")))
    assert f"no verified upload of this version in the journal, nor a matching copy in {bucket}elsewhere/" in human.stdout


@pytest.mark.parametrize("bad", [["-n", "0"], ["-n", "x"], []])
def test_local_cleanup_bad_input(tmp_path: Path, bad: list[str]) -> None:
    make_local(tmp_path / "c")
    result = run("checkpoint", "cleanup", str(tmp_path / "c"), *bad)
    assert result.exit_code == 2
    assert len(list((tmp_path / "c").iterdir())) == 5
    missing = run("checkpoint", "cleanup", str(tmp_path / "nope"), "-n", "1")
    assert missing.exit_code == 2 and "no such directory" in missing.stderr


def test_cleanup_commands_as_subprocesses(moto_server: S3Server, tmp_path: Path) -> None:
    bucket = S3URL(moto_server.new_bucket())
    for step in (1, 2, 3):
        put(moto_server, bucket, f"ckpt/step_{step}.pt")
    put(moto_server, bucket, "ckpt/train.log")
    s3 = run_process(
        "s3", "cleanup", f"{bucket}ckpt/", "--keep-last-n", "2", "--json", env=moto_server.env()
    )
    assert s3.returncode == 0, s3.stderr
    assert [d["name"] for d in of_type(s3.stdout, "delete")] == ["step_1.pt"]
    assert set(keys(moto_server, bucket)) == {"ckpt/step_2.pt", "ckpt/step_3.pt", "ckpt/train.log"}

    root = tmp_path / "local"
    make_local(root)
    local = run_process("checkpoint", "cleanup", str(root), "-n", "2", "--force", "--json")
    assert local.returncode == 0, local.stderr
    assert sorted(d["name"] for d in of_type(local.stdout, "delete")) == ["step_1.pt", "step_2.pt"]
    assert sorted(p.name for p in root.iterdir() if p.name != ".runctl") == [
        "checkpoint-3",
        "step_4.pt",
        "train.log",
    ]
