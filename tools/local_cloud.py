"""A local stand-in for the clouds 3GSync talks to: two moto servers on 127.0.0.1.

``LocalCloud`` starts (or borrows) two moto server processes:

* ``aws``  - the source side: S3 source bucket, SQS queue + dead-letter queue, DynamoDB table,
  SSM parameters. A worker reaches it through botocore's ``AWS_ENDPOINT_URL``.
* ``dest`` - an S3-compatible destination standing in for GCS's XML API (``DestEndPointURL``).

It is used by the test fixtures, by ``tools/local_sync.py`` (the embedded local default, SPEC 13)
and by the benchmark. Nothing here talks to anything but 127.0.0.1.

What moto server (5.2) S3 -> SQS notifications look like, measured here:

* ``PutBucketNotificationConfiguration`` itself sends ``{"Service": "Amazon S3", "Event":
  "s3:TestEvent", "Time": ..., "Bucket": ...}`` to the queue, like real S3. ``LocalCloud`` removes
  it again so every test starts with an empty queue.
* Every message holds exactly one record: ``{"eventVersion": "2.1", "eventSource": "aws:s3",
  "awsRegion", "eventTime", "eventName": "ObjectCreated:Put", "s3": {"s3SchemaVersion",
  "configurationId", "bucket": {"name", "arn"}, "object": {"key", "size", "eTag"}}}``.
  There is no ``versionId`` (even on a versioned bucket), no ``sequencer``, no ``userIdentity``,
  ``requestParameters`` or ``responseElements``.
* The key is encoded with ``quote_plus`` and *nothing* kept safe: space -> ``+``, ``+`` ->
  ``%2B``, ``/`` -> ``%2F``, UTF-8 bytes -> ``%C3%BC``, ``%`` -> ``%25``, ``?`` -> ``%3F``.
  Real S3 leaves ``/`` unencoded; ``unquote_plus`` decodes both.
* A multipart upload produces TWO events: ``ObjectCreated:Put`` and then
  ``ObjectCreated:CompleteMultipartUpload``, both with the final size and the ``-N`` ETag
  (real S3 sends only the second): duplicate deliveries come for free.
  ``CopyObject`` gives ``ObjectCreated:Copy``.
* ``DeleteObject`` on an unversioned bucket gives ``ObjectRemoved:Delete`` (with size and eTag);
  on a versioned bucket (delete marker) nothing is sent at all.
* Delivery is synchronous: the message is in the queue when the S3 call returns. No queue policy
  is needed (moto does not check one).

Other moto facts that shaped this module: an SQS message received ``maxReceiveCount`` times is
moved to the dead-letter queue on the next receive; ``GetParameter`` on a SecureString without
``WithDecryption=True`` returns ``kms:alias/aws/ssm:<value>``; ``POST /moto-api/reset`` empties a
server in a few milliseconds, which lets the tests share two servers across the whole session.
"""

from __future__ import annotations

import configparser
import functools
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, TypeVar
from urllib.parse import quote_plus

import boto3
import botocore.session
from botocore.config import Config

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"
AWS_TEST_KEY = "testing"
DEST_ACCESS_KEY_ID = "dest-access-key"
DEST_SECRET_ACCESS_KEY = "dest-secret-key"
BUCKET_PARAMETER = "s3_migration_bucket_para"
MiB = 1024 * 1024

T = TypeVar("T")


