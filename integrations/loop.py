"""Checkpoints for plain training loops: save atomically, upload in the background, keep the last N."""

from __future__ import annotations

import logging
import operator
import os
import re
import string
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from runctl.exceptions import UsageError
from runctl.localrun import ENV_CHECKPOINT_DIR

from ._common import UploadOptions, finish_uploads, require

if TYPE_CHECKING:
    from runctl.config import S3Config
    from runctl.s3url import S3URL
    from runctl.uploader import CheckpointUploader, UploaderStatus, UploadHandle

log = logging.getLogger("runctl.integrations.loop")
T = TypeVar("T")

DEFAULT_FILENAME = "step_{step}.pt"
_TMP_DIR = ".runctl"
#: ``save()``'s temporary file: the checkpoint's name and the writing process's pid.
_TMP_NAME = re.compile(r".+\.(\d+)\.tmp")
#: About when this process began (this module is imported before any save): a temp file named
#: with this process's ID and older than that is a previous process's that had the same ID.
_PROCESS_BEGAN = time.time() - 1.0


def _check_step_comes_back(filename: str) -> None:
    """Refuse a ``filename`` whose files retention and ``latest()`` would not recognise or order.

    Once ``gpt2-{step}.pt`` was accepted: its step could not be read back (the digit before the
    dash), so keep-last-N never deleted anything and ``latest()`` found nothing to resume from.
    """
    from runctl.checkpoints import is_recognised, parse_step

    try:
        name = filename.format(step=12345)
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"filename {filename!r} cannot be formatted with step: {exc}") from None
    if "/" in name:
        raise UsageError(
            f"filename {filename!r} gives names like {name!r}, which save below local_dir and "
            "whose step runctl cannot read back: use a name like 'step_{step}.pt'"
        )
    recognised, reads_back = is_recognised(name), 12345 in parse_step(name)
    if reads_back and not recognised:
        # The step reads back: what is missing is an ending runctl takes for a checkpoint's
        # (`checkpoint_{step}.pth.tar` was told its step could not be read; loop pass).
        raise UsageError(
            f"filename {filename!r} gives names like {name!r}, which runctl does not take for a "
            "checkpoint: end it in .pt, .pth, .ckpt, .bin, .safetensors or .pkl"
        )
    if not (recognised and reads_back):
        raise UsageError(
            f"filename {filename!r} gives names like {name!r}, whose step runctl cannot read back "
            "(it orders checkpoints by it): use a name like 'step_{step}.pt' or 'model-{step}.pt'"
        )


def _step_in(filename: str, name: str) -> int | None:
    """The step ``name`` was made with by ``filename.format(step=...)``, else None: any format
    spec (``{step:06d}``) included.

    ``{step:06d}`` once matched nothing: ``latest()`` saw none of the manager's own files in S3
    and a preempted run started again from step 0 (loop pass).

    Example:
        >>> _step_in("step_{step:06d}.pt", "step_000120.pt"), _step_in("step_{step}.pt", "step_7.pth")
        (120, None)
    """
    pattern = "".join(
        re.escape(literal) + ("" if field is None else "(.+?)")
        for literal, field, _spec, _conv in string.Formatter().parse(filename)
    )
    found = re.fullmatch(pattern, name)
    if found is None:
        return None
    try:
        step = int(found.group(1).strip().replace("_", "").replace(",", ""))
        return step if step >= 0 and filename.format(step=step) == name else None
    except (ValueError, KeyError, IndexError):
        return None


def _patiently(look: Callable[[], T]) -> T:
    """``look()``, retried with backoff while S3 is out of reach (a blip at the start of a resume).

    With no local checkpoint there is nothing to fall back on, and a job restarted after a
    preemption often meets a network still coming up: giving up at once ended the run.
    """
    from runctl.exceptions import RunctlError
    from runctl.retry import RetryPolicy

    policy = RetryPolicy()
    attempt = 1
    while True:
        try:
            return look()
        except (RunctlError, OSError) as exc:
            if attempt >= policy.attempts or not policy.is_retryable(exc):
                raise
            delay = policy.delay(attempt)
            log.warning("cannot get a checkpoint to resume from out of S3 (%s): retrying in %.0f s", exc, delay)
            time.sleep(delay)
            attempt += 1


