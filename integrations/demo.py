"""The training run behind ``runctl demo``: a tiny Lightning regressor on synthetic data, saved with RunctlCheckpoint."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import require

if TYPE_CHECKING:
    from runctl.config import S3Config
    from runctl.s3url import S3URL

log = logging.getLogger("runctl.integrations.demo")


@dataclass(frozen=True)
class DemoResult:
    """What the demo run did: steps trained, where it saved, and the uploader's final counters."""

    steps: int
    dirpath: Path
    s3_url: str
    best: str | None
    stats: dict[str, float]


def make_module(hidden: int = 32) -> Any:
    """A tiny LightningModule: a two-layer MLP regressing y = sum(x) on 8 features."""
    require("lightning.pytorch", "demo")
    import lightning.pytorch as lp
    import torch
    from torch import nn

    class TinyRegressor(lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).squeeze(-1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return TinyRegressor()


def make_dataloader(samples: int = 256, batch_size: int = 16, seed: int = 0) -> Any:
    """Synthetic data, no downloads."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=gen)
    return DataLoader(
        TensorDataset(x, x.sum(dim=1)), batch_size=batch_size, shuffle=True, generator=gen
    )


def train_demo(
    dirpath: str | os.PathLike[str],
    s3_url: str | S3URL,
    *,
    config: S3Config | None = None,
    steps: int = 60,
    every: int = 5,
    keep_last_n: int = 3,
    progress: bool = True,
    use_s5cmd: bool = True,
) -> DemoResult:
    """Train for ``steps`` steps, saving every ``every`` steps with RunctlCheckpoint (keep-last-N in S3)."""
    lp = require("lightning.pytorch", "demo")
    from runctl.integrations.lightning import RunctlCheckpoint

    ckpt = RunctlCheckpoint(
        dirpath=str(dirpath),
        filename="{epoch}-{step}",
        every_n_train_steps=every,
        save_top_k=-1,
        save_last=True,
        s3_url=s3_url,
        keep_last_n=keep_last_n,
        local_keep_last_n=keep_last_n,
        config=config,
        use_s5cmd=use_s5cmd,
        log_stats=False,
    )

    class ExceptionSeen(lp.Callback):  # type: ignore[misc]
        exception: BaseException | None = None

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self.exception = exception

    interrupt = ExceptionSeen()
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    with warnings.catch_warnings():
        # Lightning's hints (no GPU, few dataloader workers, deprecations) are noise in the demo.
        warnings.simplefilter("ignore")
        lightning_log.setLevel(logging.WARNING)
        trainer = lp.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            callbacks=[ckpt, interrupt],
            logger=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        try:
            trainer.fit(make_module(), make_dataloader())
        except SystemExit:
            # Lightning ends fit on Ctrl-C (or the CLI's SIGTERM, a KeyboardInterrupt too) with
            # exit(1), after its own graceful shutdown: hand the interrupt back, so the demo
            # exits 130 or 143 as every runctl command does, with its one line.
            if isinstance(interrupt.exception, KeyboardInterrupt):
                raise interrupt.exception from None
            raise
        finally:
            lightning_log.setLevel(level)
    best = Path(ckpt.best_model_path).name if ckpt.best_model_path else None
    return DemoResult(
        steps=int(trainer.global_step),
        dirpath=Path(dirpath),
        s3_url=str(ckpt.s3_url),
        best=best,
        stats=dict(ckpt.final_stats),
    )
