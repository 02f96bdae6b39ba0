"""Checkpoint names, steps, local scans, S3 grouping, completeness and markers."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from runctl.checkpoints import (
    DEFAULT_PATTERNS,
    MARKER_NAME,
    Checkpoint,
    FileEntry,
    Manifest,
    build_manifest,
    group_s3,
    is_alias,
    is_recognised,
    local_checkpoint,
    marker_ok,
    parse_step,
    scan_local,
    verify_against_manifest,
)
from runctl.exceptions import MarkerError, NoSuchKeyError, TransferError, UsageError
from runctl.s3url import S3URL
from runctl.transfer.base import ObjectInfo, PrefixInfo

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def obj(key: str, size: int = 10, age: float = 0.0, etag: str | None = None) -> ObjectInfo:
    return ObjectInfo("bkt", key, size, T0 + timedelta(seconds=age), etag=etag)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("epoch=3-step=1200.ckpt", (1200, 3)),
        ("step=5.pt", (5, None)),
        ("step_100.pt", (100, None)),
        ("step-100.pt", (100, None)),
        ("checkpoint-500", (500, None)),
        ("checkpoint-500/", (500, None)),
        ("global_step500", (500, None)),
        ("epoch=2.ckpt", (None, 2)),
        ("epoch=3-step=1200-v1.ckpt", (1200, 3)),
        ("model-00100.safetensors", (100, None)),
        ("iter_0001000", (1000, None)),
        ("iter100", (100, None)),  # Megatron-style: recognised, but it had no step (name order)
        ("filter_5.pt", (5, None)),
        # A metric logged on_step is named train_loss_step by Lightning: its value is no step.
        ("epoch=2-train_loss_step=0.31.ckpt", (None, 2)),
        ("epoch=2-train_loss_step=0.31-step=500.ckpt", (500, 2)),
        ("step=10.5.ckpt", (None, None)),
        ("model-00001-of-00003.safetensors", (None, None)),
        ("resnet50-00100.pt", (None, None)),
        ("last.ckpt", (None, None)),
        ("steps.txt", (None, None)),
        ("runs/7/step_9.pt", (9, None)),
    ],
)
def test_parse_step(name: str, expected: tuple[int | None, int | None]) -> None:
    assert parse_step(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "epoch=3-step=1200.ckpt",
        "step_100.pt",
        "step-1.pth",
        "step=7.bin",
        "global_step5.pkl",
        "model-00100.safetensors",
        "ckpt_5.pt",
        "iter_0001000.pt",
        "my_weights_3.pth",
        "pytorch_model_7.bin",
        "net_g_5000.pth",  # BasicSR
        "agent_100.pt",
        "epoch=2.ckpt",
        "last.ckpt",
        "last-v1.ckpt",
        "checkpoint-500",
        "global_step500",
        "step-100",
        "step_100",
        "step=100",
        "epoch=3",
        "epoch=3-step=1200",
        "checkpoint-500/",
    ],
)
def test_recognised(name: str) -> None:
    assert is_recognised(name)


@pytest.mark.parametrize(
    "name",
    [
        "train.log",
        "hparams.yaml",
        "config.json",
        "step_100.json",
        "trainer_state.json",
        "events.out.tfevents.1700000000.host.1.0",
        "README",
        "README.md",
        "model.safetensors",
        "optimizer.pt",
        "model-00001-of-00003.safetensors",
        # A word and a number, but not a checkpoint: once vocab_32000.bin ranked as step 32000
        # and a cleanup kept it as the newest, deleting every real checkpoint.
        "vocab_32000.bin",
        "rng_state_0.pth",
        "optimizer_5.pt",
        "scheduler_1.pt",
        "random_states_0.pkl",  # Accelerate's, inside its checkpoint directory
        "step_100.pt.tmp",
        "step_100.pt.partial",
        ".step_100.pt",
        ".runctl",
        "ckpt-old",
        "checkpoint-500.log",
        "",
    ],
)
def test_not_recognised(name: str) -> None:
    assert not is_recognised(name)


def test_custom_patterns_replace_the_defaults() -> None:
    assert is_recognised("weights_7.h5", [r"weights_\d+\.h5"])
    assert not is_recognised("step_7.pt", [r"weights_\d+\.h5"])
    assert not is_recognised("xweights_7.h5", [r"weights_\d+\.h5"])  # whole name must match


def test_invalid_pattern_names_it() -> None:
    with pytest.raises(UsageError, match=r"invalid checkpoint pattern '\(unclosed'"):
        is_recognised("step_1.pt", ["(unclosed"])


def test_default_patterns_are_regexes() -> None:
    assert DEFAULT_PATTERNS and all(isinstance(p, str) for p in DEFAULT_PATTERNS)


@pytest.mark.parametrize(
    ("name", "alias"),
    [("last.ckpt", True), ("last-v1.ckpt", True), ("latest", True), ("latest.pt", True),
     ("step_5.pt", False), ("last_step_5.pt", False), ("lastly.ckpt", False)],
)
def test_is_alias(name: str, alias: bool) -> None:
    assert is_alias(name) is alias


def cp(name: str, mtime: float = 0.0, **kw: object) -> Checkpoint:
    step, epoch = parse_step(name)
    fields: dict = dict(name=name, is_dir=False, step=step, epoch=epoch, mtime=mtime, size=1, complete=True)
    fields.update(kw)
    return Checkpoint(**fields)


def test_order_key_step_then_epoch_then_mtime() -> None:
    items = [
        cp("step_10.pt", mtime=1),
        cp("epoch=1-step=5.ckpt", mtime=9),
        cp("epoch=0-step=5.ckpt", mtime=10),
        cp("step_2.pt", mtime=100),
    ]
    assert [c.name for c in sorted(items, key=Checkpoint.order_key)] == [
        "step_2.pt",
        "epoch=0-step=5.ckpt",
        "epoch=1-step=5.ckpt",
        "step_10.pt",
    ]


def test_order_key_without_numbers_uses_mtime() -> None:
    items = [cp("b.pt", mtime=5), cp("a.pt", mtime=7), cp("c.pt", mtime=1)]
    assert [c.name for c in sorted(items, key=Checkpoint.order_key)] == ["c.pt", "b.pt", "a.pt"]


def test_checkpoint_to_json_is_plain() -> None:
    doc = cp("step_1.pt", files=("step_1.pt",)).to_json()
    assert doc["name"] == "step_1.pt" and doc["step"] == 1 and doc["files"] == ["step_1.pt"]


# --- local ------------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "step_1.pt").write_bytes(b"a" * 5)
    (root / "step_2.pt").write_bytes(b"b" * 7)
    (root / "last.ckpt").write_bytes(b"c")
    (root / "train.log").write_text("log")
    (root / "hparams.yaml").write_text("lr: 1")
    (root / "step_3.pt.tmp").write_bytes(b"x")
    (root / ".step_4.pt").write_bytes(b"x")
    hf = root / "checkpoint-500"
    (hf / "sub").mkdir(parents=True)
    (hf / "model.safetensors").write_bytes(b"m" * 11)
    (hf / "sub" / "optimizer.pt").write_bytes(b"o" * 3)
    (root / "runs").mkdir()
    (root / "runs" / "step_9.pt").write_bytes(b"nested")
    (root / ".runctl").mkdir()
    (root / ".runctl" / "journal.jsonl").write_text("")


def test_scan_local_finds_only_recognised_direct_children(tmp_path: Path) -> None:
    make_tree(tmp_path)
    os.utime(tmp_path / "last.ckpt", (1, 1))
    found = {c.name: c for c in scan_local(tmp_path)}
    assert set(found) == {"step_1.pt", "step_2.pt", "last.ckpt", "checkpoint-500"}
    hf = found["checkpoint-500"]
    assert hf.is_dir and hf.complete and hf.step == 500
    assert hf.size == 14
    assert hf.files == ("checkpoint-500/model.safetensors", "checkpoint-500/sub/optimizer.pt")
    assert found["step_2.pt"].files == ("step_2.pt",) and found["step_2.pt"].size == 7
    assert all(c.marker is None for c in found.values())


def test_scan_local_orders_oldest_first(tmp_path: Path) -> None:
    make_tree(tmp_path)
    os.utime(tmp_path / "last.ckpt", (1, 1))
    assert [c.name for c in scan_local(tmp_path)] == ["last.ckpt", "step_1.pt", "step_2.pt", "checkpoint-500"]


def test_local_dir_mtime_is_newest_file(tmp_path: Path) -> None:
    d = tmp_path / "checkpoint-1"
    d.mkdir()
    (d / "a").write_bytes(b"a")
    (d / "b").write_bytes(b"b")
    os.utime(d / "a", (100, 100))
    os.utime(d / "b", (200, 200))
    assert local_checkpoint(d).mtime == 200
    assert local_checkpoint(d, tmp_path).files == ("checkpoint-1/a", "checkpoint-1/b")


def test_scan_local_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        scan_local(tmp_path / "nope")


# --- S3 grouping ------------------------------------------------------------------------------

PREFIX = S3URL("bkt", "ckpt/")


def manifest_for(name: str, files: dict[str, int]) -> bytes:
    return Manifest(name, parse_step(name)[0], {k: FileEntry(v) for k, v in files.items()}, "0", 1.0).to_bytes()


def test_group_s3_only_direct_children_strictly_inside() -> None:
    objects = [
        obj("ckpt/step_1.pt"),
        obj("ckpt/train.log"),
        obj("ckpt-old/step_0.pt"),
        obj("ckpt"),
        obj("ckpt/"),
        obj("ckpt/runs/step_9.pt"),
        obj("ckpt/logs/checkpoint-5/x.bin"),
        PrefixInfo("bkt", "ckpt/somewhere/"),
    ]
    grouped = group_s3(objects, S3URL("bkt", "ckpt"))
    assert [c.name for c in grouped.checkpoints] == ["step_1.pt"]
    assert {o.key for o in grouped.others} == {
        "ckpt/train.log",
        "ckpt-old/step_0.pt",
        "ckpt",
        "ckpt/",
        "ckpt/runs/step_9.pt",
        "ckpt/logs/checkpoint-5/x.bin",
    }


def test_group_s3_directory_with_marker_is_complete() -> None:
    objects = [
        obj("ckpt/checkpoint-5/model.bin", 4, age=1),
        obj("ckpt/checkpoint-5/sub/opt.pt", 6, age=2),
        obj(f"ckpt/checkpoint-5/{MARKER_NAME}", 50, age=3),
    ]
    (c,) = group_s3(objects, PREFIX).checkpoints
    assert c.is_dir and c.complete and c.step == 5
    assert c.files == ("ckpt/checkpoint-5/model.bin", "ckpt/checkpoint-5/sub/opt.pt")
    assert c.marker == f"ckpt/checkpoint-5/{MARKER_NAME}"
    assert c.size == 10
    assert c.mtime == (T0 + timedelta(seconds=3)).timestamp()


def test_group_s3_directory_without_marker_is_incomplete() -> None:
    objects = [obj("ckpt/checkpoint-5/model.bin", age=1), obj("ckpt/checkpoint-5/b.bin", age=7)]
    (c,) = group_s3(objects, PREFIX).checkpoints
    assert not c.complete and c.marker is None
    assert c.mtime == (T0 + timedelta(seconds=7)).timestamp()
    (c,) = group_s3(objects, PREFIX, treat_unmarked_complete=True).checkpoints
    assert c.complete


def test_group_s3_reads_and_checks_the_marker() -> None:
    marker_key = f"ckpt/checkpoint-5/{MARKER_NAME}"
    objects = [obj("ckpt/checkpoint-5/model.bin", 4), obj(marker_key, 50)]
    good = manifest_for("checkpoint-5", {"model.bin": 4})
    wrong_size = manifest_for("checkpoint-5", {"model.bin": 5})
    missing = manifest_for("checkpoint-5", {"model.bin": 4, "other.bin": 1})
    for data, complete in [(good, True), (wrong_size, False), (missing, False), (b"{not json", False)]:
        (c,) = group_s3(objects, PREFIX, read_marker={marker_key: data}.__getitem__).checkpoints
        assert c.complete is complete, data
        assert c.marker == marker_key
    # An invalid marker stays incomplete even when unmarked trees count as complete.
    (c,) = group_s3(objects, PREFIX, treat_unmarked_complete=True, read_marker=lambda k: b"[]").checkpoints
    assert not c.complete


def test_group_s3_unreadable_marker_is_incomplete() -> None:
    def unreadable(key: str) -> bytes:
        raise TransferError(f"read of {key} failed", code="InternalError")

    objects = [obj("ckpt/checkpoint-5/model.bin"), obj(f"ckpt/checkpoint-5/{MARKER_NAME}", 9)]
    (c,) = group_s3(objects, PREFIX, read_marker=unreadable).checkpoints
    assert not c.complete


def test_group_s3_reads_every_marker_in_one_batch_when_asked() -> None:
    def key(name: str) -> str:
        return f"ckpt/{name}/{MARKER_NAME}"

    objects = [
        obj("ckpt/checkpoint-1/model.bin", 4),
        obj(key("checkpoint-1"), 50),
        obj("ckpt/checkpoint-2/model.bin", 4),
        obj(key("checkpoint-2"), 50),
        obj("ckpt/checkpoint-3/model.bin", 4),
        obj(key("checkpoint-3"), 50),
        obj("ckpt/checkpoint-4/model.bin", 4),
        obj(key("checkpoint-4"), 0),  # empty: never read, incomplete
        obj("ckpt/checkpoint-5/model.bin", 4),
        obj(key("checkpoint-5"), 50),
        obj("ckpt/step_9.pt", 4),
    ]
    batches: list[list[str]] = []

    def read_markers(keys: Sequence[str]) -> dict[str, bytes | TransferError]:
        batches.append(list(keys))
        return {
            key("checkpoint-1"): manifest_for("checkpoint-1", {"model.bin": 4}),
            key("checkpoint-2"): manifest_for("checkpoint-2", {"model.bin": 5}),  # wrong size
            key("checkpoint-3"): TransferError("read failed", code="InternalError"),
            # checkpoint-5's marker is absent from the result: not read, so not proof
        }

    grouped = group_s3(objects, PREFIX, read_markers=read_markers)
    assert batches == [[key(f"checkpoint-{i}") for i in (1, 2, 3, 5)]]
    complete = {c.name: c.complete for c in grouped.checkpoints}
    assert complete == {
        "checkpoint-1": True,
        "checkpoint-2": False,
        "checkpoint-3": False,
        "checkpoint-4": False,
        "checkpoint-5": False,
        "step_9.pt": True,
    }
    # No marker to read: no batch at all.
    batches.clear()
    group_s3([obj("ckpt/step_1.pt")], PREFIX, read_markers=read_markers)
    assert batches == []


def test_group_s3_hands_each_marker_to_the_batch_while_the_listing_goes_on() -> None:
    # A cleanup read its markers after the listing; fed as the listing shows them, the batch
    # reads them while the rest of the listing arrives.
    def key(name: str) -> str:
        return f"ckpt/{name}/{MARKER_NAME}"

    handed = threading.Event()

    def read_markers(keys: Iterable[str]) -> dict[str, bytes | TransferError]:
        found: dict[str, bytes | TransferError] = {}
        for k in keys:
            handed.set()
            found[k] = manifest_for(k.split("/")[1], {"model.bin": 4})
        return found

    def listing() -> Iterator[ObjectInfo]:
        yield obj(key("checkpoint-1"), 50)
        yield obj("ckpt/checkpoint-1/model.bin", 4)
        assert handed.wait(10), "the first marker was not handed over before the listing ended"
        yield obj(key("checkpoint-2"), 50)
        yield obj("ckpt/checkpoint-2/model.bin", 4)

    grouped = group_s3(listing(), PREFIX, read_markers=read_markers)
    assert [(c.name, c.complete) for c in grouped.checkpoints] == [
        ("checkpoint-1", True),
        ("checkpoint-2", True),
    ]


def test_group_s3_raises_a_failed_batch_and_a_failed_listing_does_not_wait_for_it() -> None:
    def key(name: str) -> str:
        return f"ckpt/{name}/{MARKER_NAME}"

    def refused(keys: Iterable[str]) -> dict[str, bytes | TransferError]:
        for _ in keys:
            pass
        raise TransferError("access denied", code="AccessDenied")

    objects = [obj(key("checkpoint-1"), 50), obj("ckpt/checkpoint-1/model.bin", 4)]
    with pytest.raises(TransferError, match="access denied"):
        group_s3(objects, PREFIX, read_markers=refused)

    release = threading.Event()
    ended = threading.Event()

    def slow(keys: Iterable[str]) -> dict[str, bytes | TransferError]:
        for _ in keys:
            pass
        ended.set()
        release.wait(10)
        return {}

    def broken() -> Iterator[ObjectInfo]:
        yield obj(key("checkpoint-1"), 50)
        raise TransferError("listing failed", code="InternalError")

    with pytest.raises(TransferError, match="listing failed"):
        group_s3(broken(), PREFIX, read_markers=slow)
    assert ended.wait(10)  # the batch was told the keys had ended, and group_s3 did not wait
    release.set()


def test_group_s3_empty_marker_is_incomplete() -> None:
    objects = [obj("ckpt/checkpoint-5/model.bin"), obj(f"ckpt/checkpoint-5/{MARKER_NAME}", 0)]
    (c,) = group_s3(objects, PREFIX).checkpoints
    assert not c.complete


def test_group_s3_single_files_are_complete_and_sorted() -> None:
    objects = [obj("ckpt/step_20.pt", age=1), obj("ckpt/step_3.pt", age=5), obj("ckpt/last.ckpt", age=9)]
    names = [c.name for c in group_s3(objects, PREFIX).checkpoints]
    assert names == ["last.ckpt", "step_3.pt", "step_20.pt"]


def test_group_s3_bucket_root() -> None:
    objects = [obj("step_1.pt"), obj("x/step_2.pt")]
    grouped = group_s3(objects, S3URL("bkt"))
    assert [c.name for c in grouped.checkpoints] == ["step_1.pt"]


# --- manifests --------------------------------------------------------------------------------


def test_manifest_round_trip_and_build(tmp_path: Path) -> None:
    d = tmp_path / "checkpoint-3"
    (d / "sub").mkdir(parents=True)
    (d / "model.bin").write_bytes(b"1234")
    (d / "sub" / "o.pt").write_bytes(b"12")
    (d / MARKER_NAME).write_bytes(b"stale")
    m = build_manifest(d, "checkpoint-3", 3, etags={"model.bin": '"abc"'})
    assert dict(m.files) == {"model.bin": FileEntry(4, "abc"), "sub/o.pt": FileEntry(2, None)}
    again = Manifest.from_bytes(m.to_bytes())
    assert again == m
    assert again.step == 3 and again.name == "checkpoint-3" and again.runctl_version


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[]", "not a runctl manifest"),
        (b'{"format": "other"}', "not a runctl manifest"),
        (b'{"format": "runctl-manifest", "name": "", "files": {}}', "no valid name"),
        (b'{"format": "runctl-manifest", "name": "c", "step": "5", "files": {}}', "step must be"),
        (
            b'{"format": "runctl-manifest", "name": "c", "step": 1, "runctl_version": "0", "created": 1, '
            b'"files": {"a": {"size": -1}}}',
            "no valid size",
        ),
        (
            b'{"format": "runctl-manifest", "name": "c", "step": 1, "runctl_version": "0", "created": 1, '
            b'"files": []}',
            "files must be",
        ),
    ],
)
def test_manifest_from_bytes_rejects(data: bytes, message: str) -> None:
    with pytest.raises(MarkerError, match=message):
        Manifest.from_bytes(data)


def test_verify_against_manifest() -> None:
    m = Manifest("c", 1, {"a": FileEntry(3, "e1"), "b": FileEntry(2), "c": FileEntry(1)}, "0", 0.0)
    objects = {"a": obj("x/a", 3, etag='"e2"'), "b": obj("x/b", 9), "extra": obj("x/extra")}
    problems = verify_against_manifest(m, objects)
    assert problems == [
        "a: ETag e2 but the manifest says e1",
        "b: size 9 but the manifest says 2",
        "c: missing",
    ]
    assert verify_against_manifest(m, {"a": obj("a", 3, etag="e1"), "b": obj("b", 2), "c": obj("c", 1)}) == []


def test_markers_are_read_in_parallel_and_a_failed_read_stays_with_its_checkpoint() -> None:
    import threading

    from runctl.checkpoints import MARKER_NAME, FileEntry, Manifest

    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    prefix = S3URL("bkt", "run/")
    objects = []
    for step in (1, 2, 3):
        objects.append(ObjectInfo("bkt", f"run/checkpoint-{step}/model.bin", 4, t))
        objects.append(ObjectInfo("bkt", f"run/checkpoint-{step}/{MARKER_NAME}", 10, t))
    both_waiting = threading.Barrier(3, timeout=5)  # sequential reads would never get past it

    def read_marker(key: str) -> bytes:
        both_waiting.wait()
        if "checkpoint-2" in key:
            raise TransferError("connection reset", code="RequestError")
        return Manifest("x", None, {"model.bin": FileEntry(4)}, "0.1", 0.0).to_bytes()

    grouped = group_s3(objects, prefix, read_marker=read_marker)
    complete = {c.name: c.complete for c in grouped.checkpoints}
    assert complete == {"checkpoint-1": True, "checkpoint-2": False, "checkpoint-3": True}


def test_a_marker_is_read_while_the_listing_is_still_arriving() -> None:
    # cleanup hands group_s3 the live listing: each marker's read starts as the listing passes
    # it, so the reads overlap the rest of the listing instead of following it.
    import threading

    from runctl.checkpoints import MARKER_NAME, FileEntry, Manifest

    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    first_read = threading.Event()
    body = Manifest("x", None, {"model.bin": FileEntry(4)}, "0.1", 0.0).to_bytes()

    def listing():
        yield ObjectInfo("bkt", "run/checkpoint-1/model.bin", 4, t)
        yield ObjectInfo("bkt", f"run/checkpoint-1/{MARKER_NAME}", len(body), t)
        assert first_read.wait(5), "the marker was not read until the listing ended"
        yield ObjectInfo("bkt", "run/checkpoint-2/model.bin", 4, t)

    def read_marker(key: str) -> bytes:
        first_read.set()
        return body

    grouped = group_s3(listing(), S3URL("bkt", "run/"), read_marker=read_marker)
    complete = {c.name: c.complete for c in grouped.checkpoints}
    assert complete == {"checkpoint-1": True, "checkpoint-2": False}


def test_a_listing_that_fails_midway_leaves_no_marker_reader_behind() -> None:
    import threading

    from runctl.checkpoints import MARKER_NAME

    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    release = threading.Event()

    def listing():
        yield ObjectInfo("bkt", f"run/checkpoint-1/{MARKER_NAME}", 10, t)
        release.set()
        raise TransferError("listing broke", code="RequestError")

    def read_marker(key: str) -> bytes:
        release.wait(5)
        return b"{}"

    with pytest.raises(TransferError, match="listing broke"):
        group_s3(listing(), S3URL("bkt", "run/"), read_marker=read_marker)
    assert not [th for th in threading.enumerate() if th.name.startswith("runctl-marker")]


def test_marking_names_agree_with_checkpoints() -> None:
    # runctl.marking repeats two names so that a plain copy need not import this module.
    from runctl import checkpoints, marking

    assert (marking.MARKER_NAME, marking.RUNCTL_DIR) == (
        checkpoints.MARKER_NAME,
        checkpoints.RUNCTL_DIR,
    )


def test_a_trainer_directory_without_its_sign_is_not_complete(tmp_path: Path) -> None:
    # training_args.bin comes right after the model, trainer_state.json last: between the two
    # the directory is the Hugging Face Trainer's, half written, however long it stays quiet.
    from runctl.checkpoints import awaits_hf_sign
    from runctl.marking import local_files, why_unfinished

    d = tmp_path / "checkpoint-60"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"m")
    assert local_checkpoint(d).complete  # not the Trainer's, as far as anyone can tell
    (d / "training_args.bin").write_bytes(b"a")
    assert not local_checkpoint(d).complete and awaits_hf_sign(d.name, {"training_args.bin"})
    export = tmp_path / "step-60"  # Trainer.save_model writes no trainer_state.json: finished
    export.mkdir()
    (export / "training_args.bin").write_bytes(b"a")
    assert local_checkpoint(export).complete
    # upload -r and sync up leave it unmarked, however long ago it changed
    why = why_unfinished(d, local_files(d), started=time.time() + 3600)
    assert why is not None and "trainer_state.json" in why
    (d / "trainer_state.json").write_text("{}")
    assert local_checkpoint(d).complete
    assert why_unfinished(d, local_files(d), started=time.time() + 3600) is None

    objs = [ObjectInfo("bkt", f"run/checkpoint-{n}/{f}", 1, T0) for n, f in
            [(5, "model.bin"), (6, "model.bin"), (6, "training_args.bin")]]
    grouped = group_s3(objs, S3URL("bkt", "run/"), treat_unmarked_complete=True)
    assert {c.name: c.complete for c in grouped.checkpoints} == {
        "checkpoint-5": True, "checkpoint-6": False,
    }


def test_an_alias_that_landed_in_the_same_second_as_the_highest_step_is_the_newest() -> None:
    # S3 stamps objects to the whole second: after an outage the backlog landed
    # epoch=0-step=4.ckpt and last.ckpt (step 16) in one second, and a resume took step 4.
    from runctl.checkpoints import newest_state

    best = Checkpoint("epoch=0-step=4.ckpt", False, 4, 0, 100.0, 1, True, ())
    last = Checkpoint("last.ckpt", False, None, None, 100.0, 1, True, ())
    assert newest_state([best, last]) is last
    assert newest_state([best, Checkpoint("last.ckpt", False, None, None, 99.0, 1, True, ())]) is best


def test_a_marker_deleted_after_the_listing_is_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    # `download --latest` during training warned "cannot read marker ... treating the checkpoint
    # as incomplete" about nearly every download: retention had deleted an old checkpoint
    # between the listing and the read of its marker. Any other failure to read one still warns.
    from datetime import datetime, timezone

    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    marker = ObjectInfo("b", f"run/c-1/{MARKER_NAME}", 90, t)
    files = [ObjectInfo("b", "run/c-1/w.bin", 3, t)]

    def gone(key: str) -> bytes:
        raise NoSuchKeyError(f"get s3://b/{key} failed: no such object", code="NoSuchKey")

    def refused(key: str) -> bytes:
        raise TransferError(f"get s3://b/{key} failed: connection refused")

    caplog.set_level(logging.INFO, logger="runctl")
    assert marker_ok(marker, files, "run/c-1/", gone) is False
    assert [r.levelname for r in caplog.records] == ["INFO"]
    caplog.clear()
    assert marker_ok(marker, files, "run/c-1/", refused) is False
    assert [r.levelname for r in caplog.records] == ["WARNING"]