def poll_until(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy and return that.

    Bounded in time (``timeout_s``) and in count; raises ``TimeoutError`` naming ``what``.
    Only for states nobody can signal (a server coming up, a remote queue's depth).
    """
    attempts = max(1, math.ceil(timeout_s / interval_s)) + 1
    deadline = time.monotonic() + timeout_s
    for _ in range(attempts):
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not reached within {timeout_s} s")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# Runs ``python -m moto.server ARGS`` after starting a thread that SIGTERMs the server once
# its stdin reaches end-of-file, i.e. once the process that started it is gone.
_LAUNCHER = """\
import os, runpy, signal, sys, threading
def stop_when_parent_is_gone():
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=stop_when_parent_is_gone, daemon=True).start()
sys.argv[0] = "moto.server"
runpy.run_module("moto.server", run_name="__main__", alter_sys=True)
"""

# Never route loopback requests through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerExited(RuntimeError):
    """The server process ended before it answered (usually: its port was taken meanwhile)."""


# --------------------------------------------------------------------------------------------
# One moto server process
# --------------------------------------------------------------------------------------------
class MotoServer:
    """``python -m moto.server`` on a free loopback port, as a context manager.

    The port is chosen by the OS; if another process takes it before moto binds it, moto exits
    and ``start`` tries again with a new port (``START_ATTEMPTS`` times).
    """

    START_ATTEMPTS = 3
    STOP_TIMEOUT_S = 5.0

    def __init__(self, name: str = "moto", log_path: Path | None = None,
                 startup_timeout_s: float = 30.0) -> None:
        self.name = name
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        if self.port is None:
            raise RuntimeError(f"{self.name} server is not started")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the server, or None when not running."""
        return self._proc.pid if self._proc else None

    def launch(self) -> None:
        """Spawn the process on a free port without waiting for it (``start`` waits)."""
        if self._proc is None:
            self._spawn(free_loopback_port())

    def start(self) -> MotoServer:
        """Launch the process if needed and wait until it answers HTTP; returns self."""
        for attempt in range(1, self.START_ATTEMPTS + 1):
            self.launch()
            try:
                poll_until(self._answers, self.startup_timeout_s, f"{self.name} server start")
            except ServerExited:
                logger.warning("%s server exited at start (attempt %d), retrying on another port",
                               self.name, attempt)
                self.stop()
                continue
            except BaseException:
                self.stop()
                raise
            logger.info("%s server ready at %s (pid %s)", self.name, self.endpoint_url, self.pid)
            return self
        where = f"; see {self.log_path}" if self.log_path else ""
        raise RuntimeError(f"{self.name} server did not start in {self.START_ATTEMPTS} attempts"
                           f"{where}")

    def _spawn(self, port: int) -> None:
        """Launch the process on ``port``; its output goes to the log file or nowhere.

        Its stdin is a pipe this process never writes to: when this process ends, however it
        ends (even SIGKILL), the pipe closes and the server stops itself.
        """
        command = [sys.executable, "-c", _LAUNCHER, "-H", LOOPBACK, "-p", str(port)]
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log,
                                              stderr=subprocess.STDOUT)
        else:
            self._proc = subprocess.Popen(command, stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = port

    def _answers(self) -> bool:
        """True once the server answers an HTTP request (S3 ListBuckets on ``/``)."""
        if self._proc is None or self._proc.poll() is not None:
            raise ServerExited(f"{self.name} server exited")
        try:
            with _DIRECT.open(self.endpoint_url + "/", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def reset(self) -> None:
        """Forget every resource on the server (moto's ``/moto-api/reset``)."""
        request = urllib.request.Request(self.endpoint_url + "/moto-api/reset", data=b"",
                                         method="POST")
        with _DIRECT.open(request, timeout=10) as response:
            response.read()

    def terminate(self) -> None:
        """Ask the process to exit (SIGTERM) without waiting; ``stop`` then waits for it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def stop(self) -> None:
        """Terminate the process (kill it if it does not stop in time). Idempotent."""
        proc, self._proc, self.port = self._proc, None, None
        if proc is None:
            return
        proc.stdin.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.STOP_TIMEOUT_S)
        logger.info("%s server stopped", self.name)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServerPair(NamedTuple):
    """The two servers of a LocalCloud: ``aws`` (source side) and ``dest`` (GCS stand-in)."""

    aws: MotoServer
    dest: MotoServer


def start_server_pair(log_dir: Path | None = None) -> ServerPair:
    """Start the ``aws`` and ``dest`` servers side by side; the caller stops them."""
    pair = ServerPair(*(MotoServer(name, log_dir / f"moto-{name}.log" if log_dir else None)
                        for name in ServerPair._fields))
    try:
        for server in pair:
            server.launch()
        for server in pair:
            server.start()
    except BaseException:
        stop_servers(pair)
        raise
    return pair


def stop_servers(servers: Iterable[MotoServer]) -> None:
    """Stop several servers side by side (each takes ~0.25 s to exit after SIGTERM)."""
    servers = list(servers)
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop()


# --------------------------------------------------------------------------------------------
# Clients and settings
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def isolated_session() -> boto3.Session:
    """A boto3 session that ignores AWS_PROFILE and the user's ~/.aws files.

    Shared (built once): its loaded service models make each further client cheap.
    """
    core = botocore.session.Session(session_vars={
        "profile": (None, None, None, None),
        "config_file": (None, None, os.devnull, None),
        "credentials_file": (None, None, os.devnull, None),
    })
    return boto3.Session(botocore_session=core, region_name=REGION)


@dataclass(frozen=True)
class Clients:
    """boto3 clients on the local servers (path-style S3, region us-east-1, no proxy)."""

    src_s3: Any
    dest_s3: Any
    sqs: Any
    dynamodb: Any
    ssm: Any

    @classmethod
    def for_servers(cls, aws_url: str, dest_url: str) -> Clients:
        """Build every client; the destination one sends no flexible checksums (as the worker)."""
        session = isolated_session()
        base = Config(s3={"addressing_style": "path"}, proxies={}, retries={"mode": "standard"})
        dest = base.merge(Config(request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required"))

        def make(service: str, url: str, config: Config = base) -> Any:
            return session.client(service, endpoint_url=url, aws_access_key_id=AWS_TEST_KEY,
                                  aws_secret_access_key=AWS_TEST_KEY, config=config)

        return cls(src_s3=make("s3", aws_url), dest_s3=make("s3", dest_url, dest),
                   sqs=make("sqs", aws_url), dynamodb=make("dynamodb", aws_url),
                   ssm=make("ssm", aws_url))


# The seed's ini keys, in the seed's sections and order. Values filled in by LocalCloud.
SEED_KEYS: dict[str, tuple[str, ...]] = {
    "Basic": ("SrcEndPointURL", "DestEndPointURL", "JobType", "table_queue_name",
              "sqs_queue_name", "ssm_parameter_bucket", "ssm_parameter_credentials",
              "Des_bucket_default", "Des_prefix_default"),
    "Mode": ("StorageClass", "ResumableThreshold", "MaxRetry", "MaxThread", "MaxParallelFile",
             "JobTimeout", "JobsenderCompareVersionId", "UpdateVersionId",
             "GetObjectWithVersionId"),
    "Debug": ("CleanUnfinishedUpload", "LoggingLevel", "LocalProfileMode", "ifVerifyMD5Twice",
              "ChunkSize"),
}
# Keys 3GSync added to the seed's set; anything else unknown goes to [Mode].
NEW_KEY_SECTIONS = {"VisibilityHeartbeat": "Mode", "ShutdownGrace": "Mode",
                    "PropagateDeletes": "Mode", "LogFormat": "Debug", "MetricsPort": "Debug"}


def _ini_value(value: object) -> str:
    """Render a Python value the way the seed's ini spells it (True/False, plain numbers)."""
    return "" if value is None else str(value)


class QueueDepths(NamedTuple):
    """Approximate message counts: visible and in flight on the queue, visible on the DLQ."""

    visible: int
    in_flight: int
    dlq_visible: int


def s3_event(bucket: str, key: str, size: int, *, version_id: str | None = None,
             event_name: str = "ObjectCreated:Put", etag: str | None = None) -> dict:
    """An S3 event notification body as real S3 sends it (key encoded, ``/`` kept).

    For cases moto's own notifications cannot produce (``versionId``, deletes on a
    versioned bucket): send the result with ``LocalCloud.send_message``.
    """
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/"), "size": size}
    if etag is not None:
        obj["eTag"] = etag
    if version_id is not None:
        obj["versionId"] = version_id
    record = {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": REGION,
              "eventName": event_name,
              "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket,
                                                          "arn": f"arn:aws:s3:::{bucket}"},
                     "object": obj}}
    return {"Records": [record]}


