"""What the framework integrations share: options, building the uploader, ending it, its metrics."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from runctl.exceptions import RunctlError, UsageError
from runctl.localrun import (  # read when an argument is omitted (``runctl local`` sets them)
    ENV_CHECKPOINT_DIR,
    ENV_ENDPOINT_URL,
    ENV_KEEP_LAST_N,
    ENV_LOCAL_KEEP_LAST_N,
    ENV_S3_URL,
    ENV_WATCHED,
    claim_directory,
)
from runctl.s3url import S3URL

if TYPE_CHECKING:
    from runctl.config import S3Config
    from runctl.uploader import CheckpointUploader

log = logging.getLogger("runctl.integrations")

ON_UPLOAD_ERROR = ("raise", "warn")
METRIC_PREFIX = "runctl/"
#: Seconds close() may still wait once a flush already failed or timed out.
CLOSE_AFTER_ERROR = 1.0


class UploadWarning(UserWarning):
    """Uploads failed or were still pending at the end, and the integration was told to warn."""


def require(module: str, extra: str, *, install: str | None = None) -> ModuleType:
    """Import ``module`` or raise ImportError that names the extra (or ``install`` spec) to install.

    Example:
        >>> require("json", "demo").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and module != missing and not module.startswith(missing + "."):
            # Installed, but something it imports is not (lightning before 2.4 and setuptools'
            # pkg_resources): "pip install runctl[lightning]" would not help.
            raise
        raise ImportError(
            f"{module} is not installed; install it with: pip install '{install or f'runctl[{extra}]'}'"
        ) from exc


