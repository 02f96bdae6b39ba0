"""Lightning: ``RunctlCheckpoint``, a ModelCheckpoint that also uploads each checkpoint to S3.

Two classes come from one implementation, one per Lightning namespace (a callback of one
namespace is accepted by the other's Trainer, but not as its checkpoint callback: Lightning
then adds a ``ModelCheckpoint`` of its own, and "best" and "last" are that one's):

- ``RunctlCheckpoint`` subclasses ``lightning.pytorch.callbacks.ModelCheckpoint``;
- ``RunctlCheckpointPL`` subclasses ``pytorch_lightning.callbacks.ModelCheckpoint``.

Each is built on first access, so only the namespace you use has to be installed.

Resuming from S3: ``trainer.fit(model, ckpt_path=callback.resolve_ckpt_path("s3://b/run/last.ckpt"))``
downloads the object with runctl into the callback's ``dirpath`` and returns the local path;
a prefix (``"s3://b/run/"``, or ``"latest"`` for the callback's own ``s3_url``) downloads the newest
complete checkpoint there (None when there is none, so training starts fresh). Passing an
``s3://`` path straight to ``trainer.fit`` goes through fsspec/s3fs instead, which runctl does not
manage (and it is slower).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runctl.exceptions import NoSuchKeyError, RunctlError, UsageError
from runctl.localrun import ENV_CHECKPOINT_DIR
from runctl.s3url import S3URL

from ._common import (
    UploadOptions,
    ctrl_c_stops_waiting,
    finish_uploads,
    require,
    stop_after_interrupt,
    uploader_metrics,
)

if TYPE_CHECKING:
    from runctl.config import S3Config
    from runctl.uploader import CheckpointUploader

log = logging.getLogger("runctl.integrations.lightning")

#: Public class name -> (Lightning namespace, what to pip install when it is missing).
_CLASSES = {
    "RunctlCheckpoint": ("lightning.pytorch", "runctl[lightning]"),
    "RunctlCheckpointPL": ("pytorch_lightning", "pytorch-lightning"),
}

__all__ = ["RunctlCheckpoint", "RunctlCheckpointPL", "resolve_ckpt_path"]  # noqa: F822  (built lazily)


def resolve_ckpt_path(
    ckpt_path: str | os.PathLike[str] | None,
    dest_dir: str | os.PathLike[str],
    *,
    config: S3Config | None = None,
    endpoint_url: str | None = None,
    profile: str | None = None,
    region: str | None = None,
    use_s5cmd: bool = True,
) -> str | None:
    """Turn an ``s3://`` checkpoint into a local file downloaded by runctl; other paths pass through.

    An object URL downloads that object to ``dest_dir/<name>``; a prefix URL (ending in ``/``)
    downloads the newest complete checkpoint under it, or returns None when there is none. The
    prefix is asked for about 15 s before a refused connection ends it (a job restarted after a
    preemption may start before S3 answers). A local file of that name which is not S3's copy
    (a ``last.ckpt`` saved while S3 was out of reach) is never replaced: it stays, with a
    warning, and S3's copy goes to ``dest_dir/.runctl/restored/`` (``restore_path``).

    Raises:
        NoSuchKeyError: the object URL names nothing.

    Example:
        >>> path = resolve_ckpt_path("s3://bucket/run-1/last.ckpt", "checkpoints/")  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path=path)  # doctest: +SKIP
    """
    if ckpt_path is None or not str(ckpt_path).startswith("s3://"):
        return None if ckpt_path is None else str(ckpt_path)
    from runctl.config import resolve_config

    url = S3URL.parse(str(ckpt_path))
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = config or resolve_config(endpoint_url, profile, region)
    if url.is_prefix:
        from runctl.uploader import latest_checkpoint

        from .loop import _patiently

        found = _patiently(
            lambda: latest_checkpoint(
                url, dest, config=cfg, use_s5cmd=use_s5cmd, keep_newer_local=True, same_step=False
            )  # Lightning resumes from one file
        )
        log.info(
            "resuming from %s", found if found is not None else "scratch (no complete checkpoint)"
        )
        return None if found is None else str(found)
    from runctl.transfer import get_transfer
    from runctl.transfer.ops import download
    from runctl.uploader import restore_path

    transfer = get_transfer(cfg, use_s5cmd=use_s5cmd)
    try:
        obj = transfer.stat(url)
        if obj is None:
            raise NoSuchKeyError(f"checkpoint {url} does not exist", code="NoSuchKey", url=str(url))
        target = restore_path(dest, obj)  # never over a newer local file of that name
        target.parent.mkdir(parents=True, exist_ok=True)
        download(transfer, url, target)
    finally:
        transfer.close()
    return str(target)


def _async_executor(trainer: Any) -> Executor | None:
    """The single-thread executor of an ``AsyncCheckpointIO`` in the strategy's IO chain, if any."""
    io = getattr(trainer.strategy, "checkpoint_io", None)
    seen = 0
    while io is not None and seen < 8:
        executor = getattr(io, "_executor", None)
        if isinstance(executor, Executor):
            return executor
        io = (
            getattr(io, "checkpoint_io", None)
            if hasattr(io, "_base_checkpoint_io_configured")
            else None
        )
        seen += 1
    return None


