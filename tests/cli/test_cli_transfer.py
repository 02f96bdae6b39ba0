"""`runctl s3 upload / download / sync / list` against real S3 servers, on both transfer backends."""

from __future__ import annotations

import io
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from runctl.cli.output import Output
from runctl.s3url import S3URL
from runctl.transfer.base import BucketInfo
from tests.cli.cli_support import (
    assert_one_line_error,
    backend_flag,
    keys,
    of_type,
    put,
    records,
    run,
    run_process,
    run_s3,
)
from tests.servers import ACCESS_KEY, SECRET_KEY, S3Server


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    (root / "checkpoint-5").mkdir(parents=True)
    (root / "step_1.pt").write_bytes(b"one")
    (root / "step_2.pt").write_bytes(b"two!")
    (root / "checkpoint-5" / "model.bin").write_bytes(b"weights")
    (root / "notes.tmp").write_bytes(b"scratch")
    return root


def test_upload_file_and_tree(s3_server: S3Server, bucket: S3URL, backend: str, tree: Path) -> None:
    flag = backend_flag(backend)
    # one file into a "directory" URL, human output
    result = run_s3(s3_server, "s3", "upload", str(tree / "step_1.pt"), f"{bucket}run/", flag)
    assert result.exit_code == 0, result.output
    assert f"upload: {tree / 'step_1.pt'} -> {bucket}run/step_1.pt" in result.stdout
    # one file to an exact key
    result = run_s3(
        s3_server,
        "s3",
        "upload",
        str(tree / "step_2.pt"),
        f"{bucket}exact/renamed.pt",
        flag,
        "--json",
    )
    assert result.exit_code == 0, result.output
    (item,) = of_type(result.stdout, "upload")
    assert item["destination"] == f"{bucket}exact/renamed.pt" and item["size"] == 4
    # a tree, recursive, with an exclude; the options also work after the command
    result = run_s3(
        s3_server,
        "s3",
        "upload",
        str(tree),
        f"{bucket}tree",
        "--recursive",
        "--exclude",
        "*.tmp",
        flag,
        "--json",
    )
    assert result.exit_code == 0, result.output
    uploads = of_type(result.stdout, "upload")
    assert sorted(u["destination"] for u in uploads) == [
        f"{bucket}tree/checkpoint-5/model.bin",
        f"{bucket}tree/step_1.pt",
        f"{bucket}tree/step_2.pt",
    ]
    (summary,) = of_type(result.stdout, "summary")
    assert summary["files"] == 3 and summary["bytes"] == 3 + 4 + 7 and summary["dry_run"] is False
    assert keys(s3_server, bucket) == {
        "run/step_1.pt": b"one",
        "exact/renamed.pt": b"two!",
        "tree/checkpoint-5/model.bin": b"weights",
        "tree/step_1.pt": b"one",
        "tree/step_2.pt": b"two!",
    }
    # aws's idiom takes files back with --include after --exclude '*'; here an exclude match
    # wins, as with s5cmd: nothing goes, and the user is told how to say it instead.
    result = run_s3(
        s3_server, "s3", "upload", str(tree), f"{bucket}idiom/", "-r",
        "--exclude", "*", "--include", "*.pt", flag,
    )
    assert result.exit_code == 0, result.output
    assert "give only `--include '*.pt'`" in result.output
    assert "not marked complete" not in result.output  # checkpoint-5/ was not copied at all
    assert not any(k.startswith("idiom/") for k in keys(s3_server, bucket))


def test_upload_include_and_dry_run(
    s3_server: S3Server, bucket: S3URL, backend: str, tree: Path
) -> None:
    flag = backend_flag(backend)
    result = run_s3(
        s3_server,
        "s3",
        "upload",
        str(tree),
        f"{bucket}run/",
        "-r",
        "--include",
        "step_*",
        "--dry-run",
        "--json",
        flag,
    )
    assert result.exit_code == 0, result.output
    planned = of_type(result.stdout, "upload")
    assert sorted(p["destination"] for p in planned) == [
        f"{bucket}run/step_1.pt",
        f"{bucket}run/step_2.pt",
    ]
    assert all(p["dry_run"] for p in planned)
    assert keys(s3_server, bucket) == {}

    result = run_s3(
        s3_server, "s3", "upload", str(tree), f"{bucket}run/", "-r", "--include", "step_*", flag
    )
    assert result.exit_code == 0, result.output
    assert set(keys(s3_server, bucket)) == {"run/step_1.pt", "run/step_2.pt"}


def test_upload_storage_class(moto_server: S3Server, backend: str, tree: Path) -> None:
    bucket = S3URL(moto_server.new_bucket())
    result = run_s3(
        moto_server,
        "s3",
        "upload",
        str(tree / "step_1.pt"),
        f"{bucket}a.pt",
        "--storage-class",
        "standard_ia",
        backend_flag(backend),
    )
    assert result.exit_code == 0, result.output
    head = moto_server.client().head_object(Bucket=bucket.bucket, Key="a.pt")
    assert head.get("StorageClass") == "STANDARD_IA"