@dataclass(frozen=True)
class UploadOptions:
    """Where and how an integration uploads; validated once, in the integration's constructor.

    Example:
        >>> opts = UploadOptions.build("s3://bucket/run-1", keep_last_n=3)
        >>> str(opts.s3_url), opts.keep_last_n
        ('s3://bucket/run-1/', 3)
    """

    s3_url: S3URL | None
    keep_last_n: int | None = None
    local_keep_last_n: int | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    config: S3Config | None = None
    use_s5cmd: bool = True
    wait_for_uploads: bool = True
    flush_timeout: float | None = 600.0
    on_upload_error: str = "raise"
    uploader_options: Mapping[str, Any] = field(default_factory=dict)
    #: (directory, prefix) that an enclosing ``runctl local`` watches, when it does.
    local_run: tuple[str, S3URL] | None = None

    @classmethod
    def build(
        cls,
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
        env: Mapping[str, str] | None = None,
    ) -> UploadOptions:
        """Validate every argument (naming the one that is wrong).

        Omitted, ``s3_url``, ``keep_last_n``, ``local_keep_last_n`` and ``endpoint_url`` fall
        back to $RUNCTL_S3_URL, $RUNCTL_KEEP_LAST_N, $RUNCTL_LOCAL_KEEP_LAST_N and
        $RUNCTL_ENDPOINT_URL: what ``runctl local`` gives its script.
        With $RUNCTL_LOCAL_WATCHING=1 it also remembers the directory and prefix that
        ``runctl local`` uploads itself (see ``make_uploader``).
        """
        env = os.environ if env is None else env
        local_run = None
        if env.get(ENV_WATCHED) == "1" and env.get(ENV_CHECKPOINT_DIR) and env.get(ENV_S3_URL):
            local_run = (env[ENV_CHECKPOINT_DIR], S3URL.parse(env[ENV_S3_URL]).as_prefix())
        if s3_url is None and env.get(ENV_S3_URL):
            s3_url = env[ENV_S3_URL]
        if keep_last_n is None:
            keep_last_n = _env_count(env, ENV_KEEP_LAST_N)
        if local_keep_last_n is None:
            local_keep_last_n = _env_count(env, ENV_LOCAL_KEEP_LAST_N)
        if endpoint_url is None and config is None and env.get(ENV_ENDPOINT_URL):
            endpoint_url = env[ENV_ENDPOINT_URL]
        url = None
        if s3_url is not None:
            url = (s3_url if isinstance(s3_url, S3URL) else S3URL.parse(str(s3_url))).as_prefix()
        for name, value in (("keep_last_n", keep_last_n), ("local_keep_last_n", local_keep_last_n)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise UsageError(f"{name} must be a whole number >= 1 or None, got {value!r}")
        if on_upload_error not in ON_UPLOAD_ERROR:
            raise UsageError(f"on_upload_error must be 'raise' or 'warn', got {on_upload_error!r}")
        if flush_timeout is not None and flush_timeout <= 0:
            raise UsageError(f"flush_timeout must be > 0 seconds or None, got {flush_timeout!r}")
        return cls(
            s3_url=url,
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
            uploader_options=dict(uploader_options or {}),
            local_run=local_run,
        )

    def resolved_config(self) -> S3Config:
        """The S3Config these options name (the explicit one wins)."""
        if self.config is not None:
            return self.config
        from runctl.config import resolve_config

        return resolve_config(self.endpoint_url, self.profile, self.region)

    def watched_by_local_run(self, local_root: str | os.PathLike[str]) -> bool:
        """True when an enclosing ``runctl local`` watches ``local_root`` for ``s3_url`` too.

        Example:
            >>> env = {"RUNCTL_LOCAL_WATCHING": "1", "RUNCTL_CHECKPOINT_DIR": "/ck",
            ...        "RUNCTL_S3_URL": "s3://bucket/run/"}
            >>> UploadOptions.build(env=env).watched_by_local_run("/ck")
            True
            >>> UploadOptions.build("s3://bucket/other/", env=env).watched_by_local_run("/ck")
            False
        """
        if self.local_run is None or self.s3_url is None:
            return False
        watched, prefix = self.local_run
        return prefix == self.s3_url and os.path.realpath(watched) == os.path.realpath(local_root)

    def make_uploader(
        self, local_root: str | os.PathLike[str], *, hold_retention: bool = False
    ) -> CheckpointUploader:
        """A CheckpointUploader for ``local_root`` with these options (``s3_url`` must be set).

        When ``runctl local`` runs this script and watches ``local_root`` for ``s3_url``
        ($RUNCTL_LOCAL_WATCHING=1), this claims the directory: runctl local then stands aside,
        and each checkpoint goes up once, by this uploader, which knows which ones to protect.

        ``hold_retention``: no retention until ``release_retention()``, for a framework that
        learns the checkpoint it resumed from only after this starts.
        """
        from runctl.uploader import CheckpointUploader

        if self.s3_url is None:
            raise UsageError("s3_url is required to upload (or set $RUNCTL_S3_URL), got None")
        root = Path(local_root)
        root.mkdir(parents=True, exist_ok=True)
        if self.watched_by_local_run(root):
            claim_directory(root)
            log.info("runctl local watches %s too: this script uploads it, runctl local stands aside", root)
        extra = dict(self.uploader_options)
        extra.setdefault("failure_policy", "warn")
        return CheckpointUploader(
            root,
            self.s3_url,
            keep_last_n=self.keep_last_n,
            local_keep_last_n=self.local_keep_last_n,
            config=self.resolved_config(),
            use_s5cmd=self.use_s5cmd,
            hold_retention=hold_retention,
            **extra,
        )


def _env_count(env: Mapping[str, str], name: str) -> int | None:
    """A whole number >= 1 from ``env[name]`` (None when unset or empty)."""
    text = (env.get(name) or "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UsageError(f"${name} must be a whole number >= 1, got {text!r}")
    return int(text)


@contextlib.contextmanager
def ctrl_c_stops_waiting(interrupted: bool) -> Iterator[None]:
    """After a Ctrl-C the framework caught (``interrupted``), let the next one through while
    uploads are waited for: ``KeyboardInterrupt`` then ends the wait (``finish_uploads``).

    Lightning ignores SIGINT once it has caught a KeyboardInterrupt, before its ``on_exception``
    hooks run: a flush of slow uploads there could not be cut short (Lightning pass: 50 s, two
    more Ctrl-C ignored, nothing said). A SIGINT ignored for any other reason stays ignored.

    Example:
        >>> with ctrl_c_stops_waiting(interrupted=False):
        ...     pass
    """
    if (
        not interrupted
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    ):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_after_interrupt(uploader: CheckpointUploader) -> None:
    """Ctrl-C while waiting for uploads means stop waiting: close now, and say that what is
    pending stays in the journal for the next run (not wait again for 30 s in the exit hook).

    Said so because all a Ctrl-C there left was "flush timed out after 1 s", a time nobody
    set, and not a word that the checkpoints were still safe (Lightning pass).
    """
    with contextlib.suppress(RunctlError):
        uploader.close(timeout=CLOSE_AFTER_ERROR, quiet=True)
    left = uploader.status().pending
    if left:
        log.warning(
            "runctl: interrupted while waiting for uploads: %d checkpoint(s) not yet in S3 stay "
            "queued in the journal in %s, and the next run with this directory uploads them: %s",
            len(left), uploader.root, ", ".join(left),
        )


def finish_uploads(
    uploader: CheckpointUploader,
    *,
    timeout: float | None,
    on_upload_error: str,
    close: bool = True,
    allow_raise: bool = True,
) -> BaseException | None:
    """Flush (bounded by ``timeout``) and close ``uploader``; raise or warn about what failed.

    Returns the error it warned about (None when all went well). With ``allow_raise=False``
    (used while another exception is already propagating) it always warns instead of raising,
    and stops waiting once nothing has reached S3 for ``FAILING_TIMEOUT`` s: the training error
    is not held up by an unreachable or hung S3 (what is pending stays journaled).
    """
    from runctl.uploader import FAILING_TIMEOUT

    error: BaseException | None = None
    try:
        uploader.flush(timeout=timeout, failing_timeout=None if allow_raise else FAILING_TIMEOUT)
    except RunctlError as exc:
        error = exc
    except KeyboardInterrupt:
        if close:
            stop_after_interrupt(uploader)
        raise
    if close:
        try:
            # After a failed or timed-out flush, close must not wait a second full timeout:
            # what is still pending stays in the journal for the next run.
            uploader.close(timeout=CLOSE_AFTER_ERROR if error is not None else timeout)
        except RunctlError as exc:
            error = error or exc
    if error is None:
        return None
    if on_upload_error == "raise" and allow_raise:
        raise error
    message = f"runctl: {error}"
    log.warning(message)
    warnings.warn(message, UploadWarning, stacklevel=3)
    return error


def uploader_metrics(uploader: CheckpointUploader) -> dict[str, float]:
    """The uploader's status as ``runctl/...`` metrics for a training logger (``runctl/uploaded``, ...)."""
    values = uploader.status().to_dict()
    return {f"{METRIC_PREFIX}{key}": float(value) for key, value in values.items()}
