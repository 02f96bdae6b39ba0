"""Fixtures for the uploader tests: fast retries, wrappers that record, gate or break a real transfer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runctl.exceptions import TransferError
from runctl.retry import RetryPolicy
from runctl.s3url import S3URL
from runctl.transfer.base import ObjectInfo
from tests.servers import S3Server

FAST_RETRY = RetryPolicy(attempts=3, backoff_factor=0.02, backoff_max=0.1, jitter=0.0)


class Wrapped:
    """A real transfer with hooks: records every call; ``before_put`` runs before each put_files."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.config = inner.config
        self.calls: list[tuple[str, Any]] = []
        self.before_put: Callable[[int, list[tuple[Path, S3URL]]], None] | None = None
        self.put_count = 0
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def put_files(self, pairs, *, storage_class=None, progress=None):  # noqa: ANN001, ANN201
        pairs = list(pairs)
        with self.lock:
            self.put_count += 1
            count = self.put_count
            self.calls.append(("put_files", [str(u) for _, u in pairs]))
        if self.before_put is not None:
            self.before_put(count, pairs)
        return self.inner.put_files(pairs, storage_class=storage_class, progress=progress)

    def put_bytes(self, data, url):  # noqa: ANN001, ANN201
        with self.lock:
            self.calls.append(("put_bytes", str(url)))
        return self.inner.put_bytes(data, url)

    def get_files(self, pairs, *, progress=None):  # noqa: ANN001, ANN201
        return self.inner.get_files(pairs, progress=progress)

    def warm_up(self) -> None:
        with self.lock:
            self.calls.append(("warm_up", None))
        self.inner.warm_up()

    def iter_objects(self, url, *, recursive=True):  # noqa: ANN001, ANN201
        return self.inner.iter_objects(url, recursive=recursive)

    def delete_keys(self, bucket, keys):  # noqa: ANN001, ANN201
        keys = list(keys)
        with self.lock:
            self.calls.append(("delete_keys", keys))
        return self.inner.delete_keys(bucket, keys)

    def stat(self, url):  # noqa: ANN001, ANN201
        return self.inner.stat(url)

    def unlisted(self, prefix, rels):  # noqa: ANN001, ANN201
        return self.inner.unlisted(prefix, rels)

    def get_bytes(self, url):  # noqa: ANN001, ANN201
        return self.inner.get_bytes(url)

    def close(self) -> None:
        # The uploader closes its transfer to stop a stuck attempt; a gate must open then.
        self.closed.set()
        self.inner.close()


class Gate:
    """Makes put_files wait until ``open()`` (or the transfer is closed, which fails the call)."""

    def __init__(self, wrapped: Wrapped) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.wrapped = wrapped
        wrapped.before_put = self._wait

    def _wait(self, count: int, pairs: list[tuple[Path, S3URL]]) -> None:
        self.entered.set()
        while not self.opened.is_set():
            if self.wrapped.closed.is_set():
                self.wrapped.closed.clear()
                raise TransferError("transfer closed while waiting", code="Closed")
            self.opened.wait(0.01)

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def fast_retry() -> RetryPolicy:
    return FAST_RETRY


@pytest.fixture
def moto_bucket(moto_server: S3Server) -> S3URL:
    return S3URL(moto_server.new_bucket())


@pytest.fixture
def boto_transfer(moto_server: S3Server) -> Iterator[Any]:
    """The boto3 backend on moto: for tests about the uploader's own logic, not the backends."""
    from runctl.transfer import get_transfer

    t = get_transfer(moto_server.config(), use_s5cmd=False)
    yield t
    t.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints"
    path.mkdir()
    return path


def keys_under(transfer: Any, url: S3URL) -> dict[str, ObjectInfo]:
    """Key relative to ``url`` -> object, for every object under it."""
    base = url.as_prefix().key
    return {
        o.key[len(base) :]: o
        for o in transfer.iter_objects(url.as_prefix(), recursive=True)
        if isinstance(o, ObjectInfo)
    }


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
