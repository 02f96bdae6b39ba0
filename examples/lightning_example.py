"""Train a tiny Lightning model on synthetic data and upload its checkpoints to S3 with RunctlCheckpoint.

Runs in a few seconds on a CPU, with no downloads:

    python examples/lightning_example.py                       # embedded local S3 server
    python examples/lightning_example.py --s3-url s3://bucket/run-1/ [--endpoint-url http://...]

Needs: pip install -c tests/constraints.txt '.[demo]' (from a clone; the demo extra brings
the embedded server and torch).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from contextlib import ExitStack

import lightning.pytorch as lp
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from runctl.integrations.lightning import RunctlCheckpoint


class TinyRegressor(lp.LightningModule):
    """A two-layer MLP learning y = sum(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def synthetic(samples: int, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--s3-url", help="s3://bucket/prefix/ (default: an embedded local S3 server)"
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, GCS, ...)")
    parser.add_argument("--dir", help="local checkpoint directory (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--keep-last-n", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    with ExitStack() as stack:
        config = None
        s3_url = args.s3_url
        if s3_url is None:
            from runctl.embedded import embedded_s3

            server = stack.enter_context(embedded_s3())
            s3_url, config = str(server.url("lightning-example/")), server.config()
        dirpath = args.dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="runctl-example-")
        )

        checkpoint = RunctlCheckpoint(
            dirpath=dirpath,
            monitor="val_loss",
            save_top_k=2,  # Lightning keeps the two best locally, as usual
            save_last=True,
            s3_url=s3_url,
            endpoint_url=args.endpoint_url,
            config=config,
            keep_last_n=args.keep_last_n,  # S3 keeps the newest N, plus the best and last.ckpt
        )
        trainer = lp.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            callbacks=[checkpoint],
            logger=False,
            enable_model_summary=False,
        )
        trainer.fit(TinyRegressor(), synthetic(512, seed=0), synthetic(128, seed=1))
        logging.getLogger("example").info(
            "best: %s; upload stats: %s", checkpoint.best_model_path, checkpoint.final_stats
        )


if __name__ == "__main__":
    main()
