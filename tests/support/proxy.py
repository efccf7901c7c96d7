"""A loopback HTTP reverse proxy that records requests and injects faults.

Put it between a client and a real server (moto) to see exactly what the client sent, and to
make the server look slow, flaky or broken::

    with FaultProxy(cloud.dest_url) as proxy:
        proxy.fault = FailNth(SLOW_DOWN, n=2, match=matching(method="PUT", query="partNumber"))
        ...  # point the worker's DestEndPointURL at proxy.endpoint_url
        assert not any("x-amz-checksum-crc32" in r.headers for r in proxy.requests)

``fault(request) -> action | None`` is called for every request after its body was read; the
actions are ``Respond``, ``Reset``, ``Delay`` and ``DropResponse``. ``fault`` may be replaced at
any time. Every request is recorded in ``requests`` with the action applied to it.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Union
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CLIENT_IDLE_TIMEOUT_S = 30.0  # a kept-alive client connection idle this long is closed
UPSTREAM_TIMEOUT_S = 60.0
MAX_BODY_CHUNKS = 1_000_000  # bound on chunks of one Transfer-Encoding: chunked body
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                        "expect"})


class Headers(Mapping):
    """Read-only, case-insensitive header mapping (the last value wins for repeated names)."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._items = {name.lower(): (name, value) for name, value in pairs}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the proxy received it. ``fault`` names the action applied, if any."""

    method: str
    path: str  # path and query string, as sent
    headers: Headers
    body_length: int
    at: float = field(default_factory=time.monotonic)
    fault: Optional[str] = None

    @property
    def url_path(self) -> str:
        """The path without the query string."""
        return urlsplit(self.path).path

    @property
    def query(self) -> dict[str, list[str]]:
        """The query string parsed; blank values kept: ``?uploads`` gives ``{"uploads": [""]}``."""
        return parse_qs(urlsplit(self.path).query, keep_blank_values=True)


# --------------------------------------------------------------------------------------------
# Actions a fault can return
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Respond:
    """Do not forward; answer with this status, body and headers."""

    status: int
    body: bytes = b""
    headers: Optional[Mapping[str, str]] = None


@dataclass(frozen=True)
class Reset:
    """Do not forward; reset the client connection (TCP RST) without any response."""


@dataclass(frozen=True)
class Delay:
    """Wait this many seconds (cut short by ``stop``), then forward as usual."""

    seconds: float


@dataclass(frozen=True)
class DropResponse:
    """Forward (the server acts on the request), then reset the client without replying."""


Action = Union[Respond, Reset, Delay, DropResponse]
Fault = Callable[[RecordedRequest], Optional[Action]]


