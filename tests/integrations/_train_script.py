"""A training run in its own process, for the SIGKILL test: prints one line per checkpoint handed over.

Usage: python _train_script.py DIR S3_URL MAX_STEPS [--resume CKPT] [--slow-put SECONDS] [--step-delay SECONDS]
                                [--ddp --fail-rank-1-at STEP] [--second-s3-url S3_URL]
The S3 endpoint and credentials come from the environment (AWS_ENDPOINT_URL_S3, ...).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as lp
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from runctl.config import resolve_config
from runctl.exceptions import TransferError
from runctl.integrations.lightning import RunctlCheckpoint
from runctl.transfer import get_transfer


class Tiny(lp.LightningModule):
    def __init__(self, step_delay: float = 0.0, fail_rank_1_at: int = 0) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.step_delay = step_delay
        self.fail_rank_1_at = fail_rank_1_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(self.step_delay)  # time for a test to interrupt the run midway
        if self.global_rank == 1 and self.global_step == self.fail_rank_1_at > 0:
            raise RuntimeError(f"rank 1 fails at step {self.global_step}")
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SlowPuts:
    """A transfer whose uploads sit still for a while first, so that a kill lands mid-upload.

    ``close()`` (the uploader stopping an upload) ends the wait, as it kills a running s5cmd.
    """

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self._closed = threading.Event()

    def put_files(self, *args: Any, **kwargs: Any) -> None:
        if self._closed.wait(self._delay):
            raise TransferError("the transfer was closed", code="Closed")
        self._inner.put_files(*args, **kwargs)

    def close(self) -> None:
        self._closed.set()
        self._inner.close()

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
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--ddp", action="store_true", help="two CPU ranks, launched as Lightning's ddp does")
    parser.add_argument("--fail-rank-1-at", type=int, default=0)
    parser.add_argument("--second-s3-url", help="a second callback (quick uploads) into DIR-b, to this prefix")
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
    callbacks = [cb]
    if args.second_s3_url:
        callbacks.append(
            RunctlCheckpoint(dirpath=args.dir + "-b", every_n_train_steps=2, save_top_k=-1, s3_url=args.second_s3_url)
        )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=gen)
    data = DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = lp.Trainer(
            max_steps=args.max_steps,
            accelerator="cpu",
            devices=2 if args.ddp else 1,
            strategy="ddp" if args.ddp else "auto",
            callbacks=callbacks,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Tiny(args.step_delay, args.fail_rank_1_at), data, ckpt_path=args.resume)
    print(f"DONE {trainer.global_step}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
