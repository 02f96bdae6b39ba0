"""Lightning: RunctlCheckpoint trains a real tiny model on CPU and lands exactly the right checkpoints in S3."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from runctl.exceptions import TransferError, UsageError
from runctl.s3url import S3URL
from tests.integrations.conftest import as_under_runctl_local, file_checkpoints, s3_objects
from tests.servers import S3Server

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
CLASS_FOR = {"lightning.pytorch": "RunctlCheckpoint", "pytorch_lightning": "RunctlCheckpointPL"}


def checkpoint_class(namespace: str) -> Any:
    return getattr(importlib.import_module("runctl.integrations.lightning"), CLASS_FOR[namespace])


def make_module(namespace: str, val_losses: list[float] | None = None) -> Any:
    """A tiny regressor; ``val_losses`` scripts the monitored metric epoch by epoch."""
    lp = importlib.import_module(namespace)

    class Tiny(lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            value = val_losses[self.current_epoch] if val_losses else 1.0
            self.log("val_loss", torch.tensor(value))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Tiny()


class Boom(RuntimeError):
    """The training error a test raises mid-fit."""


def failing_module(at_step: int) -> Any:
    """The tiny regressor, whose training step raises Boom once ``global_step`` reaches ``at_step``."""
    module = make_module("lightning.pytorch")
    original = module.training_step

    def failing_step(batch: Any, batch_idx: int) -> torch.Tensor:
        if module.global_step == at_step:
            raise Boom(f"step {at_step} failed")
        return original(batch, batch_idx)

    module.training_step = failing_step
    return module


def loader(batches: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batches * 4, 4, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=4)


def make_trainer(namespace: str, callbacks: list, **kwargs: Any) -> Any:
    lp = importlib.import_module(namespace)
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lp.Trainer(callbacks=callbacks, **defaults)


def ckpt_step(body: bytes, tmp: Path) -> int:
    path = tmp / "probe.ckpt"
    path.write_bytes(body)
    return int(torch.load(path, weights_only=False)["global_step"])


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_topk_monitor_save_last_keep_last_n(
    namespace: str,
    moto_server: S3Server,
    moto_bucket: S3URL,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """save_top_k=2 + monitor + save_last + keep_last_n=2 in S3: best kept, newest kept, nothing torn."""
    from runctl.uploader import CheckpointUploader

    told: list[str | None] = []
    set_best = CheckpointUploader.set_best

    def spy(self: CheckpointUploader, name: str | None) -> None:
        told.append(name)
        set_best(self, name)

    monkeypatch.setattr(CheckpointUploader, "set_best", spy)
    prefix = moto_bucket.join("run/")
    dirpath = tmp_path / "ckpt"
    cb = checkpoint_class(namespace)(
        dirpath=dirpath,
        filename="{epoch}-{step}",
        monitor="val_loss",
        mode="min",
        save_top_k=2,
        save_last=True,
        s3_url=prefix,
        keep_last_n=2,
        config=moto_server.config(),
    )
    # Epoch 1 is the best; Lightning keeps epochs 1 and 4 locally (top-2).
    trainer = make_trainer(namespace, [cb], max_epochs=5)
    trainer.fit(make_module(namespace, [0.5, 0.1, 0.4, 0.3, 0.2]), loader(), loader(1))

    assert Path(cb.best_model_path).name == "epoch=1-step=8.ckpt"
    # The uploader hears of each new best once; the save hook does no lookup when it is unchanged.
    assert told == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    local = sorted(p.name for p in dirpath.glob("*.ckpt"))
    assert local == ["epoch=1-step=8.ckpt", "epoch=4-step=20.ckpt", "last.ckpt"]

    in_s3 = file_checkpoints(s3_objects(moto_server, prefix))
    names = set(in_s3)
    # The best, the newest and last.ckpt are always there; epoch=3 may be there (newest two)
    # or skipped as superseded (Lightning deleted it locally); nothing older survives retention.
    assert {"epoch=1-step=8.ckpt", "epoch=4-step=20.ckpt", "last.ckpt"} <= names
    assert names <= {
        "epoch=1-step=8.ckpt",
        "epoch=3-step=16.ckpt",
        "epoch=4-step=20.ckpt",
        "last.ckpt",
    }
    for name in local:
        assert in_s3[name] == (dirpath / name).read_bytes(), (
            f"{name} in S3 differs from the local file"
        )
    for name, body in in_s3.items():
        expected = 20 if name == "last.ckpt" else int(name.split("step=")[1].split(".")[0])
        assert ckpt_step(body, tmp_path) == expected, (
            f"{name} in S3 is not the version saved at its step"
        )
    assert cb.final_stats["runctl/uploaded"] >= 3
    assert cb.final_stats["runctl/failures"] == 0
    assert isinstance(cb, importlib.import_module(f"{namespace}.callbacks").ModelCheckpoint)


def test_every_n_steps_async_checkpoint_io(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """With AsyncCheckpointIO every checkpoint is handed over only after its write finished."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from runctl.integrations.lightning import RunctlCheckpoint

    prefix = moto_bucket.join("async/")
    dirpath = tmp_path / "ckpt"
    cb = RunctlCheckpoint(
        dirpath=dirpath,
        every_n_train_steps=2,
        save_top_k=-1,
        s3_url=prefix,
        keep_last_n=3,
        config=moto_server.config(),
    )
    trainer = make_trainer("lightning.pytorch", [cb], max_steps=10, plugins=[AsyncCheckpointIO()])
    trainer.fit(make_module("lightning.pytorch"), loader(16))
    in_s3 = file_checkpoints(s3_objects(moto_server, prefix))
    assert set(in_s3) == {"epoch=0-step=6.ckpt", "epoch=0-step=8.ckpt", "epoch=0-step=10.ckpt"}
    for name, body in in_s3.items():
        assert body == (dirpath / name).read_bytes()
    assert len(list(dirpath.glob("*.ckpt"))) == 5  # Lightning's top-k (-1) keeps them all locally


