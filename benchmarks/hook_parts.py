"""Row 1b taken apart: four save hooks in one ``Trainer.fit``, side by side on every step.

    python -m benchmarks.hook_parts --saves 8

Each callback saves a 1 GiB checkpoint every step, and the time in its ``_save_checkpoint``
beyond its own ``trainer.save_checkpoint`` (the ``torch.save``) is its stall, as in row 1b.
Their order rotates every step, so none is always the first to run after a write of a GiB.

- ``ModelCheckpoint``: Lightning's own callback, no upload. What any callback built on it
  pays after the write.
- ``RunctlCheckpoint``: runctl as shipped.
- ``lean hand-over``: a RunctlCheckpoint whose hook only does the least hand-over (open the
  file, ``fstat`` it, append one line to a file, close) and leaves ``submit()`` to a helper
  thread: the design that builds the upload job off the training thread, prototyped.
- ``least hand-over``: ModelCheckpoint plus the least hand-over, nothing uploaded: the floor
  for any Lightning callback whose hand-over survives SIGKILL.

A diagnostic, not part of the suite: it asserts nothing and writes nothing but its table.
"""

from __future__ import annotations

import argparse
import queue
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import percentile
from benchmarks.suite import _least_handover, server_storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hook_parts", description=__doc__)
    parser.add_argument("--saves", type=int, default=8, help="saves per callback (default 8)")
    parser.add_argument("--size", type=int, default=1 << 30, help="checkpoint bytes (default 1 GiB)")
    args = parser.parse_args(argv)
    stalls = measure(args.saves, args.size)
    print("| hook | median | p90 | each save (ms) |")
    print("|---|---|---|---|")
    for label, values in stalls.items():
        each = ", ".join(f"{v * 1000:.2f}" for v in values)
        print(
            f"| {label} | {statistics.median(values) * 1000:.2f} ms "
            f"| {percentile(values, 90) * 1000:.2f} ms | {each} |"
        )
    return 0


def measure(saves: int, size: int) -> dict[str, list[float]]:
    """Seconds each hook spent beyond its ``torch.save``, per save, by label."""
    import torch
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from runctl.integrations.lightning import RunctlCheckpoint
    from tests.servers import start_rclone

    class Blob(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.register_buffer("blob", torch.zeros(size // 4))

        def training_step(self, batch: Any, _index: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Lean(RunctlCheckpoint):  # type: ignore[misc]
        """The least hand-over in the hook; the real submit() on a helper thread."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.pending: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
            self.helper = threading.Thread(target=self._submit_later, daemon=True)
            self.helper.start()

        @property
        def state_key(self) -> str:
            return "lean"

        def _hand_over(self, filepath: str, step: int) -> None:
            _least_handover(filepath, str(Path(filepath).parent / "lean.jsonl"))
            self.pending.put((filepath, step))

        def _submit_later(self) -> None:
            while (item := self.pending.get()) is not None:
                RunctlCheckpoint._hand_over(self, *item)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self.pending.put(None)  # hand over the rest before the flush
            self.helper.join()
            super().on_fit_end(trainer, pl_module)

    class Least(ModelCheckpoint):
        @property
        def state_key(self) -> str:
            return "least"

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            _least_handover(filepath, str(Path(filepath).parent / "least.jsonl"))

    root = Path(tempfile.mkdtemp(prefix="runctl-hook-parts-"))
    served_root = Path(tempfile.mkdtemp(prefix="runctl-hook-parts-s3-", dir=server_storage(None)))
    served = served_root / "s3"
    (served / "bench").mkdir(parents=True)
    server = start_rclone(served)
    try:
        runctl = {
            "s3_url": "",
            "config": server.config(),
            "keep_last_n": 1,
            "local_keep_last_n": 1,
            "log_stats": False,
        }
        every = {"every_n_train_steps": 1, "save_top_k": -1}
        last = {"every_n_train_steps": 1, "save_top_k": 1}  # Lightning deletes the one before
        hooks: dict[str, Any] = {
            "ModelCheckpoint": ModelCheckpoint(dirpath=root / "plain", **last),
            "RunctlCheckpoint": RunctlCheckpoint(
                dirpath=root / "runctl", **every, **{**runctl, "s3_url": "s3://bench/runctl/"}
            ),
            "lean hand-over": Lean(
                dirpath=root / "lean", **every, **{**runctl, "s3_url": "s3://bench/lean/"}
            ),
            "least hand-over": Least(dirpath=root / "least", **last),
        }
        stalls: dict[str, list[float]] = {label: [] for label in hooks}
        trainer = Trainer(
            max_steps=saves,
            callbacks=list(hooks.values()),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        save = trainer.save_checkpoint
        write = 0.0

        def timed_save(filepath: str, *args: Any, **kwargs: Any) -> Any:
            nonlocal write
            start = time.perf_counter()
            try:
                return save(filepath, *args, **kwargs)
            finally:
                write = time.perf_counter() - start

        def timed_hook(label: str, hook: Any) -> Any:
            def run(trainer: Any, filepath: str) -> None:
                start = time.perf_counter()
                try:
                    hook(trainer, filepath)
                finally:
                    stalls[label].append(time.perf_counter() - start - write)

            return run

        trainer.save_checkpoint = timed_save  # type: ignore[method-assign]
        for label, callback in hooks.items():
            callback._save_checkpoint = timed_hook(label, callback._save_checkpoint)
        ours = list(hooks.values())

        class Rotate(Callback):  # type: ignore[misc]
            def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
                k = trainer.global_step % len(ours)
                rest = [c for c in trainer.callbacks if not any(c is o for o in ours)]
                trainer.callbacks = rest + ours[k:] + ours[:k]

        trainer.callbacks.insert(0, Rotate())
        loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8)
        trainer.fit(Blob(), loader)
        return stalls
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(served_root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
