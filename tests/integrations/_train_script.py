"""A training run in its own process, for the SIGKILL test: prints one line per checkpoint handed over.

Usage: python _train_script.py DIR S3_URL MAX_STEPS [--resume CKPT] [--slow-put SECONDS]
The S3 endpoint and credentials come from the environment (AWS_ENDPOINT_URL_S3, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as lp
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from runctl.config import resolve_config
from runctl.integrations.lightning import RunctlCheckpoint
from runctl.transfer import get_transfer


class Tiny(lp.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SlowPuts:
    """A transfer whose uploads sit still for a while first, so that a kill lands mid-upload."""

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner = inner
        self._delay = delay

    def put_files(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(self._delay)
        self._inner.put_files(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class AnnouncingCheckpoint(RunctlCheckpoint):  # type: ignore[misc, valid-type]
    def _hand_over(self, filepath: str, step: int) -> None:
        super()._hand_over(filepath, step)
        print(f"HANDED {Path(filepath).name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("s3_url")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--slow-put", type=float, default=0.0)
    args = parser.parse_args()

    options: dict[str, Any] = {}
    if args.slow_put:
        options["transfer"] = SlowPuts(get_transfer(resolve_config()), args.slow_put)
    cb = AnnouncingCheckpoint(
        dirpath=args.dir,
        every_n_train_steps=2,
        save_top_k=-1,
        s3_url=args.s3_url,
        keep_last_n=3,
        flush_timeout=60,
        uploader_options=options,
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=gen)
    data = DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = lp.Trainer(
            max_steps=args.max_steps,
            accelerator="cpu",
            devices=1,
            callbacks=[cb],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Tiny(), data, ckpt_path=args.resume)
    print(f"DONE {trainer.global_step}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