class CheckpointManager:
    """Save ``state`` every few steps, upload it to S3 in the background, keep the last N.

    Without ``s3_url`` (and no $RUNCTL_S3_URL) it only saves locally and applies
    ``local_keep_last_n`` itself. Under torchrun every rank runs the loop: call ``save()`` on
    rank 0 only, or give each rank its own ``s3_url`` (ranks uploading the same names to one
    prefix undo each other's markers); ``latest()`` works on every rank. ``local_dir`` defaults to $RUNCTL_CHECKPOINT_DIR. Under
    ``runctl local --checkpoint-dir DIR --upload-to S3URL`` with the same directory and prefix,
    it uploads them, and runctl local stands aside (each checkpoint goes up once).

    Args:
        local_dir: where checkpoints are written.
        s3_url: ``s3://bucket/prefix/`` to upload to (default $RUNCTL_S3_URL).
        keep_last_n: how many complete checkpoints to keep in S3 (default $RUNCTL_KEEP_LAST_N,
            else all).
        local_keep_last_n: how many to keep locally (only ones durable in S3 are deleted).
        filename: the file name, formatted with ``step`` (it must keep the step parseable).
        endpoint_url, profile, region, config: where and as whom to reach S3 (``endpoint_url``
            defaults to $RUNCTL_ENDPOINT_URL unless ``config`` is given).
        on_upload_error: ``"raise"`` (default) or ``"warn"`` when uploads failed at ``close``.

    Example:
        >>> with CheckpointManager("ckpt", "s3://bucket/run-1/", keep_last_n=3) as manager:  # doctest: +SKIP
        ...     start = 0
        ...     if (path := manager.latest()) is not None:
        ...         start = torch.load(path)["step"] + 1
        ...     for step in range(start, 1000):
        ...         train_one_step()
        ...         if step % 100 == 0:
        ...             manager.save({"model": model.state_dict(), "step": step}, step)
    """

    def __init__(
        self,
        local_dir: str | os.PathLike[str] | None = None,
        s3_url: str | S3URL | None = None,
        *,
        keep_last_n: int | None = None,
        local_keep_last_n: int | None = None,
        filename: str = DEFAULT_FILENAME,
        endpoint_url: str | None = None,
        profile: str | None = None,
        region: str | None = None,
        config: S3Config | None = None,
        use_s5cmd: bool = True,
        flush_timeout: float | None = 600.0,
        on_upload_error: str = "raise",
        uploader_options: Mapping[str, Any] | None = None,
    ) -> None:
        if local_dir is None:
            local_dir = os.environ.get(ENV_CHECKPOINT_DIR) or None
        if local_dir is None:
            raise UsageError(f"local_dir is required (or set ${ENV_CHECKPOINT_DIR}), got None")
        if "{step" not in filename:
            raise UsageError(
                f"filename must contain '{{step}}' so the step can be parsed back, got {filename!r}"
            )
        _check_step_comes_back(filename)
        self.options = UploadOptions.build(
            s3_url,
            keep_last_n=keep_last_n,
            local_keep_last_n=local_keep_last_n,
            endpoint_url=endpoint_url,
            profile=profile,
            region=region,
            config=config,
            use_s5cmd=use_s5cmd,
            flush_timeout=flush_timeout,
            on_upload_error=on_upload_error,
            uploader_options=uploader_options,
        )
        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        self.filename = filename
        self._uploader: CheckpointUploader | None = None
        if self.options.s3_url is not None:
            # Retention waits for latest() (or the first save): the checkpoint this run resumes
            # from is protected, and it is known only then.
            self._uploader = self.options.make_uploader(self.local_dir, hold_retention=True)
        self._closed = False

    @property
    def s3_url(self) -> S3URL | None:
        """Where checkpoints go (None: local only)."""
        return self.options.s3_url

    @property
    def uploader(self) -> CheckpointUploader | None:
        """The background uploader (None without S3)."""
        return self._uploader

    def path_for(self, step: int) -> Path:
        """The local path the checkpoint of ``step`` is written to."""
        return self.local_dir / self.filename.format(step=step)

    def save(self, state: Any, step: int, *, protect: bool = False) -> Path:
        """Write ``state`` with ``torch.save`` atomically (temp file, then rename) and hand it to the uploader.

        Args:
            state: anything ``torch.save`` accepts.
            step: the training step; orders checkpoints for retention.
            protect: keep this checkpoint whatever ``keep_last_n`` and ``local_keep_last_n``
                say, in later runs too, on any node: it is pinned in S3 and locally
                (``<prefix>.runctl/pinned/<name>``, ``local_dir/.runctl/pinned/<name>``;
                delete both to unpin, or ``manager.uploader.unprotect(name)``).

        Returns:
            The path written.
        """
        if self._closed:
            raise UsageError("save() called on a closed CheckpointManager")
        given = step
        try:
            # Any integer: numpy's and a tensor's too (np.int64(6) was refused as not whole).
            step = -1 if isinstance(step, bool) else operator.index(step)
        except TypeError:
            step = -1
        if step < 0:
            raise UsageError(f"step must be a whole number >= 0, got {given!r}")
        torch = require("torch", "lightning", install="torch")  # a plain loop needs torch alone
        path = self.path_for(step)
        tmp_dir = self.local_dir / _TMP_DIR
        tmp_dir.mkdir(parents=True, exist_ok=True)  # the directory may have been removed
        # The temp file lives under .runctl/ (never scanned as a checkpoint) on the same filesystem.
        tmp = tmp_dir / f"{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if self._uploader is not None:
            self._uploader.release_retention()
            self._submit(path, step, protect)
        else:
            if protect:  # (the uploader pins in S3 and here; without one, here)
                from runctl.pins import LocalPins

                LocalPins(self.local_dir, "").pin(path.name)
            if self.options.local_keep_last_n is not None:
                self._apply_local_retention()
        return path

    def _remove_stale_temps(self) -> None:
        """Remove what ``save()``s of killed processes left half-written (``<name>.<pid>.tmp``)."""
        from runctl.staging import process_alive

        removed = 0
        for tmp in (self.local_dir / _TMP_DIR).glob("*.tmp"):
            match = _TMP_NAME.fullmatch(tmp.name)
            if match is None:
                continue
            pid = int(match[1])
            try:
                if pid == os.getpid():
                    # Ours only if written since this process began: a container's trainer is
                    # PID 1 in every run, and a kill mid-save left its temp for good (loop pass).
                    if tmp.stat().st_mtime >= _PROCESS_BEGAN:
                        continue
                elif process_alive(pid):
                    continue
                tmp.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        removed += self._remove_stale_downloads()
        if removed:
            log.info("removed %d half-written save(s) left by a process that was killed", removed)

    def _remove_stale_downloads(self) -> int:
        """Remove the ``.runctl-tmp-*`` of a ``latest()`` download killed midway: written before
        this process began, and open for writing in no process (a checkpoint's size each, left
        for good; loop pass)."""
        import shutil

        from runctl.localrun import open_for_writing
        from runctl.transfer.ops import TMP_PREFIX

        try:
            stale = [
                e
                for e in os.scandir(self.local_dir)
                if e.name.startswith(TMP_PREFIX) and e.stat(follow_symlinks=False).st_mtime < _PROCESS_BEGAN
            ]
        except OSError:
            return 0
        writers = open_for_writing(None) if stale else None
        if writers is None:
            return 0
        removed = 0
        for entry in stale:
            path = os.path.realpath(entry.path)
            if any(w == path or w.startswith(path + os.sep) for w in writers):
                continue  # another process's download, still going
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue
            removed += 1
        return removed

    def _submit(self, path: Path, step: int, protect: bool) -> UploadHandle:
        assert self._uploader is not None
        return self._uploader.submit(path, step=step, protect=protect)

    def _apply_local_retention(self) -> None:
        from runctl.retention import apply_local_retention

        assert self.options.local_keep_last_n is not None
        # Without S3 nothing is ever durable: keep-last-N applies to the local copies as they
        # are, and pinned ones stay (local_pins).
        apply_local_retention(self.local_dir, self.options.local_keep_last_n, force=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint to resume from, local or in S3; downloaded if need be.

        A local one is used as it is unless S3 holds a newer one (a higher step: another machine
        went on, or this directory is stale); that one is downloaded. A local file its own
        format shows cut short is passed by, with a warning. When S3 cannot be asked, the local
        one is used, with a warning. Returns None when there is none anywhere. The one returned
        is protected from retention for the rest of the run; a local one no run handed to an
        uploader (killed between its save and the hand-over) is uploaded.

        Example:
            >>> path = manager.latest()  # doctest: +SKIP
            >>> state = torch.load(path) if path is not None else None  # doctest: +SKIP
        """
        path = self._find_latest()
        if self._uploader is not None:
            if path is not None:
                self._uploader.set_resumed_from(path.name)
                self._send_if_never_handed_over(path)
            self._uploader.release_retention()
        return path

    def _send_if_never_handed_over(self, path: Path) -> None:
        """Upload the local checkpoint resumed from if no run ever handed it to an uploader.

        A run killed between ``save()``'s rename and its ``submit()`` left a whole checkpoint
        the journal has no line about: resumed from, it was never uploaded, and local retention
        kept it for good as not durable in S3. (One restored from S3 is in the journal.)
        """
        from runctl.checkpoints import parse_step
        from runctl.journal import Journal

        assert self._uploader is not None
        if path.parent != self.local_dir or path.name in Journal(self.local_dir).replay():
            return
        log.info("%s was saved by a run stopped before it could hand it over: uploading it", path.name)
        self._submit(path, parse_step(path.name)[0] or 0, protect=False)

    def _find_latest(self) -> Path | None:
        from runctl.checkpoints import scan_local

        # This manager's own files only: another's in the same directory (an EMA's beside the
        # model's) was taken where there was none of its own, and uploaded to its prefix.
        mine = [
            c
            for c in scan_local(self.local_dir)
            if c.complete and not c.is_dir and self._matches_filename(c.name)
        ]
        newest = self._newest_whole(mine)
        if self.options.s3_url is None:
            return None if newest is None else self.local_dir / newest.name
        from runctl.exceptions import RunctlError
        from runctl.uploader import latest_checkpoint, record_restored

        passed_by: set[str] = set()  # S3's newest, downloaded and found cut short

        def from_s3(newer_than: str | None) -> Path | None:
            assert self.options.s3_url is not None
            path = latest_checkpoint(
                self.options.s3_url,
                self.local_dir,
                config=self.options.resolved_config(),
                use_s5cmd=self.options.use_s5cmd,
                newer_than=newer_than,
                keep_newer_local=True,
                same_step=False,  # this manager's own file: it resumes from that
                names=lambda name: self._matches_filename(name) and name not in passed_by,
            )
            if path is None or path.name in passed_by:
                return None
            torn = _cut_short(path)
            if torn is None:
                return path
            # A torn object in S3 (one a hand upload sent half written) was resumed from on
            # every try, over a whole older one in S3 or on disk (resume pass).
            log.warning("passing by %s from S3 to resume from: %s", path.name, torn)
            passed_by.add(path.name)
            return from_s3(newer_than)

        if newest is None:
            path = _patiently(lambda: from_s3(newer_than=None))
        else:
            try:
                path = from_s3(newer_than=newest.name)
            except (RunctlError, OSError) as exc:  # the lookup or the download
                log.warning(
                    "cannot look in S3 for a newer checkpoint (%s): resuming from %s", exc, newest.name
                )
                return self.local_dir / newest.name
            if path is None:
                return self.local_dir / newest.name
            log.info("S3 held %s, newer than the local %s: downloaded it", path.name, newest.name)
        if path is not None:
            record_restored(path, self.options.s3_url.join(path.name))
        return path

    def _newest_whole(self, candidates: list[Any]) -> Any:
        """The newest of the local checkpoints whose own format does not say it was cut short.

        A ``torch.save`` cut off mid-write (a disk filled, a copy in from elsewhere stopped) was
        returned as the newest, and the resume failed in ``torch.load`` while S3 held a whole one.
        """
        for ckpt in sorted(candidates, key=lambda c: c.order_key(), reverse=True):
            path = self.local_dir / ckpt.name
            try:
                st = path.stat()
            except OSError:
                continue
            torn = _cut_short(path, st)
            if torn is None:
                return ckpt
            log.warning("passing by %s to resume from: %s", ckpt.name, torn)
        return None

    def _matches_filename(self, name: str) -> bool:
        return _step_in(self.filename, name) is not None

    def status(self) -> UploaderStatus | None:
        """The uploader's counters (None without S3)."""
        return self._uploader.status() if self._uploader is not None else None

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every saved checkpoint is in S3 (raises UploadError / FlushTimeout)."""
        if self._uploader is not None:
            self._uploader.flush(timeout=self.options.flush_timeout if timeout is None else timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded) and stop the uploader; failures raise or warn per ``on_upload_error``."""
        if self._closed:
            return
        self._closed = True
        if self._uploader is not None:
            self._uploader.release_retention()
            finish_uploads(
                self._uploader,
                timeout=self.options.flush_timeout if timeout is None else timeout,
                on_upload_error=self.options.on_upload_error,
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._closed or self._uploader is None:
            self._closed = True
            return
        self._closed = True
        self._uploader.release_retention()
        # While another error propagates, an upload problem is reported, never allowed to mask it.
        finish_uploads(
            self._uploader,
            timeout=self.options.flush_timeout,
            on_upload_error=self.options.on_upload_error,
            allow_raise=exc_type is None,
        )


def _cut_short(path: Path, st: os.stat_result | None = None) -> str | None:
    """Why the checkpoint file ``path`` cannot be resumed from (its format says cut short, it
    is empty, it is not a regular file), or None.

    An empty file (a save that never wrote) or a FIFO under a checkpoint's name was taken, the
    resume failed, and the upload on resume put it in S3 as the newest.
    """
    import stat

    from runctl.checkpoints import format_check

    st = st or path.stat()
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return "it is empty"
    return format_check(path)[1]