# --------------------------------------------------------------------------------------------
# The local cloud
# --------------------------------------------------------------------------------------------
class LocalCloud:
    """Two moto servers provisioned the way a 3GSync PUT-mode deployment expects.

    Pass ``servers`` (a running ``ServerPair``) to borrow servers: they are reset on start and
    left running on close. Otherwise the cloud starts its own and stops them on close.
    ``log_dir`` receives the moto logs of servers it starts.
    """

    def __init__(self, src_bucket: str = "src-bucket", dest_bucket: str = "dest-bucket",
                 queue_name: str = "s3_migration_file_list",
                 table_name: str = "s3_migration_file_list", max_receive_count: int = 3,
                 visibility_timeout_s: int = 60,
                 credentials_parameter: str = "s3_migration_credentials", notify: bool = True,
                 versioned: bool = False, *, servers: ServerPair | None = None,
                 log_dir: Path | None = None) -> None:
        self.src_bucket = src_bucket
        self.dest_bucket = dest_bucket
        self.queue_name = queue_name
        self.dlq_name = queue_name + "_deadletter"
        self.table_name = table_name
        self.max_receive_count = max_receive_count
        self.visibility_timeout_s = visibility_timeout_s
        self.credentials_parameter = credentials_parameter
        self.notify = notify
        self.versioned = versioned
        self.log_dir = Path(log_dir) if log_dir else None
        self._borrowed = servers
        self.servers: ServerPair | None = None
        self.clients: Clients | None = None
        self.queue_url = ""
        self.dlq_url = ""

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> LocalCloud:
        """Start (or reset borrowed) servers and create every resource; returns self."""
        if self._borrowed:
            for server in self._borrowed:
                server.reset()
            self.servers = self._borrowed
        else:
            self.servers = start_server_pair(self.log_dir)
        try:
            self.clients = Clients.for_servers(self.aws_url, self.dest_url)
            self._provision()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the servers this cloud started (borrowed ones keep running)."""
        if self.servers and not self._borrowed:
            stop_servers(self.servers)
        self.servers = None

    def __enter__(self) -> LocalCloud:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def aws_url(self) -> str:
        """Endpoint of the source side (S3, SQS, DynamoDB, SSM)."""
        return self._running().aws.endpoint_url

    @property
    def dest_url(self) -> str:
        """Endpoint of the S3-compatible destination."""
        return self._running().dest.endpoint_url

    def _running(self) -> ServerPair:
        if self.servers is None:
            raise RuntimeError("LocalCloud is not started")
        return self.servers

    def _provision(self) -> None:
        """Create buckets, queue + DLQ, table, SSM parameters and the bucket notification."""
        c = self.clients
        c.src_s3.create_bucket(Bucket=self.src_bucket)
        c.dest_s3.create_bucket(Bucket=self.dest_bucket)
        if self.versioned:
            c.src_s3.put_bucket_versioning(Bucket=self.src_bucket,
                                           VersioningConfiguration={"Status": "Enabled"})
        self.dlq_url = c.sqs.create_queue(QueueName=self.dlq_name)["QueueUrl"]
        redrive = {"deadLetterTargetArn": self._queue_arn(self.dlq_url),
                   "maxReceiveCount": str(self.max_receive_count)}
        self.queue_url = c.sqs.create_queue(QueueName=self.queue_name, Attributes={
            "VisibilityTimeout": str(self.visibility_timeout_s),
            "RedrivePolicy": json.dumps(redrive)})["QueueUrl"]
        c.dynamodb.create_table(TableName=self.table_name, BillingMode="PAY_PER_REQUEST",
                                AttributeDefinitions=[{"AttributeName": "Key",
                                                       "AttributeType": "S"}],
                                KeySchema=[{"AttributeName": "Key", "KeyType": "HASH"}])
        c.ssm.put_parameter(Name=self.credentials_parameter, Type="SecureString",
                            Value=json.dumps({"aws_access_key_id": DEST_ACCESS_KEY_ID,
                                              "aws_secret_access_key": DEST_SECRET_ACCESS_KEY,
                                              "region": REGION}))
        c.ssm.put_parameter(Name=BUCKET_PARAMETER, Type="String", Value=json.dumps(
            [{"src_bucket": self.src_bucket, "src_prefix": "",
              "des_bucket": self.dest_bucket, "des_prefix": ""}]))
        if self.notify:
            self._wire_notification()

    def _queue_arn(self, queue_url: str) -> str:
        return self.clients.sqs.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]

    def _wire_notification(self) -> None:
        """Send the source bucket's ObjectCreated:* events to the queue; drop S3's test event."""
        self.clients.src_s3.put_bucket_notification_configuration(
            Bucket=self.src_bucket, NotificationConfiguration={"QueueConfigurations": [
                {"QueueArn": self._queue_arn(self.queue_url), "Events": ["s3:ObjectCreated:*"]}]})
        self.clients.sqs.purge_queue(QueueUrl=self.queue_url)

    # -- worker configuration ----------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment variables a worker subprocess needs to reach this cloud.

        Merge over a base from which every other ``AWS_*`` variable was removed (see
        ``subprocess_env``): an inherited ``AWS_PROFILE`` or ``AWS_ENDPOINT_URL_S3`` would
        otherwise still apply.
        """
        no_proxy = f"{LOOPBACK},localhost"
        return {"AWS_ENDPOINT_URL": self.aws_url, "AWS_ACCESS_KEY_ID": AWS_TEST_KEY,
                "AWS_SECRET_ACCESS_KEY": AWS_TEST_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "NO_PROXY": no_proxy,
                "no_proxy": no_proxy}

    def subprocess_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) without any ``AWS_*`` variable, plus ``env()``."""
        base = dict(os.environ if base is None else base)
        return {k: v for k, v in base.items() if not k.startswith("AWS_")} | self.env()

    def ini_values(self) -> dict[str, dict[str, str]]:
        """The worker ini this cloud needs, as {section: {key: value}} in the seed's order."""
        values = {
            "SrcEndPointURL": self.aws_url, "DestEndPointURL": self.dest_url, "JobType": "PUT",
            "table_queue_name": self.table_name, "sqs_queue_name": self.queue_name,
            "ssm_parameter_bucket": BUCKET_PARAMETER,
            "ssm_parameter_credentials": self.credentials_parameter,
            "Des_bucket_default": self.dest_bucket, "Des_prefix_default": "",
            "StorageClass": "STANDARD", "ResumableThreshold": 5, "MaxRetry": 3, "MaxThread": 4,
            "MaxParallelFile": 4, "JobTimeout": 600, "JobsenderCompareVersionId": False,
            "UpdateVersionId": False, "GetObjectWithVersionId": False,
            "CleanUnfinishedUpload": False, "LoggingLevel": "INFO", "LocalProfileMode": False,
            "ifVerifyMD5Twice": False, "ChunkSize": 5,
        }
        return {section: {key: _ini_value(values[key]) for key in keys}
                for section, keys in SEED_KEYS.items()}

    def write_config(self, path: str | Path, **overrides: object) -> Path:
        """Write a worker ini with every seed key; ``overrides`` maps key name -> value.

        Key names match the seed's case-insensitively. A key the seed does not have goes to
        the section ``NEW_KEY_SECTIONS`` names, or to [Mode].
        """
        sections = self.ini_values()
        where = {key.lower(): (section, key)
                 for section, keys in sections.items() for key in keys}
        for name, value in overrides.items():
            section, key = where.get(name.lower(), (NEW_KEY_SECTIONS.get(name, "Mode"), name))
            sections[section][key] = _ini_value(value)
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # keep the seed's key case
        parser.read_dict(sections)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            parser.write(f)
        return path

    # -- queue helpers -----------------------------------------------------------------------
    def queue_depths(self) -> QueueDepths:
        """(visible, in flight, DLQ visible), from ApproximateNumberOf* attributes."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        main = self.clients.sqs.get_queue_attributes(QueueUrl=self.queue_url,
                                                     AttributeNames=names)["Attributes"]
        dlq = self.clients.sqs.get_queue_attributes(QueueUrl=self.dlq_url,
                                                    AttributeNames=names[:1])["Attributes"]
        return QueueDepths(int(main[names[0]]), int(main[names[1]]), int(dlq[names[0]]))

    def wait_for_queue_depth(self, n: int, timeout_s: float = 10.0) -> int:
        """Wait until at least ``n`` messages are visible on the queue; returns the depth."""
        return poll_until(lambda: self._visible_if_at_least(n), timeout_s,
                          f"{n} visible messages on {self.queue_name}")

    def _visible_if_at_least(self, n: int) -> int | None:
        visible = self.queue_depths().visible
        return visible if visible >= n else None

    def send_message(self, body: dict | str) -> str:
        """Put one message (a dict is JSON-encoded) on the queue; returns its MessageId."""
        text = body if isinstance(body, str) else json.dumps(body)
        return self.clients.sqs.send_message(QueueUrl=self.queue_url,
                                             MessageBody=text)["MessageId"]

    # -- objects -----------------------------------------------------------------------------
    def upload(self, key: str, data: bytes, part_size: int | None = None,
               **put_args: Any) -> dict:
        """Put ``data`` at ``key`` in the source bucket; multipart when it exceeds ``part_size``.

        Returns the PutObject / CompleteMultipartUpload response. ``put_args`` go to the
        PutObject or CreateMultipartUpload call (ContentType, Metadata, ...).
        """
        s3 = self.clients.src_s3
        if part_size is None or len(data) <= part_size:
            return s3.put_object(Bucket=self.src_bucket, Key=key, Body=data, **put_args)
        upload_id = s3.create_multipart_upload(Bucket=self.src_bucket, Key=key,
                                               **put_args)["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, len(data), part_size), start=1):
                etag = s3.upload_part(Bucket=self.src_bucket, Key=key, UploadId=upload_id,
                                      PartNumber=number,
                                      Body=data[offset:offset + part_size])["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
            return s3.complete_multipart_upload(Bucket=self.src_bucket, Key=key,
                                                UploadId=upload_id,
                                                MultipartUpload={"Parts": parts})
        except BaseException:
            s3.abort_multipart_upload(Bucket=self.src_bucket, Key=key, UploadId=upload_id)
            raise

    def compare(self, key: str, dest_key: str | None = None) -> bool:
        """True when the destination object equals the source object byte for byte."""
        dest_s3 = self.clients.dest_s3
        try:
            copied = dest_s3.get_object(Bucket=self.dest_bucket, Key=dest_key or key)
        except dest_s3.exceptions.NoSuchKey:
            return False
        source = self.clients.src_s3.get_object(Bucket=self.src_bucket, Key=key)
        return copied["Body"].read() == source["Body"].read()

    def assert_copied(self, keys: Iterable[str]) -> None:
        """Raise AssertionError naming every key not copied byte for byte."""
        bad = [key for key in keys if not self.compare(key)]
        if bad:
            raise AssertionError(f"not copied byte for byte: {bad!r}")