def test_resume_from_s3_protects_the_resumed_checkpoint(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """A run resumed from an s3:// checkpoint downloads it via runctl and never deletes it (S3 or local)."""
    from runctl.integrations.lightning import RunctlCheckpoint

    prefix = moto_bucket.join("resume/")
    config = moto_server.config()

    def callback(dirpath: Path) -> Any:
        return RunctlCheckpoint(
            dirpath=dirpath,
            every_n_train_steps=2,
            save_top_k=-1,
            s3_url=prefix,
            keep_last_n=1,
            local_keep_last_n=1,
            config=config,
        )

    first = callback(tmp_path / "a")
    make_trainer("lightning.pytorch", [first], max_steps=4).fit(
        make_module("lightning.pytorch"), loader(16)
    )
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == ["epoch=0-step=4.ckpt"]

    second = callback(tmp_path / "b")
    ckpt_path = second.resolve_ckpt_path(str(prefix.join("epoch=0-step=4.ckpt")))
    assert ckpt_path == str(tmp_path / "b" / "epoch=0-step=4.ckpt")
    trainer = make_trainer("lightning.pytorch", [second], max_steps=10)
    trainer.fit(make_module("lightning.pytorch"), loader(16), ckpt_path=ckpt_path)
    assert trainer.global_step == 10

    in_s3 = file_checkpoints(s3_objects(moto_server, prefix))
    assert sorted(in_s3) == ["epoch=0-step=10.ckpt", "epoch=0-step=4.ckpt"]
    local = sorted(p.name for p in (tmp_path / "b").glob("*.ckpt"))
    assert local == ["epoch=0-step=10.ckpt", "epoch=0-step=4.ckpt"]
    assert in_s3["epoch=0-step=10.ckpt"] == (tmp_path / "b" / "epoch=0-step=10.ckpt").read_bytes()

    state = torch.load(tmp_path / "b" / "epoch=0-step=10.ckpt", weights_only=False)
    runctl_state = next(
        v for k, v in state["callbacks"].items() if k.startswith("RunctlCheckpoint")
    )["runctl"]
    assert runctl_state["s3_url"] == str(prefix)
    assert runctl_state["resumed_from"] == "epoch=0-step=4.ckpt"
    json.dumps(runctl_state)  # plain values only


def test_resuming_from_an_older_local_checkpoint_keeps_it(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """Retention waits for on_train_start: the uploader starts in setup, before Lightning restores."""
    from runctl.integrations.lightning import RunctlCheckpoint

    prefix = moto_bucket.join("resume-older/")
    dirpath = tmp_path / "ckpt"

    def callback(keep: int) -> Any:
        return RunctlCheckpoint(
            dirpath=dirpath, every_n_train_steps=2, save_top_k=-1, s3_url=prefix,
            keep_last_n=keep, local_keep_last_n=keep, config=moto_server.config(),
        )

    make_trainer("lightning.pytorch", [callback(3)], max_steps=8).fit(make_module("lightning.pytorch"), loader(16))
    older = "epoch=0-step=4.ckpt"
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == [
        older, "epoch=0-step=6.ckpt", "epoch=0-step=8.ckpt"
    ]
    # Resume from the oldest of the three with keep-last-2: it is #3, but it is what this run
    # resumed from, so neither the start-up retention nor any later one may delete it.
    trainer = make_trainer("lightning.pytorch", [callback(2)], max_steps=10)
    trainer.fit(make_module("lightning.pytorch"), loader(16), ckpt_path=str(dirpath / older))
    assert trainer.global_step == 10
    in_s3 = file_checkpoints(s3_objects(moto_server, prefix))
    # Kept: the newest two (step 10, and one of the two step-8 saves: Lightning names the second
    # "epoch=0-step=8-v1.ckpt", and the server's times may not tell them apart), and the resumed one.
    assert len(in_s3) == 3 and {older, "epoch=0-step=10.ckpt"} <= set(in_s3), sorted(in_s3)
    assert set(in_s3) & {"epoch=0-step=8.ckpt", "epoch=0-step=8-v1.ckpt"}
    local = {p.name for p in dirpath.glob("*.ckpt")}  # its times tell the two step-8 saves apart
    assert len(local) == 3 and {older, "epoch=0-step=10.ckpt"} <= local, sorted(local)
    assert in_s3[older] == (dirpath / older).read_bytes()


def test_resolve_latest_from_an_empty_prefix_starts_fresh(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    from runctl.integrations.lightning import RunctlCheckpoint

    cb = RunctlCheckpoint(
        dirpath=tmp_path, s3_url=moto_bucket.join("nothing/"), config=moto_server.config()
    )
    assert cb.resolve_ckpt_path("latest") is None
    assert cb.resolve_ckpt_path("local/path.ckpt") == "local/path.ckpt"


def test_resolve_latest_waits_out_a_blip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One refused connection to S3 at start (a job restarted after a preemption) ended the run.
    import threading

    import runctl.retry
    from runctl.integrations.lightning import RunctlCheckpoint
    from tests.servers import start_rclone

    monkeypatch.setattr(runctl.retry.RetryPolicy, "delay", lambda self, retry, rng=None: 0.5)
    server = start_rclone(tmp_path / "rclone")
    try:
        prefix = S3URL(server.new_bucket()).join("run/")
        first = RunctlCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=2, s3_url=prefix, config=server.config())
        make_trainer("lightning.pytorch", [first], max_steps=2).fit(make_module("lightning.pytorch"), loader(16))
        server.stop()
        restart = threading.Timer(1.0, server.start)
        restart.start()
        fresh = RunctlCheckpoint(dirpath=tmp_path / "b", s3_url=prefix, config=server.config())
        assert fresh.resolve_ckpt_path("latest") == str(tmp_path / "b" / "epoch=0-step=2.ckpt")
        restart.join()
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["latest", "object", "latest at a bucket root"])
def test_resolve_never_replaces_a_newer_local_last_ckpt(moto_server: S3Server, tmp_path: Path, how: str) -> None:
    # S3 went down at step 4; last.ckpt at step 10 stayed local. The documented restart,
    # resolve_ckpt_path("latest"), downloaded S3's step-4 last.ckpt over it: step 10 was gone.
    import os
    import time

    from runctl.integrations.lightning import resolve_ckpt_path

    prefix = S3URL(moto_server.new_bucket()).join("" if how.endswith("root") else "run/")
    client = moto_server.client()
    client.put_object(Bucket=prefix.bucket, Key=prefix.key + "epoch=0-step=4.ckpt", Body=b"step 4")
    client.put_object(Bucket=prefix.bucket, Key=prefix.key + "last.ckpt", Body=b"step 4")
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    local = dirpath / "last.ckpt"
    local.write_bytes(b"step 10")
    later = time.time() + 5  # written after S3's copy landed
    os.utime(local, (later, later))
    url = prefix.join("last.ckpt") if how == "object" else prefix
    found = resolve_ckpt_path(str(url), dirpath, config=moto_server.config())
    assert local.read_bytes() == b"step 10"
    assert found == str(dirpath / ".runctl" / "restored" / "last.ckpt")
    assert Path(found).read_bytes() == b"step 4"
    from runctl.uploader import record_restored

    record_restored(found, prefix.join("last.ckpt"))  # as the callback does with what it resumes
    assert not (dirpath / ".runctl" / "restored" / ".runctl").exists()  # set aside: no journal of its own
    # S3's own copy, untouched since, is restored in place as before.
    os.utime(local, (later - 3600, later - 3600))
    local.write_bytes(b"step 4")
    os.utime(local, (later - 3600, later - 3600))
    assert resolve_ckpt_path(str(url), dirpath, config=moto_server.config()) == str(local)


def test_resolve_never_replaces_a_local_last_ckpt_handed_over_and_never_sent(
    moto_server: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Uploads slower than saves, then kill -9: last.ckpt at step 9 was queued, never sent; S3's
    step-3 copy has the same size (every save of a model has) and landed after step 9 was
    written. The restore took the local file for S3's copy and wrote step 3 over it (Lightning
    pass), though the journal said step 9 was handed over and never landed."""
    import os
    import time

    from runctl.integrations.lightning import resolve_ckpt_path
    from runctl.journal import Journal

    prefix = S3URL(moto_server.new_bucket()).join("run/")
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    local = dirpath / "last.ckpt"
    local.write_bytes(b"step 9")
    earlier = time.time() - 30  # saved before S3's older copy finished landing
    os.utime(local, (earlier, earlier))
    st = local.stat()
    Journal(dirpath).record("last.ckpt", "queued", time=earlier, size=st.st_size, mtime=st.st_mtime)
    moto_server.client().put_object(Bucket=prefix.bucket, Key=prefix.key + "last.ckpt", Body=b"step 3")
    caplog.set_level(logging.WARNING)
    found = resolve_ckpt_path(str(prefix), dirpath, config=moto_server.config())
    assert local.read_bytes() == b"step 9"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [m for m in said if "the journal says it was handed over for upload and never landed" in m], said
    assert found == str(dirpath / ".runctl" / "restored" / "last.ckpt")
    assert Path(found).read_bytes() == b"step 3"


def test_best_only_in_s3_is_fetched_for_validate_with_ckpt_path_best(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """Resumed on a fresh machine, Lightning restores best_model_path from the checkpoint, but the
    best is in S3 only: validate/test(ckpt_path="best") raised FileNotFoundError (Lightning pass)."""
    from runctl.integrations.lightning import RunctlCheckpoint

    prefix = moto_bucket.join("run/")

    def callback(dirpath: Path) -> Any:
        return RunctlCheckpoint(
            dirpath=dirpath, monitor="val_loss", save_top_k=1, save_last=True,
            s3_url=prefix, keep_last_n=2, config=moto_server.config(),
        )  # fmt: skip

    losses = [0.5, 0.1, 0.4, 0.45, 0.9, 0.9]
    first = callback(tmp_path / "a")
    make_trainer("lightning.pytorch", [first], max_epochs=3).fit(make_module("lightning.pytorch", losses), loader(), loader(1))
    assert Path(first.best_model_path).name == "epoch=1-step=8.ckpt"

    (tmp_path / "a").rename(tmp_path / "first-machine")  # the same dirpath, on a fresh machine
    fresh = callback(tmp_path / "a")
    trainer = make_trainer("lightning.pytorch", [fresh], max_epochs=4)
    trainer.fit(make_module("lightning.pytorch", losses), loader(), loader(1), ckpt_path=fresh.resolve_ckpt_path("latest"))
    assert fresh.best_model_path == str(tmp_path / "a" / "epoch=1-step=8.ckpt")
    assert not Path(fresh.best_model_path).exists()  # never saved on this machine
    trainer.validate(make_module("lightning.pytorch", losses), loader(1))  # the weights in memory
    assert not Path(fresh.best_model_path).exists()  # nothing asked for it: not downloaded
    trainer.validate(make_module("lightning.pytorch", losses), loader(1), ckpt_path="best")
    assert Path(fresh.best_model_path).read_bytes() == (tmp_path / "first-machine" / "epoch=1-step=8.ckpt").read_bytes()


def test_without_s3_url_it_is_a_plain_model_checkpoint(tmp_path: Path) -> None:
    from runctl.integrations.lightning import RunctlCheckpoint

    cb = RunctlCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    make_trainer("lightning.pytorch", [cb], max_steps=4).fit(
        make_module("lightning.pytorch"), loader(16)
    )
    assert cb.uploader is None
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
    ]


@pytest.mark.parametrize("dirpath", ["given", "from RUNCTL_CHECKPOINT_DIR"])
def test_under_runctl_local_watching_its_dirpath_it_claims_it(
    moto_server: S3Server,
    moto_bucket: S3URL,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dirpath: str,
) -> None:
    import os

    from runctl.integrations.lightning import RunctlCheckpoint
    from runctl.localrun import claimed_by

    prefix = moto_bucket.join("local-run/")
    as_under_runctl_local(monkeypatch, tmp_path, prefix, moto_server)
    monkeypatch.chdir(tmp_path.parent)  # not Lightning's own default, ./checkpoints
    given = {"dirpath": tmp_path} if dirpath == "given" else {}
    cb = RunctlCheckpoint(every_n_train_steps=2, save_top_k=-1, **given)
    make_trainer("lightning.pytorch", [cb], max_steps=4).fit(
        make_module("lightning.pytorch"), loader(16)
    )
    # The callback uploaded (it knows the best checkpoint, runctl local's watcher does not),
    # and told runctl local so.
    assert claimed_by(tmp_path, [os.getpid()]) == os.getpid()
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
    ]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"keep_last_n": 0}, "keep_last_n"), ({"on_upload_error": "nope"}, "on_upload_error")],
)
def test_bad_runctl_arguments_are_named(kwargs: dict, needle: str) -> None:
    from runctl.integrations.lightning import RunctlCheckpoint

    with pytest.raises(UsageError, match=needle):
        RunctlCheckpoint(s3_url="s3://bucket/x/", **kwargs)


def test_model_checkpoint_arguments_still_validate() -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from runctl.integrations.lightning import RunctlCheckpoint

    with pytest.raises(MisconfigurationException):
        RunctlCheckpoint(save_top_k=-2, s3_url="s3://bucket/x/")


@pytest.mark.parametrize(
    ("filename", "auto_insert", "says"),
    [
        ("{epoch}-{val/loss:.2f}", True, "auto_insert_metric_name=False"),
        ("epoch{epoch}/model", True, "subdirectories of dirpath"),
        ("{epoch}-val_loss={val/loss:.2f}", False, None),
    ],
)
def test_a_filename_that_saves_below_dirpath_is_refused_when_built(
    tmp_path: Path, filename: str, auto_insert: bool, says: str | None
) -> None:
    # Valid for ModelCheckpoint, these once crashed training at the first save ("submit path
    # must be directly inside the uploader's root").
    from runctl.integrations.lightning import RunctlCheckpoint

    def build() -> Any:
        return RunctlCheckpoint(
            dirpath=tmp_path,
            filename=filename,
            auto_insert_metric_name=auto_insert,
            s3_url="s3://bucket/run/",
        )

    if says is None:
        build()
    else:
        with pytest.raises(UsageError, match=says):
            build()


@pytest.mark.parametrize(
    ("filename", "auto_insert", "keep_last_n", "outcome"),
    [
        (None, True, 2, "ok"),
        ("{epoch}-{val_loss:.2f}", True, 2, "ok"),
        ("step_{step}", False, 2, "ok"),
        ("model-{epoch:02d}", False, 2, "ok"),  # one trailing number orders them
        ("epoch={epoch}-step={step}-val_loss={val/loss:.2f}", False, 2, "ok"),  # as the slash refusal suggests
        ("{val_loss:.4f}", True, 2, "refused"),
        ("model-{val_acc:.0f}", False, 2, "refused"),  # one number, but a metric's
        ("{epoch}-{step}", False, 2, "refused"),  # '3-1200.ckpt'
        ("best", True, None, "warned"),
    ],
)
def test_a_filename_runctl_cannot_order_is_refused_with_retention_and_warned_about_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, filename: str | None, auto_insert: bool,
    keep_last_n: int | None, outcome: str,
) -> None:
    # filename="{val_loss:.4f}" uploaded, but keep-last-N never deleted one and
    # resolve_ckpt_path("latest") resumed from scratch: runctl saw no checkpoint in those names.
    from runctl.integrations.lightning import RunctlCheckpoint

    def build() -> Any:
        return RunctlCheckpoint(
            dirpath=tmp_path, filename=filename, auto_insert_metric_name=auto_insert,
            s3_url="s3://bucket/run/", keep_last_n=keep_last_n,
        )

    with caplog.at_level(logging.WARNING, logger="runctl"):
        if outcome == "refused":
            with pytest.raises(UsageError, match="no step or epoch to order checkpoints by"):
                build()
        else:
            build()
    warned = [r for r in caplog.records if "no step or epoch" in r.getMessage()]
    assert bool(warned) == (outcome == "warned")


@pytest.mark.parametrize(
    ("filename", "within_epoch", "warned"),
    [
        ("{epoch}-{train_loss_step:.3f}", dict(every_n_train_steps=3), True),
        ("{epoch}", dict(train_time_interval=timedelta(minutes=5)), True),
        ("{epoch}-{step}", dict(every_n_train_steps=3), False),
        ("{epoch}-{val_loss:.2f}", {}, False),
    ],
)
def test_saves_within_an_epoch_named_by_the_epoch_alone_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, filename: str, within_epoch: dict, warned: bool
) -> None:
    # every_n_train_steps=3 with "{epoch}-{train_loss_step:.3f}": the saves of one epoch
    # shared its number, runctl took them for one checkpoint, and keep_last_n=2 left epoch 0
    # and parts of the later ones in S3.
    from runctl.integrations.lightning import RunctlCheckpoint

    with caplog.at_level(logging.WARNING, logger="runctl"):
        RunctlCheckpoint(
            dirpath=tmp_path, filename=filename, s3_url="s3://bucket/run/", keep_last_n=2,
            **within_epoch,
        )  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "by the epoch alone" in r.getMessage()]
    assert bool(said) == warned, said


def test_a_run_begun_with_model_checkpoint_resumes_with_its_state(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    # Lightning keys a callback's state by class name: swapping ModelCheckpoint for
    # RunctlCheckpoint mid-run once forgot the best score (and wrote last-v1.ckpt).
    from lightning.pytorch.callbacks import ModelCheckpoint

    from runctl.integrations.lightning import RunctlCheckpoint

    args = dict(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    first = ModelCheckpoint(**args)
    make_trainer("lightning.pytorch", [first], max_epochs=2).fit(
        make_module("lightning.pytorch", [0.5, 0.1, 0.9]), loader(2), loader(1)
    )
    assert float(first.best_model_score) == pytest.approx(0.1)
    second = RunctlCheckpoint(**args, s3_url=moto_bucket.join("swap/"), config=moto_server.config())
    make_trainer("lightning.pytorch", [second], max_epochs=3).fit(
        make_module("lightning.pytorch", [0.5, 0.1, 0.9]),
        loader(2),
        loader(1),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )
    assert float(second.best_model_score) == pytest.approx(0.1)  # epoch 2's 0.9 is no better
    assert Path(second.best_model_path).name == Path(first.best_model_path).name
    assert not (tmp_path / "ckpt" / "last-v1.ckpt").exists()


def test_the_best_stays_in_s3_when_a_run_resumes_into_another_dirpath(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    # Lightning forgets the best score on a new dirpath and takes the next save for the best:
    # the old best (val_loss 0.1) once went to S3 retention.
    from runctl.integrations.lightning import RunctlCheckpoint

    prefix = moto_bucket.join("newdir/")
    losses = [0.1, 0.5, 0.9, 0.8, 0.7]

    def callback(dirpath: Path) -> Any:
        return RunctlCheckpoint(
            dirpath=dirpath, monitor="val_loss", save_top_k=1, save_last=True,
            s3_url=prefix, keep_last_n=1, config=moto_server.config(),
        )

    first = callback(tmp_path / "a")
    make_trainer("lightning.pytorch", [first], max_epochs=3).fit(
        make_module("lightning.pytorch", losses), loader(2), loader(1)
    )
    best = Path(first.best_model_path).name
    assert best in file_checkpoints(s3_objects(moto_server, prefix))
    second = callback(tmp_path / "b")
    make_trainer("lightning.pytorch", [second], max_epochs=5).fit(
        make_module("lightning.pytorch", losses), loader(2), loader(1),
        ckpt_path=str(tmp_path / "a" / "last.ckpt"),
    )
    assert best in file_checkpoints(s3_objects(moto_server, prefix))
    # Kept for that run only: no pin, here or in S3, keeps it from later retention.
    assert not (tmp_path / "b" / ".runctl" / "pinned").exists()
    assert not [k for k in s3_objects(moto_server, prefix) if "pinned" in k]


def test_two_callbacks_that_would_delete_each_others_checkpoints_are_refused(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    # "best by metric" beside "every 2 steps" on one prefix: the periodic one's keep-last-N
    # deleted the other's best, which each callback protects only for itself.
    from runctl.integrations.lightning import RunctlCheckpoint

    def pair(best: dict[str, Any], periodic: dict[str, Any]) -> list[Any]:
        common = dict(config=moto_server.config(), keep_last_n=1)
        return [
            RunctlCheckpoint(monitor="val_loss", **common, **best),
            RunctlCheckpoint(every_n_train_steps=2, save_top_k=-1, **common, **periodic),
        ]

    run = moto_bucket.join("pair/")
    a, b = tmp_path / "a", tmp_path / "b"
    for best, periodic, says in [
        (dict(dirpath=a, s3_url=run), dict(dirpath=b, s3_url=run), "upload to"),
        (
            dict(dirpath=a, s3_url=run.join("best/")),
            dict(dirpath=a, s3_url=run.join("periodic/"), local_keep_last_n=1),
            "save to",
        ),
    ]:
        trainer = make_trainer("lightning.pytorch", pair(best, periodic), max_steps=2)
        with pytest.raises(UsageError, match=f"two RunctlCheckpoint callbacks {says}"):
            trainer.fit(make_module("lightning.pytorch"), loader(4), loader(2))
    # Apart, both run; so do two on one prefix when neither deletes anything there.
    shared = moto_bucket.join("shared/")
    no_retention = [
        RunctlCheckpoint(
            dirpath=tmp_path / "c", monitor="val_loss", s3_url=shared, config=moto_server.config()
        ),
        RunctlCheckpoint(
            dirpath=tmp_path / "d", every_n_train_steps=2, s3_url=shared, config=moto_server.config()
        ),
    ]
    make_trainer("lightning.pytorch", no_retention, max_steps=2).fit(
        make_module("lightning.pytorch"), loader(4), loader(2)
    )
    callbacks = pair(
        dict(dirpath=a, s3_url=run.join("best/")), dict(dirpath=b, s3_url=run.join("periodic/"))
    )
    make_trainer("lightning.pytorch", callbacks, max_steps=2).fit(
        make_module("lightning.pytorch"), loader(4), loader(2)
    )
    assert sorted(file_checkpoints(s3_objects(moto_server, run.join("periodic/")))) == [
        "epoch=0-step=2.ckpt"
    ]


def test_two_callbacks_on_one_dirpath_each_keep_their_last_n_in_their_own_prefix(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    # The layout the refusal above advises: "best" and "periodic" on one dirpath, each with its
    # own s3_url. Their uploaders share the directory's journal: the best's skipped files made
    # the periodic one's steps "not whole" (and the other way round), and S3 kept 5 where 2 and
    # 5 where 1 were asked for.
    from runctl.integrations.lightning import RunctlCheckpoint

    run, epochs = moto_bucket.join("run/"), 8
    common = dict(dirpath=tmp_path / "ckpt", config=moto_server.config())
    best = RunctlCheckpoint(
        filename="best-{epoch}-{step}", monitor="val_loss", save_top_k=1,
        s3_url=run.join("best/"), keep_last_n=1, **common,
    )  # fmt: skip
    periodic = RunctlCheckpoint(
        every_n_epochs=1, save_top_k=-1, s3_url=run.join("periodic/"), keep_last_n=2, **common
    )
    module = make_module("lightning.pytorch", val_losses=[1.0 - 0.1 * e for e in range(epochs)])
    make_trainer("lightning.pytorch", [best, periodic], max_epochs=epochs).fit(
        module, loader(4), loader(2)
    )
    last = epochs - 1
    assert sorted(file_checkpoints(s3_objects(moto_server, run.join("periodic/")))) == [
        f"epoch={last - 1}-step={4 * last}.ckpt", f"epoch={last}-step={4 * epochs}.ckpt"
    ]  # fmt: skip
    assert sorted(file_checkpoints(s3_objects(moto_server, run.join("best/")))) == [
        f"best-epoch={last}-step={4 * epochs}.ckpt"
    ]


@pytest.mark.parametrize("writes", ["sync", "async"])
def test_exception_mid_fit_still_lands_what_was_saved(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, writes: str
) -> None:
    """on_exception flushes pending uploads (bounded) and lets the training error through."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    from runctl.integrations.lightning import RunctlCheckpoint

    class SlowIO(TorchCheckpointIO):
        def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.5)  # still writing when the error comes: its hand-over is queued
            super().save_checkpoint(*args, **kwargs)

    plugins = [AsyncCheckpointIO(SlowIO())] if writes == "async" else []
    module = failing_module(at_step=5)
    prefix = moto_bucket.join("boom/")
    dirpath = tmp_path / "ckpt"
    cb = RunctlCheckpoint(
        dirpath=dirpath,
        every_n_train_steps=2,
        save_top_k=-1,
        s3_url=prefix,
        config=moto_server.config(),
    )
    with pytest.raises(Boom):
        make_trainer("lightning.pytorch", [cb], max_steps=10, plugins=plugins).fit(
            module, loader(16)
        )
    assert cb.uploader is None  # closed by on_exception
    in_s3 = file_checkpoints(s3_objects(moto_server, prefix))
    assert set(in_s3) == {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"}
    for name, body in in_s3.items():
        assert body == (dirpath / name).read_bytes()


def test_an_exception_with_s3_unreachable_is_not_held_up_by_the_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training error surfaces once uploads have failed for FAILING_TIMEOUT, not flush_timeout."""
    import runctl.uploader
    from runctl.config import Credentials, S3Config
    from runctl.integrations.lightning import RunctlCheckpoint
    from runctl.journal import Journal
    from runctl.retry import RetryPolicy
    from tests.servers import free_port

    monkeypatch.setattr(runctl.uploader, "FAILING_TIMEOUT", 1.0)
    module = failing_module(at_step=3)
    dirpath = tmp_path / "ckpt"
    nobody = S3Config(
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: S3 is unreachable
        static_credentials=Credentials("test", "test"),
    )
    cb = RunctlCheckpoint(
        dirpath=dirpath,
        every_n_train_steps=2,
        s3_url="s3://bucket/unreachable/",
        config=nobody,
        use_s5cmd=False,
        uploader_options={"retry": RetryPolicy(attempts=1000, backoff_factor=0.05, backoff_max=0.1)},
    )
    start = time.monotonic()
    with pytest.raises(Boom), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer("lightning.pytorch", [cb], max_steps=10).fit(module, loader(16))
    assert time.monotonic() - start < 30  # flush_timeout is 600 s
    # What could not go up stays in the journal: the next run uploads it.
    assert [e.name for e in Journal(dirpath).pending()] == ["epoch=0-step=2.ckpt"]


def test_upload_stats_reach_the_trainer_logger(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from runctl.integrations.lightning import RunctlCheckpoint

    cb = RunctlCheckpoint(
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=2,
        s3_url=moto_bucket.join("stats/"),
        config=moto_server.config(),
    )
    logger = CSVLogger(tmp_path / "logs", name="run", version=0)
    make_trainer("lightning.pytorch", [cb], max_steps=4, logger=logger).fit(
        make_module("lightning.pytorch"), loader(16)
    )
    header = (
        (tmp_path / "logs" / "run" / "version_0" / "metrics.csv")
        .read_text()
        .splitlines()[0]
        .split(",")
    )
    assert {"runctl/uploaded", "runctl/bytes_uploaded", "runctl/failures"} <= set(header)


@pytest.mark.parametrize("policy", ["raise", "warn"])
def test_failed_uploads_surface_at_the_end_of_fit(
    policy: str, moto_server: S3Server, tmp_path: Path
) -> None:
    """A bucket that does not exist: fit ends with UploadError ("raise") or an UploadWarning ("warn")."""
    from runctl.exceptions import UploadError
    from runctl.integrations._common import UploadWarning
    from runctl.integrations.lightning import RunctlCheckpoint
    from runctl.retry import RetryPolicy

    cb = RunctlCheckpoint(
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=2,
        s3_url="s3://no-such-bucket-runctl/run/",
        config=moto_server.config(),
        use_s5cmd=False,
        on_upload_error=policy,
        flush_timeout=30,
        uploader_options={"retry": RetryPolicy(attempts=1, backoff_factor=0.01)},
    )
    trainer = make_trainer("lightning.pytorch", [cb], max_steps=2)
    if policy == "raise":
        with pytest.raises(UploadError, match="epoch=0-step=2.ckpt"):
            trainer.fit(make_module("lightning.pytorch"), loader(16))
    else:
        with pytest.warns(UploadWarning, match="epoch=0-step=2.ckpt"):
            trainer.fit(make_module("lightning.pytorch"), loader(16))
    assert cb.uploader is None
    # The local checkpoint is kept: it never became durable.
    assert (tmp_path / "ckpt" / "epoch=0-step=2.ckpt").exists()


def test_resuming_through_the_last_ckpt_link_uploads_no_stale_last_ckpt(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """save_last="link" + fit(ckpt_path="last"): the link never goes to S3, and the checkpoint
    it points to is the one kept as resumed from.

    Once, the resume uploaded the link's target as S3's last.ckpt, never refreshed after, and
    "latest" on a fresh machine could pick it over a newer step.
    """
    from runctl.integrations.lightning import RunctlCheckpoint

    prefix = moto_bucket.join("link/")
    dirpath = tmp_path / "ckpt"

    def callback(where: Path) -> Any:
        return RunctlCheckpoint(
            dirpath=where, filename="{epoch}-{step}", every_n_train_steps=2, save_top_k=-1,
            save_last="link", s3_url=prefix, keep_last_n=2, config=moto_server.config(),
        )  # fmt: skip

    make_trainer("lightning.pytorch", [callback(dirpath)], max_steps=4).fit(
        make_module("lightning.pytorch"), loader(16)
    )
    assert os.readlink(dirpath / "last.ckpt") == "epoch=0-step=4.ckpt"
    trainer = make_trainer("lightning.pytorch", [callback(dirpath)], max_steps=8)
    trainer.fit(make_module("lightning.pytorch"), loader(16), ckpt_path="last")
    assert trainer.global_step == 8

    # Kept: the newest two, and step 4, resumed from through the link (keep_last_n=2 alone
    # would have deleted it).
    in_s3 = file_checkpoints(s3_objects(moto_server, prefix))
    assert sorted(in_s3) == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "epoch=0-step=8.ckpt"]
    fresh = callback(tmp_path / "fresh").resolve_ckpt_path("latest")
    assert fresh is not None and Path(fresh).name == "epoch=0-step=8.ckpt"


class HeldPuts:
    """A real transfer whose uploads wait until ``release`` is set (at most until ``deadline``),
    so that uploads are still pending when fit ends. ``close()`` ends the wait, as it kills a
    running s5cmd."""

    def __init__(self, inner: Any, release: threading.Event, within: float) -> None:
        self._inner = inner
        self._release = release
        self._deadline = time.monotonic() + within
        self._closed = threading.Event()

    def put_files(self, *args: Any, **kwargs: Any) -> None:
        while not self._release.is_set() and time.monotonic() < self._deadline:
            if self._closed.wait(0.05):
                raise TransferError("the transfer was closed", code="Closed")
        self._inner.put_files(*args, **kwargs)

    def close(self) -> None:
        self._closed.set()
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Heard(logging.Handler):
    """Keeps every line logged to it; calls ``then`` at the first one containing ``needle``."""

    def __init__(self, needle: str = "", then: Any = None) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._needle, self._then = needle, then

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if self._then is not None and self._needle in self.lines[-1]:
            self._then, then = None, self._then
            then()


@contextlib.contextmanager
def listening(name: str, handler: logging.Handler) -> Iterator[None]:
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def test_the_final_flush_says_that_fit_waits_for_uploads(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """Uploads still pending when fit ends: one line says fit waits for them (it sat silent for 18 s)."""
    from runctl.integrations.lightning import RunctlCheckpoint
    from runctl.transfer import get_transfer

    release = threading.Event()
    transfer = HeldPuts(get_transfer(moto_server.config(), use_s5cmd=False), release, within=10)
    prefix = moto_bucket.join("wait/")
    cb = RunctlCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, s3_url=prefix,
        config=moto_server.config(), uploader_options={"transfer": transfer},
    )  # fmt: skip
    heard = Heard("waiting for", release.set)  # the uploads go once the wait is announced
    try:
        with listening("runctl.integrations.lightning", heard):
            make_trainer("lightning.pytorch", [cb], max_steps=4).fit(
                make_module("lightning.pytorch"), loader(16)
            )
    finally:
        transfer.close()
    said = [line for line in heard.lines if "waiting for" in line]
    assert len(said) == 1 and "2 checkpoint upload(s) to land before fit returns" in said[0], heard.lines
    assert "(up to 598 s); Ctrl-C stops waiting" in said[0]  # flush_timeout=600 less the quiet wait
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"
    ]  # fmt: skip


def test_ctrl_c_during_the_final_flush_says_the_checkpoints_stay_queued(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    """Ctrl-C while fit waits for its last uploads: it says so, and that the next run sends them.

    It said only "flush timed out after 1 s", a time nobody set.
    """
    from lightning.pytorch.callbacks import Callback

    from runctl.integrations.lightning import RunctlCheckpoint
    from runctl.journal import Journal
    from runctl.transfer import get_transfer
    from runctl.uploader import CheckpointUploader

    class CtrlCAtFitEnd(Callback):
        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:  # runs before runctl's
            main = threading.main_thread().ident
            assert main is not None
            threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT)).start()

    transfer = HeldPuts(get_transfer(moto_server.config(), use_s5cmd=False), threading.Event(), within=20)
    prefix = moto_bucket.join("ctrl-c/")
    dirpath = tmp_path / "ckpt"
    cb = RunctlCheckpoint(
        dirpath=dirpath, every_n_train_steps=2, save_top_k=-1, s3_url=prefix,
        config=moto_server.config(), uploader_options={"transfer": transfer},
    )  # fmt: skip
    heard = Heard()
    before = signal.getsignal(signal.SIGINT)
    try:
        with listening("runctl", heard), pytest.raises(SystemExit):  # Lightning exits 1
            make_trainer("lightning.pytorch", [CtrlCAtFitEnd(), cb], max_steps=4).fit(
                make_module("lightning.pytorch"), loader(16)
            )
    finally:
        signal.signal(signal.SIGINT, before)  # Lightning ignores SIGINT from then on
        with contextlib.suppress(Exception):
            transfer.close()
    pending = ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    said = [line for line in heard.lines if "interrupted" in line]
    assert len(said) == 1, heard.lines
    assert "2 checkpoint(s) not yet in S3 stay queued in the journal" in said[0]
    assert "the next run with this directory uploads them: " + ", ".join(pending) in said[0]
    # and not "flush timed out after 1 s", a time nobody set (verification pass)
    assert not [line for line in heard.lines if "timed out" in line], heard.lines
    assert sorted(e.name for e in Journal(dirpath).pending()) == pending
    with CheckpointUploader(dirpath, prefix, config=moto_server.config(), use_s5cmd=False):
        pass  # the next run: it resumes the journal
    assert sorted(file_checkpoints(s3_objects(moto_server, prefix))) == pending