def _hold_the_process_observer(uploader: CheckpointUploader, timeout: float | None) -> None:
    """Under ``strategy="ddp"`` launched from a script, have Lightning's watch over the other
    ranks wait for this process's uploads before it kills this process.

    Rank zero runs a thread (``child-process-observer``) that SIGKILLs every rank, itself
    included, within 5 s of another rank exiting with an error: a run that failed on any rank,
    or was stopped with Ctrl-C, lost rank zero's pending uploads mid-flush (DDP pass; the
    journal kept them for a restart on the same disk, a fresh node had nothing). The thread's
    ``_terminate_all`` is wrapped: the other ranks are killed first, as Lightning does, then
    this process waits until its uploads are done (``flush_timeout``, or 30 s with nothing
    reaching S3; a second Ctrl-C ends the wait, which closes the uploader), then Lightning's
    own kill runs. Nothing is changed where the thread is not there (``ddp_spawn``, torchrun,
    SLURM) or has no such method (another Lightning version).
    """
    for thread in threading.enumerate():
        terminate = getattr(thread, "_terminate_all", None)
        if thread.name != "child-process-observer" or not callable(terminate):
            continue
        waits = getattr(thread, "_runctl_waits_for", None)
        if waits is None:
            waits = thread._runctl_waits_for = []  # type: ignore[attr-defined]
            thread._terminate_all = functools.partial(_wait_then_terminate, thread, terminate)  # type: ignore[attr-defined]
        # Every callback's: with two, the one set up last alone was waited for (DDP pass).
        waits.append((uploader, timeout))


#: Seconds the end-of-fit flush waits before it says that it waits: most uploads land within
#: them, and a line after every fit would be noise; past them silence read as a hang (18 s
#: with nothing said after "`Trainer.fit` stopped", Lightning pass).
_QUIET_FLUSH = 2.0
#: Set while ``on_exception`` waits for uploads on the main thread (it has said so).
_WAITING_AT_EXCEPTION = threading.Event()
#: How long the observer lets the main thread end the process itself once a second Ctrl-C
#: closed the uploaders: it says what stays pending, and Lightning exits 1.
_MAIN_THREAD_GRACE = 5.0


def _wait_then_terminate(thread: Any, terminate: Callable[[], None]) -> None:
    """The observer's ``_terminate_all``: kill the other ranks, wait for this process's
    uploads, then Lightning's kill (``_hold_the_process_observer``)."""
    from runctl.uploader import FAILING_TIMEOUT

    for proc in getattr(thread, "_child_processes", ()):
        with contextlib.suppress(Exception):
            proc.kill()
    with contextlib.suppress(Exception):  # Lightning's kill must run whatever happens
        waits = [(u, t) for u, t in thread._runctl_waits_for if u.status().pending]
        if waits:
            if not _WAITING_AT_EXCEPTION.is_set():  # the main thread has not said it waits
                timeouts = [t for _, t in waits]
                log.warning(
                    "runctl: another rank ended the run; waiting for %d checkpoint upload(s) "
                    "before Lightning stops this process (%s)",
                    sum(len(u.status().pending) for u, _ in waits),
                    "no time limit" if None in timeouts else f"up to {max(timeouts):.0f} s",  # type: ignore[type-var]
                )
            for uploader, timeout in waits:  # they upload side by side; waited for in turn
                uploader.wait_idle(timeout, failing_timeout=FAILING_TIMEOUT)
            if any(u.status().pending for u, _ in waits):
                # A second Ctrl-C closed them (or the time ran out): the main thread says what
                # stays in the journal and ends the process, as Lightning does (exit 1).
                time.sleep(_MAIN_THREAD_GRACE)
            else:
                log.warning("runctl: the checkpoint upload(s) landed; Lightning stops this process now")
    terminate()


