"""`runctl s3 upload -r` and `sync --direction up` mark the directory checkpoints they copy whole.

Without a marker, readers count a directory checkpoint incomplete: the help's own flow
(`upload checkpoints/ ... -r`, then `download ... --latest`) found nothing to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from runctl.checkpoints import MARKER_NAME, Manifest
from runctl.s3url import S3URL
from tests.cli.cli_support import backend_flag, keys, of_type, run_s3
from tests.servers import S3Server


def write(path: Path, data: bytes, age: float = 60.0) -> None:
    """A file last written ``age`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - age
    os.utime(path, (then, then))


def complete(server: S3Server, prefix: S3URL, backend: str) -> dict[str, bool]:
    """Each checkpoint under ``prefix`` and whether review --verify counts it complete."""
    result = run_s3(server, "s3", "review", str(prefix), "--verify", "--json", backend_flag(backend))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    return {c["name"]: c["complete"] for c in doc["checkpoints"]}


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    root = tmp_path / "checkpoints"
    write(root / "checkpoint-5" / "model.bin", b"five" * 100)  # finished a minute ago
    write(root / "checkpoint-5" / "sub" / "optim.bin", b"o" * 10)
    write(root / "checkpoint-10" / "model.bin", b"ten" * 100, age=0)  # just written, but ...
    write(root / "checkpoint-10" / "trainer_state.json", b"{}", age=0)  # ... Hugging Face's sign
    # Still being written, no sign (its mtime ahead of the copy, so a slow machine can't make
    # it look settled)
    write(root / "step-15" / "shard-0.bin", b"s" * 50, age=-30)
    write(root / "logs" / "events.txt", b"log")  # not a checkpoint
    write(root / "step_3.pt", b"file checkpoint")
    return root


def test_upload_marks_each_finished_directory_and_latest_finds_it(
    s3_server: S3Server, bucket: S3URL, backend: str, trained: Path, tmp_path: Path
) -> None:
    prefix = bucket.join("run/")
    # The dry run names the markers the real run then writes, and the one it withholds.
    dry = run_s3(
        s3_server, "s3", "upload", str(trained), str(prefix), "-r", "--dry-run", backend_flag(backend)
    )
    assert dry.exit_code == 0, dry.output
    assert [line for line in dry.stdout.splitlines() if "marked" in line] == [
        f"(dry run) would be marked complete: {prefix}checkpoint-10/",
        f"(dry run) would be marked complete: {prefix}checkpoint-5/",
    ]
    assert f"{prefix}step-15/ is not marked complete" in dry.stderr
    assert keys(s3_server, bucket) == {}
    result = run_s3(
        s3_server, "s3", "upload", str(trained), str(prefix), "-r", backend_flag(backend)
    )
    assert result.exit_code == 0, result.output
    assert f"marked complete: {prefix}checkpoint-5/" in result.stdout
    assert f"marked complete: {prefix}checkpoint-10/" in result.stdout
    # step-15 may still be being written: it is left unmarked, and the user is told why.
    assert f"{prefix}step-15/ is not marked complete" in result.stderr
    assert "no completion sign" in result.stderr
    assert complete(s3_server, prefix, backend) == {
        "step_3.pt": True,
        "checkpoint-5": True,
        "checkpoint-10": True,
        "step-15": False,
    }
    marker = Manifest.from_bytes(keys(s3_server, bucket)[f"run/checkpoint-5/{MARKER_NAME}"])
    assert marker.step == 5 and set(marker.files) == {"model.bin", "sub/optim.bin"}
    # Unchanged now; one marker lost: a dry run names the one marker the real run would write.
    s3_server.client().delete_object(Bucket=bucket.bucket, Key=f"run/checkpoint-5/{MARKER_NAME}")
    dry = run_s3(
        s3_server, "s3", "upload", str(trained), str(prefix), "-r", "--dry-run", backend_flag(backend)
    )
    assert [line for line in dry.stdout.splitlines() if "marked" in line] == [
        f"(dry run) would be marked complete: {prefix}checkpoint-5/",
    ]
    assert f"marked complete: {prefix}checkpoint-5/" in run_s3(
        s3_server, "s3", "upload", str(trained), str(prefix), "-r", backend_flag(backend)
    ).stdout

    down = run_s3(
        s3_server, "s3", "download", str(prefix), str(tmp_path / "resume"), "--latest",
        backend_flag(backend),
    )
    assert down.exit_code == 0, down.output
    assert (tmp_path / "resume" / "checkpoint-10" / "model.bin").read_bytes() == b"ten" * 100


def test_a_rewritten_directory_is_marked_again_and_a_filtered_one_is_not(
    moto_server: S3Server, trained: Path
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    one = bucket.join("run/checkpoint-5/")
    # One checkpoint directory to its own prefix is marked as well.
    result = run_s3(moto_server, "s3", "upload", str(trained / "checkpoint-5"), str(one), "-r", "--json")
    assert result.exit_code == 0, result.output
    assert of_type(result.stdout, "marker") == [
        {"type": "marker", "url": str(one), "complete": True, "dry_run": False}
    ]
    # Uploaded again with a file that grew: the old marker goes first, the new one matches.
    write(trained / "checkpoint-5" / "model.bin", b"five" * 200)
    result = run_s3(moto_server, "s3", "upload", str(trained / "checkpoint-5"), str(one), "-r")
    assert result.exit_code == 0, result.output
    marker = Manifest.from_bytes(keys(moto_server, bucket)[f"run/checkpoint-5/{MARKER_NAME}"])
    assert marker.files["model.bin"].size == 800
    assert complete(moto_server, bucket.join("run/"), "boto3") == {"checkpoint-5": True}

    # A file left out by --exclude: S3 does not hold the whole directory, so no marker.
    result = run_s3(
        moto_server, "s3", "upload", str(trained / "checkpoint-5"), str(bucket.join("x/checkpoint-5/")),
        "-r", "--exclude", "sub/*",
    )
    assert result.exit_code == 0, result.output
    assert "is not marked complete: 1 of its files are not in S3" in result.stderr
    assert f"x/checkpoint-5/{MARKER_NAME}" not in keys(moto_server, bucket)


def test_sync_up_marks_and_delete_keeps_the_markers(
    s3_server: S3Server, bucket: S3URL, backend: str, trained: Path
) -> None:
    prefix = bucket.join("sync/")
    write(trained / "step-15" / "shard-0.bin", b"s" * 50)  # finished: its mtime in the past
    args = ("s3", "sync", str(trained), str(prefix), "--direction", "up", backend_flag(backend))
    dry = run_s3(s3_server, *args, "--delete", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert sorted(m["url"] for m in of_type(dry.stdout, "marker")) == [
        str(prefix.join(f"{name}/")) for name in ("checkpoint-10", "checkpoint-5", "step-15")
    ]
    assert keys(s3_server, bucket) == {}
    result = run_s3(s3_server, *args, "--delete")
    assert result.exit_code == 0, result.output
    assert complete(s3_server, prefix, backend)["checkpoint-5"] is True
    # Again, with nothing changed: --delete must not take the markers (no local file has
    # their name), and the checkpoints stay complete.
    before = markers(s3_server, bucket)
    result = run_s3(s3_server, *args, "--delete", "--json")
    assert result.exit_code == 0, result.output
    (summary,) = of_type(result.stdout, "summary")
    assert (summary["copied"], summary["deleted"]) == (0, 0)
    found = complete(s3_server, prefix, backend)
    assert found["checkpoint-5"] is True and found["checkpoint-10"] is True
    # ... and no marker was written again (watch --exec would take each for a new checkpoint).
    assert of_type(result.stdout, "marker") == [] and markers(s3_server, bucket) == before

    # A checkpoint deleted locally goes from S3 with its marker: no 0-file "complete" left.
    shutil.rmtree(trained / "checkpoint-5")
    result = run_s3(s3_server, *args, "--delete")
    assert result.exit_code == 0, result.output
    assert f"sync/checkpoint-5/{MARKER_NAME}" not in keys(s3_server, bucket)
    assert "checkpoint-5" not in complete(s3_server, prefix, backend)
    # ... and one emptied, its directory still there (the marker stayed, naming files gone).
    for path in (trained / "checkpoint-10").rglob("*"):
        if path.is_file():
            path.unlink()
    result = run_s3(s3_server, *args, "--delete")
    assert result.exit_code == 0, result.output
    assert not [k for k in keys(s3_server, bucket) if k.startswith("sync/checkpoint-10/")]
    # ... and one that holds only what the sync leaves out: an --exclude'd log (diff review).
    for path in (trained / "step-15").rglob("*"):
        if path.is_file():
            path.unlink()
    write(trained / "step-15" / "notes.log", b"n")
    result = run_s3(s3_server, *args, "--delete", "--exclude", "*.log")
    assert result.exit_code == 0, result.output
    assert not [k for k in keys(s3_server, bucket) if k.startswith("sync/step-15/")]


def markers(server: S3Server, bucket: S3URL) -> dict[str, str]:
    """Each marker in the bucket and its ETag (a rewritten marker has another: its time differs)."""
    listed = server.client().list_objects_v2(Bucket=bucket.bucket).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listed if o["Key"].endswith(MARKER_NAME)}


def test_upload_leaves_the_markers_of_unchanged_checkpoints_alone(
    s3_server: S3Server, bucket: S3URL, backend: str, trained: Path
) -> None:
    # Copying the whole tree again after one more checkpoint: the older ones are neither
    # unmarked while it runs (an interrupted or failed copy would leave them incomplete, and
    # cleanup --incomplete-older-than would delete them) nor marked anew.
    prefix = bucket.join("run/")
    up = ("s3", "upload", str(trained), str(prefix), "-r", backend_flag(backend))
    assert run_s3(s3_server, *up).exit_code == 0
    before = markers(s3_server, bucket)
    assert set(before) == {f"run/checkpoint-{n}/{MARKER_NAME}" for n in (5, 10)}
    write(trained / "checkpoint-20" / "model.bin", b"twenty" * 10)
    result = run_s3(s3_server, *up, "--json")
    assert result.exit_code == 0, result.output
    marked = [m["url"] for m in of_type(result.stdout, "marker") if m["complete"]]
    assert marked == [f"{prefix}checkpoint-20/"]  # (step-15, still being written, is not)
    after = markers(s3_server, bucket)
    assert {k: after[k] for k in before} == before
    assert complete(s3_server, prefix, backend)["checkpoint-20"] is True

    # New bytes of the same size under an old mtime (`cp -p`) look unchanged, but upload -r
    # sends every file again: the marker, whose ETags no longer match, is written anew.
    write(trained / "checkpoint-5" / "model.bin", b"FIVE" * 100, age=3600)
    result = run_s3(s3_server, *up)
    assert result.exit_code == 0, result.output
    again = markers(s3_server, bucket)
    five, ten = (f"run/checkpoint-{n}/{MARKER_NAME}" for n in (5, 10))
    assert again[five] != after[five] and again[ten] == after[ten]
    assert complete(s3_server, prefix, backend)["checkpoint-5"] is True


def test_a_round_trip_sends_no_marker_and_a_second_sync_copies_nothing(
    s3_server: S3Server, bucket: S3URL, backend: str, trained: Path, tmp_path: Path
) -> None:
    # Down with its marker, then up to another prefix: the local marker once went up as a file,
    # was rewritten with a new time, and so differed again at every later sync ("copied 1 file").
    flag = backend_flag(backend)
    first, second = bucket.join("a/"), bucket.join("b/")
    assert run_s3(s3_server, "s3", "upload", str(trained), str(first), "-r", flag).exit_code == 0
    copy = tmp_path / "copy"
    down = run_s3(s3_server, "s3", "sync", str(copy), str(first), "-d", "down", flag)
    assert down.exit_code == 0, down.output
    assert (copy / "checkpoint-5" / MARKER_NAME).is_file()  # a faithful copy, marker and all
    then = time.time() - 60  # the files keep S3's times: make them settled, as hours later
    for path in copy.rglob("*"):
        os.utime(path, (then, then))
    up = ("s3", "sync", str(copy), str(second), "-d", "up", "--json", flag)
    result = run_s3(s3_server, *up)
    assert result.exit_code == 0, result.output
    assert not [c for c in of_type(result.stdout, "copy") if c["source"].endswith(MARKER_NAME)]
    assert complete(s3_server, second, backend)["checkpoint-5"] is True  # its own, written anew
    again = run_s3(s3_server, *up)
    (summary,) = of_type(again.stdout, "summary")
    assert summary["copied"] == 0, again.stdout
    # upload -r of the copy does not send the markers either
    upload = run_s3(s3_server, "s3", "upload", str(copy), str(bucket.join("c/")), "-r", "--json", flag)
    assert upload.exit_code == 0, upload.output
    assert not [u for u in of_type(upload.stdout, "upload") if u["source"].endswith(MARKER_NAME)]
    # One level deeper no copy marks it: there the marker goes up as it is (review of af28d63).
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(copy, runs / "7")
    deeper = run_s3(s3_server, "s3", "upload", str(runs), str(bucket.join("d/")), "-r", flag)
    assert deeper.exit_code == 0, deeper.output
    assert f"d/7/checkpoint-5/{MARKER_NAME}" in keys(s3_server, bucket)
    assert complete(s3_server, bucket.join("d/7/"), backend)["checkpoint-5"] is True


def test_a_checkpoint_incomplete_in_s3_stays_so_through_a_round_trip(
    s3_server: S3Server, bucket: S3URL, backend: str, trained: Path, tmp_path: Path
) -> None:
    # checkpoint-5 lost a file in S3 after it was marked; sync down brought its marker and the
    # rest, and sync up to another prefix marked it complete: --latest then restored a
    # checkpoint without its optimizer.
    flag = backend_flag(backend)
    first, second = bucket.join("a/"), bucket.join("b/")
    assert run_s3(s3_server, "s3", "upload", str(trained), str(first), "-r", flag).exit_code == 0
    s3_server.client().delete_object(Bucket=bucket.bucket, Key=f"{first.key}checkpoint-5/sub/optim.bin")
    copy = tmp_path / "copy"
    assert run_s3(s3_server, "s3", "sync", str(copy), str(first), "-d", "down", flag).exit_code == 0
    then = time.time() - 60
    for path in copy.rglob("*"):
        os.utime(path, (then, then))
    result = run_s3(s3_server, "s3", "sync", str(copy), str(second), "-d", "up", flag)
    assert result.exit_code == 0, result.output
    assert "names files it lacks or holds at another size: sub/optim.bin" in result.stderr
    assert complete(s3_server, second, backend)["checkpoint-5"] is False
    assert complete(s3_server, second, backend)["checkpoint-10"] is True


def test_a_deepspeed_step_newer_than_its_latest_is_neither_marked_nor_counted(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path
) -> None:
    # DeepSpeed writes 'latest' once every rank has saved: global_step300 beside a latest that
    # names global_step200 is a save under way. upload -r marked it, and checkpoint cleanup -n 1
    # kept it as the newest complete and deleted global_step200, all DeepSpeed could resume from.
    flag = backend_flag(backend)
    ds = tmp_path / "ds"
    for step in (100, 200, 300):
        write(ds / f"global_step{step}" / "mp_rank_00_model_states.pt", b"z" * step)
    write(ds / "latest", b"global_step200")
    result = run_s3(s3_server, "s3", "upload", str(ds), str(bucket.join("ds/")), "-r", flag)
    assert result.exit_code == 0, result.output
    assert complete(s3_server, bucket.join("ds/"), backend) == {
        "global_step100": True, "global_step200": True, "global_step300": False
    }
    result = run_s3(s3_server, "checkpoint", "cleanup", str(ds), "--keep-last-n", "1", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ds.iterdir() if p.name != ".runctl") == ["global_step200", "global_step300", "latest"]


@pytest.mark.parametrize("command", ["upload", "sync"])
def test_a_failed_file_leaves_only_its_own_directory_unmarked(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    # A half-written file in checkpoint-600 (a periodic `upload -r` beside a Trainer) failed the
    # copy, and no directory was marked: checkpoint-500, whole in S3, read as incomplete.
    from runctl.transfer.boto import BotoTransfer
    from runctl.transfer.s5cmd import S5cmdTransfer

    root = tmp_path / "out"
    for name in ("checkpoint-500", "checkpoint-600"):
        write(root / name / "model.bin", b"m" * 100)
        write(root / name / "trainer_state.json", b"{}")
    backend_class = S5cmdTransfer if backend == "s5cmd" else BotoTransfer
    real = backend_class.put_files

    def put_while_written(self: object, pairs: object, **kwargs: object) -> object:
        result = real(self, pairs, **kwargs)  # type: ignore[arg-type]
        with open(root / "checkpoint-600" / "model.bin", "ab") as fh:
            fh.write(b"still being written")
        return result

    monkeypatch.setattr(backend_class, "put_files", put_while_written)
    prefix = bucket.join("run/")
    args = ["upload", str(root), str(prefix), "-r"] if command == "upload" else ["sync", str(root), str(prefix), "-d", "up"]
    result = run_s3(s3_server, "s3", *args, "--json", backend_flag(backend))
    assert result.exit_code == 1, result.output
    landed = keys(s3_server, bucket)
    assert f"run/checkpoint-500/{MARKER_NAME}" in landed
    assert f"run/checkpoint-600/{MARKER_NAME}" not in landed
    unmarked = {r["url"]: r["reason"] for r in of_type(result.stdout, "marker") if not r["complete"]}
    assert list(unmarked) == [str(prefix.join("checkpoint-600/"))]
    assert complete(s3_server, prefix, backend) == {"checkpoint-500": True, "checkpoint-600": False}


def test_a_proxy_that_cannot_reach_a_loopback_endpoint_never_splits_a_checkpoint(
    moto_server: S3Server, tmp_path: Path
) -> None:
    """s5cmd (Go) never proxies loopback; botocore did, through HTTP(S)_PROXY: with a proxy that
    could not reach the endpoint, `upload -r` sent a checkpoint's files direct and failed its
    marker, so the checkpoint never completed (config pass)."""
    from tests.cli.cli_support import run_process
    from tests.servers import free_port

    bucket = S3URL(moto_server.new_bucket())
    ckpt = tmp_path / "checkpoint-5"
    write(ckpt / "model.bin", b"weights")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: a proxy that reaches nothing
    proxies = {name: dead for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    env = moto_server.env() | proxies | {"NO_PROXY": "", "no_proxy": ""}
    done = run_process("s3", "upload", str(ckpt), f"{bucket}run/checkpoint-5/", "-r", env=env)
    assert done.returncode == 0, done.stderr
    assert set(keys(moto_server, bucket)) == {"run/checkpoint-5/model.bin", f"run/checkpoint-5/{MARKER_NAME}"}
