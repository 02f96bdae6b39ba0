"""Hugging Face: RunctlCallback with save_total_limit uploads whole checkpoint-N/ dirs and keeps the best."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from runctl.s3url import S3URL
from tests.integrations.conftest import (
    as_under_runctl_local,
    assert_dir_complete,
    dir_checkpoints,
    s3_objects,
)
from tests.servers import S3Server

transformers = pytest.importorskip("transformers")


class RandomTokens(Dataset):
    def __init__(self, samples: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32, (samples, 8), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> Any:
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def test_save_total_limit_keep_last_n_and_best(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    from runctl.integrations.huggingface import RunctlCallback

    prefix = moto_bucket.join("hf/")
    out = tmp_path / "out"
    # A scripted metric makes the first evaluation (step 2) the best one.
    scores = iter([0.1, 0.5, 0.9, 0.9])

    def compute_metrics(_: Any) -> dict[str, float]:
        return {"score": next(scores)}

    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=2,
        metric_for_best_model="score",
        greater_is_better=False,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    callback = RunctlCallback(prefix, keep_last_n=1, config=moto_server.config())
    seen: list[dict[str, Any]] = []

    class Reporter(transformers.TrainerCallback):  # a reporter listed after runctl's callback
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            seen.append(dict(logs or {}))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(
            model=tiny_gpt2(),
            args=args,
            train_dataset=RandomTokens(32),
            eval_dataset=RandomTokens(4, seed=1),
            compute_metrics=compute_metrics,
            callbacks=[callback, Reporter()],
        )
        trainer.train()
    # runctl's counters go into the training logs only: an evaluation's logs are its metrics,
    # which hyperparameter_search's default objective summed (every trial scored 0.0; HF pass).
    training = [logs for logs in seen if "loss" in logs]
    evaluations = [logs for logs in seen if "eval_loss" in logs]
    assert training and evaluations
    assert all("runctl/uploaded" in logs for logs in training)
    assert not [key for logs in evaluations for key in logs if key.startswith("runctl/")]

    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    # save_total_limit=2 keeps the best and the newest locally.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    dirs = dir_checkpoints(s3_objects(moto_server, prefix))
    # keep_last_n=1 keeps the newest; the best is protected; checkpoint-4 is gone (or never landed).
    assert sorted(dirs) == ["checkpoint-2", "checkpoint-6"]
    for name, files in dirs.items():
        assert_dir_complete(name, files, out / name)
    assert "model.safetensors" in dirs["checkpoint-6"]
    assert callback.last_status["runctl/failures"] == 0


def test_resume_keeps_the_resumed_checkpoint(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    from runctl.integrations.huggingface import RunctlCallback

    prefix = moto_bucket.join("hf-resume/")
    out = tmp_path / "out"

    def train(max_steps: int, resume: bool) -> None:
        args = transformers.TrainingArguments(
            output_dir=str(out),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_steps=2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        callback = RunctlCallback(prefix, keep_last_n=1, config=moto_server.config())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = transformers.Trainer(
                model=tiny_gpt2(), args=args, train_dataset=RandomTokens(64), callbacks=[callback]
            )
            trainer.train(resume_from_checkpoint=True if resume else None)

    train(2, resume=False)
    assert sorted(dir_checkpoints(s3_objects(moto_server, prefix))) == ["checkpoint-2"]
    train(6, resume=True)
    dirs = dir_checkpoints(s3_objects(moto_server, prefix))
    # keep_last_n=1 keeps checkpoint-6; checkpoint-2 is what the second run resumed from.
    assert sorted(dirs) == ["checkpoint-2", "checkpoint-6"]
    for name, files in dirs.items():
        assert_dir_complete(name, files, out / name)


@pytest.mark.parametrize("restored", ["in output_dir", "elsewhere"])
def test_resuming_from_an_older_checkpoint_keeps_it(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, restored: str
) -> None:
    """Retention waits for the first step: the uploader starts before the Trainer restores its state."""
    from runctl.integrations.huggingface import RunctlCallback

    prefix = moto_bucket.join("hf-resume-older/")
    out = tmp_path / "out"

    def train(max_steps: int, keep: int, resume: str | None) -> None:
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, save_steps=2,
            report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        )
        callback = RunctlCallback(prefix, keep_last_n=keep, local_keep_last_n=keep, config=moto_server.config())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = transformers.Trainer(
                model=tiny_gpt2(), args=args, train_dataset=RandomTokens(64), callbacks=[callback]
            )
            trainer.train(resume_from_checkpoint=resume)

    train(6, keep=3, resume=None)
    assert sorted(dir_checkpoints(s3_objects(moto_server, prefix))) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # checkpoint-2 is #3 under keep-last-2, but it is what the second run resumed from: also
    # when it was restored outside output_dir (latest_checkpoint(prefix, "restore/")).
    resume_from = out / "checkpoint-2"
    if restored == "elsewhere":
        resume_from = tmp_path / "restore" / "checkpoint-2"
        shutil.copytree(out / "checkpoint-2", resume_from)
        shutil.rmtree(out / "checkpoint-2")
    train(8, keep=2, resume=str(resume_from))
    dirs = dir_checkpoints(s3_objects(moto_server, prefix))
    assert sorted(dirs) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    local = ["checkpoint-6", "checkpoint-8"] if restored == "elsewhere" else sorted(dirs)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == local
    for name, files in dirs.items():
        assert_dir_complete(name, files, resume_from if name == "checkpoint-2" else out / name)


@pytest.mark.parametrize(("limit", "warned"), [(2, True), (3, False), (None, False)])
def test_a_save_total_limit_below_keep_last_n_is_warned_about(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    limit: int | None, warned: bool,
) -> None:
    from runctl.integrations.huggingface import RunctlCallback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), save_total_limit=limit, report_to=[], use_cpu=True
    )
    callback = RunctlCallback(moto_bucket.join("hf-limit/"), keep_last_n=3, config=moto_server.config())
    with caplog.at_level(logging.WARNING, logger="runctl"):
        callback.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl())
        callback.close()
    said = [r.getMessage() for r in caplog.records if "save_total_limit" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert "save_total_limit=2 is below keep_last_n=3" in said[0]


@pytest.mark.parametrize(("limit", "warned"), [(1, True), (2, False)])
def test_a_save_total_limit_of_one_with_the_best_loaded_at_the_end_is_warned_about(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    limit: int, warned: bool,
) -> None:
    # The Trainer deletes its last checkpoint at the end of train() when it is not the best
    # (save_total_limit=1): runctl skipped it, logged at INFO only, and S3 kept an older one.
    from runctl.integrations.huggingface import RunctlCallback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), save_total_limit=limit, load_best_model_at_end=True,
        eval_strategy="steps", save_strategy="steps", report_to=[], use_cpu=True,
    )
    callback = RunctlCallback(moto_bucket.join("hf-limit-1/"), config=moto_server.config())
    with caplog.at_level(logging.WARNING, logger="runctl"):
        callback.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl())
        callback.close()
    said = [r.getMessage() for r in caplog.records if "load_best_model_at_end" in r.getMessage()]
    assert bool(said) == warned, said


def test_under_runctl_local_watching_its_output_dir_it_claims_it(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from runctl.integrations.huggingface import RunctlCallback
    from runctl.localrun import claimed_by

    out, prefix = tmp_path / "out", moto_bucket.join("local-run/")
    as_under_runctl_local(monkeypatch, out, prefix, moto_server)
    args = transformers.TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True)
    for url, claims in ((moto_bucket.join("mine/"), False), (None, True)):
        callback = RunctlCallback(url, config=moto_server.config())
        callback.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl())
        # runctl local watches `out` for `prefix`: only that one is claimed.
        assert callback.uploader is not None
        assert (claimed_by(out, [os.getpid()]) is not None) == claims, url
        callback.close()


def hf_trainer(out: Path, callback: Any, max_steps: int, scores: list[float] | None = None, **extra: Any) -> Any:
    """A tiny GPT-2 Trainer saving every 2 steps (evaluating then too, with scripted ``scores``)."""
    evaluating: dict[str, Any] = {}
    if scores is not None:
        it = iter(scores)
        evaluating = dict(
            eval_strategy="steps", eval_steps=2, metric_for_best_model="score", greater_is_better=False
        )
        extra["compute_metrics"] = lambda _: {"score": next(it)}
        extra["eval_dataset"] = RandomTokens(4, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0, **evaluating,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Trainer(
            model=tiny_gpt2(), args=args, train_dataset=RandomTokens(64), callbacks=[callback], **extra
        )


def test_the_best_checkpoint_survives_a_resume_on_a_node_without_it(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    # The Trainer forgets a best_model_checkpoint that is not on this disk ("does not exist
    # anymore"), and retention then deleted the best in S3 on the first resume on a fresh node.
    from runctl.integrations.huggingface import RunctlCallback
    from runctl.uploader import latest_checkpoint

    prefix = moto_bucket.join("hf-best-fresh/")
    out = tmp_path / "out"
    first = hf_trainer(out, RunctlCallback(prefix, keep_last_n=1, config=moto_server.config()), 6, [0.1, 0.5, 0.9])
    first.train()
    assert sorted(dir_checkpoints(s3_objects(moto_server, prefix))) == ["checkpoint-2", "checkpoint-6"]
    shutil.rmtree(out)  # a fresh node
    resume = latest_checkpoint(prefix, out, config=moto_server.config())
    assert resume is not None and resume.name == "checkpoint-6"
    second = hf_trainer(out, RunctlCallback(prefix, keep_last_n=1, config=moto_server.config()), 10, [0.9, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second.train(resume_from_checkpoint=str(resume))
    # Newer transformers forget the best's path ("does not exist anymore") and keep its step;
    # 4.47 (the lowest runctl allows) keeps a path that is not on this disk, and no step.
    assert getattr(second.state, "best_global_step", 2) == 2
    # checkpoint-2 (the best) and checkpoint-6 (resumed from) stay; checkpoint-8 goes.
    assert sorted(dir_checkpoints(s3_objects(moto_server, prefix))) == ["checkpoint-10", "checkpoint-2", "checkpoint-6"]


def test_the_best_checkpoint_survives_a_resume_into_another_output_dir(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    # The Trainer keeps best_model_checkpoint (old_dir/checkpoint-2, still there); the callback
    # protected it only when it sat in this run's output_dir, and retention deleted it in S3.
    from runctl.integrations.huggingface import RunctlCallback

    prefix = moto_bucket.join("hf-best-moved/")
    first = hf_trainer(tmp_path / "a", RunctlCallback(prefix, keep_last_n=1, config=moto_server.config()), 6, [0.1, 0.5, 0.9])
    first.train()
    second = hf_trainer(tmp_path / "b", RunctlCallback(prefix, keep_last_n=1, config=moto_server.config()), 10, [0.9, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert Path(second.state.best_model_checkpoint) == tmp_path / "a" / "checkpoint-2"
    assert sorted(dir_checkpoints(s3_objects(moto_server, prefix))) == ["checkpoint-10", "checkpoint-2", "checkpoint-6"]


class FailAt(transformers.TrainerCallback):  # type: ignore[misc]
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise RuntimeError("boom")


def test_a_second_train_after_one_that_raised_protects_what_it_resumes_from(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path
) -> None:
    # The Trainer calls no callback when train() raises: the callback's uploader went on, and
    # a second train() in the same process (a notebook) skipped protecting its resumed-from.
    from runctl.integrations.huggingface import RunctlCallback

    prefix = moto_bucket.join("hf-second-train/")
    out = tmp_path / "out"
    callback = RunctlCallback(prefix, keep_last_n=1, config=moto_server.config())
    trainer = hf_trainer(out, callback, 8)
    fail = FailAt(5)
    trainer.add_callback(fail)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    trainer.remove_callback(fail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    # keep_last_n=1 keeps checkpoint-8; checkpoint-2 is what the second train() resumed from.
    assert sorted(dir_checkpoints(s3_objects(moto_server, prefix))) == ["checkpoint-2", "checkpoint-8"]


def test_local_deletions_never_pull_a_checkpoint_from_under_the_trainers_rotation(
    moto_server: S3Server, moto_bucket: S3URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With local_keep_last_n and save_total_limit, the Trainer's rotation lists checkpoint-*
    and then reads each one's time: runctl deleting one in between failed train() with
    FileNotFoundError (HF pass; seen with the reads slowed, as on a network filesystem)."""
    import time as time_module

    from runctl.integrations.huggingface import RunctlCallback

    real = transformers.trainer_utils.os.path.getmtime

    def slow_getmtime(path: Any) -> float:
        time_module.sleep(0.05)  # a slow filesystem: the window between listing and reading
        return real(path)

    monkeypatch.setattr(transformers.trainer_utils.os.path, "getmtime", slow_getmtime)
    out = tmp_path / "out"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=12, per_device_train_batch_size=4, save_steps=1,
        save_total_limit=3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    callback = RunctlCallback(moto_bucket.join("rot/"), local_keep_last_n=1, config=moto_server.config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(
            model=tiny_gpt2(), args=args, train_dataset=RandomTokens(64), callbacks=[callback]
        )
        trainer.train()
    assert callback.last_status["runctl/failures"] == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12"]
