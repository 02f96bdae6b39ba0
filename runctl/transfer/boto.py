"""The boto3 transfer backend: s3transfer for files, paginated listings, batched deletes."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from runctl.config import S3Config, scrub
from runctl.exceptions import (
    AccessDeniedError,
    EndpointError,
    MissingCredentialsError,
    NoSuchBucketError,
    NoSuchKeyError,
    PartialTransferError,
    StreamClosedError,
    TransferError,
)
from runctl.s3url import S3URL
from runctl.transfer.base import (
    DEFAULT_PART_SIZE,
    DELETE_BATCH,
    BucketInfo,
    DeleteResult,
    ObjectInfo,
    PrefixInfo,
    ProgressCallback,
    Transfer,
    failure_summary,
    part_size_for,
    xml_safe,
)
from runctl.transfer.threads import DaemonPool

log = logging.getLogger("runctl.transfer.boto")

T = TypeVar("T")

#: Seconds the clean-up of an interrupted upload's multipart uploads may take before it is
#: given up on (a Ctrl-C against an endpoint that stopped answering).
ABORT_WAIT = 15.0

#: Requests in flight for a batch (one shared s3transfer manager; the client pool holds 32).
BATCH_CONCURRENCY = 32
#: Read size when streaming a small object to disk.
IO_CHUNK = 256 * 1024
#: Longest file name most filesystems take (a temp name is cut to fit, as s3transfer does).
_MAX_NAME = 255
#: Listing page size (the S3 maximum).
PAGE_SIZE = 1000

_NO_SUCH_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "403",
        "Forbidden",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "AccountProblem",
    }
)


_DEFAULT_MESSAGES = {
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "no such object",
    "404": "no such object",
    "AccessDenied": "access denied",
    "403": "access denied",
}


def _utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _unquote_etag(etag: str | None) -> str | None:
    if not etag:
        return None
    return etag.strip('"')


def _find_cause(exc: BaseException) -> BaseException:
    """The botocore error under s3transfer's wrappers (S3UploadFailedError chains the ClientError)."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (ClientError, BotoCoreError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return exc


class FileShrankError(Exception):
    """A file got shorter while it was read for an upload (not an OSError: botocore does not
    retry it; the uploader's next attempt stages the file as it is then)."""


@functools.lru_cache(maxsize=1)
def _whole_reads() -> Any:
    """s3transfer's file access, but a read that ends before the size it set out with fails.

    A file truncated while it went up sent fewer bytes than its request's Content-Length: the
    server waited for the rest until the read timeout, once per retry (362 s for a 300 MB
    checkpoint, and 53 s for Ctrl-C to take effect; s5cmd fails it in a second).
    """
    from s3transfer.utils import OSUtils, ReadFileChunk

    class WholeChunk(ReadFileChunk):  # type: ignore[misc]
        def read(self, amount: int | None = None) -> bytes:
            data = super().read(amount)
            if not data and amount != 0 and self._amount_read < self._size:
                raise FileShrankError(
                    f"the file got shorter while it was uploading ({self._amount_read} of "
                    f"{self._size} bytes read): upload it again once it is written"
                )
            return data

    class WholeReads(OSUtils):  # type: ignore[misc]
        def open_file_chunk_reader_from_fileobj(  # noqa: ANN001, ANN201
            self, fileobj, chunk_size, full_file_size, callbacks, close_callbacks=None
        ):
            return WholeChunk(
                fileobj,
                chunk_size,
                full_file_size,
                callbacks=callbacks,
                enable_callbacks=False,
                close_callbacks=close_callbacks,
            )

    return WholeReads()


