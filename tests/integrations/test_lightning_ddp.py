"""DDP on two CPU processes (gloo): only global rank zero uploads, and the run ends without hanging."""

from __future__ import annotations

import atexit
import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as lp
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from runctl.integrations.lightning import RunctlCheckpoint
from runctl.s3url import S3URL
from tests.integrations.conftest import file_checkpoints, s3_objects
from tests.servers import S3Server


class Tiny(lp.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class GlooTeardown(lp.Callback):
    """Destroys each worker's gloo process group at exit, while the interpreter is whole.

    Lightning registers that only for NCCL. Without it, gloo's threads can still hold work
    whose tensors are freed during interpreter finalization, and a worker dies with SIGABRT
    ("terminate called without an active exception") after its fit ended. That failed one
    CI run here, rank 1; pytorch/pytorch#179291 (closed unmerged) describes the cause. It
    has nothing to do with runctl, whose code runs only on rank zero.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        atexit.register(_destroy_process_group)


class RecordingCheckpoint(RunctlCheckpoint):  # type: ignore[misc, valid-type]
    """Writes, per rank, whether it had an uploader and how many checkpoints it handed over."""

    def __init__(self, *args: Any, record_dir: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record_dir = record_dir
        self.handed = 0
        self.saved = 0

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        self.saved += 1
        super()._save_checkpoint(trainer, filepath)

    def _hand_over(self, filepath: str, step: int) -> None:
        self.handed += 1
        super()._hand_over(filepath, step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        had_uploader = self.uploader is not None
        super().on_fit_end(trainer, pl_module)
        record = {"uploader": had_uploader, "saved": self.saved, "handed": self.handed}
        Path(self.record_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow  # two spawned processes import torch and Lightning: ~20 s on a small machine
@pytest.mark.timeout(120)
def test_ddp_two_processes_only_rank_zero_uploads(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    prefix = moto_bucket.join("ddp/")
    dirpath = tmp_path / "ckpt"
    cb = RecordingCheckpoint(
        dirpath=str(dirpath),
        every_n_train_steps=2,
        save_top_k=-1,
        s3_url=prefix,
        keep_last_n=2,
        config=moto_server.config(),
        flush_timeout=60,
        record_dir=str(tmp_path),
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = lp.Trainer(
            strategy="ddp_spawn",
            accelerator="cpu",
            devices=2,
            max_steps=6,
            callbacks=[cb, GlooTeardown()],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Tiny(), DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=4))

    ranks = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ranks[0] == {"uploader": True, "saved": 3, "handed": 3}
    assert ranks[1] == {"uploader": False, "saved": 3, "handed": 0}
    in_s3 = file_checkpoints(s3_objects(moto_server, prefix))
    assert sorted(in_s3) == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    for name, body in in_s3.items():
        assert body == (dirpath / name).read_bytes()
