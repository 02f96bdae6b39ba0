"""Both transfer backends, on both servers, give the same results for every operation."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from runctl.exceptions import (
    EndpointError,
    NoSuchBucketError,
    NoSuchKeyError,
    PartialTransferError,
    UsageError,
)
from runctl.s3url import S3URL
from runctl.transfer import ops
from runctl.transfer.base import MiB, ObjectInfo, PrefixInfo, Transfer
from tests.servers import S3Server, etags_known_or_absent, names_it_keeps

WEIRD_KEYS = (
    "weird/with space.txt",
    "weird/ünïcødé-日本.txt",
    "weird/star*.txt",
    "weird/question?.txt",
    "weird/[bracket].txt",
    "weird/trailing space ",
    "weird/plus+and%percent.txt",
)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def listing(transfer: Transfer, url: S3URL, recursive: bool = True) -> list[tuple[Any, ...]]:
    """A listing reduced to what both backends must agree on (times to whole seconds)."""
    rows: list[tuple[Any, ...]] = []
    for entry in transfer.iter_objects(url, recursive=recursive):
        if isinstance(entry, PrefixInfo):
            rows.append(("prefix", entry.key))
        else:
            rows.append(("object", entry.key, entry.size, entry.etag))
    return rows


def put_raw(server: S3Server, bucket: str, keys: list[str], body: bytes = b"x") -> None:
    """Create keys with plain boto3 (not the code under test), in parallel."""
    client = server.client()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=body), keys))


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# -- small objects, literal keys --------------------------------------------------------------


@pytest.mark.parametrize("key", WEIRD_KEYS)
def test_put_get_stat_literal_keys(transfer: Transfer, bucket: S3URL, key: str) -> None:
    data = f"payload of {key}".encode()
    url = bucket.join(key)
    transfer.put_bytes(data, url)
    assert transfer.get_bytes(url) == data
    info = transfer.stat(url)
    assert info is not None
    assert (info.key, info.size, info.etag) == (key, len(data), md5(data))
    assert listing(transfer, bucket) == [("object", key, len(data), md5(data))]


def test_files_with_glob_characters_are_literal(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, {"a1.bin": b"one", "a2.bin": b"two", "a*.bin": b"star", "a[12].bin": b"class"})
    pairs = [(src / name, bucket.join("g", name)) for name in ("a1.bin", "a2.bin", "a*.bin", "a[12].bin")]
    transfer.put_files(pairs)
    assert sorted(row[1] for row in listing(transfer, bucket)) == ["g/a*.bin", "g/a1.bin", "g/a2.bin", "g/a[12].bin"]

    out = tmp_path / "out"
    out.mkdir()
    got = ops.download(transfer, bucket.join("g", "a*.bin"), out)
    assert got == [(bucket.join("g", "a*.bin"), out / "a*.bin")]
    assert tree_files(out) == {"a*.bin": b"star"}
    transfer.get_files([(bucket.join("g", "a[12].bin"), out / "class")])
    assert (out / "class").read_bytes() == b"class"


def test_a_local_path_through_a_symlink_and_dotdot_is_the_kernels(
    transfer: Transfer, bucket: S3URL, tmp_path: Path
) -> None:
    # dd/l links to other/sub, so dd/l/../f.pt is other/f.pt. s5cmd was handed the path cleaned
    # as text (dd/f.pt): it sent another file, and a download -r wrote outside its destination.
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "dd").mkdir()
    (tmp_path / "other" / "f.pt").write_bytes(b"through the link")
    (tmp_path / "dd" / "f.pt").write_bytes(b"as text")
    (tmp_path / "dd" / "l").symlink_to(tmp_path / "other" / "sub")
    via = tmp_path / "dd" / "l" / ".."
    ops.upload(transfer, via / "f.pt", bucket.join("x/f.pt"))
    assert transfer.get_bytes(bucket.join("x/f.pt")) == b"through the link"
    ops.download(transfer, bucket.join("x/f.pt"), via / "one.pt")
    ops.download(transfer, bucket.join("x/"), via / "tree", recursive=True)
    assert (tmp_path / "other" / "one.pt").read_bytes() == b"through the link"
    assert tree_files(tmp_path / "other" / "tree") == {"f.pt": b"through the link"}
    assert sorted(p.name for p in (tmp_path / "dd").iterdir()) == ["f.pt", "l"]


def test_upload_file_into_prefix_and_to_key(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    f = tmp_path / "step_1.pt"
    f.write_bytes(b"weights")
    assert ops.upload(transfer, f, bucket.join("run/")) == [(f, bucket.join("run/step_1.pt"))]
    assert ops.upload(transfer, f, bucket.join("run/renamed.pt")) == [(f, bucket.join("run/renamed.pt"))]
    assert [row[1] for row in listing(transfer, bucket)] == ["run/renamed.pt", "run/step_1.pt"]
    with pytest.raises(UsageError, match="recursive"):
        ops.upload(transfer, tmp_path, bucket.join("run/"))
    with pytest.raises(UsageError, match="no such file"):
        ops.upload(transfer, tmp_path / "missing", bucket.join("run/"))


def test_listing_recursive_and_one_level(transfer: Transfer, bucket: S3URL) -> None:
    put_raw_keys = ["ckpt/a.pt", "ckpt/sub/b.pt", "ckpt/sub/deeper/c.pt", "ckpt-old/d.pt", "top.txt"]
    for key in put_raw_keys:
        transfer.put_bytes(key.encode(), bucket.join(key))
    assert [row[1] for row in listing(transfer, bucket.join("ckpt/"))] == [
        "ckpt/a.pt",
        "ckpt/sub/b.pt",
        "ckpt/sub/deeper/c.pt",
    ]
    # One level: per page, common prefixes first, then objects (as s5cmd and the AWS CLI print).
    assert listing(transfer, bucket.join("ckpt/"), recursive=False) == [
        ("prefix", "ckpt/sub/"),
        ("object", "ckpt/a.pt", 9, md5(b"ckpt/a.pt")),
    ]
    assert listing(transfer, bucket, recursive=False) == [
        ("prefix", "ckpt-old/"),
        ("prefix", "ckpt/"),
        ("object", "top.txt", 7, md5(b"top.txt")),
    ]
    # A bare key is a literal string prefix: "ckpt" also matches "ckpt-old/".
    assert len(listing(transfer, bucket.join("ckpt"))) == 4
    assert listing(transfer, bucket.join("nothing/")) == []


def test_listing_has_times_and_storage_class(transfer: Transfer, bucket: S3URL) -> None:
    before = time.time()
    transfer.put_bytes(b"abc", bucket.join("t.txt"))
    (obj,) = list(transfer.iter_objects(bucket))
    assert isinstance(obj, ObjectInfo)
    assert obj.last_modified.tzinfo is not None
    assert before - 5 <= obj.last_modified.timestamp() <= time.time() + 5
    assert obj.storage_class == "STANDARD"
    stat = transfer.stat(bucket.join("t.txt"))
    assert stat is not None
    assert int(stat.last_modified.timestamp()) == int(obj.last_modified.timestamp())
    assert (stat.size, stat.etag, stat.storage_class) == (obj.size, obj.etag, obj.storage_class)


def test_stat_missing_object_is_none(transfer: Transfer, bucket: S3URL) -> None:
    assert transfer.stat(bucket.join("no/such/key.pt")) is None
    transfer.put_bytes(b"x", bucket.join("dir/file"))
    assert transfer.stat(bucket.join("dir/")) is None
    assert transfer.stat(bucket.join("dir")) is None


def test_missing_bucket_is_a_typed_error(transfer: Transfer, s3_server: S3Server, tmp_path: Path) -> None:
    missing = S3URL(f"no-such-bucket-{os.getpid()}-{time.monotonic_ns()}")
    with pytest.raises(NoSuchBucketError) as info:
        list(transfer.iter_objects(missing.join("x/")))
    assert info.value.code == "NoSuchBucket"
    with pytest.raises(NoSuchBucketError):
        transfer.put_bytes(b"x", missing.join("k"))
    with pytest.raises(NoSuchBucketError):
        transfer.get_bytes(missing.join("k"))
    with pytest.raises(NoSuchBucketError):
        transfer.get_files([(missing.join("k"), tmp_path / "k")])
    src = tmp_path / "f"
    src.write_bytes(b"data")
    with pytest.raises(NoSuchBucketError):
        transfer.put_files([(src, missing.join("k"))])


def test_an_unreachable_endpoint_is_an_endpoint_error(backend: str, tmp_path: Path) -> None:
    # boto3's connection errors are not HTTPClientErrors: they came out as plain TransferErrors
    # (PartialTransferError for a batch), which `except EndpointError` / ConnectionError missed.
    from runctl.config import Credentials, S3Config
    from runctl.transfer import get_transfer
    from tests.servers import ACCESS_KEY, SECRET_KEY, free_port

    config = S3Config(
        f"http://127.0.0.1:{free_port()}", static_credentials=Credentials(ACCESS_KEY, SECRET_KEY)
    )
    src = tmp_path / "f"
    src.write_bytes(b"data")
    where = S3URL("nowhere", "run/")
    transfer = get_transfer(config, use_s5cmd=backend == "s5cmd")
    try:
        for call in (
            lambda: transfer.put_files([(src, where.join("f"))]),
            lambda: transfer.stat(where.join("f")),
            lambda: list(transfer.iter_objects(where)),
            lambda: transfer.delete_keys("nowhere", ["run/f"]),
        ):
            with pytest.raises(EndpointError) as caught:
                call()
            assert isinstance(caught.value, ConnectionError)
        # A batch that failed whole names each item with its own reason, so a caller listing
        # the items does not repeat the batch's summary under each (sync down did: N² text).
        pairs = [(src, where.join(f"f{i}")) for i in range(3)]
        with pytest.raises(EndpointError) as caught:
            transfer.put_files(pairs)
        assert sorted(caught.value.failures) == sorted(str(url) for _, url in pairs)
        assert not any("failed for" in reason for reason in caught.value.failures.values())
        failures: dict[str, str] = {}
        ops._collect(caught.value, [str(url) for _, url in pairs], failures)
        assert failures == caught.value.failures
    finally:
        transfer.close()


def test_missing_key_is_a_typed_error(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    with pytest.raises(NoSuchKeyError):
        transfer.get_bytes(bucket.join("missing"))
    with pytest.raises(NoSuchKeyError):
        transfer.get_files([(bucket.join("missing"), tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    with pytest.raises(NoSuchKeyError):
        ops.download(transfer, bucket.join("missing"), tmp_path / "m")
    with pytest.raises(NoSuchKeyError):
        ops.download(transfer, bucket.join("empty/"), tmp_path / "d" / "e", recursive=True)
    assert not (tmp_path / "d").exists()  # not even the temporary directory of a prefix download


def test_missing_bucket_in_a_prefix_download_is_a_typed_error(
    transfer: Transfer, tmp_path: Path
) -> None:
    missing = S3URL(f"no-such-bucket-{os.getpid()}-{time.monotonic_ns()}", "run/")
    with pytest.raises(NoSuchBucketError):
        ops.download(transfer, missing, tmp_path / "d", recursive=True)
    assert not (tmp_path / "d").exists()
    # One object: a HEAD answers a bare 404 for a missing bucket too; it must not read as NoSuchKey.
    with pytest.raises(NoSuchBucketError):
        ops.download(transfer, missing.join("step_1.pt"), tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_partial_failure_names_each_item(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    transfer.put_bytes(b"good", bucket.join("good"))
    with pytest.raises(PartialTransferError) as info:
        transfer.get_files([(bucket.join("good"), tmp_path / "good"), (bucket.join("bad"), tmp_path / "bad")])
    (name,) = info.value.failures
    assert str(bucket.join("bad")) in name
    assert (tmp_path / "good").read_bytes() == b"good"


def test_get_files_takes_pairs_that_are_still_coming(
    transfer: Transfer, bucket: S3URL, tmp_path: Path
) -> None:
    # Retention hands its markers to get_files as the listing shows them (an iterator).
    transfer.put_bytes(b"alpha", bucket.join("a"))
    transfer.put_bytes(b"beta", bucket.join("b"))
    pairs = iter(
        [
            (bucket.join("a"), tmp_path / "a"),
            (bucket.join("missing"), tmp_path / "m"),
            (bucket.join("b"), tmp_path / "b"),
        ]
    )
    with pytest.raises(PartialTransferError) as info:
        transfer.get_files(pairs)
    assert list(info.value.failures) == [str(bucket.join("missing"))]
    assert "1 of 3" in str(info.value)
    assert (tmp_path / "a").read_bytes() == b"alpha" and (tmp_path / "b").read_bytes() == b"beta"

    def broken() -> Any:
        yield bucket.join("a"), tmp_path / "again"
        raise RuntimeError("the listing broke")

    with pytest.raises(RuntimeError, match="the listing broke"):
        transfer.get_files(broken())
    transfer.get_files(iter([]))  # nothing to do


# -- big and many -----------------------------------------------------------------------------


def test_200mib_multipart_roundtrip(
    transfer: Transfer, s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    block = os.urandom(MiB)
    with open(big, "wb") as fh:
        for i in range(200):  # every MiB differs, so a misordered or repeated part changes the hash
            fh.write(i.to_bytes(8, "big") + block[8:])
    url = bucket.join("big/model.ckpt")
    moved: list[int] = []
    transfer.put_files([(big, url)], progress=moved.append)
    info = transfer.stat(url)
    assert info is not None and info.size == 200 * MiB
    if s3_server.kind == "moto":
        assert info.etag is not None and "-" in info.etag, "200 MiB must go up as a multipart upload"
    else:  # rclone serve s3 reports the whole file's MD5 whatever the upload's shape
        digest = hashlib.md5()
        with open(big, "rb") as fh:
            for chunk in iter(lambda: fh.read(4 * MiB), b""):
                digest.update(chunk)
        assert info.etag == digest.hexdigest()
    back = tmp_path / "back.bin"
    transfer.get_files([(url, back)])
    assert file_sha256(back) == file_sha256(big)
    if moved:  # progress is optional, but when reported it must add up
        assert sum(moved) == 200 * MiB


def test_tree_of_1000_small_files(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, s3_server: S3Server
) -> None:
    src = tmp_path / "src"
    files = {f"d{i % 10}/f{i:04d}.bin": f"{i}".encode() * (i % 7 + 1) for i in range(1000)}
    make_tree(src, files)
    uploaded = ops.upload(transfer, src, bucket.join("tree"), recursive=True)
    assert len(uploaded) == 1000
    rows = listing(transfer, bucket.join("tree/"))
    assert [row[1] for row in rows] == [f"tree/{rel}" for rel in sorted(files)]
    etags_known_or_absent(
        s3_server, [(row[1], row[3]) for row in rows], {f"tree/{k}": md5(v) for k, v in files.items()}
    )  # and the download below checks every byte
    out = tmp_path / "out"
    got = ops.download(transfer, bucket.join("tree/"), out, recursive=True)
    assert len(got) == 1000
    assert tree_files(out) == files


def test_files_that_appear_during_a_tree_upload_are_reported_as_what_s3_got(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # s5cmd's directory copy walks the directory again: a checkpoint saved after runctl's walk
    # went up unreported and unchecked (summary 254 files, S3 260), possibly half-written.
    src = tmp_path / "src"
    make_tree(src, {f"f{i:03d}.bin": b"x" * 10 for i in range(100)})
    plain_tree, put_tree = ops._plain_tree, type(transfer).put_tree

    def walk_then_save(*args: Any, **kwargs: Any) -> Any:
        pairs = plain_tree(*args, **kwargs)
        (src / "late.pt").write_bytes(b"saved after the walk")
        (src / "growing.pt").write_bytes(b"first half")
        return pairs

    def put_while_saving(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = put_tree(self, *args, **kwargs)
        with open(src / "growing.pt", "ab") as fh:  # still being written after it went up
            fh.write(b", second half")
        return result

    monkeypatch.setattr(ops, "_plain_tree", walk_then_save)
    monkeypatch.setattr(type(transfer), "put_tree", put_while_saving)
    url = bucket.join("tree/")
    failures: dict[str, str] = {}
    try:
        done = ops.upload(transfer, src, url, recursive=True)
    except PartialTransferError as exc:
        done, failures = exc.done, exc.failures
    in_s3 = {row[1] for row in listing(transfer, url)}
    reported = {u.key for _, u in done}
    # What went up and is whole is reported; what went up torn fails, by name; nothing else.
    assert in_s3 - reported == {S3URL.parse(name).key for name in failures} <= {"tree/growing.pt"}
    assert reported <= in_s3 and len(reported) >= 100
    # s5cmd's directory copy walks again and finds them; boto3 sends the pairs it was given.
    assert ("tree/late.pt" in in_s3) == (transfer.name == "s5cmd")
    if transfer.name == "s5cmd":
        assert list(failures) == [str(url.join("growing.pt"))]
        assert "while it was written" in failures[str(url.join("growing.pt"))]


def test_files_that_appear_during_a_tree_upload_that_partly_fails_are_reported_too(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The directory copy's list of what it sent beyond the pairs was lost when a pair failed.
    from runctl.transfer import s5cmd as s5cmd_module

    src = tmp_path / "src"
    make_tree(src, {f"f{i:03d}.bin": b"x" * 10 for i in range(100)})
    plain_tree, tree_copy = ops._plain_tree, s5cmd_module._tree_copy

    def walk_then_save(*args: Any, **kwargs: Any) -> Any:
        pairs = plain_tree(*args, **kwargs)
        (src / "late.pt").write_bytes(b"saved after the walk")
        if transfer.name != "s5cmd":
            (src / "f000.bin").unlink()  # local retention, after the walk
        return pairs

    def plan_then_delete(*args: Any, **kwargs: Any) -> Any:
        plan = tree_copy(*args, **kwargs)
        (src / "f000.bin").unlink()  # after the plan's stat, before s5cmd's own walk
        return plan

    monkeypatch.setattr(ops, "_plain_tree", walk_then_save)
    monkeypatch.setattr(s5cmd_module, "_tree_copy", plan_then_delete)
    url = bucket.join("tree/")
    with pytest.raises(PartialTransferError) as info:
        ops.upload(transfer, src, url, recursive=True)
    assert list(info.value.failures) == [str(url.join("f000.bin"))]
    in_s3 = {row[1] for row in listing(transfer, url)}
    assert {u.key for _, u in info.value.done} == in_s3
    assert ("tree/late.pt" in in_s3) == (transfer.name == "s5cmd")


#: A tree big enough for a directory copy (s5cmd ``put_tree``), with names a walk could get wrong.
TREE_NAMES = [
    ".hidden",
    "sub/.also-hidden",
    "empty",
    "with space/ünïcødé ✓.pt",
    "it's \"quoted\".pt",
    "tab\there.pt",
    "plus+and%percent&amp=.bin",
    "deep/er/still/leaf.pt",
    "-leading-dash.pt",
] + [f"many/f{i:03d}.bin" for i in range(80)]


def test_tree_upload_is_exactly_its_regular_files(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, s3_server: S3Server
) -> None:
    names = names_it_keeps(s3_server, TREE_NAMES)
    files = {rel: (b"" if rel == "empty" else rel.encode() * 3) for rel in names}
    make_tree(tmp_path / "src", files)
    (tmp_path / "src" / "empty dir").mkdir()
    moved: list[int] = []
    uploaded = ops.upload(transfer, tmp_path / "src", bucket.join("t/"), recursive=True, progress=moved.append)
    assert sorted(str(u) for _, u in uploaded) == sorted(str(bucket.join("t", rel)) for rel in files)
    rows = listing(transfer, bucket)
    assert [row[1] for row in rows] == sorted(f"t/{rel}" for rel in files)
    etags_known_or_absent(
        s3_server, [(row[1], row[3]) for row in rows], {f"t/{k}": md5(v) for k, v in files.items()}
    )
    if moved:
        assert sum(moved) == sum(len(data) for data in files.values())


def test_tree_upload_skips_what_a_walk_skips(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    # Each of these makes the tree not plain, so no backend may copy the directory whole.
    files = {f"f{i:03d}.bin": b"%d" % i for i in range(80)}
    cases: dict[str, Any] = {
        "state dir": lambda src: make_tree(src, {".runctl/journal.jsonl": b"{}"}),
        "interrupted download": lambda src: make_tree(src, {".runctl-tmp-0123": b"partial"}),
        "interrupted prefix download": lambda src: make_tree(src, {".runctl-tmp-x1/a": b"part"}),
        "dir symlink": lambda src: (src / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True),
        "fifo": lambda src: os.mkfifo(src / "pipe"),
        "dangling symlink": lambda src: (src / "dangling").symlink_to(tmp_path / "missing"),
    }
    make_tree(tmp_path / "elsewhere", {"outside.bin": b"outside"})
    for i, (case, add) in enumerate(cases.items()):
        src = tmp_path / f"src{i}"
        make_tree(src, files)
        add(src)
        ops.upload(transfer, src, bucket.join(f"c{i}/"), recursive=True)
        keys = [row[1] for row in listing(transfer, bucket.join(f"c{i}/"))]
        assert keys == [f"c{i}/{rel}" for rel in sorted(files)], case
    src = tmp_path / "filelink"
    make_tree(src, files)
    (src / "z-link.bin").symlink_to(tmp_path / "elsewhere" / "outside.bin")
    ops.upload(transfer, src, bucket.join("l/"), recursive=True, exclude=["f000.bin"])
    keys = [row[1] for row in listing(transfer, bucket.join("l/"))]
    assert keys == [f"l/{rel}" for rel in sorted(files) if rel != "f000.bin"] + ["l/z-link.bin"]
    assert transfer.get_bytes(bucket.join("l/z-link.bin")) == b"outside"


def test_tree_upload_from_a_directory_named_like_a_glob(
    transfer: Transfer, bucket: S3URL, tmp_path: Path
) -> None:
    files = {f"f{i:03d}.bin": b"%d" % i for i in range(80)}
    make_tree(tmp_path / "a", {"stray.bin": b"not mine"})  # what "[ab]*" would also match
    src = tmp_path / "[ab]*"
    make_tree(src, files)
    ops.upload(transfer, src, bucket.join("g/"), recursive=True)
    assert [row[1] for row in listing(transfer, bucket)] == [f"g/{rel}" for rel in sorted(files)]


def test_tree_upload_to_a_missing_bucket_is_that_error_once(
    transfer: Transfer, tmp_path: Path
) -> None:
    # As for one file: the typed error (exit 2), not "N of N failed" with the whole batch's
    # message repeated for each file (and, on boto3, the first file's cause under every name).
    make_tree(tmp_path / "src", {f"f{i:03d}.bin": b"x" for i in range(80)})
    missing = S3URL(f"no-such-bucket-{os.getpid()}-{time.monotonic_ns()}")
    with pytest.raises(NoSuchBucketError) as info:
        ops.upload(transfer, tmp_path / "src", missing.join("t/"), recursive=True)
    assert not isinstance(info.value, PartialTransferError)
    assert info.value.exit_code == 2
    assert str(info.value).count("NoSuchBucket") <= 6  # at most the five it shows, and its code


def test_upload_include_exclude(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"a.pt": b"1", "b.log": b"2", "sub/c.pt": b"3", "sub/skip.pt": b"4"})
    ops.upload(transfer, tmp_path / "src", bucket.join("r/"), recursive=True, include=["*.pt"], exclude=["*skip*"])
    assert [row[1] for row in listing(transfer, bucket)] == ["r/a.pt", "r/sub/c.pt"]
    planned = ops.upload(transfer, tmp_path / "src", bucket.join("dry/"), recursive=True, dry_run=True)
    assert len(planned) == 4
    assert listing(transfer, bucket.join("dry/")) == []


# -- containment ------------------------------------------------------------------------------

HOSTILE_KEYS = (
    "run/../escaped.txt",
    "run/a/../../escaped2.txt",
    "run/../../../../tmp/escaped3.txt",
    "run/./dot.txt",
    "run/a//double.txt",
    # On POSIX a backslash is part of a name: the file "back\\..\\slash.txt" inside the destination.
    *(["run/back\\..\\slash.txt"] if os.sep == "\\" else []),
)


def test_recursive_download_never_escapes(
    transfer: Transfer, s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    client = s3_server.client()
    stored: list[str] = []
    refused: dict[str, str] = {}
    for key in HOSTILE_KEYS:
        try:
            client.put_object(Bucket=bucket.bucket, Key=key, Body=b"evil")
        except Exception as exc:  # the server's own rule, not ours
            refused[key] = type(exc).__name__
    present = {o.key for o in transfer.iter_objects(bucket)}
    stored = [key for key in HOSTILE_KEYS if key in present]
    if not any(".." in key.split("/") for key in stored):
        pytest.skip(f"{s3_server.kind} cannot store keys with '..' (refused: {sorted(refused)})")
    client.put_object(Bucket=bucket.bucket, Key="run/safe/ok.txt", Body=b"ok")
    safe = {"safe/ok.txt": b"ok"}
    if os.sep == "/":
        client.put_object(Bucket=bucket.bucket, Key="run/back\\..\\slash.txt", Body=b"name")
        safe["back\\..\\slash.txt"] = b"name"
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(PartialTransferError) as info:
        ops.download(transfer, bucket.join("run/"), dest, recursive=True)
    assert set(info.value.failures) == {str(bucket.join(key)) for key in stored}
    assert info.value.exit_code == 1
    assert tree_files(dest) == safe
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == sorted(
        ["box", "box/dest", "box/dest/safe", *(f"box/dest/{rel}" for rel in safe)]
    )
    assert not Path("/tmp/escaped3.txt").exists()
    plan = ops.plan_sync(transfer, dest, bucket.join("run/"), "down")
    assert {url for url, _ in plan.skipped} == {str(bucket.join(key)) for key in stored}


def test_download_never_writes_through_a_symlink(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    transfer.put_bytes(b"ok", bucket.join("run/safe/ok.txt"))
    transfer.put_bytes(b"via symlink", bucket.join("run/link/through.txt"))
    transfer.put_bytes(b"replaced", bucket.join("run/file-link"))
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    dest.mkdir()
    (dest / "link").symlink_to(outside, target_is_directory=True)
    (dest / "file-link").symlink_to(outside / "precious")

    with pytest.raises(PartialTransferError) as info:
        ops.download(transfer, bucket.join("run/"), dest, recursive=True)
    assert set(info.value.failures) == {str(bucket.join("run/link/through.txt"))}
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    assert (outside / "precious").read_bytes() == b"keep me"
    # The symlinked file itself is replaced by the download, its target untouched.
    assert not (dest / "file-link").is_symlink() and (dest / "file-link").read_bytes() == b"replaced"
    assert (dest / "safe" / "ok.txt").read_bytes() == b"ok"


def test_download_objects_is_contained(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    transfer.put_bytes(b"1", bucket.join("run/checkpoint-5/model.bin"))
    transfer.put_bytes(b"2", bucket.join("run/checkpoint-5/opt/state.bin"))
    objs = [o for o in transfer.iter_objects(bucket.join("run/checkpoint-5/")) if isinstance(o, ObjectInfo)]
    forged = ObjectInfo(bucket.bucket, "run/checkpoint-5/../../evil", 1, objs[0].last_modified)
    with pytest.raises(PartialTransferError) as info:
        ops.download_objects(transfer, [*objs, forged], bucket.join("run/"), tmp_path / "out")
    assert list(info.value.failures) == [str(forged.url)]
    assert tree_files(tmp_path / "out") == {"checkpoint-5/model.bin": b"1", "checkpoint-5/opt/state.bin": b"2"}
    assert not (tmp_path / "evil").exists()


def test_recursive_download_skips_folder_marker_objects(
    transfer: Transfer, s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    # The S3 console's "Create folder" makes an empty object named "fm/": under the prefix being
    # downloaded it has an empty relative key, and nothing to write. (rclone, which keeps
    # objects as files, refuses to store such keys.)
    if s3_server.kind != "rclone":
        put_raw(s3_server, bucket.bucket, ["fm/", "fm/sub/"], body=b"")
    put_raw(s3_server, bucket.bucket, ["fm/sub/step_1.pt", "fm/step_2.pt"])
    for prefix, want in (("fm/", {"sub/step_1.pt": b"x", "step_2.pt": b"x"}), ("fm/sub/", {"step_1.pt": b"x"})):
        dest = tmp_path / prefix.replace("/", "_")
        done = ops.download(transfer, bucket.join(prefix), dest, recursive=True)
        assert sorted(str(path.relative_to(dest)) for _, path in done) == sorted(want)
        assert tree_files(dest) == want


def test_download_is_atomic_and_replaces(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    transfer.put_bytes(b"new contents", bucket.join("f.bin"))
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    ops.download(transfer, bucket.join("f.bin"), tmp_path)
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with pytest.raises(UsageError, match="recursive"):
        ops.download(transfer, bucket.join("dir/"), tmp_path)


# -- delete -----------------------------------------------------------------------------------


def test_delete_more_than_1000_keys(transfer: Transfer, s3_server: S3Server, bucket: S3URL) -> None:
    keys = [f"many/k{i:05d}" for i in range(1100)]
    put_raw(s3_server, bucket.bucket, keys + ["keep/one"])
    result = transfer.delete_keys(bucket.bucket, (k for k in keys + ["many/never-existed"]))
    assert result.errors == {}
    assert result.deleted == 1101
    assert listing(transfer, bucket) == [("object", "keep/one", 1, md5(b"x"))]
    assert transfer.delete_keys(bucket.bucket, []).deleted == 0


def _put_one_by_one(server: S3Server, bucket: str, keys: list[str]) -> None:
    """Keys with control characters, one at a time: rclone keeps them under their visible forms
    (U+241B for ESC) on disk, and with uploads landing in parallel it now and then listed one
    under that form (1 run in 2 CIs; ``names_it_keeps`` says the same of tabs)."""
    client = server.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")


def _control_keys(server: S3Server) -> list[str]:
    """Keys XML 1.0 cannot carry as themselves; a carriage return only on moto (rclone keeps
    objects as files and lists one back changed)."""
    keys = ["ctl/ck\x1b[1]/step_1.pt", "ctl/step_2\x01.pt", "ctl/step_3\x0b.pt"]
    return keys + (["ctl/step_4\r.pt"] if server.kind == "moto" else [])


def test_keys_xml_cannot_carry_are_listed_and_deleted_exactly(
    transfer: Transfer, s3_server: S3Server, bucket: S3URL
) -> None:
    # s5cmd's DeleteObjects body had U+FFFD in place of the ESC: S3 deleted "ck\ufffd[1]/..."
    # (another prefix) and kept the key asked for; botocore's body was refused whole
    # (MalformedXML), plain keys of the batch too. s5cmd's listing read such a key as U+FFFD
    # (rclone) or failed (moto: SerializationError), and a CR as a newline (keys pass).
    odd = _control_keys(s3_server)
    neighbours = ["ctl/ck\ufffd[1]/step_1.pt", "ctl/step_5.pt"]
    _put_one_by_one(s3_server, bucket.bucket, odd + neighbours)
    want = sorted(odd + neighbours)
    assert [row[1] for row in listing(transfer, bucket.join("ctl/"))] == want
    assert [row[1] for row in listing(transfer, bucket.join("ctl/step_"))] == [k for k in want if "step_" in k[4:9]]

    result = transfer.delete_keys(bucket.bucket, [*odd, "ctl/step_5.pt"])

    assert result.errors == {} and result.deleted == len(odd) + 1
    left = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket.bucket)["Contents"]]
    assert left == ["ctl/ck\ufffd[1]/step_1.pt"]


def test_a_prefix_xml_cannot_carry_is_listed_and_downloaded_exactly(
    transfer: Transfer, s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    # On rclone s5cmd read the prefix ck<ESC>/ as empty: "nothing found", cleanup idle, and
    # latest_checkpoint() None (verification pass).
    keys = ["ck\x1b/step_1.pt", "ck\x1b/sub/step_2.pt"]
    _put_one_by_one(s3_server, bucket.bucket, keys)
    assert [row[1] for row in listing(transfer, bucket.join("ck\x1b/"))] == keys
    assert [row[1] for row in listing(transfer, bucket.join("ck\x1b/"), recursive=False)] == [
        "ck\x1b/sub/", "ck\x1b/step_1.pt"
    ]
    ops.download(transfer, bucket.join("ck\x1b/"), tmp_path / "out", recursive=True)
    assert tree_files(tmp_path / "out") == {"step_1.pt": b"x", "sub/step_2.pt": b"x"}


def test_a_key_ending_in_a_dot_segment_leaves_no_file_behind(
    transfer: Transfer, s3_server: S3Server, bucket: S3URL, tmp_path: Path
) -> None:
    # "dot/." was refused as unsafe, but s5cmd's copy had already written it to a temporary
    # file beside the staging directory, where it stayed (keys pass). rclone cannot store it.
    if s3_server.kind == "rclone":
        pytest.skip("rclone keeps objects as files: no key ending in '/.'")
    put_raw(s3_server, bucket.bucket, ["dot/.", "dot/a.pt"])
    with pytest.raises(PartialTransferError) as info:
        ops.download(transfer, bucket.join("dot/"), tmp_path / "out", recursive=True)
    assert list(info.value.failures) == [str(bucket.join("dot/."))]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.pt"]


def test_a_file_name_of_250_bytes_downloads_recursively(
    transfer: Transfer, bucket: S3URL, tmp_path: Path
) -> None:
    # s5cmd writes "<name><up to 10 digits>" first: "file name too long" (keys pass).
    name = "x" * 247 + ".pt"
    transfer.put_bytes(b"long", bucket.join(f"long/{name}"))
    transfer.put_bytes(b"short", bucket.join("long/short.pt"))
    ops.download(transfer, bucket.join("long/"), tmp_path / "out", recursive=True)
    assert tree_files(tmp_path / "out") == {name: b"long", "short.pt": b"short"}


# -- sync -------------------------------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    stamp = time.time() + seconds
    os.utime(path, (stamp, stamp))


def test_sync_up(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, {"a.pt": b"aaa", "sub/b.pt": b"bbbb", "c d*.pt": b"c"})
    transfer.put_bytes(b"sibling", bucket.join("ckpt-old/x.pt"))
    url = bucket.join("ckpt/")

    plan = ops.sync(transfer, src, url, "up")
    assert sorted(dst for _, dst in plan.copy) == [str(url.join(k)) for k in ("a.pt", "c d*.pt", "sub/b.pt")]
    assert ops.plan_sync(transfer, src, url, "up") == ops.SyncPlan("up", (), (), 3)

    (src / "a.pt").write_bytes(b"changed size")
    _age(src / "sub/b.pt", 30)  # same size, newer locally
    (src / "c d*.pt").unlink()
    (src / "new.pt").write_bytes(b"n")
    expected_copy = {
        (str(src / "a.pt"), str(url.join("a.pt"))),
        (str(src / "new.pt"), str(url.join("new.pt"))),
        (str(src / "sub/b.pt"), str(url.join("sub/b.pt"))),
    }
    dry = ops.sync(transfer, src, url, "up", delete=True, dry_run=True)
    assert set(dry.copy) == expected_copy
    assert dry.delete == (str(url.join("c d*.pt")),)
    assert dry.unchanged == 0
    assert len(listing(transfer, url)) == 3 and transfer.get_bytes(url.join("a.pt")) == b"aaa"

    size_only = ops.plan_sync(transfer, src, url, "up", size_only=True)
    assert str(src / "sub/b.pt") not in {s for s, _ in size_only.copy}

    done = ops.sync(transfer, src, url, "up", delete=True)
    assert done == dry
    assert [row[1] for row in listing(transfer, url)] == ["ckpt/a.pt", "ckpt/new.pt", "ckpt/sub/b.pt"]
    assert transfer.get_bytes(url.join("a.pt")) == b"changed size"
    assert transfer.stat(bucket.join("ckpt-old/x.pt")) is not None, "delete must stay inside the prefix"
    after = ops.plan_sync(transfer, src, url, "up", delete=True, size_only=True)
    assert (after.copy, after.delete, after.unchanged) == ((), (), 3)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_file_gone_between_the_walk_and_the_plan_does_not_stop_the_sync(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    # Local keep-last-N deleting a checkpoint while `sync` planned aborted the whole sync with
    # a bare "[Errno 2] No such file or directory" and sent nothing. aws skips such a file.
    src, url = tmp_path / "src", bucket.join("run/")
    make_tree(src, {"step_1.pt": b"one", "step_2.pt": b"two"})
    transfer.put_bytes(b"one", url.join("step_1.pt"))
    transfer.put_bytes(b"three", url.join("step_3.pt"))
    walk = ops._walk_files

    def walk_then_retention(*args: Any, **kwargs: Any) -> Any:
        yield from walk(*args, **kwargs)
        (src / "step_1.pt").unlink()

    monkeypatch.setattr(ops, "_walk_files", walk_then_retention)
    if direction == "up":
        with pytest.raises(PartialTransferError) as info:
            ops.sync(transfer, src, url, "up", delete=True)
        assert list(info.value.failures) == [str(src / "step_1.pt")]
        assert "since it was listed" in str(info.value)
        # The rest went up, and the object of the file seen in the walk stays.
        assert [row[1] for row in listing(transfer, url)] == ["run/step_1.pt", "run/step_2.pt"]
    else:
        plan = ops.sync(transfer, src, url, "down")
        assert sorted(Path(dst).name for _, dst in plan.copy) == ["step_1.pt", "step_3.pt"]
        assert (src / "step_1.pt").read_bytes() == b"one"


def test_sync_down(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    url = bucket.join("run/")
    for key, data in {"a.pt": b"aaa", "sub/b.pt": b"bbbb", "[x].pt": b"x"}.items():
        transfer.put_bytes(data, url.join(key))
    transfer.put_bytes(b"sibling", bucket.join("run-old/y.pt"))
    dest = tmp_path / "dest"

    plan = ops.sync(transfer, dest, url, "down")
    assert sorted(src for src, _ in plan.copy) == [str(url.join(k)) for k in ("[x].pt", "a.pt", "sub/b.pt")]
    assert tree_files(dest) == {"a.pt": b"aaa", "sub/b.pt": b"bbbb", "[x].pt": b"x"}
    remote = {o.key: o for o in transfer.iter_objects(url) if isinstance(o, ObjectInfo)}
    assert int((dest / "a.pt").stat().st_mtime) == int(remote["run/a.pt"].last_modified.timestamp())
    assert ops.plan_sync(transfer, dest, url, "down") == ops.SyncPlan("down", (), (), 3)

    (dest / "extra.pt").write_bytes(b"local only")
    _age(dest / "a.pt", -3600)  # remote is now newer, same size
    transfer.put_bytes(b"bigger now", url.join("sub/b.pt"))
    dry = ops.sync(transfer, dest, url, "down", delete=True, dry_run=True)
    assert set(dry.copy) == {(str(url.join("a.pt")), str(dest / "a.pt")), (str(url.join("sub/b.pt")), str(dest / "sub/b.pt"))}
    assert dry.delete == (str(dest / "extra.pt"),)
    assert (dest / "extra.pt").exists() and (dest / "sub/b.pt").read_bytes() == b"bbbb"
    assert ops.plan_sync(transfer, dest, url, "down", size_only=True).copy == (
        (str(url.join("sub/b.pt")), str(dest / "sub/b.pt")),
    )

    assert ops.sync(transfer, dest, url, "down", delete=True) == dry
    assert tree_files(dest) == {"a.pt": b"aaa", "sub/b.pt": b"bigger now", "[x].pt": b"x"}
    assert not (tmp_path / "y.pt").exists()


def test_sync_rejects_bad_input(transfer: Transfer, bucket: S3URL, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(UsageError):
        ops.plan_sync(transfer, f, bucket.join("p/"), "up")
    with pytest.raises(UsageError):
        ops.plan_sync(transfer, tmp_path / "missing", bucket.join("p/"), "up")
    with pytest.raises(UsageError):
        ops.plan_sync(transfer, tmp_path, bucket.join("p/"), "sideways")  # type: ignore[arg-type]


# -- the two backends side by side ------------------------------------------------------------


@pytest.fixture
def both(s3_server: S3Server) -> Any:
    from runctl.transfer import get_transfer

    pair = {name: get_transfer(s3_server.config(), use_s5cmd=name == "s5cmd") for name in ("s5cmd", "boto3")}
    yield pair
    for t in pair.values():
        t.close()


def test_backends_agree(both: dict[str, Transfer], s3_server: S3Server, bucket: S3URL, tmp_path: Path) -> None:
    """Same data, both backends: identical listings, stats, bytes, downloads and sync plans."""
    src = tmp_path / "src"
    files = {k.split("/", 1)[1]: k.encode() for k in WEIRD_KEYS} | {"deep/er/x.bin": b"x" * 1000}
    make_tree(src, files)
    ops.upload(both["boto3"], src, bucket.join("b/"), recursive=True)
    ops.upload(both["s5cmd"], src, bucket.join("s/"), recursive=True)

    def rel_rows(t: Transfer, prefix: str, recursive: bool) -> list[tuple[Any, ...]]:
        return [(r[0], r[1][len(prefix):], *r[2:]) for r in listing(t, bucket.join(prefix), recursive)]

    for recursive in (True, False):
        views = {
            (who, where): rel_rows(t, where, recursive) for who, t in both.items() for where in ("b/", "s/")
        }
        assert len({repr(v) for v in views.values()}) == 1, views

    for rel in files:
        stats = {name: t.stat(bucket.join("b/", rel)) for name, t in both.items()}
        assert stats["s5cmd"] is not None and stats["boto3"] is not None
        a, b = stats["s5cmd"], stats["boto3"]
        assert (a.key, a.size, a.etag, a.storage_class) == (b.key, b.size, b.etag, b.storage_class), rel
        assert int(a.last_modified.timestamp()) == int(b.last_modified.timestamp()), rel
        assert both["s5cmd"].get_bytes(bucket.join("s/", rel)) == both["boto3"].get_bytes(bucket.join("b/", rel))

    for name, t in both.items():
        ops.download(t, bucket.join("s/"), tmp_path / f"down-{name}", recursive=True)
    assert tree_files(tmp_path / "down-s5cmd") == tree_files(tmp_path / "down-boto3") == files

    for direction in ("up", "down"):
        plans = {name: ops.plan_sync(t, src, bucket.join("b/"), direction, delete=True) for name, t in both.items()}
        assert plans["s5cmd"] == plans["boto3"], direction


def _send_while(
    transfer: Transfer,
    src: Path,
    url: S3URL,
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[], None],
    **options: Any,
) -> list[dict[str, Any]]:
    """``upload -r`` (or ``sync`` up) of ``src`` to ``url``, with ``meanwhile`` run once each
    batch has gone up and before the copy checks what it sent; returns the options of each
    ``put_files`` call. A file sent again is sent once it has been still for 0.05 s."""
    real = type(transfer).put_files
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ops, "RESEND_SETTLE", 0.05)

    def put_files(self: Any, pairs: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        result = real(self, pairs, **kwargs)
        meanwhile()
        return result

    monkeypatch.setattr(type(transfer), "put_files", put_files)
    monkeypatch.setattr(type(transfer), "put_tree", lambda self, root, pairs, **kw: put_files(self, pairs, **kw) or [])
    if command == "upload":
        ops.upload(transfer, src, url, recursive=True, **options)
    else:
        ops.sync(transfer, src, url, "up", **options)
    return calls


@pytest.mark.parametrize("command", ["upload", "sync"])
def test_a_file_changed_while_it_uploads_fails_and_leaves_no_object(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    # A checkpoint rewritten in place during `runctl s3 upload` (or sync) reached S3 as a mix
    # of old and new bytes, exit 0: `review` called it complete and `checkpoint cleanup
    # --durable-in` (sizes equal) would have deleted the only whole copy.
    src = tmp_path / "src"
    make_tree(src, {"step_9.pt": b"old" * 1000, "step_8.pt": b"steady"})

    def rewrite() -> None:
        with open(src / "step_9.pt", "r+b") as fh:  # the writer, mid-upload
            fh.write(b"new")

    with pytest.raises(PartialTransferError) as info:
        _send_while(transfer, src, bucket.join("u/"), command, monkeypatch, rewrite)
    assert list(info.value.failures) == [str(bucket.join("u/step_9.pt"))]
    assert "changed while it was uploading" in str(info.value)
    assert [row[1] for row in listing(transfer, bucket.join("u/"))] == ["u/step_8.pt"]


@pytest.mark.parametrize("how", ["in place", "renamed over"])
@pytest.mark.parametrize("command", ["upload", "sync"])
def test_a_file_changed_once_while_it_uploads_is_sent_again_as_it_is_now(
    transfer: Transfer,
    bucket: S3URL,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    how: str,
) -> None:
    # Training saved last.ckpt again while `runctl s3 sync` sent it, and its uploader put that
    # newer version and said so; sync then deleted the object as "changed while it was
    # uploading": S3 held no last.ckpt at all, and the uploader's journal said it did.
    src = tmp_path / "src"
    make_tree(src, {"last.ckpt": b"old" * 1000, "step_8.pt": b"steady"})
    url = bucket.join("u/")
    saves = []

    def save_once() -> None:
        if saves:
            return
        saves.append(1)
        if how == "in place":
            (src / "last.ckpt").write_bytes(b"new" * 2000)
        else:  # a temporary file renamed over it, as fsspec and HF do
            (src / "last.tmp").write_bytes(b"new" * 2000)
            os.replace(src / "last.tmp", src / "last.ckpt")
            # The training run's uploader puts it (the copy's first object is then older).
            transfer.put_files([(src / "last.ckpt", url.join("last.ckpt"))])

    _send_while(transfer, src, url, command, monkeypatch, save_once)
    assert [row[1] for row in listing(transfer, url)] == ["u/last.ckpt", "u/step_8.pt"]
    assert transfer.get_bytes(url.join("last.ckpt")) == b"new" * 2000


def test_a_file_sent_again_waits_for_its_writer_and_keeps_the_storage_class(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sent again at once, a checkpoint torch.save was still writing (half written, its writer
    # between two records) went up torn and the copy reported success; and without its
    # --storage-class.
    src = tmp_path / "src"
    make_tree(src, {"last.ckpt": b"old" * 1000, "step_8.pt": b"steady"})
    url = bucket.join("u/")
    threads: list[threading.Thread] = []

    def write_slowly() -> None:
        with open(src / "last.ckpt", "wb") as fh:  # in place, as torch.save(obj, path)
            fh.write(b"n" * 2000)
            fh.flush()
            time.sleep(1.0)  # open for writing, unchanged: not yet still
            fh.write(b"w" * 2000)

    def save_once() -> None:
        if not threads:
            threads.append(threading.Thread(target=write_slowly))
            threads[0].start()
            time.sleep(0.1)  # the first half is written

    calls = _send_while(
        transfer, src, url, "upload", monkeypatch, save_once, storage_class="STANDARD_IA"
    )
    threads[0].join()
    assert transfer.get_bytes(url.join("last.ckpt")) == b"n" * 2000 + b"w" * 2000
    assert len(calls) == 2 and all(c.get("storage_class") == "STANDARD_IA" for c in calls), calls


def test_files_that_settle_one_after_another_or_stay_open_are_each_sent_again(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A log held open for appending (TensorBoard's events file) never counted as still: its
    # object was deleted after the wait. And a save of three files in turn: the resends were
    # counted per round, so the last file to settle failed with its object deleted.
    src = tmp_path / "src"
    make_tree(src, {"model.pt": b"m0", "optim.pt": b"o0", "events.log": b"e0"})
    url = bucket.join("u/")
    monkeypatch.setattr(ops, "RESEND_WAIT", 1.5)
    held: list[Any] = []
    threads: list[threading.Thread] = []

    def meanwhile() -> None:
        if held:
            return
        (src / "model.pt").write_bytes(b"model.pt-new")  # written and closed: still at once
        optim = open(src / "optim.pt", "wb")  # still being written for 0.8 s more
        optim.write(b"optim.pt-new")
        optim.flush()
        events = open(src / "events.log", "ab")  # a log open for the whole run
        events.write(b"+line")
        events.flush()
        held.extend([optim, events])
        threads.append(threading.Timer(0.8, optim.close))
        threads[0].start()

    try:
        _send_while(transfer, src, url, "sync", monkeypatch, meanwhile)
    finally:
        threads[0].join()
        for fh in held:
            fh.close()
    assert transfer.get_bytes(url.join("model.pt")) == b"model.pt-new"
    assert transfer.get_bytes(url.join("optim.pt")) == b"optim.pt-new"
    assert transfer.get_bytes(url.join("events.log")) == b"e0+line"


@pytest.mark.parametrize(
    ("name", "mode"), [("train.log", "ab"), ("train.log", "wb"), ("step_2.pt", "ab"), ("model.safetensors", "ab")]
)
def test_a_log_appended_to_throughout_keeps_what_went_up(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, mode: str
) -> None:
    # A train.log appended to several times a second never settles: `sync -d up` deleted its
    # object and failed on every run during training (sync pass); aws sends it as it is.
    # Appending leaves the bytes before it alone: what went up is the log as it was, whole.
    # A file written from the start ("wb", a checkpoint) that never settles still goes, and so
    # does a checkpoint grown by appending (a step_2.pt was kept torn; verification pass), and
    # any file not named as a log is (`wget -c` appends: a model.safetensors was kept torn).
    src = tmp_path / "src"
    make_tree(src, {name: b"start\n", "step_1.pt": b"w"})
    url = bucket.join("u/")
    monkeypatch.setattr(ops, "RESEND_WAIT", 1.0)
    stop = threading.Event()
    writer: list[threading.Thread] = []

    def meanwhile() -> None:
        if writer:
            return
        fh = open(src / name, mode)
        fh.write(b"line\n")  # before the copy checks what it sent
        fh.flush()

        def write() -> None:
            with fh:
                while not stop.wait(0.02):
                    fh.write(b"line\n")
                    fh.flush()

        writer.append(threading.Thread(target=write))
        writer[0].start()

    try:
        if (name, mode) == ("train.log", "ab"):
            _send_while(transfer, src, url, "sync", monkeypatch, meanwhile)
        else:
            with pytest.raises(PartialTransferError) as info:
                _send_while(transfer, src, url, "sync", monkeypatch, meanwhile)
            assert list(info.value.failures) == [str(url.join(name))]
    finally:
        stop.set()
        writer[0].join()
    keys = [row[1] for row in listing(transfer, url)]
    if (name, mode) == ("train.log", "ab"):
        assert keys == ["u/step_1.pt", "u/train.log"]
        sent = transfer.get_bytes(url.join("train.log"))
        # sent once more as it was at the end of the wait: a later, whole prefix of the log
        assert sent.startswith(b"start\nline\n") and (src / "train.log").read_bytes().startswith(sent)
    else:
        assert keys == ["u/step_1.pt"]


def test_a_file_deleted_after_it_was_sent_keeps_its_object(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Local retention deletes a checkpoint once it is durable: a `runctl s3 sync` beside it
    # then deleted its object too, as "changed while it was uploading" (an unlink tears nothing).
    src = tmp_path / "src"
    make_tree(src, {"step_7.pt": b"seven", "step_8.pt": b"eight"})
    _send_while(transfer, src, bucket.join("u/"), "sync", monkeypatch, (src / "step_7.pt").unlink)
    assert transfer.get_bytes(bucket.join("u/step_7.pt")) == b"seven"


@pytest.mark.parametrize("command", ["upload", "sync"])
def test_a_file_linked_or_chmoded_while_it_uploads_is_not_changed(
    transfer: Transfer, bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    # The uploader hard-links each checkpoint into its staging area: a `runctl s3 upload -r`
    # of the same directory called that a change (the inode's ctime moved), deleted the good
    # object and exited 1. Only the bytes (size, mtime) say a file changed.
    src = tmp_path / "src"
    make_tree(src, {"step_9.pt": b"steady" * 1000, "step_8.pt": b"steady"})

    def link_and_chmod() -> None:
        os.link(src / "step_9.pt", tmp_path / "staged-link")  # the uploader staging it, mid-upload
        os.chmod(src / "step_8.pt", 0o600)

    _send_while(transfer, src, bucket.join("u/"), command, monkeypatch, link_and_chmod)
    assert [row[1] for row in listing(transfer, bucket.join("u/"))] == ["u/step_8.pt", "u/step_9.pt"]


def test_a_file_cut_short_while_boto3_uploads_it_fails_at_once(rclone_server: S3Server, tmp_path: Path) -> None:
    # A checkpoint truncated while it went up sent fewer bytes than its Content-Length: the
    # server waited for the rest until the read timeout, once per retry (362 s for 300 MB;
    # Ctrl-C took 53 s). s5cmd fails it in a second.
    from runctl.transfer.boto import BotoTransfer

    path = tmp_path / "last.ckpt"
    path.write_bytes(os.urandom(20 * MiB))
    url = S3URL(rclone_server.new_bucket(), "run/last.ckpt")
    transfer = BotoTransfer(rclone_server.config())

    def cut_short(_: int) -> None:
        os.truncate(path, 1 * MiB)  # the trainer starts writing it again

    outcome: dict[str, BaseException] = {}

    def upload() -> None:
        try:
            transfer.put_files([(path, url)], progress=cut_short)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    began = time.monotonic()
    worker = threading.Thread(target=upload, daemon=True)
    worker.start()
    worker.join(30)
    try:
        assert not worker.is_alive(), "the upload of a file cut short hung"
        assert time.monotonic() - began < 20
        assert isinstance(outcome.get("error"), PartialTransferError), outcome
        assert "got shorter while it was uploading" in str(outcome["error"])
        assert transfer.stat(url) is None
    finally:
        transfer.close()


def test_local_names_that_are_not_utf8_are_refused_each_and_never_share_a_key(
    transfer: Transfer, bucket: S3URL, tmp_path: Path
) -> None:
    # On s5cmd, three files named x\xe9, x\xe8 and x\ufffd went up to the one key "x\ufffd"
    # (the last one's content), "uploaded 3 files", exit 0; a second sync sent two again.
    src = tmp_path / "src"
    src.mkdir()
    for raw, data in ((b"x\xe9", b"AAA"), (b"x\xe8", b"BBB")):
        (src / os.fsdecode(raw)).write_bytes(data)
    (src / "x\ufffd").write_bytes(b"CCC")
    (src / "ok.pt").write_bytes(b"ok")
    bad = {str(src / os.fsdecode(raw)) for raw in (b"x\xe9", b"x\xe8")}
    for command in ("upload", "sync"):
        url = bucket.join(f"{command}/")
        with pytest.raises(PartialTransferError) as info:
            if command == "upload":
                ops.upload(transfer, src, url, recursive=True)
            else:
                ops.sync(transfer, src, url, "up")
        assert set(info.value.failures) == bad, info.value.failures
        assert all("not valid UTF-8" in why for why in info.value.failures.values())
        keys = {row[1]: row[2] for row in listing(transfer, url)}
        assert keys == {f"{command}/ok.pt": 2, f"{command}/x\ufffd": 3}
        assert transfer.get_bytes(url.join("x\ufffd")) == b"CCC"
    with pytest.raises(UsageError, match="not valid UTF-8"):
        ops.upload(transfer, src / os.fsdecode(b"x\xe9"), bucket.join("one/"))
    assert not listing(transfer, bucket.join("one/"))
    # Going down, such a local file is one S3 cannot hold: --delete deletes it, as aws does.
    plan = ops.sync(transfer, src, bucket.join("upload/"), "down", delete=True)
    assert sorted(map(os.path.basename, plan.delete)) == sorted(map(os.path.basename, bad))
    assert sorted(p.name for p in src.iterdir()) == ["ok.pt", "x\ufffd"]
