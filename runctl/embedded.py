"""An embedded local S3 server (moto, on loopback) for the examples and ``runctl demo``; not for real data."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from runctl.config import Credentials, S3Config
from runctl.s3url import S3URL

#: Fixed throwaway credentials: moto accepts any, and they never leave the loopback interface.
ACCESS_KEY = "runctl-demo"
SECRET_KEY = "runctl-demo-secret"
REGION = "us-east-1"

log = logging.getLogger("runctl.embedded")


@dataclass(frozen=True)
class EmbeddedS3:
    """A running embedded server: its endpoint, its bucket, and the config to reach it.

    Example:
        >>> with embedded_s3(bucket="demo") as s3:  # doctest: +SKIP
        ...     print(s3.url("run-1/"))
        s3://demo/run-1/
    """

    endpoint_url: str
    bucket: str
    region: str = REGION
    credentials: Credentials = field(default=Credentials(ACCESS_KEY, SECRET_KEY), repr=False)

    def url(self, prefix: str = "") -> S3URL:
        """``s3://<bucket>/<prefix>`` on this server."""
        return S3URL(self.bucket, prefix)

    def config(self) -> S3Config:
        """An S3Config pointing at this server with its credentials."""
        return S3Config(
            endpoint_url=self.endpoint_url, region=self.region, static_credentials=self.credentials
        )

    def env(self) -> dict[str, str]:
        """Environment variables for a child process (a training script, the CLI) to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": self.credentials.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(
        f"the embedded S3 server did not listen on 127.0.0.1:{port} within {timeout:.0f}s"
    )


@contextmanager
def embedded_s3(bucket: str = "runctl-demo", port: int | None = None) -> Iterator[EmbeddedS3]:
    """Run moto's S3 server on 127.0.0.1 in this process, with ``bucket`` created; stop it on exit.

    Data lives in memory, in moto's state for this whole process: a second ``embedded_s3()`` in
    the same process (or any other moto server in it) sees the buckets of the first. It is gone
    when the process ends. (Resetting moto on exit would wipe the others' state too.)

    Raises:
        ImportError: moto is not installed (``pip install 'runctl[demo]'``).

    Example:
        >>> with embedded_s3() as s3:  # doctest: +SKIP
        ...     s3.config().boto_client().head_bucket(Bucket=s3.bucket)["ResponseMetadata"]["HTTPStatusCode"]
        200
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise ImportError(
            "the embedded S3 server needs moto; install it with: pip install 'runctl[demo]'"
        ) from exc

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port or _free_port(), verbose=False)
    server.start()
    try:
        host, bound = server.get_host_and_port()
        _wait_listening(bound)
        s3 = EmbeddedS3(endpoint_url=f"http://{host}:{bound}", bucket=bucket)
        s3.config().boto_client().create_bucket(Bucket=bucket)
        log.info("embedded S3 server at %s, bucket %s", s3.endpoint_url, bucket)
        yield s3
    finally:
        server.stop()