def s3_error(status: int, code: str, message: str) -> Respond:
    """A ``Respond`` carrying an S3-style XML error document."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
    return Respond(status, body, {"Content-Type": "application/xml"})


SLOW_DOWN = s3_error(503, "SlowDown", "Please reduce your request rate.")
INTERNAL_ERROR = s3_error(500, "InternalError",
                          "We encountered an internal error. Please try again.")


# --------------------------------------------------------------------------------------------
# Ready-made faults
# --------------------------------------------------------------------------------------------
def matching(method: Optional[str] = None, path: Optional[str] = None,
             query: Optional[str] = None) -> Callable[[RecordedRequest], bool]:
    """A request predicate: ``method`` equal, ``path`` a substring of the URL path, ``query`` a
    query parameter present (e.g. ``"partNumber"``, ``"uploads"``, ``"uploadId"``)."""

    def check(request: RecordedRequest) -> bool:
        return ((method is None or request.method == method.upper())
                and (path is None or path in request.url_path)
                and (query is None or query in request.query))

    return check


def _any_request(request: RecordedRequest) -> bool:
    return True


class FailNth:
    """Apply ``action`` to the n-th matching request (1-based); ``n`` may be several numbers."""

    def __init__(self, action: Action, n: Union[int, Iterable[int]],
                 match: Callable[[RecordedRequest], bool] = _any_request) -> None:
        self.action = action
        self.numbers = frozenset([n] if isinstance(n, int) else n)
        self.match = match
        self.seen = 0
        self._lock = threading.Lock()

    def __call__(self, request: RecordedRequest) -> Optional[Action]:
        if not self.match(request):
            return None
        with self._lock:
            self.seen += 1
            return self.action if self.seen in self.numbers else None


class FailRandomly:
    """Apply ``action`` to each matching request with probability ``p`` (seeded, repeatable
    for one order of requests)."""

    def __init__(self, action: Action, p: float, seed: int = 0,
                 match: Callable[[RecordedRequest], bool] = _any_request) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be within [0, 1], got {p}")
        self.action = action
        self.p = p
        self.match = match
        self.failed = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, request: RecordedRequest) -> Optional[Action]:
        if not self.match(request):
            return None
        with self._lock:
            if self._random.random() >= self.p:
                return None
            self.failed += 1
            return self.action


# --------------------------------------------------------------------------------------------
# The proxy
# --------------------------------------------------------------------------------------------
class UpstreamError(Exception):
    """The upstream server could not be reached or broke the connection."""


class _Handler(BaseHTTPRequestHandler):
    """Handles one client connection (any number of kept-alive requests) on its own thread."""

    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered by parse_request
    timeout = CLIENT_IDLE_TIMEOUT_S
    server: "_Server"

    def setup(self) -> None:
        super().setup()
        self._upstream: Optional[http.client.HTTPConnection] = None
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        self.server.proxy._track(self.connection, False)
        if self._upstream is not None:
            self._upstream.close()
        try:
            super().finish()
        except OSError:
            pass  # the client is gone, nothing left to flush

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("proxy %s: " + format, self.address_string(), *args)

    def _proxy(self) -> None:
        """Read the request, ask the fault what to do, then do it."""
        body = self._read_body()
        action = self.server.proxy._decide(self.command, self.path, self.headers.items(),
                                           len(body))
        if isinstance(action, Delay):
            self.server.proxy._stopping.wait(action.seconds)
        if isinstance(action, Respond):
            headers = dict(action.headers or {})
            self._reply(action.status, "", list(headers.items()), action.body)
        elif isinstance(action, Reset):
            self._reset()
        else:
            self._forward(body, drop_response=isinstance(action, DropResponse))

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _proxy

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked(self) -> bytes:
        chunks = []
        for _ in range(MAX_BODY_CHUNKS):
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)  # CRLF after the chunk
        else:
            raise ValueError("chunked body has too many chunks")
        for _ in range(MAX_BODY_CHUNKS):  # trailers end with an empty line
            if self.rfile.readline(1024).strip() == b"":
                break
        return b"".join(chunks)

    def _forward(self, body: bytes, drop_response: bool) -> None:
        try:
            status, reason, headers, data = self._exchange(body)
        except UpstreamError as exc:
            logger.warning("proxy: upstream failed for %s %s: %s", self.command, self.path, exc)
            self._reply(502, "Bad Gateway", [("Content-Type", "text/plain")], str(exc).encode())
            return
        if drop_response:
            self._reset()
        else:
            self._reply(status, reason, headers, data)

    def _exchange(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream (retrying once on a stale kept-alive connection)."""
        headers = [(k, v) for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
        if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
            headers.append(("Content-Length", str(len(body))))
        for attempt in (1, 2):
            connection = self._upstream_connection()
            reused = connection.sock is not None
            try:
                connection.putrequest(self.command, self.path, skip_host=True,
                                      skip_accept_encoding=True)
                for name, value in headers:
                    connection.putheader(name, value)
                connection.endheaders(body or None)
                response = connection.getresponse()
                data = response.read()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                return response.status, response.reason, kept, data
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                if not reused or attempt == 2:
                    raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def _upstream_connection(self) -> http.client.HTTPConnection:
        if self._upstream is None:
            host, port = self.server.proxy.upstream
            self._upstream = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT_S)
        return self._upstream

    def _reply(self, status: int, reason: str, headers: list[tuple[str, str]],
               body: bytes) -> None:
        """Send a complete response; HEAD, 204 and 304 keep the upstream's Content-Length."""
        bodiless = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        self.send_response_only(status, reason or None)
        for name, value in headers:
            if bodiless or name.lower() != "content-length":
                self.send_header(name, value)
        if not bodiless:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not bodiless:
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close the client socket with a TCP RST and no response."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drop the makefile() reference so close() really closes
        self.connection.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins the handler threads

    def __init__(self, proxy: "FaultProxy") -> None:
        self.proxy = proxy
        super().__init__((LOOPBACK, 0), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        logger.debug("proxy: connection from %s ended with an error", client_address,
                     exc_info=True)


class FaultProxy:
    """Loopback reverse proxy to ``upstream_url`` with request recording and fault injection."""

    def __init__(self, upstream_url: str, fault: Optional[Fault] = None) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.fault = fault
        self._requests: list[RecordedRequest] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        if self._server is None:
            raise RuntimeError("proxy is not started")
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def start(self) -> FaultProxy:
        """Listen on a free loopback port and serve on a background thread."""
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open client connections, wait for handler threads. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            open_connections = list(self._connections)
        for connection in open_connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler
        server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _track(self, connection: socket.socket, is_open: bool) -> None:
        with self._lock:
            (self._connections.add if is_open else self._connections.discard)(connection)

    def _decide(self, method: str, path: str, headers: Iterable[tuple[str, str]],
                body_length: int) -> Optional[Action]:
        """Record the request and return the fault's action for it (faults never crash us)."""
        request = RecordedRequest(method, path, Headers(headers), body_length)
        action = None
        fault = self.fault
        if fault is not None:
            try:
                action = fault(request)
            except Exception:
                logger.exception("proxy: fault callable raised; forwarding %s %s", method, path)
        if action is not None:
            request = replace(request, fault=type(action).__name__)
        with self._lock:
            self._requests.append(request)
        return action