def _say_if_the_flush_waits(uploader: CheckpointUploader, timeout: float | None) -> float | None:
    """Wait up to ``_QUIET_FLUSH`` s in silence; if uploads are still pending, say that fit
    waits for them. Returns what is left of ``timeout`` for the flush."""
    started = time.monotonic()
    if uploader.wait_idle(_QUIET_FLUSH if timeout is None else min(_QUIET_FLUSH, timeout)):
        return timeout
    if timeout is not None:
        timeout = max(0.1, timeout - (time.monotonic() - started))
    log.warning(
        "runctl: waiting for %d checkpoint upload(s) to land before fit returns (%s); Ctrl-C "
        "stops waiting, and the next run with this dirpath uploads them",
        len(uploader.status().pending),
        "no time limit" if timeout is None else f"up to {timeout:.0f} s",
    )
    return timeout


def _check_flat_filename(template: str | None, auto_insert_metric_name: bool) -> None:
    """Refuse a ``filename`` that saves below ``dirpath``: the uploader takes only its direct children.

    Once such a name crashed training at its first save.

    Example:
        >>> _check_flat_filename("{epoch}-{val/loss:.2f}", auto_insert_metric_name=False)
    """
    if not template:
        return
    if "/" in re.sub(r"\{[^{}]*\}", "", template):
        raise UsageError(
            f"filename={template!r} saves into subdirectories of dirpath; RunctlCheckpoint uploads "
            "the checkpoints saved directly in dirpath: use '-' or '_' where the '/' is"
        )
    slashed = [g for g in re.findall(r"\{([^{}:]*)", template) if "/" in g]
    if slashed and auto_insert_metric_name:
        name = slashed[0]
        raise UsageError(
            f"filename={template!r}: Lightning would write '{name}=' into the file name, and its "
            "'/' makes a subdirectory of dirpath, which RunctlCheckpoint does not upload. Pass "
            f"auto_insert_metric_name=False and name it yourself, e.g. "
            f"'epoch={{epoch}}-step={{step}}-{name.replace('/', '_')}={{{name}:.2f}}'"
        )


def _same_directory(a: str, b: str) -> bool:
    """True when two paths name one directory; equal strings (Lightning's case) need no lookup."""
    return a == b or os.path.realpath(a) == os.path.realpath(b)


