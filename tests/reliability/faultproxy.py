"""A fault-injecting HTTP proxy on loopback: 500s, 503 SlowDown, connection resets and stalls, seeded."""

from __future__ import annotations

import datetime
import email.utils
import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

#: Fault kinds the proxy can inject.
KINDS = ("error500", "slowdown", "reset", "stall")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}
_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<RequestId>faultproxy</RequestId></Error>"
)


@dataclass
class Rule:
    """Fail the first ``count`` requests whose method and path match, with ``kind``."""

    kind: str
    count: int
    method: str | None = None
    path_contains: str | None = None
    used: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.used >= self.count:
            return False
        if self.method and method != self.method:
            return False
        return not (self.path_contains and self.path_contains not in path)


@dataclass
class FaultPlan:
    """Per-request fault probabilities (seeded), plus deterministic rules tried first.

    ``max_faults`` bounds the random faults in total and ``max_consecutive`` in a row, so a
    client that retries a few times always gets through.

    Example:
        >>> plan = FaultPlan(seed=1, probabilities={"error500": 0.1, "reset": 0.05})
        >>> plan.choose("GET", "/b/k") in (None, "error500", "reset")
        True
    """

    seed: int = 0
    probabilities: dict[str, float] = field(default_factory=dict)
    max_faults: int = 1_000
    max_consecutive: int = 2
    stall_seconds: float = 1.5
    rules: list[Rule] = field(default_factory=list)
    #: Only requests with these methods get random faults (None: every method).
    methods: frozenset[str] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.probabilities) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use {KINDS}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._faults = 0
        self._consecutive = 0

    def choose(self, method: str, path: str) -> str | None:
        """The fault for this request, or None to forward it untouched."""
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.used += 1
                    return rule.kind
            draw = self._rng.random()
            if self.methods is not None and method not in self.methods:
                self._consecutive = 0
                return None
            if self._faults >= self.max_faults or self._consecutive >= self.max_consecutive:
                self._consecutive = 0
                return None
            edge = 0.0
            for kind in KINDS:
                edge += self.probabilities.get(kind, 0.0)
                if draw < edge:
                    self._faults += 1
                    self._consecutive += 1
                    return kind
            self._consecutive = 0
            return None


