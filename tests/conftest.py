"""Shared fixtures: real S3 servers on loopback, one bucket per test, both transfer backends."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from runctl.s3url import S3URL
from tests.servers import ACCESS_KEY, REGION, SECRET_KEY, S3Server, start_moto, start_rclone

SERVER_KINDS = ("moto", "rclone")
BACKENDS = ("s5cmd", "boto3")


@pytest.fixture(autouse=True)
def _forget_secrets_registered_by_the_test() -> Iterator[None]:
    """The scrub list is process-wide: a test's fake secret ("test") must not mask the next one's text."""
    from runctl import config

    with config._secrets_lock:
        before = set(config._secrets)
    yield
    with config._secrets_lock:
        config._secrets.intersection_update(before)


@pytest.fixture(autouse=True)
def _clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test sees the developer's AWS settings; each gets test credentials and its own lock dir."""
    for var in list(os.environ):
        if var.startswith(("AWS_", "S3_", "RUNCTL_")):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("RUNCTL_LOCK_DIR", str(tmp_path_factory.mktemp("locks")))


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_rclone(tmp_path_factory.mktemp("rclone-data"))
    yield server
    server.stop()


@pytest.fixture(params=SERVER_KINDS)
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """Each test using this runs once against moto and once against rclone."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def bucket(s3_server: S3Server) -> S3URL:
    """A fresh, empty bucket on the current server, as ``s3://name/``."""
    return S3URL(s3_server.new_bucket())


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def transfer(s3_server: S3Server, backend: str) -> Iterator[object]:
    """A transfer backend (s5cmd or boto3) pointed at the current server."""
    from runctl.transfer import get_transfer

    t = get_transfer(s3_server.config(), use_s5cmd=backend == "s5cmd")
    yield t
    t.close()