class _RunctlCheckpointMixin:
    """The whole implementation; combined with each namespace's ModelCheckpoint below."""

    def __init__(
        self,
        *args: Any,
        s3_url: str | S3URL | None = None,
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
        log_stats: bool = True,
        uploader_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not args and kwargs.get("dirpath") is None and os.environ.get(ENV_CHECKPOINT_DIR):
            # Under `runctl local --checkpoint-dir DIR`, save where it watches (and so claim it).
            kwargs["dirpath"] = os.environ[ENV_CHECKPOINT_DIR]
        super().__init__(*args, **kwargs)
        self.runctl_options = UploadOptions.build(
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
        if self.s3_url is not None:
            _check_flat_filename(getattr(self, "filename", None), self.auto_insert_metric_name)  # type: ignore[attr-defined]
            self._check_names_order()
        self.log_stats = log_stats
        self._uploader: CheckpointUploader | None = None
        self._best_told: str | None = None  # the best_model_path last given to the uploader
        self._resumed_from: str | None = None
        self._restored_runctl: dict[str, Any] | None = None
        #: The uploader's ``runctl/...`` counters when fit ended (rank zero).
        self.final_stats: dict[str, float] = {}

    def _check_names_order(self) -> None:
        """Refuse (with retention) or warn about a ``filename`` whose names runctl cannot order.

        ``filename="{val_loss:.4f}"`` or ``"best"`` uploaded, but neither keep-last-N nor
        ``resolve_ckpt_path("latest")`` saw a checkpoint in them (no step or epoch to order by):
        S3 kept everything, and a resume started from scratch.
        """
        from runctl.checkpoints import is_recognised, parse_step

        torch = require("torch", "lightning")
        template = getattr(self, "filename", None)
        sample = os.path.basename(
            self.format_checkpoint_name({"epoch": torch.tensor(3), "step": torch.tensor(12345)})  # type: ignore[attr-defined]
        )
        step, epoch = parse_step(sample)
        if is_recognised(sample) and (step in (12345, 3) or epoch == 3):  # a step, or the epoch
            within_epoch = getattr(self, "_every_n_train_steps", 0) or getattr(
                self, "_train_time_interval", None
            )
            if step is None and within_epoch:
                # Saves of one epoch then share its number: runctl takes them for files of one
                # checkpoint, and keep-last-N kept old epochs and parts of newer ones.
                log.warning(
                    "runctl: filename=%r names several saves per epoch (every_n_train_steps or "
                    "train_time_interval) by the epoch alone: runctl takes those of one epoch "
                    "for one checkpoint, and keep-last-N counts epochs, not saves; put the step "
                    "in it, e.g. '{epoch}-{step}'",
                    template,
                )
            return
        why = (
            f"filename={template!r} gives names like {sample!r}, in which runctl finds no step or "
            "epoch to order checkpoints by"
        )
        fix = (
            "runctl reads a step from step=N, step_N, step-N or a name ending in one number, "
            "an epoch from epoch=E: e.g. '{epoch}-{step}-{val_loss:.2f}', or 'step_{step}' "
            "with auto_insert_metric_name=False"
        )
        options = self.runctl_options
        if options.keep_last_n is not None or options.local_keep_last_n is not None:
            raise UsageError(f"{why}: keep-last-N could never delete one; {fix}")
        log.warning("runctl: %s: they are uploaded, but resolve_ckpt_path('latest') and "
                    "runctl's retention do not see them; %s", why, fix)

    # -- public ---------------------------------------------------------------------------

    @property
    def s3_url(self) -> S3URL | None:
        """Where checkpoints are uploaded (``None``: this callback behaves like ModelCheckpoint)."""
        return self.runctl_options.s3_url

    @property
    def uploader(self) -> CheckpointUploader | None:
        """The running uploader (global rank zero, during fit), else None."""
        return self._uploader

    def resolve_ckpt_path(self, ckpt_path: str | os.PathLike[str] | None = "latest") -> str | None:
        """Download an ``s3://`` checkpoint (or ``"latest"`` under ``s3_url``) into ``dirpath``.

        Call it on every rank before ``trainer.fit`` (each rank needs the file), and pass the
        result as ``ckpt_path``. Local paths and None pass through. With ``"latest"``, the
        newest complete checkpoint in S3 (every rank gets the same one), S3 asked for about
        15 s before giving up.

        Example:
            >>> cb = RunctlCheckpoint(dirpath="ckpt", s3_url="s3://b/run/")  # doctest: +SKIP
            >>> trainer.fit(model, ckpt_path=cb.resolve_ckpt_path("latest"))  # doctest: +SKIP
        """
        if ckpt_path == "latest":
            if self.s3_url is None:
                raise UsageError(
                    "resolve_ckpt_path('latest') needs s3_url on the callback, got None"
                )
            ckpt_path = str(self.s3_url)
        if ckpt_path is None or not str(ckpt_path).startswith("s3://"):
            return None if ckpt_path is None else str(ckpt_path)
        dirpath = getattr(self, "dirpath", None)
        if dirpath is None:
            raise UsageError(
                "resolve_ckpt_path needs an explicit dirpath on the callback, got dirpath=None"
            )
        opts = self.runctl_options
        path = resolve_ckpt_path(
            ckpt_path, dirpath, config=opts.resolved_config(), use_s5cmd=opts.use_s5cmd
        )
        if path is not None:
            from runctl.uploader import record_restored

            url = S3URL.parse(str(ckpt_path))
            record_restored(path, url.join(Path(path).name) if url.is_prefix else url)
        return path

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every handed-over checkpoint is in S3 (raises UploadError / FlushTimeout)."""
        if self._uploader is not None:
            self._uploader.flush(
                timeout=self.runctl_options.flush_timeout if timeout is None else timeout
            )

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded) and stop the uploader; failures raise or warn per ``on_upload_error``."""
        uploader, self._uploader = self._uploader, None
        if uploader is not None:
            finish_uploads(
                uploader,
                timeout=self.runctl_options.flush_timeout if timeout is None else timeout,
                on_upload_error=self.runctl_options.on_upload_error,
            )

    # -- Lightning hooks ---------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Resolve ``dirpath`` as ModelCheckpoint does, then start the uploader on global rank zero."""
        super().setup(trainer, pl_module, stage)  # type: ignore[misc]
        if stage != "fit":
            self._fetch_the_best_if_loaded(trainer)
        if (
            stage != "fit"
            or self.s3_url is None
            or not trainer.is_global_zero
            or self._uploader is not None
        ):
            return
        dirpath = str(getattr(self, "dirpath", "") or "")
        if "://" in dirpath:
            raise UsageError(
                f"RunctlCheckpoint needs a local dirpath to upload from, got dirpath={dirpath!r}"
            )
        self._check_no_sibling_shares(trainer, dirpath)
        # Lightning restores the checkpoint it resumes from after setup: retention waits for
        # on_train_start, which protects it first.
        self._uploader = self.runctl_options.make_uploader(dirpath, hold_retention=True)
        self._best_told = None
        _hold_the_process_observer(self._uploader, self.runctl_options.flush_timeout)
        log.info("uploading checkpoints from %s to %s", dirpath, self.s3_url)

    def _fetch_the_best_if_loaded(self, trainer: Any) -> None:
        """Download the best checkpoint from S3 where this machine lacks it, when
        ``validate``/``test``/``predict(ckpt_path="best")`` loads it.

        Resumed on a fresh machine, Lightning restores ``best_model_path`` from the checkpoint,
        but the file is in S3 only (retention keeps it there): ``test(ckpt_path="best")`` raised
        FileNotFoundError (Lightning pass). The path to load is chosen before this hook and
        known to the trainer only once it loads it (``resume_start``), so the download waits
        for that call and is made for the best alone: a ``validate`` of the weights in memory
        downloaded it too, on every rank (diff review).
        """
        best = str(getattr(self, "best_model_path", "") or "")
        dirpath = str(getattr(self, "dirpath", "") or "")
        if not best or self.s3_url is None or not dirpath or os.path.exists(best):
            return
        if not _same_directory(os.path.dirname(best), dirpath):
            return
        connector = getattr(trainer, "_checkpoint_connector", None)
        start = getattr(connector, "resume_start", None)
        if connector is None or start is None or "resume_start" in vars(connector):
            return  # not a Lightning this knows, or a wrapper in place already

        def resume_start(checkpoint_path: Any = None, *args: Any, **kwargs: Any) -> Any:
            vars(connector).pop("resume_start", None)  # this load only
            if checkpoint_path is not None and str(checkpoint_path) == best and not os.path.exists(best):
                self._fetch(best, dirpath)
            return start(checkpoint_path, *args, **kwargs)

        connector.resume_start = resume_start

    def _fetch(self, best: str, dirpath: str) -> None:
        url = S3URL.parse(str(self.s3_url)).as_prefix().join(os.path.basename(best))
        opts = self.runctl_options
        try:
            found = resolve_ckpt_path(str(url), dirpath, config=opts.resolved_config(), use_s5cmd=opts.use_s5cmd)
        except RunctlError as exc:
            log.warning("runctl: the best checkpoint %s is not on this machine, and fetching it from %s failed: %s", best, url, exc)
            return
        if found == best:
            log.info("runctl: the best checkpoint %s was not on this machine: downloaded it from %s", best, url)

    def _check_no_sibling_shares(self, trainer: Any, dirpath: str) -> None:
        """Refuse two callbacks whose retention would delete each other's checkpoints.

        Each protects only its own best; keep-last-N counts every checkpoint under its prefix
        (and, locally, in its directory). A "best by metric" callback beside a periodic one on
        the same prefix lost its best to the other's retention.
        """
        for other in getattr(trainer, "callbacks", ()):
            if other is self or not isinstance(other, _RunctlCheckpointMixin):
                continue
            retention = (self.runctl_options.keep_last_n, other.runctl_options.keep_last_n)
            same_prefix = other.s3_url is not None and str(other.s3_url) == str(self.s3_url)
            if same_prefix and any(n is not None for n in retention):
                raise UsageError(
                    f"two RunctlCheckpoint callbacks upload to {self.s3_url}: the retention of "
                    "each would delete the other's checkpoints, its best too. Give each its own "
                    f"s3_url (e.g. {self.s3_url}best/ and {self.s3_url}periodic/)"
                )
            other_dir = str(getattr(other, "dirpath", "") or "")
            local_n = (self.runctl_options.local_keep_last_n, other.runctl_options.local_keep_last_n)
            if other_dir and any(n is not None for n in local_n) and _same_directory(dirpath, other_dir):
                raise UsageError(
                    f"two RunctlCheckpoint callbacks save to {dirpath} and one keeps the last "
                    "local_keep_last_n there: it would delete the other's files. Give each its "
                    "own dirpath"
                )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Protect the checkpoint this run resumed from (it is known only after restore), then let retention run."""
        super().on_train_start(trainer, pl_module)  # type: ignore[misc]
        if trainer.ckpt_path and self._uploader is not None:
            resumed = Path(str(trainer.ckpt_path))
            if resumed.is_symlink():
                # save_last="link": fit(ckpt_path="last") resumes through the last.ckpt link.
                # Taken by its own name, the link was uploaded as S3's last.ckpt, frozen at the
                # resumed step for the rest of the run, while the checkpoint really resumed
                # from went unprotected (Lightning pass: "latest" on a fresh machine then
                # picked that stale last.ckpt over a newer step).
                resumed = Path(os.path.realpath(resumed))
            self._resumed_from = resumed.name
            self._uploader.set_resumed_from(self._resumed_from)
            self._upload_if_never_handed_over(resumed, trainer)
        self._update_best()
        self._keep_the_best_lightning_forgot()
        if self._uploader is not None:
            self._uploader.release_retention()

    def _upload_if_never_handed_over(self, resumed: Path, trainer: Any) -> None:
        # A run killed between torch.save and the hand-over leaves a local checkpoint that no
        # journal entry knows; resuming from it must not leave it out of S3 for good.
        uploader = self._uploader
        dirpath = str(getattr(self, "dirpath", "") or "")
        if uploader is None or not dirpath or not resumed.is_file():
            return
        if os.path.realpath(resumed.parent) != os.path.realpath(dirpath):
            return
        if resumed.name in uploader.journal.replay():
            return
        log.info("runctl: %s was never handed over before the restart: uploading it now", resumed.name)
        self._hand_over(str(resumed), int(trainer.global_step))

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        """Write the checkpoint as ModelCheckpoint does, then hand it to the uploader (rank zero)."""
        super()._save_checkpoint(trainer, filepath)  # type: ignore[misc]
        if self._uploader is None or not trainer.is_global_zero:
            return
        self._update_best()
        step = int(trainer.global_step)
        executor = _async_executor(trainer)
        if executor is None:
            self._hand_over(filepath, step)
        else:
            # AsyncCheckpointIO writes on one FIFO worker thread: a job queued now runs right
            # after this checkpoint's write has finished, never before.
            executor.submit(self._hand_over, filepath, step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Save as ModelCheckpoint does, then log the uploader's stats."""
        super().on_train_epoch_end(trainer, pl_module)  # type: ignore[misc]
        self._log_stats(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Flush pending uploads (bounded by ``flush_timeout``) and log the final stats."""
        super().on_fit_end(trainer, pl_module)  # type: ignore[misc]
        if self._uploader is None or not self.runctl_options.wait_for_uploads:
            return
        self._update_best()
        uploader, self._uploader = self._uploader, None
        try:
            finish_uploads(
                uploader,
                timeout=_say_if_the_flush_waits(uploader, self.runctl_options.flush_timeout),
                on_upload_error=self.runctl_options.on_upload_error,
            )
        except KeyboardInterrupt:
            if not uploader.closed:  # a Ctrl-C in the quiet wait, before finish_uploads began
                stop_after_interrupt(uploader)
            raise
        finally:
            self.final_stats = uploader_metrics(uploader)
            self._log_stats(trainer, uploader, save=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Save as ModelCheckpoint does, then flush what is pending; upload failures only warn here."""
        super().on_exception(trainer, pl_module, exception)  # type: ignore[misc]
        if self._uploader is None:
            return
        timeout = self.runctl_options.flush_timeout
        started = time.monotonic()
        executor = _async_executor(trainer)
        if executor is not None:
            # The writes still queued hand their checkpoints over as they finish: wait for
            # them with the uploader still in place (once, it was let go first and they were
            # dropped without a word).
            try:
                executor.submit(lambda: None).result(timeout=timeout)
            except Exception as exc:  # a wait that failed must not hide the training error
                log.warning("runctl: asynchronous checkpoint writes did not finish: %s", exc)
        uploader, self._uploader = self._uploader, None
        if uploader is None:
            return
        if timeout is not None:  # one flush_timeout in all, the writes' wait included
            timeout = max(1.0, timeout - (time.monotonic() - started))
        interrupted = isinstance(exception, KeyboardInterrupt)
        pending = uploader.status().pending
        if pending:
            # A silent wait after Ctrl-C reads as a hang (Lightning pass).
            log.warning(
                "runctl: waiting for %d checkpoint upload(s) to land before the run ends (%s)%s",
                len(pending),
                "no time limit" if timeout is None else f"up to {timeout:.0f} s",
                "; Ctrl-C again stops waiting, and the next run with this dirpath uploads them"
                if interrupted
                else "",
            )
        try:
            _WAITING_AT_EXCEPTION.set()
            with ctrl_c_stops_waiting(interrupted):
                # The training error is the one to see: an upload problem is reported, never
                # raised over it.
                finish_uploads(uploader, timeout=timeout, on_upload_error="warn", allow_raise=False)
        except KeyboardInterrupt:
            log.warning(
                "runctl: stopped waiting for uploads: what is pending stays in the journal, and "
                "the next run with this dirpath uploads it"
            )
        finally:
            _WAITING_AT_EXCEPTION.clear()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Close the uploader if on_fit_end did not (e.g. ``wait_for_uploads=False`` keeps it open)."""
        super().teardown(trainer, pl_module, stage)  # type: ignore[misc]
        if self._uploader is not None and self.runctl_options.wait_for_uploads:
            self.close()

    def state_dict(self) -> dict[str, Any]:
        """ModelCheckpoint's state plus runctl's (plain values)."""
        state = dict(super().state_dict())  # type: ignore[misc]
        opts = self.runctl_options
        best = getattr(self, "best_model_path", "") or ""
        state["runctl"] = {
            "s3_url": str(opts.s3_url) if opts.s3_url is not None else None,
            "keep_last_n": opts.keep_last_n,
            "local_keep_last_n": opts.local_keep_last_n,
            "best": Path(best).name if best else None,
            "resumed_from": self._resumed_from,
        }
        return state

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Take over the state a plain ``ModelCheckpoint`` with the same arguments saved.

        Lightning keys a callback's state by its class name: a run begun with
        ``ModelCheckpoint`` and resumed with this callback would otherwise start over (its best
        score forgotten, ``last-v1.ckpt`` beside ``last.ckpt``). Lightning still warns that the
        ModelCheckpoint is missing; its state is here.
        """
        super().on_load_checkpoint(trainer, pl_module, checkpoint)  # type: ignore[misc]
        states = checkpoint.get("callbacks")
        key = self.state_key  # type: ignore[attr-defined]
        if not isinstance(states, dict) or key in states:
            return
        plain = "ModelCheckpoint" + key[len(type(self).__qualname__) :]
        if plain in states and plain not in {cb.state_key for cb in trainer.callbacks}:
            states[key] = states[plain]
            log.info("runctl: resuming the state of %s saved by ModelCheckpoint", plain)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ModelCheckpoint's state; note runctl's so retention continues under the same prefix."""
        state = dict(state_dict)
        runctl_state = state.pop("runctl", None)
        super().load_state_dict(state)  # type: ignore[misc]
        if not isinstance(runctl_state, dict):
            return
        self._restored_runctl = runctl_state
        before, now = runctl_state.get("s3_url"), self.s3_url
        if before and now is not None and before != str(now):
            log.warning(
                "runctl: this run uploads to %s but the checkpoint it resumed from was uploaded to %s; "
                "retention only ever touches %s",
                now,
                before,
                now,
            )
        if self._uploader is not None:
            self._update_best()

    # -- internals --------------------------------------------------------------------------

    def _hand_over(self, filepath: str, step: int) -> None:
        uploader = self._uploader
        if uploader is None:
            return
        try:
            uploader.submit(filepath, step=step)
        except (FileNotFoundError, RunctlError) as exc:
            if not os.path.exists(filepath):
                # Lightning removed it (top-k) before an asynchronous write finished or was
                # handed over (submit() stats it; no need to look twice on every save).
                log.info("runctl: %s was removed before upload; skipped as superseded", filepath)
                return
            log.warning("runctl: could not queue %s for upload: %s", filepath, exc)
            if self.runctl_options.on_upload_error == "raise":
                raise

    def _update_best(self) -> None:
        if self._uploader is None:
            return
        best = getattr(self, "best_model_path", "") or ""
        if best == self._best_told:  # called on every save: no system call when nothing changed
            return
        dirpath = getattr(self, "dirpath", None)
        if best and dirpath and _same_directory(os.path.dirname(best), str(dirpath)):
            self._uploader.set_best(os.path.basename(best))
            self._best_told = best

    def _keep_the_best_lightning_forgot(self) -> None:
        """Resumed into another dirpath, Lightning forgets the best score and takes the next
        save for the best: the resumed run's best, still in S3 under this prefix, would then go
        to retention (once, it did). It stays pinned for this run."""
        restored = self._restored_runctl or {}
        best = restored.get("best")
        if not isinstance(best, str) or not best or self._uploader is None:
            return
        if self.s3_url is None or restored.get("s3_url") != str(self.s3_url):
            return
        now = getattr(self, "best_model_path", "") or ""
        dirpath = str(getattr(self, "dirpath", "") or "")
        if now and dirpath and _same_directory(os.path.dirname(now), dirpath):
            return  # restored in full: Lightning still knows (and compares against) its best
        log.info("runctl: keeping %s, the best of the run resumed from, in S3 for this run", best)
        self._uploader.protect(best, persist=False)

    def _log_stats(
        self, trainer: Any, uploader: CheckpointUploader | None = None, save: bool = False
    ) -> None:
        uploader = uploader or self._uploader
        if not self.log_stats or uploader is None or not trainer.is_global_zero:
            return
        metrics = uploader_metrics(uploader)
        for logger in getattr(trainer, "loggers", ()):
            try:
                logger.log_metrics(metrics, step=int(trainer.global_step))
                if save:
                    logger.save()
            except Exception as exc:  # a logger problem must never break training
                log.debug("runctl: logger %s refused metrics: %s", type(logger).__name__, exc)


_DOC = """A ``ModelCheckpoint`` that also uploads every checkpoint it saves to S3 in the background.

Every ``ModelCheckpoint`` argument works as before, except that ``dirpath`` defaults to
$RUNCTL_CHECKPOINT_DIR when that is set (``runctl local --checkpoint-dir``); runctl adds
(keyword-only):

Args:
    s3_url: ``s3://bucket/prefix/`` to upload to (default $RUNCTL_S3_URL; None: no uploads).
    keep_last_n: complete checkpoints to keep in S3 (default $RUNCTL_KEEP_LAST_N, else all; the
        best one, ``last.ckpt`` and the one this run resumed from are always kept).
    local_keep_last_n: checkpoints to keep locally, deleting only ones durable in S3 (default:
        Lightning's own top-k decides).
    endpoint_url, profile, region, config: where and as whom to reach S3 (``endpoint_url``
        defaults to $RUNCTL_ENDPOINT_URL unless ``config`` is given).
    use_s5cmd: upload with s5cmd (default) or boto3.
    wait_for_uploads: flush at the end of fit (default); False leaves uploads running in the
        background (call ``close()`` later; at interpreter exit runctl still flushes them, bounded).
    flush_timeout: seconds the final flush may take.
    on_upload_error: ``"raise"`` (default) or ``"warn"`` when uploads failed at the end of fit.
    log_stats: log ``runctl/...`` upload metrics to the trainer's loggers.

Only global rank zero uploads and applies retention; other ranks never touch S3. With
``AsyncCheckpointIO`` a checkpoint is handed over once its write has finished. With
``save_last="link"`` the ``last.ckpt`` symlink is not uploaded (the checkpoint it points to is).

Example:
    >>> from runctl.integrations.lightning import RunctlCheckpoint  # doctest: +SKIP
    >>> ckpt = RunctlCheckpoint(dirpath="ckpt/", every_n_train_steps=100, save_top_k=-1,
    ...                         s3_url="s3://bucket/run-1/", keep_last_n=3)  # doctest: +SKIP
    >>> Trainer(callbacks=[ckpt]).fit(model)  # doctest: +SKIP
"""


def _build(name: str) -> type:
    namespace, install = _CLASSES[name]
    require(namespace, "lightning", install=install)
    base = require(f"{namespace}.callbacks", "lightning", install=install).ModelCheckpoint
    cls = type(
        name,
        (_RunctlCheckpointMixin, base),
        {"__module__": __name__, "__qualname__": name, "__doc__": _DOC},
    )
    return cls


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        cls = _build(name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
