"""Hugging Face: ``RunctlCallback``, a TrainerCallback that uploads each ``checkpoint-N/`` to S3."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runctl.exceptions import RunctlError

from ._common import UploadOptions, finish_uploads, require, uploader_metrics

if TYPE_CHECKING:
    from runctl.config import S3Config
    from runctl.s3url import S3URL
    from runctl.uploader import CheckpointUploader

_transformers = require("transformers", "huggingface")
TrainerCallback = _transformers.TrainerCallback

log = logging.getLogger("runctl.integrations.huggingface")

CHECKPOINT_PREFIX = "checkpoint"

__all__ = ["RunctlCallback"]


class RunctlCallback(TrainerCallback):  # type: ignore[misc, valid-type]
    """Upload every ``output_dir/checkpoint-N/`` the Trainer saves to S3, as one directory checkpoint.

    A directory lands in S3 file by file, then its marker; readers treat it as complete only
    once the marker is there, so a directory the Trainer rotates away (``save_total_limit``)
    mid-upload never appears complete and torn. Only the main process
    (``state.is_world_process_zero``) uploads. The Trainer's best checkpoint
    (``state.best_model_checkpoint``) is protected from ``keep_last_n``, also after a resume on
    a node without its directory (where the Trainer keeps only ``state.best_global_step``), and
    so is the checkpoint training resumed from, also in a second ``train()`` after one that raised.

    Args:
        s3_url: ``s3://bucket/prefix/`` to upload to (default $RUNCTL_S3_URL).
        keep_last_n: complete checkpoints to keep in S3 (default $RUNCTL_KEEP_LAST_N, else all).
        local_keep_last_n: checkpoints to keep locally, deleting only ones durable in S3
            (``save_total_limit`` works as well; runctl deletes nothing locally while the
            Trainer saves and rotates its checkpoints).
        endpoint_url, profile, region, config: where and as whom to reach S3 (``endpoint_url``
            defaults to $RUNCTL_ENDPOINT_URL unless ``config`` is given).
        use_s5cmd: upload with s5cmd (default) or boto3.
        wait_for_uploads: flush at the end of training (default True).
        flush_timeout: seconds the final flush may take.
        on_upload_error: ``"raise"`` (default) or ``"warn"`` when uploads failed at the end.

    Example:
        >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
        >>> args = TrainingArguments("out", save_steps=100, save_total_limit=2)  # doctest: +SKIP
        >>> cb = RunctlCallback("s3://bucket/run-1/", keep_last_n=3)  # doctest: +SKIP
        >>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()  # doctest: +SKIP
    """

    def __init__(
        self,
        s3_url: str | S3URL | None = None,
        *,
        keep_last_n: int | None = None,
        local_keep_last_n: int | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        region: str | None = None,
        config: S3Config | None = None,
        use_s5cmd: bool = True,
        wait_for_uploads: bool = True,
        flush_timeout: float | None = 600.0,
        on_upload_error: str = "raise",
        uploader_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.options = UploadOptions.build(
            s3_url,
            keep_last_n=keep_last_n,
            local_keep_last_n=local_keep_last_n,
            endpoint_url=endpoint_url,
            profile=profile,
            region=region,
            config=config,
            use_s5cmd=use_s5cmd,
            wait_for_uploads=wait_for_uploads,
            flush_timeout=flush_timeout,
            on_upload_error=on_upload_error,
            uploader_options=uploader_options,
        )
        if self.options.s3_url is None:
            raise RunctlError("RunctlCallback needs s3_url (or $RUNCTL_S3_URL), got None")
        self._uploader: CheckpointUploader | None = None
        self._output_dir: Path | None = None
        self._resume_checked = False
        self.last_status: dict[str, float] = {}

    @property
    def uploader(self) -> CheckpointUploader | None:
        """The running uploader (main process, during training), else None."""
        return self._uploader

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the uploader on the main process, rooted at ``args.output_dir``."""
        if not state.is_world_process_zero:
            return
        if self._uploader is not None:
            # An earlier train() raised (the Trainer calls no callback then): its uploader goes
            # on, and this run's resumed-from checkpoint is protected again before retention.
            if self._output_dir is not None and Path(args.output_dir).resolve() == self._output_dir.resolve():
                self._uploader.hold_retention()
                self._uploader.set_resumed_from(None)
                self._resume_checked = False
                return
            self.close()  # another output_dir: the earlier run's uploads are finished first
        self._output_dir = Path(args.output_dir)
        limit, keep = getattr(args, "save_total_limit", None), self.options.keep_last_n
        if limit and keep and limit < keep:
            log.warning(
                "runctl: save_total_limit=%d is below keep_last_n=%d: the Trainer deletes older "
                "checkpoint directories, and one deleted before its upload starts never reaches "
                "S3, which may then hold fewer than the newest %d",
                limit,
                keep,
                keep,
            )
        if limit == 1 and getattr(args, "load_best_model_at_end", False):
            log.warning(
                "runctl: with save_total_limit=1 and load_best_model_at_end the Trainer deletes its "
                "last checkpoint at the end of training when it is not the best: it reaches S3 only "
                "if its upload began before, and a resume elsewhere starts from an earlier one "
                "(save_total_limit=2 keeps it)"
            )
        # The Trainer restores the checkpoint it resumes from after on_train_begin: retention
        # waits until the first step has protected it.
        self._uploader = self.options.make_uploader(self._output_dir, hold_retention=True)
        self._resume_checked = False
        log.info("uploading checkpoints from %s to %s", self._output_dir, self.options.s3_url)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Protect the checkpoint training resumed from (the state is restored after on_train_begin)."""
        self._protect_resumed(state)
        self._saved()

    # The Trainer saves (and rotates save_total_limit's checkpoint-* by their times) after these
    # hooks, then calls on_save: runctl's local deletions wait meanwhile, or one between its
    # listing and its reading of a time failed the save with FileNotFoundError (HF pass).

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Hold local deletions while the Trainer saves (``control.should_save``)."""
        if control.should_save:
            self._saving()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Hold local deletions while the Trainer saves (``control.should_save``)."""
        if control.should_save:
            self._saving()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Hold local deletions: a save may follow (``save_strategy="best"``)."""
        self._saving()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """End the hold of a save that did not come."""
        self._saved()

    def _saving(self) -> None:
        if self._uploader is not None and self.options.local_keep_last_n is not None:
            self._uploader.pause_local_deletions()

    def _saved(self) -> None:
        if self._uploader is not None:
            self._uploader.resume_local_deletions()

    def _protect_resumed(self, state: Any) -> None:
        """Once: protect ``checkpoint-<step>/`` when training resumed from it, then let retention run."""
        if self._resume_checked or self._uploader is None or self._output_dir is None:
            return
        self._resume_checked = True
        if state.global_step > 0:
            # Also when it was restored outside output_dir (latest_checkpoint(..., "restore/")):
            # its name in S3 is the same.
            self._uploader.set_resumed_from(f"{CHECKPOINT_PREFIX}-{state.global_step}")
        self._protect_best(state)
        self._uploader.release_retention()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Hand ``checkpoint-<global_step>/`` to the uploader as one directory checkpoint."""
        if self._uploader is None or not state.is_world_process_zero:
            return
        assert self._output_dir is not None
        self._protect_best(state)
        folder = self._output_dir / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        if not folder.is_dir():
            log.warning("runctl: %s was not found after on_save; nothing uploaded", folder)
            return
        try:
            self._uploader.submit(folder, step=int(state.global_step))
        except RunctlError as exc:
            log.warning("runctl: could not queue %s for upload: %s", folder, exc)
            if self.options.on_upload_error == "raise":
                raise
        finally:
            self._saved()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Add ``runctl/...`` upload metrics to the training logs (seen by reporters listed after
        this callback); never to an evaluation's.

        An evaluation's logs are its metrics themselves, which ``hyperparameter_search``'s
        default objective sums once ``eval_loss`` is left out: every trial scored runctl's
        counters, 0.0 (HF pass). The logs of a training step are the ones with ``loss``.
        """
        if self._uploader is not None and logs is not None and "loss" in logs:
            self.last_status = uploader_metrics(self._uploader)
            logs.update(self.last_status)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flush pending uploads (bounded) and stop the uploader; failures raise or warn."""
        if self._uploader is None or not self.options.wait_for_uploads:
            return
        self._protect_best(state)
        self._protect_resumed(state)  # a run with no step left to train still applies retention
        self._saved()
        uploader, self._uploader = self._uploader, None
        try:
            finish_uploads(
                uploader,
                timeout=self.options.flush_timeout,
                on_upload_error=self.options.on_upload_error,
            )
        finally:
            self.last_status = uploader_metrics(uploader)
            log.info("runctl upload stats: %s", self.last_status)

    def close(self, timeout: float | None = None) -> None:
        """Flush and stop the uploader when ``wait_for_uploads=False`` left it running."""
        uploader, self._uploader = self._uploader, None
        if uploader is not None:
            finish_uploads(
                uploader,
                timeout=self.options.flush_timeout if timeout is None else timeout,
                on_upload_error=self.options.on_upload_error,
            )

    def _protect_best(self, state: Any) -> None:
        if self._uploader is None or self._output_dir is None:
            return
        best = getattr(state, "best_model_checkpoint", None)
        if best:
            # Also when it is in another output_dir (this run resumed from there): S3 holds it
            # under the same name.
            self._uploader.set_best(os.path.basename(os.path.normpath(best)))
            return
        step = getattr(state, "best_global_step", None)
        if step:
            # Resumed on a node without the best checkpoint's directory, the Trainer forgets its
            # path ("does not exist anymore") but keeps its step: S3 may well hold it.
            self._uploader.set_best(f"{CHECKPOINT_PREFIX}-{step}")