class FaultProxy:
    """A threaded HTTP/1.1 proxy in front of one upstream S3 endpoint, injecting faults.

    The Host header is passed through unchanged, so SigV4 signatures made for the proxy's
    address stay valid upstream. ``counts`` tallies what happened (faults by kind, "forwarded").

    Example:
        >>> with FaultProxy("http://127.0.0.1:9000", FaultPlan(seed=3)) as proxy:  # doctest: +SKIP
        ...     client = boto3.client("s3", endpoint_url=proxy.url)
    """

    def __init__(
        self, upstream: str, plan: FaultPlan | None = None, *, clock_ahead: float = 0.0
    ) -> None:
        parts = urlsplit(upstream)
        #: Seconds added to every LastModified and Last-Modified the server answers: a server
        #: whose clock runs ahead of this machine's (or S3 rounding up to the next second).
        self.clock_ahead = clock_ahead
        #: Which keys (or request paths) ``clock_ahead`` dates ahead; None: all of them.
        self.dated_ahead: Callable[[str], bool] | None = None
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.plan = plan or FaultPlan()
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome)
        self._lock = threading.Lock()
        self.on_request: Callable[[str, str], None] | None = None
        #: (method, path, body) -> the body sent back instead (a server that answers wrong).
        self.rewrite: Callable[[str, str, bytes], bytes] | None = None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def faults(self) -> int:
        with self._lock:
            return sum(n for kind, n in self.counts.items() if kind in KINDS)

    def _note(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self.log.append((method, path, outcome))

    # -- one request ------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = _read_chunked(h)
        if self.on_request is not None:
            self.on_request(method, path)
        kind = self.plan.choose(method, path)
        if kind == "reset":
            self._note(method, path, kind)
            _reset(h.connection)
            h.close_connection = True
            return
        if kind == "fake200":  # a gateway that answers a PUT and never stores it
            self._note(method, path, kind)
            h.send_response(200)
            h.send_header("ETag", '"00000000000000000000000000000000"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if kind in ("error500", "slowdown", "expired"):
            self._note(method, path, kind)
            status, code, message = {
                "error500": (500, "InternalError", "injected internal error"),
                "slowdown": (503, "SlowDown", "Please reduce your request rate."),
                "expired": (403, "ExpiredToken", "The provided token has expired."),
            }[kind]
            payload = _XML.format(code=code, message=message).encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(payload)
            return
        if kind == "stall":
            self._note(method, path, kind)
            time.sleep(self.plan.stall_seconds)
        try:
            status, reason, headers, data = self._forward(h, method, path, body)
        except OSError:
            self._note(method, path, "upstream-down")
            _reset(h.connection)
            h.close_connection = True
            return
        self._note(method, path, "forwarded")
        if self.rewrite is not None:
            data = self.rewrite(method, path, data)
        if self.clock_ahead:
            headers, data = _ahead(headers, data, self.clock_ahead, path, self.dated_ahead)
        h.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() not in (
                "content-length",
                "date",
                "server",
            ):
                h.send_header(name, value)
        # HEAD keeps the object's real length: clients read the size from it.
        upstream_length = next((v for k, v in headers if k.lower() == "content-length"), "0")
        h.send_header("Content-Length", upstream_length if method == "HEAD" else str(len(data)))
        h.end_headers()
        if method != "HEAD" and data:
            h.wfile.write(data)

    def _forward(
        self, h: BaseHTTPRequestHandler, method: str, path: str, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in h.headers.items():
                low = name.lower()
                if low in _HOP_BY_HOP or low in ("content-length", "expect"):
                    continue
                conn.putheader(name, value)
            if body or method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
            headers = resp.getheaders()
            return resp.status, resp.reason, headers, data
        finally:
            conn.close()


_LAST_MODIFIED = re.compile(rb"<LastModified>([^<]+)</LastModified>")


_CONTENTS = re.compile(rb"<Contents>.*?</Contents>", re.DOTALL)
_KEY = re.compile(rb"<Key>([^<]*)</Key>")


def _ahead(
    headers: list[tuple[str, str]],
    data: bytes,
    seconds: float,
    path: str,
    which: Callable[[str], bool] | None,
) -> tuple[list[tuple[str, str]], bytes]:
    """The response as a server ``seconds`` ahead would date it (listings and HEAD/GET).

    ``which(key)`` picks the objects so dated (a HEAD or GET by its request path); None: all.
    """
    shift = datetime.timedelta(seconds=seconds)

    def later(match: re.Match[bytes]) -> bytes:
        when = datetime.datetime.fromisoformat(match.group(1).decode().replace("Z", "+00:00"))
        stamp = (when + shift).astimezone(datetime.timezone.utc)
        return b"<LastModified>" + stamp.strftime("%Y-%m-%dT%H:%M:%S.000Z").encode() + b"</LastModified>"

    def entry(match: re.Match[bytes]) -> bytes:
        block = match.group(0)
        key = _KEY.search(block)
        if which is None or (key is not None and which(key.group(1).decode())):
            return _LAST_MODIFIED.sub(later, block)
        return block

    out = []
    for name, value in headers:
        if name.lower() == "last-modified" and (which is None or which(path)):
            value = email.utils.format_datetime(email.utils.parsedate_to_datetime(value) + shift, usegmt=True)
        out.append((name, value))
    return out, _CONTENTS.sub(entry, data)


def _read_chunked(h: BaseHTTPRequestHandler) -> bytes:
    chunks = []
    while True:
        size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        chunks.append(h.rfile.read(size))
        h.rfile.readline()


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer sees a TCP reset, not a clean close."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
