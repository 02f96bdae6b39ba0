"""Audit an S3 prefix: checkpoints, other artifacts, multipart uploads and an estimated monthly cost."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from runctl.checkpoints import group_s3
from runctl.config import scrub
from runctl.exceptions import TransferError, UsageError
from runctl.s3url import S3URL
from runctl.transfer.base import ObjectInfo, Transfer

log = logging.getLogger("runctl.review")

#: Bytes in the "GB" of a GB-month (AWS bills storage in binary gigabytes).
GB = 1024**3

#: Estimated storage price in USD per GB-month, by storage class: AWS S3 list prices for
#: us-east-1 (first 50 TB tier; INTELLIGENT_TIERING at its frequent-access tier). Request,
#: retrieval, minimum-duration and monitoring charges are not included. Override with a JSON
#: object ``{"STANDARD": 0.021, ...}`` via ``runctl s3 review --prices FILE`` or ``RUNCTL_PRICES``;
#: classes not named in the file keep these values.
DEFAULT_PRICES: Mapping[str, float] = {
    "STANDARD": 0.023,
    "STANDARD_IA": 0.0125,
    "ONEZONE_IA": 0.01,
    "INTELLIGENT_TIERING": 0.023,
    "GLACIER_IR": 0.004,
    "GLACIER": 0.0036,
    "DEEP_ARCHIVE": 0.00099,
    "REDUCED_REDUNDANCY": 0.024,
}
CURRENCY = "USD"
#: A multipart upload initiated longer ago than this (seconds) is reported as abandoned.
DEFAULT_ABANDONED_AFTER = 24 * 3600.0


def load_prices(path: str | Path) -> dict[str, float]:
    """Read a price override file (JSON object: storage class -> USD per GB-month) merged over the defaults.

    Example:
        >>> load_prices("prices.json")["STANDARD"]   # doctest: +SKIP
        0.021

    Raises:
        UsageError: the file is missing, not JSON, or holds a non-numeric or negative price.
    """
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--prices {str(path)!r}: cannot read the file ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"--prices {str(path)!r}: not valid JSON ({exc})") from None
    return merge_prices(data, source=str(path))


def merge_prices(overrides: Mapping[str, Any], *, source: str = "prices") -> dict[str, float]:
    """``DEFAULT_PRICES`` with ``overrides`` applied; storage class names are upper-cased.

    Example:
        >>> merge_prices({"standard": 0.02})["STANDARD"]
        0.02

    Raises:
        UsageError: ``overrides`` is not a mapping of names to non-negative numbers.
    """
    if not isinstance(overrides, Mapping):
        raise UsageError(f"{source}: expected a JSON object of storage class -> price, got {type(overrides).__name__}")
    prices = dict(DEFAULT_PRICES)
    for name, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UsageError(f"{source}: price for {name!r} must be a non-negative number, got {value!r}")
        prices[str(name).upper()] = float(value)
    return prices


def monthly_cost(size: int, price_per_gb_month: float) -> float:
    """Estimated monthly cost of ``size`` bytes at ``price_per_gb_month``.

    Example:
        >>> monthly_cost(2 * GB, 0.023)
        0.046
    """
    return size / GB * price_per_gb_month


@dataclass(frozen=True)
class FileRow:
    """One object of a checkpoint (``--detailed``)."""

    key: str
    size: int
    storage_class: str | None

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "size": self.size, "storage_class": self.storage_class}


@dataclass(frozen=True)
class CheckpointRow:
    """One checkpoint in the audit."""

    name: str
    url: str
    step: int | None
    epoch: int | None
    is_dir: bool
    files: int
    size: int
    mtime: float
    age: float
    complete: bool
    storage_class: str | None
    file_list: tuple[FileRow, ...] = ()
    #: A pin object ``<prefix>.runctl/pinned/<name>`` names it: every cleanup keeps it.
    pinned: bool = False

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "name": self.name,
            "url": self.url,
            "step": self.step,
            "epoch": self.epoch,
            "is_dir": self.is_dir,
            "files": self.files,
            "size": self.size,
            "mtime": self.mtime,
            "age_seconds": self.age,
            "complete": self.complete,
            "storage_class": self.storage_class,
            "pinned": self.pinned,
        }
        if self.file_list:
            data["file_list"] = [f.to_json() for f in self.file_list]
        return data


@dataclass(frozen=True)
class ArtifactRow:
    """An object under the prefix that is not part of any checkpoint (logs, configs, ...)."""

    key: str
    size: int
    mtime: float
    storage_class: str | None

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "size": self.size, "mtime": self.mtime, "storage_class": self.storage_class}


@dataclass(frozen=True)
class MultipartRow:
    """A multipart upload that was started and never completed nor aborted; its parts are billed."""

    key: str
    upload_id: str
    initiated: float
    age: float
    parts: int
    size: int
    storage_class: str
    abandoned: bool

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "upload_id": self.upload_id,
            "initiated": self.initiated,
            "age_seconds": self.age,
            "parts": self.parts,
            "size": self.size,
            "storage_class": self.storage_class,
            "abandoned": self.abandoned,
        }


@dataclass(frozen=True)
class CostRow:
    """Bytes stored in one storage class and their estimated monthly cost (None when unpriced)."""

    storage_class: str
    size: int
    objects: int
    price_per_gb_month: float | None
    monthly_cost: float | None
    #: Bytes of unfinished multipart uploads' parts, already included in ``size``.
    multipart_size: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "storage_class": self.storage_class,
            "size": self.size,
            "objects": self.objects,
            "multipart_size": self.multipart_size,
            "price_per_gb_month": self.price_per_gb_month,
            "monthly_cost": self.monthly_cost,
        }


@dataclass(frozen=True)
class Review:
    """Everything ``runctl s3 review`` reports about one prefix.

    ``objects``/``size`` count stored objects; multipart parts are counted separately in
    ``multipart_size`` and included in ``costs`` (storage for uploaded parts is billed).
    """

    url: str
    time: float
    checkpoints: tuple[CheckpointRow, ...]
    others: tuple[ArtifactRow, ...]
    objects: int
    size: int
    multipart_uploads: tuple[MultipartRow, ...]
    multipart_size: int
    multipart_error: str | None
    abandoned_after: float
    costs: tuple[CostRow, ...]
    total_monthly_cost: float
    currency: str
    warnings: tuple[str, ...]
    #: Each marker was read and checked against the listed files (else: a marker exists).
    markers_verified: bool = False
    #: Every name pinned under the prefix (``<prefix>.runctl/pinned/<name>``), checkpoint or not.
    pinned: tuple[str, ...] = ()
    #: Unfinished multipart uploads were asked for (``include_multipart``) and listed without an
    #: error: only then does none listed mean none.
    multipart_listed: bool = True

    @property
    def incomplete(self) -> tuple[CheckpointRow, ...]:
        """Directory checkpoints without a marker (uploads in progress, or abandoned), or, when
        ``markers_verified``, with one that does not match their files."""
        return tuple(c for c in self.checkpoints if not c.complete)

    @property
    def stray_pins(self) -> tuple[str, ...]:
        """Pinned names with no checkpoint under the prefix (deleted by hand or by a sync)."""
        present = {c.name for c in self.checkpoints}
        return tuple(name for name in self.pinned if name not in present)

    @property
    def abandoned(self) -> tuple[MultipartRow, ...]:
        return tuple(m for m in self.multipart_uploads if m.abandoned)

    @property
    def checkpoint_size(self) -> int:
        return sum(c.size for c in self.checkpoints)

    def to_json(self) -> dict[str, object]:
        return {
            "url": self.url,
            "time": self.time,
            "checkpoints": [c.to_json() for c in self.checkpoints],
            "others": [o.to_json() for o in self.others],
            "incomplete": [c.name for c in self.incomplete],
            "markers_verified": self.markers_verified,
            "pinned": list(self.pinned),
            "stray_pins": list(self.stray_pins),
            "totals": {
                "objects": self.objects,
                "size": self.size,
                "checkpoints": len(self.checkpoints),
                "complete_checkpoints": len(self.checkpoints) - len(self.incomplete),
                "checkpoint_size": self.checkpoint_size,
                "other_objects": len(self.others),
                "other_size": sum(o.size for o in self.others),
                "multipart_uploads": len(self.multipart_uploads),
                "abandoned_multipart_uploads": len(self.abandoned),
                "multipart_size": self.multipart_size,
            },
            "multipart_uploads": [m.to_json() for m in self.multipart_uploads],
            "multipart_error": self.multipart_error,
            "multipart_listed": self.multipart_listed,
            "abandoned_after_seconds": self.abandoned_after,
            "cost": {
                "currency": self.currency,
                "unit": "per month",
                "by_storage_class": [c.to_json() for c in self.costs],
                "total_monthly": self.total_monthly_cost,
            },
            "warnings": list(self.warnings),
        }


def _client_error(exc: BaseException) -> tuple[str | None, str]:
    response = getattr(exc, "response", None)
    code = None
    if isinstance(response, Mapping):
        code = (response.get("Error") or {}).get("Code")
    return code, scrub(str(exc))


def _iter_multipart(client: Any, prefix: S3URL) -> Iterator[dict[str, Any]]:
    kwargs: dict[str, Any] = {"Bucket": prefix.bucket, "Prefix": prefix.key}
    while True:
        page = client.list_multipart_uploads(**kwargs)
        yield from page.get("Uploads", ()) or ()
        if not page.get("IsTruncated"):
            return
        kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
        kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")


def _parts(client: Any, bucket: str, key: str, upload_id: str) -> tuple[int, int]:
    count = size = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
    while True:
        page = client.list_parts(**kwargs)
        for part in page.get("Parts", ()) or ():
            count += 1
            size += int(part.get("Size", 0))
        if not page.get("IsTruncated"):
            return count, size
        kwargs["PartNumberMarker"] = page.get("NextPartNumberMarker", 0)


def list_multipart_uploads(
    transfer: Transfer, prefix: S3URL, *, abandoned_after: float = DEFAULT_ABANDONED_AFTER, now: float | None = None
) -> list[MultipartRow]:
    """Unfinished multipart uploads under ``prefix`` with their parts' sizes (ListMultipartUploads, ListParts).

    Example:
        >>> [m.key for m in list_multipart_uploads(transfer, S3URL.parse("s3://b/run/"))]   # doctest: +SKIP
        ['run/step_9.pt']

    Raises:
        TransferError: the server refused or does not support the listing.
    """
    now = time.time() if now is None else now
    client = transfer.config.boto_client()
    rows: list[MultipartRow] = []
    try:
        for upload in _iter_multipart(client, prefix):
            key, upload_id = upload["Key"], upload["UploadId"]
            initiated_at = upload.get("Initiated")
            initiated = initiated_at.timestamp() if isinstance(initiated_at, datetime) else now
            try:
                parts, size = _parts(client, prefix.bucket, key, upload_id)
            except Exception as exc:  # a part listing that vanished (completed meanwhile) costs nothing
                code, _ = _client_error(exc)
                if code != "NoSuchUpload":
                    raise
                continue
            age = max(now - initiated, 0.0)
            rows.append(
                MultipartRow(
                    key=key,
                    upload_id=upload_id,
                    initiated=initiated,
                    age=age,
                    parts=parts,
                    size=size,
                    storage_class=upload.get("StorageClass") or "STANDARD",
                    abandoned=age >= abandoned_after,
                )
            )
    except TransferError:
        raise
    except Exception as exc:
        raise _multipart_listing_failed(prefix, exc) from None
    rows.sort(key=lambda m: (m.key, m.initiated))
    return rows


def _multipart_listing_failed(prefix: S3URL, exc: BaseException) -> TransferError:
    code, message = _client_error(exc)
    return TransferError(f"listing multipart uploads under {prefix} failed: {message}", code=code, url=str(prefix))


def uploads_under_way(
    transfer: Transfer,
    prefix: S3URL,
    *,
    within: float = DEFAULT_ABANDONED_AFTER,
    now: float | None = None,
    client: Any = None,
) -> list[str]:
    """Keys under ``prefix`` with a multipart upload begun within the last ``within`` seconds.

    A large file on its way, as S3 alone shows it (one ListMultipartUploads a page; no part
    listing). Older ones are abandoned, and say nothing of what is under way. ``client``: a
    boto3 client to reuse (one is built otherwise).

    Example:
        >>> uploads_under_way(transfer, S3URL.parse("s3://b/run/"))   # doctest: +SKIP
        ['run/optim_step_2.pt']

    Raises:
        TransferError: the server refused or does not support the listing.
    """
    now = time.time() if now is None else now
    keys: list[str] = []
    try:
        for upload in _iter_multipart(client or transfer.config.boto_client(), prefix):
            initiated = upload.get("Initiated")
            if not isinstance(initiated, datetime) or now - initiated.timestamp() < within:
                keys.append(upload["Key"])
    except TransferError:
        raise
    except Exception as exc:
        raise _multipart_listing_failed(prefix, exc) from None
    return sorted(set(keys))


def _has_abort_rule(transfer: Transfer, prefix: S3URL) -> bool | None:
    """True if an enabled lifecycle rule aborts incomplete multipart uploads covering ``prefix``; None if unknown."""
    from runctl.lifecycle import has_abort_multipart_rule

    try:
        return has_abort_multipart_rule(transfer.config.boto_client(), prefix.bucket, prefix.key)
    except TransferError:
        return None


def review(
    transfer: Transfer,
    prefix: S3URL,
    *,
    prices: Mapping[str, float] | None = None,
    detailed: bool = False,
    abandoned_after: float = DEFAULT_ABANDONED_AFTER,
    now: float | None = None,
    patterns: Sequence[str] | None = None,
    treat_unmarked_complete: bool = False,
    include_multipart: bool = True,
    verify_markers: bool = False,
) -> Review:
    """Audit ``prefix``: checkpoints, other artifacts, unfinished multipart uploads and monthly cost.

    ``prices`` overrides ``DEFAULT_PRICES`` per storage class (USD per GB-month). A server that
    cannot list multipart uploads leaves ``multipart_error`` set instead of failing the review;
    then, or without ``include_multipart``, ``multipart_listed`` is False.
    A directory checkpoint is complete when it has a non-empty marker; ``verify_markers`` also
    reads each marker (one batch, beside the listing) and checks it against the listed files, as
    retention does: 1,000 checkpoints cost about a second more.

    Example:
        >>> r = review(transfer, S3URL.parse("s3://bucket/run/"))   # doctest: +SKIP
        >>> r.total_monthly_cost, [m.key for m in r.abandoned]       # doctest: +SKIP
        (0.0046, ['run/step_9.pt'])

    Raises:
        TransferError: the listing failed (no such bucket, access denied, ...).
        UsageError: ``abandoned_after`` is negative.
    """
    if abandoned_after < 0:
        raise UsageError(f"abandoned_after must be >= 0 seconds, got {abandoned_after!r}")
    prefix = prefix.as_prefix()
    now = time.time() if now is None else now
    table = merge_prices(prices or {}, source="prices") if prices is not None else dict(DEFAULT_PRICES)

    by_class: dict[str, list[int]] = {}  # storage class -> [bytes, objects, multipart bytes]
    objects = total = 0
    sizes: dict[str, tuple[int, str | None]] = {}

    def counted(items: Iterator[object]) -> Iterator[ObjectInfo]:
        nonlocal objects, total
        for item in items:
            if not isinstance(item, ObjectInfo):
                continue
            objects += 1
            total += item.size
            slot = by_class.setdefault(item.storage_class or "STANDARD", [0, 0, 0])
            slot[0] += item.size
            slot[1] += 1
            if detailed:
                sizes[item.key] = (item.size, item.storage_class)
            yield item

    # Multipart uploads are listed by their own client on a thread while the objects stream in.
    pool = ThreadPoolExecutor(1, thread_name_prefix="runctl-multipart") if include_multipart else None
    pending = (
        pool.submit(list_multipart_uploads, transfer, prefix, abandoned_after=abandoned_after, now=now)
        if pool is not None
        else None
    )
    read_markers = None
    if verify_markers:
        from runctl.retention import read_small_objects  # its imports cost start-up otherwise

        def read_markers(keys: Iterable[str]) -> Mapping[str, bytes | TransferError]:
            return read_small_objects(transfer, prefix.bucket, keys)

    try:
        grouped = group_s3(
            counted(transfer.iter_objects(prefix, recursive=True)),
            prefix,
            patterns,
            treat_unmarked_complete=treat_unmarked_complete,
            read_markers=read_markers,
        )
    finally:
        if pool is not None:
            pool.shutdown(wait=False)
    rows = []
    for ckpt in sorted(grouped.checkpoints, key=lambda c: c.order_key()):
        url = prefix.join(ckpt.name)
        file_list: tuple[FileRow, ...] = ()
        if detailed:
            keys = [*ckpt.files, *([ckpt.marker] if ckpt.marker else [])]
            file_list = tuple(FileRow(k, *sizes.get(k, (0, None))) for k in keys)
        rows.append(
            CheckpointRow(
                name=ckpt.name,
                url=str(url.as_prefix() if ckpt.is_dir else url),
                step=ckpt.step,
                epoch=ckpt.epoch,
                is_dir=ckpt.is_dir,
                files=len(ckpt.files),
                size=ckpt.size,
                mtime=ckpt.mtime,
                age=max(now - ckpt.mtime, 0.0),
                complete=ckpt.complete,
                storage_class=ckpt.storage_class,
                file_list=file_list,
                pinned=ckpt.name in grouped.pinned,
            )
        )
    others = tuple(
        ArtifactRow(o.key, o.size, o.last_modified.timestamp(), o.storage_class)
        for o in sorted(grouped.others, key=lambda o: o.key)
    )

    uploads: list[MultipartRow] = []
    multipart_error = None
    if pending is not None:
        try:
            uploads = pending.result()
        except TransferError as exc:
            multipart_error = str(exc)
            log.warning("%s", exc)
    for upload in uploads:
        slot = by_class.setdefault(upload.storage_class, [0, 0, 0])
        slot[0] += upload.size
        slot[2] += upload.size

    costs = []
    for storage_class in sorted(by_class):
        size, count, parts = by_class[storage_class]
        price = table.get(storage_class)
        cost = None if price is None else monthly_cost(size, price)
        costs.append(CostRow(storage_class, size, count, price, cost, parts))
    warnings: list[str] = []
    unpriced = [c.storage_class for c in costs if c.price_per_gb_month is None]
    if unpriced:
        warnings.append(f"no price for storage class {', '.join(unpriced)}: not included in the cost (use --prices)")
    abandoned = [u for u in uploads if u.abandoned]
    if abandoned:
        wasted = sum(u.size for u in abandoned)
        warnings.append(
            f"{len(abandoned)} abandoned multipart {'upload holds' if len(abandoned) == 1 else 'uploads hold'} "
            f"{wasted} bytes of billed parts"
        )
        if _has_abort_rule(transfer, prefix) is False:
            warnings.append(
                f"no lifecycle rule aborts incomplete multipart uploads under {prefix}: "
                "add one (AbortIncompleteMultipartUpload) so abandoned parts stop costing money"
            )
    return Review(
        url=str(prefix),
        time=now,
        checkpoints=tuple(rows),
        others=others,
        objects=objects,
        size=total,
        multipart_uploads=tuple(uploads),
        multipart_size=sum(u.size for u in uploads),
        multipart_error=multipart_error,
        multipart_listed=include_multipart and multipart_error is None,
        abandoned_after=abandoned_after,
        costs=tuple(costs),
        total_monthly_cost=sum(c.monthly_cost for c in costs if c.monthly_cost is not None),
        currency=CURRENCY,
        warnings=tuple(warnings),
        markers_verified=verify_markers,
        pinned=tuple(sorted(grouped.pinned)),
    )
