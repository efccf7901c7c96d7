"""A GCP Secret Manager stand-in: an in-process gRPC server on 127.0.0.1 that implements
``AccessSecretVersion`` with the message classes of ``google.cloud.secretmanager_v1`` (SPEC 14).

A worker reaches it with ``SECRET_MANAGER_EMULATOR_HOST=<address>``::

    with SecretManagerServer({"projects/p/secrets/creds/versions/1": b"{...}"}) as server:
        env["SECRET_MANAGER_EMULATOR_HOST"] = server.address

Versions behave as Secret Manager's: ``latest`` is the highest numbered version of a secret; a
name that is not stored answers NOT_FOUND; ``deny`` makes a name answer PERMISSION_DENIED.
Every request is recorded (``requests``) with its gRPC metadata.
"""
from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import google_crc32c
import grpc
from google.cloud.secretmanager_v1 import (AccessSecretVersionRequest,
                                           AccessSecretVersionResponse, SecretPayload)

SERVICE = "google.cloud.secretmanager.v1.SecretManagerService"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RecordedCall:
    name: str
    metadata: tuple[tuple[str, str], ...]


class SecretManagerServer:
    """``AccessSecretVersion`` over plain gRPC on a free loopback port."""

    def __init__(self, secrets: dict[str, bytes | str] | None = None,
                 deny: frozenset[str] = frozenset(), corrupt_checksum: bool = False):
        self.secrets = {name: value.encode() if isinstance(value, str) else value
                        for name, value in (secrets or {}).items()}
        self.deny = deny
        self.corrupt_checksum = corrupt_checksum
        self.requests: list[RecordedCall] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> "SecretManagerServer":
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "AccessSecretVersion": grpc.unary_unary_rpc_method_handler(
                self._access,
                request_deserializer=AccessSecretVersionRequest.deserialize,
                response_serializer=AccessSecretVersionResponse.serialize),
        })
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port(f"{LOOPBACK}:0")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> "SecretManagerServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _resolve(self, name: str) -> str | None:
        """The stored version ``name`` refers to (``latest``: the highest number)."""
        if name in self.secrets:
            return name
        secret, _, version = name.rpartition("/versions/")
        if version != "latest":
            return None
        numbered = [stored for stored in self.secrets
                    if stored.startswith(secret + "/versions/")
                    and stored.rpartition("/")[2].isdigit()]
        return max(numbered, key=lambda stored: int(stored.rpartition("/")[2]), default=None)

    def _access(self, request: AccessSecretVersionRequest,
                context: grpc.ServicerContext) -> AccessSecretVersionResponse:
        with self._lock:
            self.requests.append(RecordedCall(request.name, tuple(
                (item.key, str(item.value)) for item in context.invocation_metadata())))
        if request.name in self.deny:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"Permission 'secretmanager.versions.access' denied for resource "
                          f"'{request.name}'")
        stored = self._resolve(request.name)
        if stored is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Secret Version [{request.name}] not found.")
        data = self.secrets[stored]
        checksum = google_crc32c.value(data) ^ (1 if self.corrupt_checksum else 0)
        return AccessSecretVersionResponse(
            name=stored, payload=SecretPayload(data=data, data_crc32c=checksum))