def test_download_object_prefix_and_dry_run(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path
) -> None:
    flag = backend_flag(backend)
    put(s3_server, bucket, "run/step_1.pt", b"one")
    put(s3_server, bucket, "run/checkpoint-5/model.bin", b"weights")
    put(s3_server, bucket, "run-old/step_0.pt", b"old")

    # one object into an existing directory
    dest = tmp_path / "single"
    dest.mkdir()
    result = run_s3(
        s3_server, "s3", "download", f"{bucket}run/step_1.pt", str(dest), flag, "--json"
    )
    assert result.exit_code == 0, result.output
    (item,) = of_type(result.stdout, "download")
    assert item["destination"] == str(dest / "step_1.pt") and item["size"] == 3
    assert (dest / "step_1.pt").read_bytes() == b"one"

    # a trailing '/' names a directory that does not exist yet
    result = run_s3(
        s3_server, "s3", "download", f"{bucket}run/step_1.pt", f"{tmp_path / 'new'}/", flag
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "step_1.pt").read_bytes() == b"one"
    missing = run_s3(
        s3_server, "s3", "download", f"{bucket}run/nope.pt", f"{tmp_path / 'new2'}/", flag
    )
    assert missing.exit_code == 2 and not (tmp_path / "new2").exists()

    # dry run of a prefix writes nothing
    out = tmp_path / "tree"
    result = run_s3(
        s3_server,
        "s3",
        "download",
        f"{bucket}run/",
        str(out),
        "--recursive",
        "--dry-run",
        flag,
        "--json",
    )
    assert result.exit_code == 0, result.output
    # with the sizes it would bring down, as upload's dry run gives (each said 0; surface pass)
    assert sorted(r["size"] for r in of_type(result.stdout, "download")) == [3, 7]
    assert of_type(result.stdout, "summary")[0]["bytes"] == 10
    assert not out.exists()
    single = run_s3(s3_server, "s3", "download", f"{bucket}run/step_1.pt", str(out) + "/", "--dry-run", flag, "--json")
    assert [r["size"] for r in of_type(single.stdout, "download")] == [3] and not out.exists()
    # a prefix named without its '/' (it gave the first object's size alone; diff review)
    bare = run_s3(s3_server, "s3", "download", f"{bucket}run", str(out), "-r", "--dry-run", flag)
    assert "dry run: would download 2 files (10 B)" in bare.stdout, bare.stdout

    # the prefix for real: relative paths kept, the sibling prefix run-old/ not included
    result = run_s3(s3_server, "s3", "download", f"{bucket}run", str(out), "-r", flag)
    assert result.exit_code == 0, result.output
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert found == ["checkpoint-5/model.bin", "step_1.pt"]
    assert (out / "checkpoint-5" / "model.bin").read_bytes() == b"weights"
    assert "downloaded 2 files" in result.stdout


