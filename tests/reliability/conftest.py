"""Fixtures for the reliability suite: fault proxies, snapshots of S3 and disk, quick retries."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runctl.config import Credentials, S3Config
from runctl.retry import RetryPolicy
from runctl.s3url import S3URL
from tests.reliability.faultproxy import FaultPlan, FaultProxy
from tests.servers import ACCESS_KEY, REGION, SECRET_KEY, S3Server

#: Retries quick enough for tests, patient enough for a flaky server.
QUICK_RETRY = RetryPolicy(attempts=6, backoff_factor=0.1, backoff_max=0.5, jitter=0.0)


def config_for(endpoint: str, secret: str = SECRET_KEY) -> S3Config:
    """An S3Config for ``endpoint`` with the test credentials (or another secret)."""
    return S3Config(
        endpoint_url=endpoint, region=REGION, static_credentials=Credentials(ACCESS_KEY, secret)
    )


def s3_snapshot(server: S3Server, bucket: str) -> dict[str, str]:
    """Every key in ``bucket`` with the MD5 of its content."""
    client = server.client()
    found: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            found[obj["Key"]] = hashlib.md5(body).hexdigest()
    return found


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file and directory below ``root`` (relative path -> MD5, or "dir"/"link")."""
    found: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link"
            elif path.is_dir():
                found[rel] = "dir"
            elif not path.is_file():
                found[rel] = "special"  # a FIFO or socket: never opened (it would block)
            else:
                try:
                    found[rel] = hashlib.md5(path.read_bytes()).hexdigest()
                except OSError:
                    found[rel] = "unreadable"
    return found


def put_object(server: S3Server, bucket: S3URL | str, key: str, data: bytes = b"x") -> None:
    name = bucket.bucket if isinstance(bucket, S3URL) else bucket
    server.client().put_object(Bucket=name, Key=key, Body=data)


def get_object(server: S3Server, bucket: S3URL | str, key: str) -> bytes:
    name = bucket.bucket if isinstance(bucket, S3URL) else bucket
    return server.client().get_object(Bucket=name, Key=key)["Body"].read()


#: Server x backend pairs: the fast run covers both servers and both backends; the rest are slow.
COMBOS = [
    pytest.param("moto", "boto3", id="moto-boto3"),
    pytest.param("rclone", "s5cmd", id="rclone-s5cmd"),
    pytest.param("moto", "s5cmd", id="moto-s5cmd", marks=pytest.mark.slow),
    pytest.param("rclone", "boto3", id="rclone-boto3", marks=pytest.mark.slow),
]


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Start fault proxies in front of a server; all are closed after the test."""
    proxies: list[FaultProxy] = []

    def make(server: S3Server, plan: FaultPlan | None = None, **options: float) -> FaultProxy:
        proxy = FaultProxy(server.endpoint_url, plan, **options)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