def map_error(
    exc: BaseException, url: S3URL | str | None = None, action: str = ""
) -> TransferError:
    """Turn a botocore/s3transfer/OS error into the matching typed ``TransferError``.

    Example:
        >>> err = map_error(OSError("disk full"), "s3://b/k", "upload")
        >>> type(err).__name__, "disk full" in str(err)
        ('TransferError', True)
    """
    from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, TransferError):
        return exc
    cause = _find_cause(exc)
    where = f" {url}" if url is not None else ""
    prefix = f"{action}{where} failed" if action else f"S3 request for{where} failed"
    prefix = prefix.strip()
    url_text = str(url) if url is not None else None
    if isinstance(cause, ClientError):
        error = cause.response.get("Error", {}) or {}
        code = str(
            error.get("Code")
            or cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
        message = scrub(str(error.get("Message") or ""))
        if not message or message == "Unknown":
            message = _DEFAULT_MESSAGES.get(code, scrub(str(cause)))
        text = f"{prefix}: {message}"
        if code == "NoSuchBucket":
            return NoSuchBucketError(text, code=code, url=url_text)
        if code in _NO_SUCH_KEY_CODES:
            text = f"{prefix}: no such object" if code in ("404", "NotFound") else text
            return NoSuchKeyError(
                text, code="NoSuchKey" if code == "NotFound" else code, url=url_text
            )
        if code in _ACCESS_CODES:
            return AccessDeniedError(text, code=code, url=url_text)
        return TransferError(text, code=code or None, url=url_text)
    if isinstance(cause, NoCredentialsError):
        return MissingCredentialsError(
            f"{prefix}: no AWS credentials found", code="NoCredentials", url=url_text
        )
    # Refused, unresolvable, timed out connecting (EndpointConnectionError, ConnectTimeoutError)
    # are not HTTPClientErrors: a connection reset or read timeout is.
    if isinstance(cause, (HTTPClientError, BotoConnectionError)):
        return EndpointError(
            f"{prefix}: {scrub(str(cause))}", code=_connection_code(cause), url=url_text
        )
    if isinstance(cause, FileNotFoundError):
        return TransferError(
            f"{prefix}: local file not found: {scrub(str(cause))}",
            code="LocalFileNotFound",
            url=url_text,
        )
    if isinstance(cause, PermissionError):  # this machine's, not S3's (AccessDenied above)
        return TransferError(f"{prefix}: {scrub(str(cause))}", code="LocalAccessDenied", url=url_text)
    return TransferError(f"{prefix}: {scrub(str(cause))}", url=url_text)


def _connection_code(cause: BaseException) -> str:
    """``CertificateError`` for a certificate this machine does not trust (or a CA file it
    cannot read), which no retry fixes; else ``EndpointConnectionError``.

    Example:
        >>> from botocore.exceptions import SSLError
        >>> _connection_code(SSLError(endpoint_url="https://s3", error="[SSL: CERTIFICATE_VERIFY_FAILED] ..."))
        'CertificateError'
    """
    from botocore.exceptions import SSLError

    text = str(cause).lower()
    if isinstance(cause, SSLError) and (
        "certificate verify failed" in text or "certificate_verify_failed" in text or "errno 2]" in text
    ):
        return "CertificateError"
    return "EndpointConnectionError"


def raise_batch(errors: dict[str, TransferError], total: int, action: str) -> None:
    """Raise for a batch: the typed error itself if all ``total`` items failed alike, else PartialTransferError."""
    if not errors:
        return
    if len(errors) == total:
        kinds = {(type(e), e.code) for e in errors.values()}
        if len(kinds) == 1:
            first = next(iter(errors.values()))
            kind, code = next(iter(kinds))
            if kind is not TransferError and total > 1:
                raise kind(
                    f"{action} failed for all {total} items: {first.message}",
                    code=code,
                    url=first.url,
                    failures={name: str(err) for name, err in errors.items()},
                )
            if kind is not TransferError:
                raise first
    failures = {name: str(err) for name, err in errors.items()}
    codes = {e.code for e in errors.values()}
    raise PartialTransferError(
        f"{action}: {len(failures)} of {total} failed: {failure_summary(failures)}",
        failures,
        code=codes.pop() if len(codes) == 1 else None,
    )


class _Progress:
    """Thread-safe wrapper: s3transfer calls back from many worker threads."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._lock = threading.Lock()

    def __call__(self, moved: int) -> None:
        if self._callback is None or moved <= 0:
            return
        with self._lock:
            self._callback(moved)


def _on_progress(callback: _Progress) -> Any:
    """An s3transfer subscriber that hands each progress step to ``callback``."""
    from s3transfer.subscribers import BaseSubscriber

    class OnProgress(BaseSubscriber):  # type: ignore[misc]
        def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
            callback(bytes_transferred)

    return OnProgress()


def _known_size(size: int) -> Any:
    """An s3transfer subscriber that hands over a size already known, so no HEAD is sent."""
    from s3transfer.subscribers import BaseSubscriber

    class KnownSize(BaseSubscriber):  # type: ignore[misc]
        def on_queued(self, future: Any, **kwargs: Any) -> None:
            future.meta.provide_transfer_size(size)

    return KnownSize()


def _on_done(pending: _Pending) -> Any:
    """An s3transfer subscriber that tells ``pending`` its transfer ended, however it ended."""
    from s3transfer.subscribers import BaseSubscriber

    class OnDone(BaseSubscriber):  # type: ignore[misc]
        def on_done(self, future: Any, **kwargs: Any) -> None:
            pending.finished()

    return OnDone()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


#: How long an interrupted batch of downloads waits for its threads to remove their files.
STOP_WAIT = 2.0


class _Stopped(Exception):
    """The batch was interrupted: this download stops where it is."""


class _Batch:
    """One s3transfer manager for a whole batch, its request threads daemons.

    On success it shuts down as s3transfer's own ``with`` would. On an error or Ctrl-C, or
    once ``abandon()``-ed (the transfer closed under it), it cancels every transfer and lets go
    of its threads without waiting: s3transfer would wait for each request under way, which
    against an endpoint that stopped answering is a read timeout on each of botocore's
    attempts (minutes), and its pools' threads would hold up the process's exit as long.
    """

    def __init__(self, client: Any, part_size: int) -> None:
        from s3transfer.manager import TransferConfig, TransferManager

        config = TransferConfig(
            multipart_threshold=DEFAULT_PART_SIZE,
            multipart_chunksize=part_size,
            max_request_concurrency=BATCH_CONCURRENCY,
        )
        self._pools: list[DaemonPool] = []
        self._pending: list[_Pending] = []
        self._abandoned = False
        self._manager = TransferManager(client, config, osutil=_whole_reads(), executor_cls=self._pool)

    def _pool(self, max_workers: int | None = None) -> DaemonPool:
        pool = DaemonPool(max_workers, name="runctl-s3transfer")
        self._pools.append(pool)
        return pool

    def upload(self, source: Any, url: S3URL, extra: dict[str, str] | None, subscribers: Any) -> _Pending:
        """s3transfer's ``upload`` of a path or a file object to ``url``."""
        pending = _Pending()
        subscribers = [*(subscribers or ()), _on_done(pending)]
        return self._add(pending, self._submit(lambda: self._manager.upload(source, url.bucket, url.key, extra, subscribers)))

    def download(self, url: S3URL, path: str, subscribers: Any) -> _Pending:
        """s3transfer's ``download`` of ``url`` to ``path``."""
        pending = _Pending()
        subscribers = [*(subscribers or ()), _on_done(pending)]
        return self._add(pending, self._submit(lambda: self._manager.download(url.bucket, url.key, path, None, subscribers)))

    def _submit(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except RuntimeError:  # a pool let go of by close() while this was being handed over
            if self._abandoned:
                raise TransferError("the transfer was closed while a request was under way") from None
            raise

    def _add(self, pending: _Pending, future: Any) -> _Pending:
        pending.future = future
        self._pending.append(pending)
        if self._abandoned:  # closed while this one was being submitted
            pending.abandon()
        return pending

    def __enter__(self) -> _Batch:
        return self

    @property
    def abandoned(self) -> bool:
        """Whether ``abandon()`` was called (``close()`` of the transfer, under the batch)."""
        return self._abandoned

    def abandon(self) -> None:
        """Cancel every transfer of the batch; a thread in a request ends when the request does."""
        self._abandoned = True
        for pending in list(self._pending):
            pending.abandon()
        for pool in list(self._pools):
            pool.shutdown(wait=False)

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None and not self._abandoned:
            self._manager.shutdown()
        else:
            self.abandon()


class _Pending:
    """One transfer of a ``_Batch``: its ``result()`` returns when it ends or is abandoned.

    s3transfer's own future, once cancelled, still waits for its request under way.
    """

    future: Any = None

    def __init__(self) -> None:
        self._ended = False
        self._woken = threading.Event()

    def finished(self) -> None:
        """s3transfer is done with it (its ``on_done``)."""
        self._ended = True
        self._woken.set()

    def abandon(self) -> None:
        """Cancel it; ``result()`` no longer waits for a request under way."""
        if self.future is not None:
            self.future.cancel()
        self._woken.set()

    def result(self) -> Any:
        """The transfer's result, or its error; ``TransferError`` if it was abandoned midway."""
        self._woken.wait()
        if not self._ended:
            raise TransferError("the transfer was closed while a request was under way")
        return self.future.result()


def abort_multipart(client: Callable[[], Any], urls: Iterable[S3URL]) -> None:
    """Abort every unfinished multipart upload of exactly these keys (after an interrupted upload).

    S3 keeps (and bills) the parts of an upload nobody completes. Every unfinished upload of
    exactly these keys goes: this one's, or an older orphan's. (Not by start time: some S3
    servers report a fixed one.) A server that cannot list multipart uploads (rclone answers
    NoSuchUpload) has none to abort. ``client`` is called only if there is a key to look at.
    Given up on (with a warning) after ``ABORT_WAIT`` seconds: an interrupted upload to an endpoint
    that stopped answering would otherwise wait out a read timeout on each of botocore's
    attempts, per key (6 minutes each), after Ctrl-C.

    Example:
        >>> abort_multipart(lambda: client, [S3URL.parse("s3://b/run/step_1.pt")])  # doctest: +SKIP
    """
    urls = list(urls)
    if not urls:
        return
    pool = DaemonPool(1, name="runctl-abort")
    try:
        pool.submit(_abort_each, client, urls).result(ABORT_WAIT)
    except FutureTimeout:
        log.warning(
            "could not look for unfinished multipart uploads of %s: S3 did not answer within "
            "%g s; if one was begun, S3 keeps its parts until a lifecycle rule (runctl s3 "
            "lifecycle) or an abort removes them",
            ", ".join(str(url) for url in urls[:3]) + (" ..." if len(urls) > 3 else ""),
            ABORT_WAIT,
        )
    finally:
        pool.shutdown(wait=False)


def _abort_each(client: Callable[[], Any], urls: list[S3URL]) -> None:
    for url in urls:
        try:
            listing = client().list_multipart_uploads(Bucket=url.bucket, Prefix=url.key)
            for upload in listing.get("Uploads", ()) or ():
                if upload.get("Key") == url.key:
                    client().abort_multipart_upload(
                        Bucket=url.bucket, Key=url.key, UploadId=upload["UploadId"]
                    )
                    log.info("aborted the unfinished multipart upload of %s", url)
        except Exception as exc:  # noqa: BLE001 - the transfer's own error is the one to raise
            err = map_error(exc, str(url), "aborting the multipart uploads of")
            if err.code in ("NoSuchUpload", "NotImplemented", "NoSuchBucket"):
                log.debug("no multipart uploads to abort for %s: %s", url, err)
                continue
            log.warning(
                "could not abort unfinished multipart uploads of %s (%s): S3 keeps their "
                "parts until a lifecycle rule (runctl s3 lifecycle) or an abort removes them",
                url,
                err,
            )


class _Stream:
    """A file descriptor read a whole part at a time (up to its end), for s3transfer.

    Not ``os.fdopen``: a buffered file's close waits for its lock, which the reader thread
    holds while a producer that has gone quiet keeps the pipe open, so Ctrl-C never ended.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self, amount: int = -1) -> bytes:
        chunks = []
        while amount != 0:
            chunk = os.read(self._fd, amount if amount > 0 else IO_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            amount -= len(chunk) if amount > 0 else 0
        return b"".join(chunks)


def upload_stream(client: Any, fd: int, url: S3URL, storage_class: str | None = None) -> None:
    """Upload what ``fd`` yields until its end to ``url``, in parts as it is read (s3transfer).

    Example:
        >>> upload_stream(client, sys.stdin.fileno(), S3URL.parse("s3://b/x.tar"))  # doctest: +SKIP
    """
    extra = {"StorageClass": storage_class} if storage_class else None
    # s5cmd's part size: a stream of unknown size may be up to 10,000 parts (~488 GiB), not ~78.
    try:
        with _Batch(client, DEFAULT_PART_SIZE) as batch:
            try:
                batch.upload(_Stream(fd), url, extra, None).result()
            except Exception as exc:  # noqa: BLE001 - mapped to the runctl tree
                raise map_error(exc, str(url), "upload") from None
    except BaseException:
        abort_multipart(lambda: client, [url])  # its size is unknown: it may be multipart
        raise


def list_buckets(client: Any) -> Iterator[BucketInfo]:
    """The buckets the client's credentials own, page by page where the client can (ListBuckets).

    Example:
        >>> [b.name for b in list_buckets(client)]  # doctest: +SKIP
        ['checkpoints', 'datasets']
    """
    try:
        if client.can_paginate("list_buckets"):
            pages = list(client.get_paginator("list_buckets").paginate())
        else:
            pages = [client.list_buckets()]
    except Exception as exc:  # noqa: BLE001 - mapped to the runctl tree
        raise map_error(exc, None, "listing buckets") from None
    for page in pages:
        for bucket in page.get("Buckets", ()) or ():
            yield BucketInfo(name=bucket["Name"], created=_utc(bucket["CreationDate"]))


def download_stream(client: Any, url: S3URL, fd: int) -> None:
    """Write the object's bytes to ``fd`` as they arrive (one GetObject).

    Raises:
        StreamClosedError: if the reader closed ``fd`` first (a broken pipe).

    Example:
        >>> download_stream(client, S3URL.parse("s3://b/x.tar"), sys.stdout.fileno())  # doctest: +SKIP
    """
    try:
        body = client.get_object(Bucket=url.bucket, Key=url.key)["Body"]
        for chunk in body.iter_chunks(IO_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    except BrokenPipeError:
        raise StreamClosedError(
            f"download of {url} stopped: its reader closed the pipe", url=str(url)
        ) from None
    except Exception as exc:  # noqa: BLE001 - mapped to the runctl tree
        raise map_error(exc, str(url), "download") from None


class BotoTransfer(Transfer):
    """The boto3 backend (fallback when s5cmd is unavailable); thread-safe.

    Example:
        >>> from runctl.config import S3Config
        >>> t = BotoTransfer(S3Config(endpoint_url="http://127.0.0.1:9000"))
        >>> t.name
        'boto3'
    """

    name = "boto3"

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._batches: set[_Batch] = set()
        self._calls: DaemonPool | None = None
        self._closing: Future[None] = Future()

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use (clients are thread-safe)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self.config.boto_client()
        return self._client

    def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` (one request), waited for until it ends or ``close()`` is called.

        A request to an endpoint that stopped answering ends only with botocore's read timeout
        (60 s on each attempt): the uploader's worker sat in a HEAD while ``close()`` waited 30 s
        for it, and a training error was held back 65 s, not 30 (boto3 pass). It runs on a
        daemon thread; ``close()`` ends the wait at once.
        """
        with self._client_lock:
            closing = self._closing
            if self._calls is None:
                self._calls = DaemonPool(BATCH_CONCURRENCY, name="runctl-boto-call")
            calls = self._calls
        future: Future[Any] = calls.submit(fn, *args, **kwargs)
        done, _ = wait_futures([future, closing], return_when=FIRST_COMPLETED)
        if future not in done:
            raise TransferError("the transfer was closed while a request was under way")
        return future.result()

    # -- files -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _batch(self, part_size: int) -> Iterator[_Batch]:
        """A ``_Batch`` that ``close()`` abandons if it is still under way."""
        with self._client_lock:
            closing = self._closing  # a close() from here on ends this batch too
        with _Batch(self.client, part_size) as batch:
            with self._client_lock:
                self._batches.add(batch)
            if closing.done():  # closed while the batch was being set up
                batch.abandon()
            try:
                yield batch
            finally:
                with self._client_lock:
                    self._batches.discard(batch)

    def put_files(
        self,
        pairs: Sequence[tuple[Path, S3URL]],
        *,
        storage_class: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Upload each local file to exactly its URL (multipart for large files).

        The whole batch shares one s3transfer manager (one pool of request threads) per
        part size, instead of a manager and thread pool per file.
        """
        pairs = list(pairs)
        subscribers = [_on_progress(_Progress(progress))] if progress else None
        extra = {"StorageClass": storage_class} if storage_class else {}
        errors: dict[str, TransferError] = {}
        groups: dict[int, list[tuple[Path, S3URL, int]]] = {}
        for path, url in pairs:
            try:
                size = Path(path).stat().st_size
            except OSError as exc:
                errors[str(url)] = map_error(exc, str(url), "upload")
                continue
            groups.setdefault(part_size_for(size), []).append((path, url, size))
        for part_size, group in groups.items():
            # s3transfer's own abort of an unfinished multipart upload is let go with the batch
            # (Ctrl-C, or close() under it): the process may end before it would have run.
            large = [url for _, url, size in group if size >= DEFAULT_PART_SIZE]
            try:
                with self._batch(part_size) as batch:  # cancels the rest if interrupted
                    futures = [(url, batch.upload(str(path), url, extra, subscribers)) for path, url, _ in group]
                    for url, future in futures:
                        try:
                            future.result()
                        except Exception as exc:  # every failure is reported by name after the batch
                            errors[str(url)] = map_error(exc, str(url), "upload")
            except BaseException:
                abort_multipart(lambda: self.client, large)
                raise
            if batch.abandoned:
                abort_multipart(lambda: self.client, [url for url in large if str(url) in errors])
        raise_batch(errors, len(pairs), "upload")

    def put_tree(
        self,
        root: Path,
        pairs: Sequence[tuple[Path, S3URL]],
        *,
        storage_class: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[tuple[Path, S3URL, int | None]]:
        """``put_files`` of the pairs: boto3 has no directory copy, so a tree is its files.

        Example:
            >>> t.put_tree(Path("ckpt"), [(Path("ckpt/a.pt"), S3URL.parse("s3://b/run/a.pt"))])  # doctest: +SKIP
            []
        """
        self.put_files(pairs, storage_class=storage_class, progress=progress)
        return []

    def get_tree(
        self,
        prefix: S3URL,
        root: Path,
        pairs: Iterable[tuple[S3URL, Path]],
        *,
        progress: ProgressCallback | None = None,
    ) -> None:
        """``get_files`` of the pairs: boto3 has no prefix download, so a tree is its objects.

        Example:
            >>> t.get_tree(S3URL.parse("s3://b/run/"), Path("stage"), [(S3URL.parse("s3://b/run/a.pt"), Path("stage/a.pt"))])  # doctest: +SKIP
        """
        self.get_files(list(pairs), progress=progress)

    def get_files(
        self,
        pairs: Iterable[tuple[S3URL, Path]],
        *,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Download each object to exactly the given path (its parent must exist).

        Each object is first asked for with one GetObject (no HEAD): an object smaller than
        the part size is streamed from that response into a temporary file beside the
        destination and renamed into place. A larger one (or a read that broke off) goes to
        one shared s3transfer manager with its size already known, for ranged, retried GETs.
        """
        pairs = list(pairs)
        callback = _Progress(progress)
        errors: dict[str, TransferError] = {}
        lock = threading.Lock()
        futures: list[tuple[S3URL, Any]] = []
        stopping = threading.Event()  # Ctrl-C or SIGTERM: each download removes its own file

        def fail(url: S3URL, exc: BaseException) -> None:
            err = map_error(exc, url, "download")
            if isinstance(err, NoSuchKeyError) and err.code == "404":
                err = self._missing_bucket_or_key(url, err)
            log.debug("download %s failed: %s", url, err)
            with lock:
                errors[str(url)] = err

        def one(pair: tuple[S3URL, Path]) -> None:
            url, path = pair
            if stopping.is_set():
                return
            try:
                size = self._get_small(url, Path(path), callback, stopping)
            except Exception as exc:  # every failure is reported by name after the batch
                fail(url, exc)
                return
            if size is None:
                return
            subscribers = [_on_progress(callback), _known_size(size)]
            try:
                future = batch.download(url, str(path), subscribers)
            except Exception as exc:  # noqa: BLE001 - reported per item
                fail(url, exc)
                return
            with lock:
                futures.append((url, future))

        with self._batch(part_size_for(0)) as batch:  # cancels the rest if interrupted
            if len(pairs) <= 1:
                for pair in pairs:
                    one(pair)
            else:
                pool = DaemonPool(min(BATCH_CONCURRENCY, len(pairs)), name="runctl-boto")
                try:
                    with pool:
                        list(pool.map(one, pairs))
                except BaseException:
                    # The threads wrote on after the caller removed its temporary files, and
                    # the process exited: 4 interrupted syncs in 10 left a file behind, one
                    # renamed from its temporary name and never moved into place (sync pass).
                    stopping.set()
                    pool.join(STOP_WAIT)
                    raise
            for url, future in futures:
                try:
                    future.result()
                except Exception as exc:  # every failure is reported by name after the batch
                    fail(url, exc)
        raise_batch(errors, len(pairs), "download")

    def _get_small(
        self, url: S3URL, path: Path, callback: _Progress, stopping: threading.Event | None = None
    ) -> int | None:
        """GetObject ``url`` into ``path`` if it is small; else its size (None when done).

        A read that breaks off midway also returns the size, so the manager retries it. Once
        ``stopping`` is set, the download stops and removes its temporary file.
        """
        from s3transfer.download import S3_RETRYABLE_DOWNLOAD_ERRORS

        response = self.client.get_object(Bucket=url.bucket, Key=url.key)
        body = response["Body"]
        size = int(response.get("ContentLength") or 0)
        if size >= DEFAULT_PART_SIZE:
            body.close()  # the manager fetches it in parallel ranges
            return size
        suffix = f".{os.urandom(4).hex()}"  # s3transfer's temp name: beside it, same filesystem
        temp = os.path.join(os.path.dirname(path), path.name[: _MAX_NAME - len(suffix)] + suffix)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as fh:
                for chunk in body.iter_chunks(IO_CHUNK):
                    if stopping is not None and stopping.is_set():
                        raise _Stopped
                    fh.write(chunk)
                    callback(len(chunk))
            if stopping is not None and stopping.is_set():
                raise _Stopped
            os.replace(temp, path)
        except S3_RETRYABLE_DOWNLOAD_ERRORS:
            _unlink(temp)
            body.close()
            return size
        except BaseException:
            _unlink(temp)
            body.close()
            raise
        return None

    def _missing_bucket_or_key(self, url: S3URL, err: TransferError) -> TransferError:
        """A HEAD 404 does not say whether the bucket or the key is missing; ask once."""
        try:
            self._call(self.client.head_bucket, Bucket=url.bucket)
        except Exception as exc:
            bucket_err = map_error(exc, f"s3://{url.bucket}", "download")
            if isinstance(bucket_err, NoSuchKeyError):  # head_bucket's 404 is the bucket's
                return NoSuchBucketError(
                    f"download {url} failed: bucket {url.bucket!r} does not exist",
                    code="NoSuchBucket",
                    url=str(url),
                )
        return NoSuchKeyError(
            f"download {url} failed: no such object", code="NoSuchKey", url=str(url)
        )

    # -- listing -----------------------------------------------------------------------------

    def iter_objects(
        self, url: S3URL, *, recursive: bool = True
    ) -> Iterator[ObjectInfo | PrefixInfo]:
        """Stream objects (and, non-recursive, common prefixes) under ``url.key``, page by page."""
        kwargs: dict[str, Any] = {
            "Bucket": url.bucket,
            "Prefix": url.key,
            "PaginationConfig": {"PageSize": PAGE_SIZE},
        }
        if not recursive:
            kwargs["Delimiter"] = "/"
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(**kwargs))
        while True:
            try:
                page = self._call(next, pages, None)
            except Exception as exc:
                raise map_error(exc, url, "list") from None
            if page is None:
                return
            if page.get("IsTruncated") and not page.get("NextContinuationToken"):
                # botocore takes such a page for the last: the listing would end short, and
                # what it left out (markers, the newest checkpoints) read as missing to
                # cleanup (fault pass). S3 never sends one; a broken server or proxy may.
                raise TransferError(
                    f"listing {url} failed: the server said there was more (IsTruncated) "
                    "and gave no continuation token",
                    code="TruncatedListing",
                    url=str(url),
                )
            # Per page, common prefixes first, then objects (each sorted by S3): the order
            # s5cmd and the AWS CLI print, so both backends list identically.
            entries: list[ObjectInfo | PrefixInfo] = [
                PrefixInfo(bucket=url.bucket, key=item["Prefix"])
                for item in page.get("CommonPrefixes", ()) or ()
            ]
            entries.extend(
                ObjectInfo(
                    bucket=url.bucket,
                    key=item["Key"],
                    size=int(item.get("Size", 0)),
                    last_modified=_utc(item["LastModified"]),
                    etag=_unquote_etag(item.get("ETag")),
                    storage_class=item.get("StorageClass") or "STANDARD",
                )
                for item in page.get("Contents", ()) or ()
            )
            del page
            yield from entries
            entries.clear()  # do not hold this page while the next one is fetched and parsed

    def iter_buckets(self) -> Iterator[BucketInfo]:
        """The account's buckets, page by page (ListBuckets)."""
        return list_buckets(self.client)

    # -- small operations --------------------------------------------------------------------

    def delete_keys(self, bucket: str, keys: Iterable[str]) -> DeleteResult:
        """Delete keys in batches of 1,000 (DeleteObjects, quiet); per-key errors are collected.

        A key XML cannot carry (``xml_safe``) is deleted on its own (DeleteObject): in a batch
        it failed the whole batch, and retention deleted nothing of the prefix.
        """
        deleted = 0
        errors: dict[str, str] = {}
        iterator = iter(keys)
        while True:
            batch = list(itertools.islice(iterator, DELETE_BATCH))
            if not batch:
                break
            odd = [key for key in batch if not xml_safe(key)]
            if odd:
                batch = [key for key in batch if xml_safe(key)]
                for key in odd:
                    try:
                        self._call(self.client.delete_object, Bucket=bucket, Key=key)
                    except Exception as exc:  # noqa: BLE001 - reported per key, like DeleteObjects
                        mapped = map_error(exc, f"s3://{bucket}/{key}", "delete of")
                        if mapped.code not in ("NoSuchKey", "404"):
                            errors[key] = str(mapped)
                            continue
                    deleted += 1
                if not batch:
                    continue
            try:
                response = self._call(
                    self.client.delete_objects,
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
            except Exception as exc:
                raise map_error(exc, f"s3://{bucket}/", f"delete of {len(batch)} keys in") from None
            failed = {
                item["Key"]: scrub(
                    f"{item.get('Code', 'Error')}: {item.get('Message', '')}".rstrip(": ")
                )
                for item in response.get("Errors", ()) or ()
                if item.get("Code") != "NoSuchKey"  # already gone is what we wanted
            }
            errors.update(failed)
            deleted += len(batch) - len(failed)
        return DeleteResult(deleted=deleted, errors=errors)

    def stat(self, url: S3URL) -> ObjectInfo | None:
        """The object's metadata from HEAD, or None if it does not exist."""
        if url.is_bucket:
            return None
        try:
            head = self._call(self.client.head_object, Bucket=url.bucket, Key=url.key)
        except Exception as exc:
            err = map_error(exc, url, "stat")
            if isinstance(err, NoSuchKeyError):
                return None
            raise err from None
        return ObjectInfo(
            bucket=url.bucket,
            key=url.key,
            size=int(head.get("ContentLength", 0)),
            last_modified=_utc(head["LastModified"]),
            etag=_unquote_etag(head.get("ETag")),
            storage_class=head.get("StorageClass") or "STANDARD",
        )

    def unlisted(self, prefix: S3URL, rels: Sequence[str]) -> dict[str, ObjectInfo]:
        """Of these paths a listing did not show, those in S3 (one HEAD each, 16 at a time).

        S3's listing shows every object; a server or proxy that answers one short does not, and
        a pin left out was forgotten and its checkpoint deleted, by the uploader, cleanup and
        watch (retention pass). Callers ask only where a listing says something is missing.

        Example:
            >>> t.unlisted(S3URL.parse("s3://b/run/step_4/"), ["shard_0.bin"])  # doctest: +SKIP
            {'shard_0.bin': ObjectInfo(bucket='b', key='run/step_4/shard_0.bin', ...)}
        """
        if not rels:
            return {}
        with DaemonPool(min(len(rels), 16), name="runctl-head") as pool:  # a hung HEAD holds no exit
            looked = pool.map(lambda rel: (rel, self.stat(S3URL(prefix.bucket, prefix.key + rel))), rels)
            return {rel: info for rel, info in looked if info is not None}

    def put_stream(self, fd: int, url: S3URL, *, storage_class: str | None = None) -> None:
        """Upload everything read from the file descriptor ``fd`` to ``url`` (multipart as it is read)."""
        upload_stream(self.client, fd, url, storage_class)

    def get_stream(self, url: S3URL, fd: int) -> None:
        """Write the object's bytes to the file descriptor ``fd`` (StreamClosedError on a broken pipe)."""
        download_stream(self.client, url, fd)

    def put_bytes(self, data: bytes, url: S3URL) -> None:
        """Write a small object in one PutObject."""
        try:
            self._call(self.client.put_object, Bucket=url.bucket, Key=url.key, Body=data)
        except Exception as exc:
            raise map_error(exc, url, "put") from None

    def get_bytes(self, url: S3URL) -> bytes:
        """Read a small object whole with one GetObject."""
        try:
            client = self.client
            return self._call(lambda: bytes(client.get_object(Bucket=url.bucket, Key=url.key)["Body"].read()))
        except Exception as exc:
            raise map_error(exc, url, "get") from None

    def warm_up(self) -> None:
        """Nothing to prepare: the listing itself creates the client the reads use.

        Example:
            >>> BotoTransfer(S3Config()).warm_up()  # doctest: +SKIP
        """

    def close(self) -> None:
        """Cancel the transfers under way (their calls fail at once) and close the connections."""
        with self._client_lock:
            client, self._client = self._client, None
            batches, self._batches = list(self._batches), set()
            closing, self._closing = self._closing, Future()
            calls, self._calls = self._calls, None
        closing.set_result(None)
        if calls is not None:
            calls.shutdown(wait=False)
        for batch in batches:
            batch.abandon()
        if client is not None and hasattr(client, "close"):
            client.close()