def test_files_saved_at_one_step_are_one_checkpoint_to_cleanup_and_to_latest(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path
) -> None:
    # BasicSR's net_g_N.pth beside net_d_N.pth: cleanup -n 1 deleted net_d_5000.pth, and
    # --latest brought net_g_5000.pth alone.
    for step in (4000, 5000):
        for part in ("d", "g"):
            put(s3_server, bucket, f"gan/net_{part}_{step}.pth", f"{part}{step}".encode())
    flag = backend_flag(backend)
    result = run_s3(s3_server, "s3", "cleanup", f"{bucket}gan/", "--keep-last-n", "1", flag)
    assert result.exit_code == 0, result.output
    assert sorted(keys(s3_server, bucket)) == ["gan/net_d_5000.pth", "gan/net_g_5000.pth"]
    result = run_s3(s3_server, "s3", "download", f"{bucket}gan/", str(tmp_path / "r"), "--latest", flag, "--json")
    assert result.exit_code == 0, result.output
    (latest,) = of_type(result.stdout, "latest")
    assert sorted([latest["name"], *latest["also"]]) == ["net_d_5000.pth", "net_g_5000.pth"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["net_d_5000.pth", "net_g_5000.pth"]
    assert (tmp_path / "r" / "net_d_5000.pth").read_bytes() == b"d5000"
    human = run_s3(s3_server, "s3", "download", f"{bucket}gan/", str(tmp_path / "h"), "--latest", flag)
    assert human.exit_code == 0, human.output
    assert ", saved at the same step) (10 B) to " in human.stdout
    # -q: a line per file of the step, not whichever one landed last
    quiet = run_s3(s3_server, "s3", "download", f"{bucket}gan/", str(tmp_path / "q"), "--latest", "-q", flag)
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout.splitlines() == [str(tmp_path / "q" / f"net_{p}_5000.pth") for p in "dg"]


def test_a_newest_step_without_its_partner_is_not_whole_to_cleanup_nor_to_latest(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path
) -> None:
    # A run killed after model_step_5.pt landed and before optim_step_5.pt did: `cleanup -n 1`
    # deleted the step 3 pair, and `download --latest` brought model_step_5.pt alone.
    for name in ("model_step_3.pt", "optim_step_3.pt", "model_step_5.pt"):
        put(s3_server, bucket, f"run/{name}", name.encode())
    flag = backend_flag(backend)
    result = run_s3(s3_server, "s3", "cleanup", f"{bucket}run/", "-n", "1", flag)
    assert result.exit_code == 0, result.output
    assert sorted(keys(s3_server, bucket)) == ["run/model_step_3.pt", "run/model_step_5.pt", "run/optim_step_3.pt"]
    result = run_s3(s3_server, "s3", "download", f"{bucket}run/", str(tmp_path / "r"), "--latest", flag)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["model_step_3.pt", "optim_step_3.pt"]
    assert "optim_step_#.pt is missing" in result.stderr
    # Once the partner lands, the step is whole: cleanup keeps it alone.
    put(s3_server, bucket, "run/optim_step_5.pt", b"o5")
    result = run_s3(s3_server, "s3", "cleanup", f"{bucket}run/", "-n", "1", flag)
    assert result.exit_code == 0, result.output
    assert sorted(keys(s3_server, bucket)) == ["run/model_step_5.pt", "run/optim_step_5.pt"]


def test_download_latest_complete_checkpoint(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path
) -> None:
    pytest.importorskip("runctl.uploader")
    from runctl.checkpoints import MARKER_NAME, FileEntry, Manifest

    put(s3_server, bucket, "ckpt/checkpoint-10/model.bin", b"ten")
    marker = Manifest("checkpoint-10", 10, {"model.bin": FileEntry(3)}, "test", 0.0)
    put(s3_server, bucket, f"ckpt/checkpoint-10/{MARKER_NAME}", marker.to_bytes())
    put(s3_server, bucket, "ckpt/checkpoint-20/model.bin", b"twenty")  # no marker: incomplete
    put(s3_server, bucket, "ckpt/train.log", b"log")

    # --dry-run names it and downloads nothing
    dry = run_s3(
        s3_server, "s3", "download", f"{bucket}ckpt/", str(tmp_path / "resume"), "--latest",
        "--dry-run", backend_flag(backend),
    )
    assert dry.exit_code == 0, dry.output
    assert "would download the latest complete checkpoint checkpoint-10" in dry.stderr + dry.stdout
    assert not (tmp_path / "resume").exists()

    result = run_s3(
        s3_server,
        "s3",
        "download",
        f"{bucket}ckpt/",
        str(tmp_path / "resume"),
        "--latest",
        backend_flag(backend),
        "--json",
    )
    assert result.exit_code == 0, result.output
    (latest,) = of_type(result.stdout, "latest")
    assert latest["name"] == "checkpoint-10"
    assert (Path(latest["destination"]) / "model.bin").read_bytes() == b"ten"
    assert not (tmp_path / "resume" / "checkpoint-20").exists()
    assert "not part of the checkpoint" not in result.stderr

    # Restored over an older copy: a file the checkpoint lacks stays, and is named.
    (tmp_path / "resume" / "checkpoint-10" / "sub").mkdir()
    (tmp_path / "resume" / "checkpoint-10" / "sub" / "scheduler.pt").write_bytes(b"old")
    again = run_s3(
        s3_server, "s3", "download", f"{bucket}ckpt/", str(tmp_path / "resume"), "--latest",
        backend_flag(backend),
    )
    assert again.exit_code == 0, again.output
    assert "also holds 1 file(s) that are not part of the checkpoint (sub/scheduler.pt)" in again.stderr
    assert (tmp_path / "resume" / "checkpoint-10" / "sub" / "scheduler.pt").read_bytes() == b"old"

    empty = run_s3(
        s3_server,
        "s3",
        "download",
        f"{bucket}nothing/",
        str(tmp_path / "r2"),
        "--latest",
        backend_flag(backend),
    )
    assert empty.exit_code == 1
    assert "no complete checkpoint" in empty.stderr


def _touch(path: Path, data: bytes, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def test_sync_up_then_down_with_delete(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path
) -> None:
    flag = backend_flag(backend)
    src = tmp_path / "src"
    old = time.time() - 3600
    _touch(src / "a.pt", b"aaa", old)
    _touch(src / "sub" / "b.pt", b"bbbb", old)
    put(s3_server, bucket, "run/extra.pt", b"gone soon")
    put(s3_server, bucket, "run-other/keep.pt", b"never touched")

    plan = run_s3(
        s3_server,
        "s3",
        "sync",
        str(src),
        f"{bucket}run/",
        "--direction",
        "up",
        "--delete",
        "--dry-run",
        "--json",
        flag,
    )
    assert plan.exit_code == 0, plan.output
    assert sorted(c["destination"] for c in of_type(plan.stdout, "copy")) == [
        f"{bucket}run/a.pt",
        f"{bucket}run/sub/b.pt",
    ]
    assert [d["target"] for d in of_type(plan.stdout, "delete")] == [f"{bucket}run/extra.pt"]
    assert set(keys(s3_server, bucket)) == {"run/extra.pt", "run-other/keep.pt"}

    result = run_s3(
        s3_server, "s3", "sync", str(src), f"{bucket}run/", "-d", "up", "--delete", flag, "--json"
    )
    assert result.exit_code == 0, result.output
    assert keys(s3_server, bucket) == {
        "run/a.pt": b"aaa",
        "run/sub/b.pt": b"bbbb",
        "run-other/keep.pt": b"never touched",
    }

    # nothing differs now
    again = run_s3(s3_server, "s3", "sync", str(src), f"{bucket}run/", "-d", "up", flag, "--json")
    (summary,) = of_type(again.stdout, "summary")
    assert (summary["copied"], summary["unchanged"]) == (0, 2)

    # a same-size change is seen by mtime, and not with --size-only
    _touch(src / "a.pt", b"AAA", time.time() + 120)
    size_only = run_s3(
        s3_server,
        "s3",
        "sync",
        str(src),
        f"{bucket}run/",
        "-d",
        "up",
        "--size-only",
        "--dry-run",
        flag,
        "--json",
    )
    assert of_type(size_only.stdout, "copy") == []
    by_time = run_s3(
        s3_server, "s3", "sync", str(src), f"{bucket}run/", "-d", "up", "--dry-run", flag, "--json"
    )
    assert [c["destination"] for c in of_type(by_time.stdout, "copy")] == [f"{bucket}run/a.pt"]

    # down into an empty directory, with --delete removing a local extra
    dst = tmp_path / "dst"
    _touch(dst / "stale.pt", b"stale", old)
    down = run_s3(
        s3_server, "s3", "sync", str(dst), f"{bucket}run/", "--direction", "down", "--delete", flag
    )
    assert down.exit_code == 0, down.output
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "a.pt",
        "sub/b.pt",
    ]
    assert "delete: " in down.stdout and "stale.pt" in down.stdout


def test_each_file_moved_is_one_line_in_human_mode_one_record_in_json_and_nothing_when_quiet(
    s3_server: S3Server, bucket: S3URL, backend: str, tree: Path, tmp_path: Path
) -> None:
    flag = backend_flag(backend)
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    url = f"{bucket}lines/"

    up = run_s3(s3_server, "s3", "upload", str(tree), url, "--recursive", flag)
    assert up.exit_code == 0, up.output
    moved = [line for line in up.stdout.splitlines() if line.startswith("upload: ")]
    assert sorted(moved) == sorted(f"upload: {tree / rel} -> {url}{rel}" for rel in files)
    assert up.stdout.endswith("\n") and not any(
        line.startswith("{") for line in up.stdout.splitlines()
    )

    dest = tmp_path / "down"
    human = run_s3(s3_server, "s3", "download", url, f"{dest}/", "--recursive", flag)
    assert human.exit_code == 0, human.output
    moved = [line for line in human.stdout.splitlines() if line.startswith("download: ")]
    assert sorted(moved) == sorted(f"download: {url}{rel} -> {dest / rel}" for rel in files)

    as_json = run_s3(s3_server, "s3", "download", url, f"{tmp_path / 'j'}/", "-r", flag, "--json")
    assert as_json.exit_code == 0, as_json.output
    got = of_type(as_json.stdout, "download")
    assert sorted((r["source"], r["size"]) for r in got) == sorted(
        (f"{url}{rel}", (tree / rel).stat().st_size) for rel in files
    )
    assert "download: " not in as_json.stdout  # every line parsed as JSON by of_type

    quiet = run_s3(s3_server, "s3", "download", url, f"{tmp_path / 'q'}/", "-r", flag, "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == ""
    assert (
        sorted(
            p.relative_to(tmp_path / "q").as_posix()
            for p in (tmp_path / "q").rglob("*")
            if p.is_file()
        )
        == files
    )

    (tree / "step_1.pt").write_bytes(b"changed, and longer")
    synced = run_s3(s3_server, "s3", "sync", str(tree), url, "--direction", "up", flag)
    assert synced.exit_code == 0, synced.output
    assert [line for line in synced.stdout.splitlines() if line.startswith("copy: ")] == [
        f"copy: {tree / 'step_1.pt'} -> {url}step_1.pt"
    ]


def test_list_one_level_recursive_and_summary(
    s3_server: S3Server, bucket: S3URL, backend: str
) -> None:
    flag = backend_flag(backend)
    put(s3_server, bucket, "run/step_1.pt", b"1" * 1536)
    put(s3_server, bucket, "run/checkpoint-5/model.bin", b"22")
    put(s3_server, bucket, "run/checkpoint-5/opt.bin", b"333")
    put(s3_server, bucket, "run-old/step_0.pt", b"0")

    one = run_s3(s3_server, "s3", "list", f"{bucket}run/", flag, "--json")
    assert one.exit_code == 0, one.output
    items = records(one.stdout)
    assert [(i["type"], i["key"]) for i in items] == [
        ("prefix", "run/checkpoint-5/"),
        ("object", "run/step_1.pt"),
    ] or [(i["type"], i["key"]) for i in items] == [
        ("object", "run/step_1.pt"),
        ("prefix", "run/checkpoint-5/"),
    ]

    human = run_s3(s3_server, "s3", "list", f"{bucket}run/", flag, "--human-readable")
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    assert any(line.split() == ["DIR", "checkpoint-5/"] for line in lines), human.stdout
    assert any(line.endswith("1.5 KiB  step_1.pt") for line in lines), human.stdout

    rec = run_s3(
        s3_server, "s3", "list", f"{bucket}run/", "--recursive", "--summarize", flag, "--json"
    )
    objects = of_type(rec.stdout, "object")
    assert sorted(o["key"] for o in objects) == [
        "run/checkpoint-5/model.bin",
        "run/checkpoint-5/opt.bin",
        "run/step_1.pt",
    ]
    (summary,) = of_type(rec.stdout, "summary")
    assert (summary["objects"], summary["size"]) == (3, 1536 + 2 + 3)

    text = run_s3(s3_server, "s3", "list", f"{bucket}run/", "-r", "--summarize", flag)
    assert "Total Objects: 3" in text.stdout and "Total Size: 1541" in text.stdout
    # In this machine's time, as aws s3 ls and watch show it (it was UTC, with no zone said).
    step_1 = next(o for o in objects if o["key"] == "run/step_1.pt")
    when = datetime.fromisoformat(step_1["last_modified"]).astimezone()
    assert any(line.startswith(f"{when:%Y-%m-%d %H:%M:%S} ") for line in text.stdout.splitlines())
    saved = os.environ.get("TZ")
    try:
        os.environ["TZ"] = "America/New_York"
        time.tzset()
        eastern = run_s3(s3_server, "s3", "list", f"{bucket}run/step_1.pt", flag)
        assert eastern.stdout.startswith(f"{when.astimezone():%Y-%m-%d %H:%M:%S} "), eastern.stdout
        assert when.astimezone().utcoffset() != when.astimezone(timezone.utc).utcoffset()
    finally:
        if saved is None:
            os.environ.pop("TZ")
        else:
            os.environ["TZ"] = saved
        time.tzset()

    # As aws s3 ls: nothing matched exits 1 (after the summary), a bucket with keys exits 0.
    for missing in (f"{bucket}nothing/", f"{bucket}run/step_9", f"{bucket}zz"):
        none = run_s3(s3_server, "s3", "list", missing, "--summarize", flag)
        assert none.exit_code == 1, (missing, none.output)
        assert "Total Objects: 0" in none.stdout
        assert none.stderr.strip() == f"runctl: error: nothing found at {missing}"
    assert run_s3(s3_server, "s3", "list", f"{bucket}ru", "-r", flag).exit_code == 0


def test_list_without_a_bucket_lists_the_buckets(
    s3_server: S3Server, bucket: S3URL, backend: str
) -> None:
    # As `aws s3 ls` and `s5cmd ls`: once, "runctl s3 list s3://" said "the bucket name is empty".
    flag = backend_flag(backend)
    for args in ([], ["s3://"]):
        result = run_s3(s3_server, "s3", "list", *args, flag, "--json")
        assert result.exit_code == 0, result.output
        (mine,) = [r for r in of_type(result.stdout, "bucket") if r["name"] == bucket.bucket]
        assert mine["url"] == str(bucket)
        created = datetime.fromisoformat(mine["created"])
        assert abs(time.time() - created.timestamp()) < 3600
    text = run_s3(s3_server, "s3", "list", flag, "--summarize")
    assert text.exit_code == 0, text.output
    assert f"{created.astimezone():%Y-%m-%d %H:%M:%S}  {bucket.bucket}" in text.stdout.splitlines()
    assert "Total Buckets: " in text.stdout
    wrong = run_s3(s3_server, "s3", "list", "-r", flag)
    assert wrong.exit_code == 2 and "--recursive" in wrong.stderr


def test_a_legacy_bucket_name_lists_as_s3_has_it() -> None:
    # Buckets made in us-east-1 before 2018 may hold capitals or '_', which S3URL refuses.
    legacy = BucketInfo("Old_Bucket", datetime(2017, 1, 2, tzinfo=timezone.utc))
    assert legacy.to_json() == {
        "url": "s3://Old_Bucket/",
        "name": "Old_Bucket",
        "created": "2017-01-02T00:00:00+00:00",
    }


def test_list_pages_through_many_keys(moto_server: S3Server, backend: str, tmp_path: Path) -> None:
    bucket = S3URL(moto_server.new_bucket())
    many = tmp_path / "many"
    many.mkdir()
    for i in range(1105):
        (many / f"f{i:05d}").write_bytes(b"")
    assert run_s3(moto_server, "s3", "upload", str(many), f"{bucket}m/", "-r", "-q").exit_code == 0
    result = run_s3(moto_server, "s3", "list", f"{bucket}m/", "--json", backend_flag(backend))
    assert result.exit_code == 0, result.output
    listed = [r["key"] for r in of_type(result.stdout, "object")]
    assert len(listed) == 1105 and len(set(listed)) == 1105


def test_every_transfer_command_as_a_subprocess(
    moto_server: S3Server, tmp_path: Path, tree: Path
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    env = moto_server.env()

    up = run_process("s3", "upload", str(tree), f"{bucket}run/", "--recursive", "--json", env=env)
    assert up.returncode == 0, up.stderr
    assert len(of_type(up.stdout, "upload")) == 4

    listing = run_process("s3", "list", f"{bucket}run/", "-r", "--json", "--no-use-s5cmd", env=env)
    assert listing.returncode == 0, listing.stderr
    assert len(of_type(listing.stdout, "object")) == 4

    down = run_process("s3", "download", f"{bucket}run/", str(tmp_path / "back"), "-r", env=env)
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "back" / "checkpoint-5" / "model.bin").read_bytes() == b"weights"

    sync = run_process(
        "s3", "sync", str(tree), f"{bucket}run/", "--direction", "up", "--json", env=env
    )
    assert sync.returncode == 0, sync.stderr
    (summary,) = of_type(sync.stdout, "summary")
    assert summary["copied"] == 0 and summary["unchanged"] == 4


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdout", io.StringIO())
    with Output().progress("upload", 10) as advance:
        assert advance is None
    monkeypatch.setattr("sys.stdout", _FakeTTY())
    for quiet_or_json in (Output(json=True), Output(quiet=True)):
        with quiet_or_json.progress("upload", 10) as advance:
            assert advance is None
    with Output().progress("upload", 10) as advance:
        assert advance is not None
        advance(4)
        advance(6)
    monkeypatch.setenv("NO_COLOR", "1")
    assert Output().console().no_color


def test_dot_slash_dash_is_a_file_named_dash_not_stdin(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The help promises it; pathlib turns './-' into '-', which once read stdin instead.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").write_bytes(b"a file named dash")
    result = run_s3(s3_server, "s3", "upload", "./-", f"{bucket}dash", backend_flag(backend))
    assert result.exit_code == 0, result.output
    assert keys(s3_server, bucket)["dash"] == b"a file named dash"


def test_an_s3_url_given_as_local_is_refused_not_taken_for_a_path(
    moto_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # download s3://b/x s3://b/copy/ wrote ./s3:/b/copy/x and exited 0, where aws s3 cp copies
    # within S3 (surface pass).
    monkeypatch.chdir(tmp_path)
    bucket = S3URL(moto_server.new_bucket())
    put(moto_server, bucket, "run/step_1.pt", b"one")
    (tmp_path / "f.pt").write_bytes(b"f")
    for args in (
        ["download", f"{bucket}run/step_1.pt", f"{bucket}copy/"],
        ["download", f"{bucket}run/", f"{bucket}copy/", "--latest"],
        ["download", f"{bucket}run/", f"{bucket}copy/", "-r"],
        ["sync", f"{bucket}copy/", f"{bucket}run/", "-d", "down"],
        ["upload", f"{bucket}run/step_1.pt", f"{bucket}copy/"],
    ):
        result = run_s3(moto_server, "s3", *args)
        assert result.exit_code == 2, (args, result.output)
        assert_one_line_error(result.stderr, contains="is a URL: runctl copies between S3 and this machine")
    assert list(tmp_path.iterdir()) == [tmp_path / "f.pt"]
    assert sorted(keys(moto_server, bucket)) == ["run/step_1.pt"]


def _unreadable(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Make ``directory`` unreadable to the walk (tests run as root, whom chmod 000 does not stop)."""
    real = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(str(path)) == directory:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)


def test_what_the_walk_cannot_see_is_never_deleted_by_sync_up(
    moto_server: S3Server, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unreadable directory was skipped without a word (exit 0), and --delete then deleted
    # its copy in S3; so did a symlinked directory's, which aws and s5cmd upload through.
    bucket = S3URL(moto_server.new_bucket())
    flag = backend_flag(backend)
    src = tmp_path / "src"
    for rel in ("ok.txt", "locked/inside.txt", "real/f.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    for key in ("locked/inside.txt", "alias/f.txt", "sub/.runctl/config", "gone.txt"):
        put(moto_server, bucket, f"run/{key}", b"in s3")
    (src / "alias").symlink_to(src / "real", target_is_directory=True)
    _unreadable(monkeypatch, src / "locked")
    result = run_s3(moto_server, "s3", "sync", str(src), f"{bucket}run/", "-d", "up", "--delete", flag)
    assert result.exit_code == 1, result.output
    assert "locked" in result.stderr and "cannot read" in result.stderr
    assert "alias" in result.stderr and "symlink" in result.stderr
    in_s3 = set(keys(moto_server, bucket))
    assert "run/gone.txt" not in in_s3  # what the source lacks still goes
    assert {"run/locked/inside.txt", "run/alias/f.txt", "run/sub/.runctl/config"} <= in_s3
    # upload -r fails the same way, after sending the rest
    result = run_s3(moto_server, "s3", "upload", "-r", str(src), f"{bucket}up/", flag)
    assert result.exit_code == 1 and "cannot read" in result.stderr, result.output
    assert "up/ok.txt" in keys(moto_server, bucket)


def test_sync_leaves_runctl_state_out_both_ways(
    moto_server: S3Server, backend: str, tmp_path: Path
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    flag = backend_flag(backend)
    own = ("sub/.runctl/config", ".runctl-tmp-x", "sub/.runctl-tmp-y/inner.pt")
    for key in ("a.txt", *own):
        put(moto_server, bucket, f"run/{key}", b"x")
    dest = tmp_path / "dest"
    for _ in range(2):  # the second time, nothing is copied again
        result = run_s3(
            moto_server, "s3", "sync", str(dest), f"{bucket}run/", "-d", "down", flag, "--json"
        )
        assert result.exit_code == 0, result.output
    (summary,) = of_type(result.stdout, "summary")
    assert (summary["copied"], summary["unchanged"]) == (0, 1)
    assert sorted(p.name for p in dest.rglob("*")) == ["a.txt"]
    # Going up, the walk skips them locally: what it skips is not taken for gone by --delete.
    for rel in own:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(b"x")
    result = run_s3(
        moto_server, "s3", "sync", str(dest), f"{bucket}run/", "-d", "up", "--delete", flag, "--json"
    )
    assert result.exit_code == 0, result.output
    (summary,) = of_type(result.stdout, "summary")
    assert (summary["copied"], summary["deleted"]) == (0, 0)
    assert set(keys(moto_server, bucket)) == {f"run/{key}" for key in ("a.txt", *own)}


@pytest.mark.parametrize("nested", [False, True], ids=["at-the-prefix", "below-it"])
def test_sync_delete_keeps_pinned_checkpoints_and_says_so(
    moto_server: S3Server, backend: str, tmp_path: Path, nested: bool
) -> None:
    # A pin keeps its checkpoint through every cleanup; sync --delete deleted it, exit 0.
    from runctl.checkpoints import pin_url

    bucket = S3URL(moto_server.new_bucket())
    flag = backend_flag(backend)
    run = bucket.join("top/run/")
    for key in ("step_1.pt", "step_2.pt", "checkpoint-3/a.bin", "checkpoint-3/b.bin", "step_10.pt",
                "net_g_7.pth", "net_d_7.pth"):
        put(moto_server, run, run.key + key, b"x")
    for name in ("step_1.pt", "checkpoint-3", "net_g_7.pth"):  # a pin keeps its step: net_d_7.pth too
        put(moto_server, run, pin_url(run, name).key, b"")
    local = tmp_path / "local"
    (local / "run" if nested else local).mkdir(parents=True)
    (local / ("run/step_4.pt" if nested else "step_4.pt")).write_bytes(b"y")
    target = f"{bucket}top/" if nested else str(run)
    dry = run_s3(moto_server, "s3", "sync", str(local), target, "-d", "up", "--delete", "--dry-run", flag)
    assert dry.exit_code == 0, dry.output
    assert "would keep 2 objects of a pinned checkpoint" in dry.stderr
    result = run_s3(moto_server, "s3", "sync", str(local), target, "-d", "up", "--delete", flag, "--json")
    assert result.exit_code == 0, result.output
    (summary,) = of_type(result.stdout, "summary")
    assert (summary["deleted"], summary["kept"]) == (2, 5)
    assert {r["pin"] for r in of_type(result.stdout, "kept")} == {
        str(pin_url(run, "step_1.pt")), str(pin_url(run, "checkpoint-3")), str(pin_url(run, "net_g_7.pth"))
    }
    assert f"delete {pin_url(run, 'checkpoint-3')} to unpin it" in result.stderr
    left = {k for k in keys(moto_server, bucket) if ".runctl/" not in k}
    assert left == {f"top/run/{k}" for k in ("step_1.pt", "checkpoint-3/a.bin", "checkpoint-3/b.bin", "step_4.pt",
                                              "net_g_7.pth", "net_d_7.pth")}


def test_sync_down_delete_clears_a_local_file_standing_where_a_directory_comes_down(
    moto_server: S3Server, backend: str, tmp_path: Path
) -> None:
    # Local file y, S3 y/inner: --dry-run said "copy y/inner, delete y"; the run downloaded
    # first, failed y/inner on the file in its way ("File exists"), then deleted y, exit 1.
    bucket = S3URL(moto_server.new_bucket())
    put(moto_server, bucket, "run/y/inner", b"inner")
    local = tmp_path / "local"
    local.mkdir()
    (local / "y").write_bytes(b"local y")
    result = run_s3(moto_server, "s3", "sync", str(local), f"{bucket}run/", "-d", "down", "--delete", backend_flag(backend))
    assert result.exit_code == 0, result.output
    assert (local / "y" / "inner").read_bytes() == b"inner"


@pytest.mark.parametrize("direction", ["up", "down"])
def test_sync_delete_refuses_an_empty_source(
    moto_server: S3Server, backend: str, tmp_path: Path, direction: str
) -> None:
    # A mistyped prefix (or an empty directory) made --delete wipe the other side, exit 0.
    bucket = S3URL(moto_server.new_bucket())
    flag = backend_flag(backend)
    put(moto_server, bucket, "run/a.txt", b"a")
    local = tmp_path / "local"
    local.mkdir()
    if direction == "down":
        (local / "mine.txt").write_bytes(b"mine")
        url = f"{bucket}typo/"
    else:
        url = f"{bucket}run/"
    for dry in ((), ("--dry-run",)):
        result = run_s3(moto_server, "s3", "sync", str(local), url, "-d", direction, "--delete", *dry, flag)
        assert result.exit_code == 2, result.output
        assert "refused" in result.stderr
    assert (direction == "up") or (local / "mine.txt").exists()
    assert "run/a.txt" in keys(moto_server, bucket)


def test_sync_up_with_delete_to_a_bucket_root_needs_confirming(
    moto_server: S3Server, tmp_path: Path
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    put(moto_server, bucket, "other/x.txt", b"x")
    local = tmp_path / "local"
    local.mkdir()
    (local / "a.txt").write_bytes(b"a")
    # A dry run says what the real run does: it planned the deletion, exit 0, which the real
    # run then refused (CLI pass), as `cleanup --dry-run` refuses a bucket root too.
    for dry in ((), ("--dry-run",)):
        result = run_s3(moto_server, "s3", "sync", str(local), str(bucket), "-d", "up", "--delete", *dry)
        assert result.exit_code == 2 and "--yes-bucket-root" in result.stderr, result.output
    assert "other/x.txt" in keys(moto_server, bucket)
    result = run_s3(
        moto_server, "s3", "sync", str(local), str(bucket), "-d", "up", "--delete", "--yes-bucket-root"
    )
    assert result.exit_code == 0, result.output
    assert set(keys(moto_server, bucket)) == {"a.txt"}


def test_keys_with_a_backslash_come_down_and_survive_a_sync_round_trip(
    s3_server: S3Server, bucket: S3URL, backend: str, tmp_path: Path
) -> None:
    # On POSIX a backslash is one more character of a file name (aws downloads such keys).
    # They were refused as unsafe, so 'sync down' then 'sync up --delete' deleted them in S3.
    flag = backend_flag(backend)
    for key in ("a\\b.pt", "d\\\\e\\n.pt", "plain.pt"):
        put(s3_server, bucket, f"run/{key}", key.encode())
    down = tmp_path / "down"
    result = run_s3(s3_server, "s3", "download", "-r", f"{bucket}run/", str(down), flag)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in down.iterdir()} == {
        k: k.encode() for k in ("a\\b.pt", "d\\\\e\\n.pt", "plain.pt")
    }
    mirror = tmp_path / "mirror"
    for direction in ("down", "up"):
        result = run_s3(s3_server, "s3", "sync", str(mirror), f"{bucket}run/", "-d", direction, "--delete", flag)
        assert result.exit_code == 0, result.output
    assert set(keys(s3_server, bucket)) == {"run/a\\b.pt", "run/d\\\\e\\n.pt", "run/plain.pt"}


def test_downloads_into_the_current_directory_as_dot(
    moto_server: S3Server, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `download -r s3://b/p/ .` failed every object directly under the prefix ("its directory
    # resolves outside"): the parent of "a.txt" was taken for "/".
    bucket = S3URL(moto_server.new_bucket())
    flag = backend_flag(backend)
    put(moto_server, bucket, "run/a.txt", b"a")
    put(moto_server, bucket, "run/sub/b.txt", b"b")
    put(moto_server, bucket, "ckpt/step_7.pt", b"seven")
    for i, command in enumerate(
        [
            ("download", "-r", f"{bucket}run/", "."),
            ("sync", ".", f"{bucket}run/", "-d", "down"),
            ("download", f"{bucket}run/a.txt", "."),
            ("download", f"{bucket}ckpt/", ".", "--latest"),
        ]
    ):
        here = tmp_path / f"cwd{i}"
        here.mkdir()
        monkeypatch.chdir(here)
        result = run_s3(moto_server, "s3", *command, flag)
        assert result.exit_code == 0, (command, result.output)
        expected = {"step_7.pt": b"seven"} if "--latest" in command else {"a.txt": b"a"}
        if "-r" in command or "sync" in command:
            expected["sub/b.txt"] = b"b"
        assert {p.relative_to(here).as_posix(): p.read_bytes() for p in here.rglob("*") if p.is_file()} == expected


def test_a_profile_with_its_endpoint_in_the_config_file_reaches_it(
    moto_server: S3Server, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `aws s3 ls --profile p` found the endpoint_url in ~/.aws/config; runctl went to AWS.
    bucket = S3URL(moto_server.new_bucket())
    put(moto_server, bucket, "run/a.txt", b"a")
    config = tmp_path / "config"
    keys_of = f"aws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    config.write_text(f"[profile local]\nendpoint_url = {moto_server.endpoint_url}\n{keys_of}")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    result = run("s3", "list", f"{bucket}run/", "--profile", "local", backend_flag(backend), "--json")
    assert result.exit_code == 0, result.output
    assert [r["key"] for r in of_type(result.stdout, "object")] == ["run/a.txt"]
