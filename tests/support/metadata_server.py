"""A local stand-in for the instance metadata servers of GCE and EC2, on 127.0.0.1.

GCE (``Metadata-Flavor: Google`` required on requests, sent on answers), as google-auth and
3GSync use it::

    GET /                                                  ping (google-auth's GCE detection)
    GET /computeMetadata/v1/instance/name
    GET /computeMetadata/v1/project/project-id
    GET /computeMetadata/v1/instance/service-accounts/default/?recursive=true
    GET /computeMetadata/v1/instance/service-accounts/default/token   {"access_token", ...}
    GET /computeMetadata/v1/universe/universe-domain

EC2 with IMDSv2 required (a request without a valid session token answers 401)::

    PUT /latest/api/token            (X-aws-ec2-metadata-token-ttl-seconds)
    GET /latest/meta-data/instance-id
    GET /latest/meta-data/placement/region

Point clients at it with ``env()``: ``GCE_METADATA_HOST``/``GCE_METADATA_IP`` and
``AWS_EC2_METADATA_SERVICE_ENDPOINT``. Access tokens are handed out from ``tokens`` in order
(``(token, expires_in_s)``; the last one repeats). Every request is recorded.

``unresponsive_address()`` gives a loopback address that accepts connections and never
answers, for the "metadata server hangs" case.
"""
from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

LOOPBACK = "127.0.0.1"
GCE_PREFIX = "/computeMetadata/v1/"
SERVICE_ACCOUNT = "3gsync-worker@test-project.iam.gserviceaccount.com"


@dataclass(frozen=True)
class MetadataRequest:
    method: str
    path: str
    headers: dict[str, str]   # names in lower case

    @property
    def url_path(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        owner = self.server.owner
        request = MetadataRequest(self.command, self.path,
                                  {k.lower(): v for k, v in self.headers.items()})
        with owner._lock:
            owner.requests.append(request)
        path = request.url_path
        if path == "/" or path.startswith(GCE_PREFIX):
            self._gce(owner, request)
        elif path.startswith("/latest/"):
            self._ec2(owner, request)
        else:
            self._reply(404, "not found")

    # -- GCE ---------------------------------------------------------------------------------
    def _gce(self, owner: "MetadataServer", request: MetadataRequest) -> None:
        if request.headers.get("metadata-flavor") != "Google":
            self._reply(403, "Missing Metadata-Flavor:Google header.", google=True)
            return
        path = request.url_path
        if path == "/":
            self._reply(200, "computeMetadata/\n", google=True)
            return
        item = path[len(GCE_PREFIX):]
        prefix = "instance/service-accounts/"
        account, _, rest = item[len(prefix):].partition("/") if item.startswith(prefix) \
            else ("", "", "")
        if item == "instance/name":
            self._reply(200, owner.instance_name, google=True)
        elif item == "project/project-id":
            self._reply(200, owner.project_id, google=True)
        elif item == "universe/universe-domain":
            self._reply(200, "googleapis.com", google=True)
        elif account not in ("default", SERVICE_ACCOUNT):
            self._reply(404, "not found", google=True)
        elif rest == "":
            self._reply(200, json.dumps({"email": SERVICE_ACCOUNT, "aliases": ["default"],
                                         "scopes": owner.scopes}),
                        google=True, content_type="application/json")
        elif rest == "email":
            self._reply(200, SERVICE_ACCOUNT, google=True)
        elif rest == "token":
            token, expires_in = owner._next_token()
            self._reply(200, json.dumps({"access_token": token, "expires_in": expires_in,
                                         "token_type": "Bearer"}),
                        google=True, content_type="application/json")
        else:
            self._reply(404, "not found", google=True)

    # -- EC2 ---------------------------------------------------------------------------------
    def _ec2(self, owner: "MetadataServer", request: MetadataRequest) -> None:
        path = request.url_path
        if path == "/latest/api/token":
            if request.method != "PUT" or "x-aws-ec2-metadata-token-ttl-seconds" not in \
                    request.headers:
                self._reply(400, "bad token request")
                return
            self._reply(200, owner.ec2_token)
            return
        if request.headers.get("x-aws-ec2-metadata-token") != owner.ec2_token:
            self._reply(401, "")
            return
        answers = {"/latest/meta-data/instance-id": owner.instance_id,
                   "/latest/meta-data/placement/region": owner.region}
        if path in answers:
            self._reply(200, answers[path])
        else:
            self._reply(404, "not found")

    def _reply(self, status: int, body: str, google: bool = False,
               content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        if google and self.server.owner.gce_flavor:
            self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: "MetadataServer"):
        self.owner = owner
        super().__init__((LOOPBACK, 0), _Handler)


class MetadataServer:
    """GCE and EC2 (IMDSv2) metadata on a free loopback port, as a context manager."""

    def __init__(self, instance_name: str = "gce-worker-7", project_id: str = "test-project",
                 instance_id: str = "i-0123456789abcdef0", region: str = "us-east-1",
                 tokens: list[tuple[str, int]] | None = None,
                 scopes: list[str] | None = None, gce_flavor: bool = True):
        self.instance_name = instance_name
        self.project_id = project_id
        self.instance_id = instance_id
        self.region = region
        self.tokens = list(tokens or [("ya29.token-1", 3599)])
        self.scopes = scopes or ["https://www.googleapis.com/auth/cloud-platform"]
        self.gce_flavor = gce_flavor   # False: answer GCE paths as some other server would
        self.ec2_token = "imds-" + secrets.token_hex(8)
        self.requests: list[MetadataRequest] = []
        self.tokens_issued: list[str] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``"""
        return f"{LOOPBACK}:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def env(self) -> dict[str, str]:
        """Variables that send google-auth, botocore and 3GSync here (and nowhere else)."""
        return {"GCE_METADATA_HOST": self.host, "GCE_METADATA_IP": self.host,
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.url,
                "AWS_EC2_METADATA_DISABLED": "false"}

    def _next_token(self) -> tuple[str, int]:
        with self._lock:
            token, expires_in = self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]
            self.tokens_issued.append(token)
            return token, expires_in

    def paths(self) -> list[str]:
        with self._lock:
            return [request.url_path for request in self.requests]

    def start(self) -> "MetadataServer":
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name="metadata-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "MetadataServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def unresponsive_address() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a socket that accepts connections (the kernel completes them into
    the backlog) and never answers a byte."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(16)
        yield f"{LOOPBACK}:{sock.getsockname()[1]}"


def closed_address() -> str:
    """``127.0.0.1:PORT`` where nothing listens (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return f"{LOOPBACK}:{sock.getsockname()[1]}"
