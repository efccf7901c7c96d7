"""3GSync library: copy S3 objects to GCS (or any S3-compatible store) as they appear.

The module reads in the order a message travels through a worker:

    settings -> ignore list -> messages and jobs -> retries -> clients and credentials
    -> queue (SQS) -> source (S3) -> destination (GCS XML API) -> version table (DynamoDB)
    -> part planning and checksums -> one-object copy -> worker (job threads, heartbeat, shutdown)

Nothing here configures logging or calls ``sys.exit``: the entry point does.
"""
from __future__ import annotations

import base64
import binascii
import configparser
import contextlib
import datetime
import dataclasses
import enum
import fnmatch
import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import boto3
import botocore.config
import botocore.exceptions
import botocore.handlers
import google_crc32c

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_OBJECT_SIZE = 5 * 1024 * 1024 * MiB
SQS_MAX_WAIT_S = 20
SQS_MAX_BATCH = 10
SQS_MAX_VISIBILITY_S = 12 * 3600
METADATA_TIMEOUT_S = 0.5
SHUTDOWN_HAND_BACK_S = 1.0   # of ShutdownGrace, kept to hand unfinished messages back
NULL_VERSION = "null"
# A table record of another source version that ended less than this long before a single-PUT
# copy began (or is still running) means the two copies may have raced: look again. Covers
# clock skew between workers, which write their own endTime and startTime.
RACE_WINDOW_S = 60

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_CREDENTIALS = 3
EXIT_FORCED = 130


# ---------------------------------------------------------------------------------------------
# Errors. The worker maps each type to one outcome for the message (see Worker._handle).
# ---------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A setting is missing or has a bad value; the message names the key."""


class CredentialsError(RuntimeError):
    """Credentials could not be loaded; the message names the source, never the secret."""


class MessageError(ValueError):
    """A queue message has a shape the worker does not accept; it is left for the DLQ."""


class CopyError(Exception):
    """A copy did not finish; the message is left to be retried."""


class SourceGone(CopyError):
    """The source object no longer exists: permanent, the message is deleted."""


class SourceChanged(CopyError):
    """The source object was overwritten while it was being copied."""


class IntegrityError(CopyError):
    """Bytes at the destination do not match what was read from the source."""


class JobStopped(CopyError):
    """The job was asked to stop (shutdown, timeout or no progress); its message is released."""


# ---------------------------------------------------------------------------------------------
# Settings: the seed's ini keys, parsed once into a frozen dataclass with units in the names.
# ---------------------------------------------------------------------------------------------
STORAGE_CLASSES = frozenset({
    # GCS
    "STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE",
    # S3-compatible destinations
    "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER",
    "DEEP_ARCHIVE", "GLACIER_IR",
})
LOGGING_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV_OVERRIDES = ("table_queue_name", "sqs_queue_name", "ssm_parameter_bucket")
DEFAULT_CONFIG_PATH = Path(__file__).with_name("s3_migration_cluster_config.ini")
DEFAULT_IGNORE_LIST_PATH = Path(__file__).with_name("s3_migration_ignore_list.txt")

# Every key the ini may hold, with its default (None: required). Seed keys first, then new ones.
_INI_DEFAULTS: dict[str, str | None] = {
    "SrcEndPointURL": "",
    "DestEndPointURL": "https://storage.googleapis.com",
    "JobType": "PUT",
    "table_queue_name": None,
    "sqs_queue_name": None,
    "ssm_parameter_bucket": "s3_migration_bucket_para",
    "ssm_parameter_credentials": "",
    "Des_bucket_default": "",
    "Des_prefix_default": "",
    "StorageClass": "STANDARD",
    "ResumableThreshold": "50",
    "MaxRetry": "3",
    "MaxThread": "5",
    "MaxParallelFile": "5",
    "JobTimeout": "3500",
    "JobsenderCompareVersionId": "False",
    "UpdateVersionId": "False",
    "GetObjectWithVersionId": "False",
    "CleanUnfinishedUpload": "False",
    "LoggingLevel": "INFO",
    "LocalProfileMode": "False",
    "ifVerifyMD5Twice": "False",
    "ChunkSize": "10",
    # New in 3GSync; all have defaults so a seed ini keeps working.
    "VisibilityHeartbeat": "300",
    "ShutdownGrace": "25",
    "RetryDelay": "30",
    "PropagateDeletes": "False",
    "DestCredentials": "hmac",
    "DestRegion": "auto",
    "LogFormat": "text",
    "MetricsPort": "0",
    "IgnoreListPath": "",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the worker and tools read from the ini, validated and in explicit units."""

    src_endpoint_url: str | None
    dest_endpoint_url: str
    job_type: str
    table_name: str
    queue_name: str
    ssm_parameter_bucket: str
    ssm_parameter_credentials: str
    dest_bucket_default: str
    dest_prefix_default: str
    storage_class: str
    resumable_threshold_bytes: int
    max_retry: int
    max_thread: int
    max_parallel_file: int
    job_timeout_s: int
    jobsender_compare_version_id: bool
    update_version_id: bool
    get_object_with_version_id: bool
    clean_unfinished_upload: bool
    logging_level: str
    local_profile_mode: bool
    verify_md5_twice: bool
    chunk_size_bytes: int
    visibility_heartbeat_s: int
    shutdown_grace_s: int
    retry_delay_s: int
    propagate_deletes: bool
    dest_credentials: str
    dest_region: str
    log_format: str
    metrics_port: int
    ignore_list_path: Path

    @property
    def peak_part_memory_bytes(self) -> int:
        """Upper bound of part bytes held at once: MaxParallelFile x MaxThread x ChunkSize.

        Objects larger than 10,000 x ChunkSize get bigger parts (size / 10,000), so the bound
        grows with them; the README explains.
        """
        return self.max_parallel_file * self.max_thread * self.chunk_size_bytes

    @classmethod
    def from_ini(cls, path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read and validate ``path``; environment variables of ENV_OVERRIDES win over the ini."""
        environ = os.environ if environ is None else environ
        path = Path(path)
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
        try:
            with path.open(encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except configparser.Error as exc:
            raise ConfigError(f"config file {path} is not a valid ini file: {exc}") from None
        raw: dict[str, str] = {}
        known = {key.lower(): key for key in _INI_DEFAULTS}
        for section in parser.sections():
            for option, value in parser.items(section):
                key = known.get(option)
                if key is None:
                    log.warning("config: unknown key %r in [%s] ignored", option, section)
                    continue
                raw[key] = value.strip()
        for key in ENV_OVERRIDES:
            if environ.get(key):
                raw[key] = environ[key]
        return cls.from_mapping(raw, base_dir=path.parent)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, str], base_dir: Path | None = None) -> "Settings":
        """Validate seed-named values (strings, as in the ini) into Settings."""
        values = _IniValues(raw)
        job_type = values.choice("JobType", ("GET", "PUT"))
        dest_credentials = values.choice("DestCredentials", ("hmac", "service-account"), upper=False)
        if dest_credentials == "service-account" and job_type != "GET":
            raise ConfigError("config key DestCredentials: service-account needs JobType = GET")
        ignore_list = values.text("IgnoreListPath")
        ignore_path = Path(ignore_list) if ignore_list else DEFAULT_IGNORE_LIST_PATH
        if base_dir is not None and not ignore_path.is_absolute():
            ignore_path = base_dir / ignore_path
        chunk_size_mb = values.integer("ChunkSize", minimum=5, maximum=MAX_PART_SIZE // MiB)
        return cls(
            src_endpoint_url=values.url("SrcEndPointURL", required=False),
            dest_endpoint_url=values.url("DestEndPointURL", required=True),
            job_type=job_type,
            table_name=values.text("table_queue_name", required=True),
            queue_name=values.text("sqs_queue_name", required=True),
            ssm_parameter_bucket=values.text("ssm_parameter_bucket"),
            ssm_parameter_credentials=values.text("ssm_parameter_credentials"),
            dest_bucket_default=values.text("Des_bucket_default"),
            dest_prefix_default=values.text("Des_prefix_default"),
            storage_class=values.choice("StorageClass", sorted(STORAGE_CLASSES)),
            resumable_threshold_bytes=values.integer("ResumableThreshold", minimum=0) * MiB,
            max_retry=values.integer("MaxRetry", minimum=1, maximum=100),
            max_thread=values.integer("MaxThread", minimum=1, maximum=1000),
            max_parallel_file=values.integer("MaxParallelFile", minimum=1, maximum=1000),
            job_timeout_s=values.integer("JobTimeout", minimum=1),
            jobsender_compare_version_id=values.boolean("JobsenderCompareVersionId"),
            update_version_id=values.boolean("UpdateVersionId"),
            get_object_with_version_id=values.boolean("GetObjectWithVersionId"),
            clean_unfinished_upload=values.boolean("CleanUnfinishedUpload"),
            logging_level=values.choice("LoggingLevel", LOGGING_LEVELS),
            local_profile_mode=values.boolean("LocalProfileMode"),
            verify_md5_twice=values.boolean("ifVerifyMD5Twice"),
            chunk_size_bytes=chunk_size_mb * MiB,
            visibility_heartbeat_s=values.integer("VisibilityHeartbeat", minimum=1,
                                                  maximum=SQS_MAX_VISIBILITY_S),
            shutdown_grace_s=values.integer("ShutdownGrace", minimum=0, maximum=3600),
            retry_delay_s=values.integer("RetryDelay", minimum=0, maximum=SQS_MAX_VISIBILITY_S),
            propagate_deletes=values.boolean("PropagateDeletes"),
            dest_credentials=dest_credentials,
            dest_region=values.text("DestRegion", required=True),
            log_format=values.choice("LogFormat", ("text", "json"), upper=False),
            metrics_port=values.integer("MetricsPort", minimum=0, maximum=65535),
            ignore_list_path=ignore_path,
        )


class _IniValues:
    """Typed access to raw ini strings; every error names the key."""

    _TRUE = {"true", "yes", "on", "1"}
    _FALSE = {"false", "no", "off", "0"}

    def __init__(self, raw: Mapping[str, str]):
        self._raw = raw

    def text(self, key: str, required: bool = False) -> str:
        value = self._raw.get(key)
        if value is None:
            value = _INI_DEFAULTS[key]
        if value is None or (required and not value.strip()):
            raise ConfigError(f"config key {key} is required but missing or empty")
        return value.strip()

    def integer(self, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.text(key, required=True)
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"config key {key} must be a whole number, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise ConfigError(f"config key {key} must be at least {minimum}, got {number}")
        if maximum is not None and number > maximum:
            raise ConfigError(f"config key {key} must be at most {maximum}, got {number}")
        return number

    def boolean(self, key: str) -> bool:
        value = self.text(key, required=True).lower()
        if value in self._TRUE:
            return True
        if value in self._FALSE:
            return False
        raise ConfigError(f"config key {key} must be True or False, got {value!r}")

    def choice(self, key: str, allowed: Sequence[str], upper: bool = True) -> str:
        value = self.text(key, required=True)
        value = value.upper() if upper else value.lower()
        if value not in allowed:
            raise ConfigError(f"config key {key} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def url(self, key: str, required: bool) -> str | None:
        value = self.text(key, required=required)
        if not value:
            return None
        parsed = urllib.parse.urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"config key {key} must be an http(s) URL, got {value!r}")
        return value.rstrip("/")


# ---------------------------------------------------------------------------------------------
# Ignore list: fnmatch patterns matched against "bucket/key" and "key".
# ---------------------------------------------------------------------------------------------
class IgnoreList:
    """Patterns from s3_migration_ignore_list.txt; blank lines and # comments are skipped."""

    def __init__(self, patterns: Iterable[str] = ()):
        self.patterns = tuple(patterns)

    @classmethod
    def load(cls, path: Path) -> "IgnoreList":
        """Read ``path``; a missing file means nothing is ignored."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise ConfigError(f"cannot read ignore list {path}: {exc.strerror}") from None
        return cls(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))

    def matches(self, bucket: str, key: str) -> str | None:
        """Return the first pattern that matches the object, or None."""
        full = f"{bucket}/{key}"
        for pattern in self.patterns:
            if fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(key, pattern):
                return pattern
        return None


# ---------------------------------------------------------------------------------------------
# Messages and jobs: every accepted message shape becomes a list of Job (SPEC §3).
# ---------------------------------------------------------------------------------------------
class Action(enum.Enum):
    COPY = "copy"
    DELETE = "delete"


@dataclasses.dataclass(frozen=True)
class Job:
    """One object to copy (or delete) at the destination."""

    src_bucket: str
    src_key: str
    size: int
    dst_bucket: str
    dst_key: str
    version_id: str = NULL_VERSION
    etag: str | None = None
    action: Action = Action.COPY

    @property
    def table_key(self) -> str:
        """The DynamoDB key of this object: ``bucket/key`` (seed)."""
        return f"{self.src_bucket}/{self.src_key}"


def destination_key(prefix: str, key: str) -> str:
    """Join the destination prefix and the source key without doubling the ``/`` between them."""
    prefix = prefix.rstrip("/")
    return f"{prefix}/{key}" if prefix else key


def parse_message(body: str, dest_bucket: str, dest_prefix: str) -> list[Job]:
    """Turn one SQS message body into jobs; ``[]`` means nothing to do (a test event).

    Raises MessageError naming what is wrong for anything else.
    """
    try:
        document = json.loads(body)
    except (TypeError, ValueError, RecursionError) as exc:   # too deeply nested: RecursionError
        raise MessageError(f"body is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise MessageError(f"body is a JSON {type(document).__name__}, expected an object")
    if document.get("Type") == "Notification" and "Message" in document:
        inner = document["Message"]
        if not isinstance(inner, str):
            raise MessageError("SNS Notification has a non-string Message")
        return parse_message(inner, dest_bucket, dest_prefix)
    if document.get("Event") == "s3:TestEvent":
        return []
    if "Records" in document:
        return _jobs_from_s3_event(document["Records"], dest_bucket, dest_prefix)
    if "detail-type" in document and "detail" in document:
        return [_job_from_eventbridge(document, dest_bucket, dest_prefix)]
    if "Src_bucket" in document:
        return [_job_from_jobsender(document)]
    raise MessageError(f"unknown message shape with keys {sorted(document)[:8]}")


def _field(container: Any, path: str) -> Any:
    """Follow a dotted path through dicts; MessageError names the first missing part."""
    value = container
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise MessageError(f"missing field {path}")
        value = value[part]
    return value


def _text_field(container: Any, path: str) -> str:
    value = _field(container, path)
    if not isinstance(value, str) or not value:
        raise MessageError(f"field {path} must be a non-empty string, got {value!r}")
    return value


def _size_field(container: Any, path: str) -> int:
    value = _field(container, path)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise MessageError(f"field {path} must be a whole number, got {value!r}")
    try:
        size = int(value)
    except ValueError:
        raise MessageError(f"field {path} must be a whole number, got {value!r}") from None
    if size < 0 or size > MAX_OBJECT_SIZE:
        raise MessageError(f"field {path} is out of range: {size}")
    return size


def _version_field(container: dict, name: str) -> str:
    value = container.get(name)
    if value is None or value == "":
        return NULL_VERSION
    if not isinstance(value, str):
        raise MessageError(f"field {name} must be a string, got {value!r}")
    return value


def _require_bucket(dest_bucket: str) -> str:
    if not dest_bucket:
        raise MessageError("event message but config key Des_bucket_default is empty")
    return dest_bucket


def _jobs_from_s3_event(records: Any, dest_bucket: str, dest_prefix: str) -> list[Job]:
    if not isinstance(records, list) or not records:
        raise MessageError("Records must be a non-empty list")
    jobs = []
    for index, record in enumerate(records):
        where = f"Records[{index}]"
        if not isinstance(record, dict):
            raise MessageError(f"{where} is not an object")
        event_name = record.get("eventName")
        if not isinstance(event_name, str):
            raise MessageError(f"{where}.eventName is missing")
        try:
            bucket = _text_field(record, "s3.bucket.name")
            key = urllib.parse.unquote_plus(_text_field(record, "s3.object.key"))
            obj = _field(record, "s3.object")
            if event_name.startswith("ObjectRemoved"):
                action, size = Action.DELETE, 0
            elif event_name.startswith("ObjectCreated"):
                action, size = Action.COPY, _size_field(record, "s3.object.size")
            else:
                raise MessageError(f"unsupported eventName {event_name!r}")
            etag = obj.get("eTag") if isinstance(obj.get("eTag"), str) else None
            jobs.append(Job(
                src_bucket=bucket, src_key=key, size=size,
                dst_bucket=_require_bucket(dest_bucket), dst_key=destination_key(dest_prefix, key),
                version_id=_version_field(obj, "versionId"), etag=etag, action=action,
            ))
        except MessageError as exc:
            raise MessageError(f"{where}: {exc}") from None
    return jobs


def _job_from_eventbridge(document: dict, dest_bucket: str, dest_prefix: str) -> Job:
    detail_type = document.get("detail-type")
    detail = document.get("detail")
    if detail_type == "Object Created":
        action = Action.COPY
    elif detail_type == "Object Deleted":
        action = Action.DELETE
    else:
        raise MessageError(f"unsupported EventBridge detail-type {detail_type!r}")
    bucket = _text_field(detail, "bucket.name")
    key = _text_field(detail, "object.key")
    size = _size_field(detail, "object.size") if action is Action.COPY else 0
    obj = _field(detail, "object")
    etag = obj.get("etag") if isinstance(obj.get("etag"), str) else None
    return Job(
        src_bucket=bucket, src_key=key, size=size,
        dst_bucket=_require_bucket(dest_bucket), dst_key=destination_key(dest_prefix, key),
        version_id=_version_field(obj, "version-id"), etag=etag, action=action,
    )


def _job_from_jobsender(document: dict) -> Job:
    return Job(
        src_bucket=_text_field(document, "Src_bucket"),
        src_key=_text_field(document, "Src_key"),
        size=_size_field(document, "Size"),
        dst_bucket=_text_field(document, "Des_bucket"),
        dst_key=_text_field(document, "Des_key"),
        version_id=_version_field(document, "versionId"),
    )


def jobsender_message(job: Job) -> str:
    """The jobsender message body for ``job`` (the seed's field names)."""
    return json.dumps({
        "Src_bucket": job.src_bucket, "Src_key": job.src_key, "Size": job.size,
        "Des_bucket": job.dst_bucket, "Des_key": job.dst_key, "versionId": job.version_id,
    })


# ---------------------------------------------------------------------------------------------
# Retries: one helper, capped exponential back-off with full jitter, interruptible by a stop.
# botocore's own "standard" retries (3 attempts) handle throttling and 5xx per request; this
# helper retries what botocore cannot: a whole part (ranged GET + UploadPart) after a broken
# body stream, a digest mismatch or a reset, MaxRetry times.
# ---------------------------------------------------------------------------------------------
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.BotoCoreError,  # connection resets, read timeouts, broken streams
    botocore.exceptions.ClientError,    # filtered by _is_retryable
    IntegrityError,
    ConnectionError,
    TimeoutError,
)
_PERMANENT_CODES = frozenset({
    "AccessDenied", "NoSuchBucket", "NoSuchKey", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "NoSuchUpload", "PreconditionFailed", "412", "404", "403", "InvalidArgument", "EntityTooLarge",
    "InvalidRequest",
})


def error_code(exc: BaseException) -> str:
    """The service error code of a botocore ClientError, or the exception's class name."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or "ClientError"
    return type(exc).__name__


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, botocore.exceptions.ClientError):
        return error_code(exc) not in _PERMANENT_CODES
    return isinstance(exc, RETRYABLE_ERRORS)


def backoff_delays(attempts: int, base_s: float = 0.5, cap_s: float = 20.0,
                   rng: random.Random | None = None) -> list[float]:
    """Full-jitter delays before attempts 2..N: uniform(0, min(cap, base * 2**i))."""
    rng = rng or random.Random()
    return [rng.uniform(0, min(cap_s, base_s * 2 ** i)) for i in range(attempts - 1)]


def retry_call(fn: Callable[[], Any], attempts: int, stop: threading.Event, what: str) -> Any:
    """Call ``fn`` up to ``attempts`` times while its errors are retryable and no stop is set."""
    delays = backoff_delays(attempts)
    for attempt in range(1, attempts + 1):
        if stop.is_set():
            raise JobStopped(f"{what}: stop requested")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered right below
            if attempt == attempts or not _is_retryable(exc):
                raise
            delay = delays[attempt - 1]
            log.warning("%s failed (%s), attempt %d of %d, retrying in %.1fs",
                        what, error_code(exc), attempt, attempts, delay)
            if stop.wait(delay):
                raise JobStopped(f"{what}: stop requested") from exc
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Clients and credentials. AWS endpoints for SQS, DynamoDB and SSM come from botocore's own
# AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_<SERVICE> variables; only S3 endpoints are in the ini.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AccessKey:
    """An access key pair; repr hides the secret so it never reaches a log line."""

    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    region: str | None = None

    @classmethod
    def from_json(cls, document: Any, where: str) -> "AccessKey":
        """Build from the seed's JSON shape; errors name the field and ``where``, never values."""
        if not isinstance(document, dict):
            raise CredentialsError(f"{where}: expected a JSON object")
        values = {}
        for name in ("aws_access_key_id", "aws_secret_access_key"):
            value = document.get(name)
            if not isinstance(value, str) or not value:
                raise CredentialsError(f"{where}: field {name} is missing or empty")
            values[name] = value
        region = document.get("region")
        if region is not None and not isinstance(region, str):
            raise CredentialsError(f"{where}: field region must be a string")
        return cls(values["aws_access_key_id"], values["aws_secret_access_key"], region or None)


def _credentials_json(text: str, where: str) -> Any:
    """Parse a credentials document; the error says where the JSON breaks, never what it holds."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CredentialsError(f"{where}: value is not valid JSON ({exc.msg} at line "
                               f"{exc.lineno} column {exc.colno})") from None
    except ValueError:
        raise CredentialsError(f"{where}: value is not valid JSON") from None


def parse_access_key_json(text: str, where: str) -> AccessKey:
    """Parse an SSM parameter value holding one access key (PUT mode)."""
    return AccessKey.from_json(_credentials_json(text, where), where)


@dataclasses.dataclass(frozen=True)
class GetModeKeys:
    """The GET-mode secret: keys for the source (S3, SQS, DynamoDB) and the destination."""

    source: AccessKey
    destination: AccessKey | None   # None with DestCredentials = service-account


def parse_get_mode_secret(text: str, where: str, need_destination: bool = True) -> GetModeKeys:
    """Parse the seed's ``{"source": {...}, "destination": {...}}`` secret (GET mode).

    Errors name the secret and the missing or bad field, never a value.
    """
    document = _credentials_json(text, where)
    if not isinstance(document, dict):
        raise CredentialsError(f"{where}: expected a JSON object with source and destination")
    sides = ("source", "destination") if need_destination else ("source",)
    for side in sides:
        if side not in document:
            raise CredentialsError(f"{where}: field {side} is missing")
    source = AccessKey.from_json(document["source"], f"{where}: source")
    destination = None
    if need_destination:
        destination = AccessKey.from_json(document["destination"], f"{where}: destination")
    return GetModeKeys(source, destination)


def s3_client_config(max_pool_connections: int, path_style: bool) -> botocore.config.Config:
    """Client settings for both S3 sides: no flexible checksums (GCS rejects them), pooled.

    Bodies are not SHA-256 signed (``UNSIGNED-PAYLOAD``): every body carries its Content-MD5,
    which the store checks. botocore already skips the signing hash on https with Content-MD5;
    on http endpoints it would hash every part a second time, for nothing.
    """
    return botocore.config.Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max_pool_connections,
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=10,
        read_timeout=120,
        tcp_keepalive=True,
        s3={"addressing_style": "path" if path_style else "auto",
            "payload_signing_enabled": False},
        signature_version="s3v4",
    )


def aws_session(key: AccessKey | None, region: str | None = None) -> boto3.session.Session:
    """A boto3 session on ``key`` or, without one, on the default credential chain."""
    if key is None:
        return boto3.session.Session(region_name=region)
    return boto3.session.Session(
        aws_access_key_id=key.access_key_id,
        aws_secret_access_key=key.secret_access_key,
        region_name=region or key.region,
    )


def read_ssm_secure_string(session: boto3.session.Session, name: str) -> str:
    """Read an SSM parameter with decryption; errors name the parameter, not its value."""
    if not name:
        raise CredentialsError("config key ssm_parameter_credentials is empty")
    ssm = session.client("ssm")
    try:
        return ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
    except botocore.exceptions.ClientError as exc:
        raise CredentialsError(f"SSM parameter {name}: {error_code(exc)}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise CredentialsError(f"SSM parameter {name}: {type(exc).__name__}") from None


@dataclasses.dataclass(frozen=True)
class WorkerIdentity:
    """Who this worker is: an instance id or name, and the AWS region if known."""

    instance_id: str
    region: str | None


class MetadataUnavailable(OSError):
    """A metadata server did not answer in time, or answered as something else."""


def ec2_identity(environ: Mapping[str, str] | None = None) -> WorkerIdentity:
    """Instance id and region from EC2 metadata (IMDSv2: a session token first), falling back
    fast (METADATA_TIMEOUT_S a request) to the hostname and the environment's region."""
    environ = os.environ if environ is None else environ
    fallback_region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return WorkerIdentity(socket.gethostname(), fallback_region)
    base = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")
    try:
        token = _http_text(f"{base}/latest/api/token", method="PUT",
                           headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        headers = {"X-aws-ec2-metadata-token": token}
        instance_id = _http_text(f"{base}/latest/meta-data/instance-id", headers=headers)
        region = _http_text(f"{base}/latest/meta-data/placement/region", headers=headers)
    except MetadataUnavailable as exc:
        log.warning("EC2 metadata not reachable (%s); using the hostname and the region from "
                    "the environment", exc)
        return WorkerIdentity(socket.gethostname(), fallback_region)
    return WorkerIdentity(instance_id, region or fallback_region)


def gce_identity(environ: Mapping[str, str] | None = None) -> WorkerIdentity:
    """The instance name from the GCE metadata server, falling back fast to the hostname.

    The server is ``GCE_METADATA_HOST`` (google-auth's variable, also ``GCE_METADATA_ROOT``),
    else ``GCE_METADATA_IP``, else the link-local address (no DNS lookup that could hang off
    GCE). The region is the environment's; GET mode takes the source's from the secret.
    """
    environ = os.environ if environ is None else environ
    fallback_region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    host = (environ.get("GCE_METADATA_HOST") or environ.get("GCE_METADATA_ROOT")
            or environ.get("GCE_METADATA_IP") or "169.254.169.254")
    try:
        name = _http_text(f"http://{host}/computeMetadata/v1/instance/name",
                          headers={"Metadata-Flavor": "Google"}, flavor="Google")
    except MetadataUnavailable as exc:
        log.warning("GCE metadata not reachable (%s); using the hostname as the instance name",
                    exc)
        return WorkerIdentity(socket.gethostname(), fallback_region)
    return WorkerIdentity(name, fallback_region)


def _http_text(url: str, method: str = "GET", headers: Mapping[str, str] | None = None,
               flavor: str | None = None) -> str:
    """One metadata request, METADATA_TIMEOUT_S per connect and read; MetadataUnavailable
    names what went wrong. ``flavor``: the ``Metadata-Flavor`` the answer must carry."""
    import http.client
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    # Metadata servers are link-local: never go through a proxy to reach them.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=METADATA_TIMEOUT_S) as response:
            if flavor is not None and response.headers.get("Metadata-Flavor") != flavor:
                raise MetadataUnavailable(f"{url} is not a {flavor} metadata server")
            text = response.read().decode("utf-8").strip()
    except urllib.error.HTTPError as exc:
        raise MetadataUnavailable(f"{url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise MetadataUnavailable(f"{url}: {type(exc.reason).__name__}") from None
    except (OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
        if isinstance(exc, MetadataUnavailable):
            raise
        raise MetadataUnavailable(f"{url}: {type(exc).__name__}") from None
    if not text:
        raise MetadataUnavailable(f"{url}: empty answer")
    return text


SECRET_MANAGER_EMULATOR_ENV = "SECRET_MANAGER_EMULATOR_HOST"
SECRET_MANAGER_TIMEOUT_S = 10.0
# The GAPIC client logs every response, payload included, at DEBUG on these loggers.
_SECRET_MANAGER_LOGGERS = (
    "google.cloud.secretmanager_v1",
    "google.cloud.secretmanager_v1.services.secret_manager_service.client",
    "google.cloud.secretmanager_v1.services.secret_manager_service.transports.grpc",
)


def secret_version_name(resource: str) -> str:
    """The Secret Manager version name for ``resource``: ``projects/P/secrets/S/versions/V``,
    with ``/versions/latest`` added when the resource id names the secret only."""
    parts = resource.strip().strip("/").split("/")
    if len(parts) == 4:
        parts += ["versions", "latest"]
    if (len(parts) != 6 or parts[0] != "projects" or parts[2] != "secrets"
            or parts[4] != "versions" or not all(parts)):
        raise CredentialsError(
            "config key ssm_parameter_credentials must be a Secret Manager resource id "
            f"projects/<project>/secrets/<name>[/versions/<version>], got {resource!r}")
    return "/".join(parts)


def read_gcp_secret(resource: str, environ: Mapping[str, str] | None = None) -> str:
    """The text of a Secret Manager secret version (GET mode), checked against its CRC32C.

    Uses the machine's Google credentials (on GCE: its service account, through the metadata
    server). With ``SECRET_MANAGER_EMULATOR_HOST=host:port`` it talks plain gRPC to that
    address without credentials instead (local tests). Errors name the secret and what went
    wrong, never the value.
    """
    environ = os.environ if environ is None else environ
    if not resource:
        raise CredentialsError("config key ssm_parameter_credentials is empty")
    name = secret_version_name(resource)
    where = f"Secret Manager secret {name}"
    try:  # only GET mode needs these packages
        import grpc
        from google.api_core import exceptions as api_exceptions
        from google.api_core import retry as api_retry
        from google.auth import exceptions as auth_exceptions
        from google.cloud import secretmanager_v1
        from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
            SecretManagerServiceGrpcTransport)
    except ImportError as exc:
        raise CredentialsError(f"JobType GET needs google-cloud-secret-manager: {exc}") from None
    for logger_name in _SECRET_MANAGER_LOGGERS:
        # Never let a DEBUG log level write the secret's payload (SPEC 9).
        quiet = logging.getLogger(logger_name)
        if quiet.level < logging.INFO:
            quiet.setLevel(logging.INFO)
    emulator = environ.get(SECRET_MANAGER_EMULATOR_ENV)
    try:
        if emulator:
            transport = SecretManagerServiceGrpcTransport(channel=grpc.insecure_channel(emulator))
            client = secretmanager_v1.SecretManagerServiceClient(transport=transport)
        else:
            client = secretmanager_v1.SecretManagerServiceClient()
    except auth_exceptions.DefaultCredentialsError:
        raise CredentialsError(f"{where}: no Google credentials (run on GCE with a service "
                               "account, or set GOOGLE_APPLICATION_CREDENTIALS)") from None
    retry = api_retry.Retry(
        initial=0.2, maximum=2.0, multiplier=2.0, timeout=SECRET_MANAGER_TIMEOUT_S,
        predicate=api_retry.if_exception_type(api_exceptions.ServiceUnavailable,
                                              api_exceptions.TooManyRequests))
    hints = {
        "NotFound": "not found (check config key ssm_parameter_credentials)",
        "PermissionDenied": "permission denied (the instance's service account needs "
                            "roles/secretmanager.secretAccessor on it)",
        "FailedPrecondition": "the version is disabled or destroyed",
    }
    try:
        with client:
            response = client.access_secret_version(request={"name": name}, retry=retry,
                                                    timeout=SECRET_MANAGER_TIMEOUT_S)
    except api_exceptions.RetryError:
        raise CredentialsError(f"{where}: Secret Manager did not answer within "
                               f"{SECRET_MANAGER_TIMEOUT_S:.0f}s") from None
    except api_exceptions.GoogleAPICallError as exc:
        reason = type(exc).__name__
        raise CredentialsError(f"{where}: {hints.get(reason, reason)}") from None
    except auth_exceptions.GoogleAuthError as exc:
        raise CredentialsError(f"{where}: Google credentials failed ({type(exc).__name__})") \
            from None
    payload = response.payload
    data = bytes(payload.data)
    if "data_crc32c" in payload and google_crc32c.value(data) != payload.data_crc32c:
        raise CredentialsError(f"{where}: payload does not match its CRC32C")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"{where}: value is not UTF-8 text") from None


# DestCredentials = service-account: GCS's XML API with the machine's own OAuth2 identity.
GCS_READ_WRITE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"


class BearerAuth:
    """Authenticates destination requests with an OAuth2 access token instead of SigV4.

    Registered on a botocore client's ``before-send`` event, it runs for every attempt of every
    request: ``Authorization: Bearer <token>`` (the form GCS's XML API takes), with the token
    refreshed, under a lock shared by the part threads, whenever google-auth no longer counts it
    as valid, which it does from a few minutes before expiry. ``x-amz-*`` request headers are
    sent as ``x-goog-*``, as GCS documents for OAuth requests (``x-goog-meta-*`` metadata,
    ``x-goog-storage-class``).
    """

    def __init__(self, credentials: Any, request: Any = None):
        if request is None:
            import google.auth.transport.requests
            request = google.auth.transport.requests.Request()
        self._credentials = credentials
        self._request = request
        self._lock = threading.Lock()

    def token(self) -> str:
        """A valid access token, refreshed first if it is missing, expired or about to expire."""
        from google.auth import exceptions as auth_exceptions
        with self._lock:
            if not self._credentials.valid:
                try:
                    self._credentials.refresh(self._request)
                except auth_exceptions.GoogleAuthError as exc:
                    # ConnectionError: retried like any network failure of the request.
                    raise ConnectionError(f"OAuth2 token refresh failed ({type(exc).__name__})") \
                        from None
            return self._credentials.token

    def __call__(self, request: Any, **_kwargs: Any) -> None:
        headers = request.headers
        for name in [name for name in headers.keys() if name.lower().startswith("x-amz-")]:
            value = headers[name]
            del headers[name]
            headers["x-goog-" + name[len("x-amz-"):]] = value
        if "Authorization" in headers:
            del headers["Authorization"]
        headers["Authorization"] = f"Bearer {self.token()}"


def google_default_credentials(scopes: Sequence[str] = (GCS_READ_WRITE_SCOPE,)) -> Any:
    """google-auth's default credentials (on GCE: the instance's service account)."""
    try:
        import google.auth
        from google.auth import exceptions as auth_exceptions
    except ImportError as exc:
        raise CredentialsError(f"DestCredentials = service-account needs google-auth: {exc}") \
            from None
    try:
        credentials, _project = google.auth.default(scopes=list(scopes))
    except auth_exceptions.GoogleAuthError as exc:
        raise CredentialsError(
            f"DestCredentials = service-account: no Google default credentials "
            f"({type(exc).__name__}); run on GCE with a service account allowed to write the "
            "bucket, or set GOOGLE_APPLICATION_CREDENTIALS") from None
    return credentials


def bearer_s3_client(session: boto3.session.Session, endpoint_url: str,
                     config: botocore.config.Config, credentials: Any, request: Any = None) -> Any:
    """An unsigned S3 client of ``session`` (whose own keys it never uses) whose requests carry
    the OAuth2 token of ``credentials``. Fails at once (CredentialsError) when no first token
    can be had.
    """
    auth = BearerAuth(credentials, request)
    try:
        auth.token()
    except ConnectionError as exc:
        raise CredentialsError(f"DestCredentials = service-account: {exc}") from None
    client = session.client(
        "s3", endpoint_url=endpoint_url, region_name="auto",
        config=config.merge(botocore.config.Config(signature_version=botocore.UNSIGNED)))
    client.meta.events.register("before-send.s3", auth)
    return client


@dataclasses.dataclass(frozen=True)
class CloudAccess:
    """What a worker needs to reach both sides: sessions, the S3 clients and who it is."""

    aws: boto3.session.Session   # SQS, DynamoDB, SSM, and the source
    source: Any                  # boto3 S3 client for the source
    destination: Any             # boto3 S3 client for the destination XML API
    identity: WorkerIdentity


def connect(settings: Settings, environ: Mapping[str, str] | None = None) -> CloudAccess:
    """Load credentials for the configured JobType and build the clients (SPEC §9).

    PUT (on EC2): identity from EC2 metadata, AWS through the instance role (the default
    chain), the destination's HMAC key from the SSM SecureString ``ssm_parameter_credentials``.
    GET (on GCE): instance name from GCE metadata, both keys from the Secret Manager secret
    ``ssm_parameter_credentials``; with ``DestCredentials = service-account`` the destination
    is reached with the instance's own OAuth2 tokens and the secret needs no destination key.
    """
    environ = os.environ if environ is None else environ
    bearer = settings.dest_credentials == "service-account"
    if settings.job_type == "GET":
        identity = gce_identity(environ)
        name = secret_version_name(settings.ssm_parameter_credentials) \
            if settings.ssm_parameter_credentials else ""
        keys = parse_get_mode_secret(read_gcp_secret(name, environ),
                                     f"Secret Manager secret {name}", need_destination=not bearer)
        identity = dataclasses.replace(identity, region=keys.source.region or identity.region)
        aws = aws_session(keys.source, identity.region)
        dest_key = keys.destination
    else:
        identity = ec2_identity(environ)
        aws = aws_session(None, identity.region)
        dest_key = parse_access_key_json(
            read_ssm_secure_string(aws, settings.ssm_parameter_credentials),
            f"SSM parameter {settings.ssm_parameter_credentials}")
    pool = settings.max_parallel_file * settings.max_thread + settings.max_parallel_file + 4
    source = aws.client("s3", endpoint_url=settings.src_endpoint_url,
                        config=s3_client_config(pool, path_style=bool(settings.src_endpoint_url)))
    dest_config = s3_client_config(pool, path_style=True)
    if bearer:
        destination = bearer_s3_client(aws, settings.dest_endpoint_url, dest_config,
                                       google_default_credentials())
        log.info("destination: OAuth2 tokens of this machine's service account")
    else:
        dest_region = dest_key.region if settings.dest_region == "auto" else settings.dest_region
        # Same session as the source, own keys: the S3 model is loaded once (a second session
        # would parse it again, ~0.15 s CPU at every start).
        destination = aws.client(
            "s3", endpoint_url=settings.dest_endpoint_url, config=dest_config,
            region_name=dest_region or "auto", aws_access_key_id=dest_key.access_key_id,
            aws_secret_access_key=dest_key.secret_access_key)
    return CloudAccess(aws=aws, source=source, destination=destination, identity=identity)


# ---------------------------------------------------------------------------------------------
# Queue (SQS).
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Message:
    """One received SQS message."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_at_s: float


class JobQueue:
    """The SQS queue of jobs: long-poll receive, delete, visibility changes."""

    def __init__(self, sqs_client: Any, queue_url: str):
        self._sqs = sqs_client
        self.url = queue_url

    @classmethod
    def by_name(cls, sqs_client: Any, name: str) -> "JobQueue":
        try:
            url = sqs_client.get_queue_url(QueueName=name)["QueueUrl"]
        except botocore.exceptions.ClientError as exc:
            raise ConfigError(f"config key sqs_queue_name: queue {name!r}: {error_code(exc)}") from None
        return cls(sqs_client, url)

    def receive(self, max_messages: int, wait_s: int = SQS_MAX_WAIT_S,
                visibility_s: int | None = None) -> list[Message]:
        """Long-poll for up to ``max_messages`` (1..10) messages; ``visibility_s`` overrides the
        queue's own VisibilityTimeout for them."""
        extra = {} if visibility_s is None else {"VisibilityTimeout": visibility_s}
        response = self._sqs.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=max(1, min(SQS_MAX_BATCH, max_messages)),
            WaitTimeSeconds=min(SQS_MAX_WAIT_S, wait_s),
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            **extra,
        )
        messages = []
        for item in response.get("Messages", []):
            attributes = item.get("Attributes", {})
            messages.append(Message(
                message_id=item["MessageId"],
                receipt_handle=item["ReceiptHandle"],
                body=item.get("Body", ""),
                receive_count=int(attributes.get("ApproximateReceiveCount", "1")),
                sent_at_s=int(attributes.get("SentTimestamp", "0")) / 1000,
            ))
        return messages

    def delete(self, message: Message) -> None:
        self._sqs.delete_message(QueueUrl=self.url, ReceiptHandle=message.receipt_handle)

    def delete_batch(self, messages: Sequence[Message]) -> list[Message]:
        """Delete several messages, ten per DeleteMessageBatch; returns those not deleted
        (logged; they reappear after their visibility timeout)."""
        failed = []
        for start in range(0, len(messages), SQS_MAX_BATCH):
            batch = messages[start:start + SQS_MAX_BATCH]
            response = self._sqs.delete_message_batch(QueueUrl=self.url, Entries=[
                {"Id": str(i), "ReceiptHandle": m.receipt_handle} for i, m in enumerate(batch)])
            for failure in response.get("Failed", []):
                message = batch[int(failure["Id"])]
                log.warning("delete failed for message %s: %s", message.message_id,
                            failure.get("Code"))
                failed.append(message)
        return failed

    def set_visibility(self, messages: Sequence[Message], visibility_s: int) -> None:
        """Change the visibility of several messages, ten per call; failures are logged."""
        for start in range(0, len(messages), SQS_MAX_BATCH):
            batch = messages[start:start + SQS_MAX_BATCH]
            response = self._sqs.change_message_visibility_batch(QueueUrl=self.url, Entries=[
                {"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": visibility_s}
                for i, m in enumerate(batch)])
            for failure in response.get("Failed", []):
                log.warning("visibility change failed for message %s: %s",
                            batch[int(failure["Id"])].message_id, failure.get("Code"))

    def release(self, messages: Sequence[Message]) -> None:
        """Make messages visible again at once, so another worker takes them."""
        self.set_visibility(messages, 0)

    def depth(self) -> tuple[int, int]:
        """(waiting, in flight) message counts, approximate as SQS reports them; waiting
        includes delayed messages, which will become visible."""
        attributes = self._sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed"])["Attributes"]
        return (int(attributes["ApproximateNumberOfMessages"])
                + int(attributes.get("ApproximateNumberOfMessagesDelayed", 0)),
                int(attributes["ApproximateNumberOfMessagesNotVisible"]))


# ---------------------------------------------------------------------------------------------
# Source (S3).
# ---------------------------------------------------------------------------------------------
_CARRIED_HEADERS = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage",
                    "CacheControl")


@dataclasses.dataclass(frozen=True)
class SourceObject:
    """What a HEAD of the source told us; the copy is pinned to this etag (and version)."""

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None
    last_modified: str
    headers: Mapping[str, str]
    metadata: Mapping[str, str]
    etag_is_md5: bool = False   # plain single-PUT object without KMS or customer keys

    @property
    def md5(self) -> bytes:
        """The object's MD5 when its ETag is one, else b''."""
        return _md5_from_etag(self.etag) if self.etag_is_md5 else b""


def _source_object(bucket: str, key: str, size: int, response: Mapping[str, Any]) -> SourceObject:
    """A SourceObject from the headers of a HEAD or GET response."""
    last_modified = response.get("LastModified")
    return SourceObject(
        bucket=bucket, key=key, size=size,
        etag=response["ETag"].strip('"'),
        version_id=response.get("VersionId"),
        last_modified=last_modified.isoformat() if last_modified else "",
        headers={name: response[name] for name in _CARRIED_HEADERS if response.get(name)},
        metadata=dict(response.get("Metadata", {})),
        etag_is_md5=(response.get("ServerSideEncryption") not in ("aws:kms", "aws:kms:dsse")
                     and not response.get("SSECustomerAlgorithm")),
    )


def _is_not_found(exc: botocore.exceptions.ClientError) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchVersion")


class Source:
    """Reads from the source bucket: HEAD and ranged GETs pinned to one object version."""

    def __init__(self, s3_client: Any):
        self._s3 = s3_client

    def head(self, bucket: str, key: str, version_id: str | None = None) -> SourceObject:
        """HEAD the object (a given version if ``version_id``); SourceGone when it is gone."""
        args = {"Bucket": bucket, "Key": key}
        if version_id:
            args["VersionId"] = version_id
        try:
            response = self._s3.head_object(**args)
        except botocore.exceptions.ClientError as exc:
            if _is_not_found(exc):
                raise SourceGone(f"s3://{bucket}/{key} does not exist (any more)") from None
            raise
        return _source_object(bucket, key, int(response["ContentLength"]), response)

    def bucket_missing(self, bucket: str) -> bool:
        """True only when the store says the bucket does not exist (a 403 cannot tell)."""
        try:
            self._s3.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            return error_code(exc) in ("404", "NoSuchBucket")
        return False

    def fetch(self, bucket: str, key: str, version_id: str | None,
              limit: int) -> tuple[SourceObject, bytes | None]:
        """What ``head`` tells, from a GET of the first ``limit`` bytes; also the object's bytes
        when the whole object fits in ``limit``.

        For an object small enough for one PUT this is one request instead of a HEAD and a
        GET. The bytes come from the same response as the ETag, so they are that version's;
        an object larger than ``limit`` (the message's size was stale) is described and its
        bytes dropped. An empty object (416 to any range) is described by a HEAD.
        """
        args: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes=0-{limit - 1}"}
        if version_id:
            args["VersionId"] = version_id
        try:
            response = self._s3.get_object(**args)
        except botocore.exceptions.ClientError as exc:
            if _is_not_found(exc):
                raise SourceGone(f"s3://{bucket}/{key} does not exist (any more)") from None
            if error_code(exc) in ("InvalidRange", "416"):
                return self.head(bucket, key, version_id), None
            raise
        content_range = response.get("ContentRange")
        with response["Body"] as body:
            if content_range:   # "bytes 0-N/SIZE"
                size = int(content_range.rpartition("/")[2])
                if content_range != f"bytes 0-{min(size, limit) - 1}/{size}":
                    raise SourceChanged(f"s3://{bucket}/{key}: asked for the first {limit} "
                                        f"bytes, got {content_range}")
            else:               # the store ignored the range and sends the whole object
                size = int(response["ContentLength"])
            src = _source_object(bucket, key, size, response)
            if size > limit:
                return src, None
            data = body.read()
        if len(data) != size:
            raise IntegrityError(f"s3://{bucket}/{key}: short read: {len(data)} of {size} bytes")
        return src, data

    def read(self, obj: SourceObject, start: int, length: int, pin_version: bool) -> bytes:
        """Read ``length`` bytes at ``start``, pinned to the object's etag (and version)."""
        args: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key, "IfMatch": f'"{obj.etag}"'}
        if pin_version and obj.version_id and obj.version_id != NULL_VERSION:
            args["VersionId"] = obj.version_id
        ranged = not (start == 0 and length == obj.size)
        if ranged:
            args["Range"] = f"bytes={start}-{start + length - 1}"
        try:
            response = self._s3.get_object(**args)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) in ("PreconditionFailed", "412"):
                raise SourceChanged(f"s3://{obj.bucket}/{obj.key} changed during the copy") from None
            if _is_not_found(exc):
                raise SourceGone(f"s3://{obj.bucket}/{obj.key} disappeared during the copy") from None
            raise
        if ranged:
            expected = f"bytes {start}-{start + length - 1}/{obj.size}"
            if response.get("ContentRange") != expected:
                raise SourceChanged(f"s3://{obj.bucket}/{obj.key}: asked for {expected}, "
                                    f"got {response.get('ContentRange')}")
        with response["Body"] as body:
            data = body.read()
        if len(data) != length:
            raise IntegrityError(f"s3://{obj.bucket}/{obj.key}: short read at {start}: "
                                 f"{len(data)} of {length} bytes")
        return data


# ---------------------------------------------------------------------------------------------
# Destination (GCS XML API, or any S3-compatible store).
# ---------------------------------------------------------------------------------------------
META_SOURCE_ETAG = "source-etag"
META_SOURCE_VERSION = "source-version-id"
META_SOURCE_MTIME = "source-last-modified"


@dataclasses.dataclass(frozen=True)
class DestinationObject:
    """What a HEAD of the destination told us."""

    size: int
    etag: str
    metadata: Mapping[str, str]
    crc32c: int | None   # from GCS's x-goog-hash, when the store is GCS


@dataclasses.dataclass(frozen=True)
class UploadedPart:
    """One part at the destination: its number, size and checksums (crc32c unknown if listed)."""

    number: int
    size: int
    etag: str
    md5: bytes
    crc32c: int | None = None


@dataclasses.dataclass(frozen=True)
class UnfinishedUpload:
    """A multipart upload started at the destination and neither completed nor aborted."""

    bucket: str
    key: str
    upload_id: str
    initiated: datetime.datetime


def _goog_header(headers: Mapping[str, str], prefix: str) -> dict[str, str]:
    return {name[len(prefix):]: value for name, value in headers.items() if name.startswith(prefix)}


def _crc32c_from_goog_hash(header: str | None) -> int | None:
    for item in (header or "").split(","):
        name, _, value = item.strip().partition("=")
        if name == "crc32c":
            try:
                return int.from_bytes(base64.b64decode(value), "big")
            except (binascii.Error, ValueError):
                return None
    return None


class Destination:
    """Writes to the destination bucket through its S3-compatible API, always with Content-MD5."""

    def __init__(self, s3_client: Any, storage_class: str):
        self._s3 = s3_client
        self._storage_class = storage_class
        # Part bytes are in memory already. botocore would wrap them in a BytesIO, send an
        # Expect: 100-continue and wait for the answer, then copy them out 16 KiB per write;
        # as bytes they go in one write. Only how a bytes body travels changes (this client).
        for operation in ("PutObject", "UploadPart"):
            s3_client.meta.events.unregister(f"before-parameter-build.s3.{operation}",
                                             botocore.handlers.convert_body_to_file_like_object)

    def head(self, bucket: str, key: str) -> DestinationObject | None:
        """HEAD the object; None when it does not exist."""
        try:
            response = self._s3.head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _is_not_found(exc):
                return None
            raise
        headers = response["ResponseMetadata"].get("HTTPHeaders", {})
        metadata = _goog_header(headers, "x-goog-meta-")
        metadata.update(response.get("Metadata", {}))
        return DestinationObject(
            size=int(response["ContentLength"]),
            etag=response.get("ETag", "").strip('"'),
            metadata=metadata,
            crc32c=_crc32c_from_goog_hash(headers.get("x-goog-hash")),
        )

    def _object_args(self, src: SourceObject) -> dict[str, Any]:
        metadata = dict(src.metadata)
        metadata[META_SOURCE_ETAG] = src.etag
        metadata[META_SOURCE_MTIME] = src.last_modified
        if src.version_id:
            metadata[META_SOURCE_VERSION] = src.version_id
        return {"Metadata": metadata, "StorageClass": self._storage_class, **src.headers}

    def put(self, bucket: str, key: str, data: bytes, md5: bytes, src: SourceObject) -> None:
        """Store a whole object in one PUT; the store checks Content-MD5."""
        response = self._s3.put_object(Bucket=bucket, Key=key, Body=data,
                                       ContentMD5=base64.b64encode(md5).decode(),
                                       **self._object_args(src))
        _check_md5_etag(response.get("ETag", ""), md5, f"{bucket}/{key}")

    def list_uploads(self, bucket: str, prefix: str = "",
                     exact: bool = False) -> Iterator[UnfinishedUpload]:
        """Unfinished multipart uploads under ``prefix`` (of exactly that key with ``exact``).

        botocore's paginator follows the markers and stops on a store that repeats one.
        """
        pages = self._s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket,
                                                                          Prefix=prefix)
        for page in pages:
            for upload in page.get("Uploads", ()):
                if not exact or upload["Key"] == prefix:
                    yield UnfinishedUpload(bucket, upload["Key"], upload["UploadId"],
                                           upload["Initiated"])

    def list_parts(self, bucket: str, key: str, upload_id: str) -> list[UploadedPart]:
        """Every part already stored for ``upload_id``."""
        pages = self._s3.get_paginator("list_parts").paginate(Bucket=bucket, Key=key,
                                                              UploadId=upload_id)
        parts = []
        for page in pages:
            for part in page.get("Parts", ()):
                etag = part["ETag"].strip('"')
                parts.append(UploadedPart(number=part["PartNumber"], size=part["Size"], etag=etag,
                                          md5=_md5_from_etag(etag)))
        return parts

    def create_upload(self, bucket: str, key: str, src: SourceObject) -> str:
        response = self._s3.create_multipart_upload(Bucket=bucket, Key=key, **self._object_args(src))
        return response["UploadId"]

    def upload_part(self, bucket: str, key: str, upload_id: str, number: int, data: bytes,
                    md5: bytes) -> str:
        """Upload one part with its Content-MD5; returns the ETag the store gave it."""
        response = self._s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                        PartNumber=number, Body=data,
                                        ContentMD5=base64.b64encode(md5).decode())
        etag = response.get("ETag", "").strip('"')
        _check_md5_etag(etag, md5, f"{bucket}/{key} part {number}")
        return etag

    def complete(self, bucket: str, key: str, upload_id: str, parts: Sequence[UploadedPart]) -> None:
        self._s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": f'"{p.etag}"'} for p in parts]})

    def abort(self, bucket: str, key: str, upload_id: str) -> None:
        try:
            self._s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "NoSuchUpload":
                raise

    def delete(self, bucket: str, key: str) -> None:
        self._s3.delete_object(Bucket=bucket, Key=key)


def _md5_from_etag(etag: str) -> bytes:
    try:
        return bytes.fromhex(etag) if len(etag) == 32 else b""
    except ValueError:
        return b""


def _check_md5_etag(etag: str, md5: bytes, what: str) -> None:
    """Where the store's ETag is an MD5 (S3, GCS parts), it must be ours."""
    etag = etag.strip('"')
    if len(etag) == 32 and _md5_from_etag(etag) and _md5_from_etag(etag) != md5:
        raise IntegrityError(f"{what}: destination ETag {etag} is not the MD5 we sent")


# ---------------------------------------------------------------------------------------------
# Version table (DynamoDB): what each object's copy was pinned to, and how it went.
# ---------------------------------------------------------------------------------------------
class Status(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class VersionTable:
    """One item per source object (key ``bucket/key``), SPEC §6."""

    def __init__(self, dynamodb_client: Any, table_name: str):
        self._ddb = dynamodb_client
        self.name = table_name

    def check_exists(self) -> None:
        """Fail at start-up, naming the key, when the table is not there."""
        try:
            self._ddb.describe_table(TableName=self.name)
        except botocore.exceptions.ClientError as exc:
            raise ConfigError(f"config key table_queue_name: table {self.name!r}: "
                              f"{error_code(exc)}") from None

    def begin(self, job: Job, src: SourceObject, instance_id: str) -> dict[str, Any]:
        """Record that this worker starts copying ``src``; returns the item as it was before.

        One UpdateItem: the version, ETag and size the copy is pinned to (UpdateVersionId's
        "record the current version"), who and when, status ``running``, ``tryTimes`` counted
        with ADD (atomic however many workers begin at once), and no ``endTime``, so a TTL on
        ``endTime`` never removes a copy in progress. The old item tells the caller whether an
        unfinished upload belongs to the same source object (same ETag).
        """
        response = self._ddb.update_item(
            TableName=self.name,
            Key={"Key": {"S": job.table_key}},
            UpdateExpression=("SET #versionId = :v, #etag = :e, #Size = :s, #startTime = :t, "
                              "#instanceId = :i, #status = :running, #percent = :zero "
                              "ADD #tryTimes :one REMOVE #endTime, #uploadId"),
            ExpressionAttributeNames=_names("versionId", "etag", "Size", "startTime", "instanceId",
                                            "status", "percent", "tryTimes", "endTime",
                                            "uploadId"),
            ExpressionAttributeValues={
                ":v": {"S": src.version_id or NULL_VERSION}, ":e": {"S": src.etag},
                ":s": {"N": str(src.size)}, ":t": {"N": str(int(time.time()))},
                ":i": {"S": instance_id}, ":running": {"S": Status.RUNNING.value},
                ":zero": {"N": "0"}, ":one": {"N": "1"},
            },
            ReturnValues="ALL_OLD",
        )
        return _plain_item(response.get("Attributes", {}))

    def record_upload(self, job: Job, src: SourceObject, upload_id: str) -> None:
        """Record the multipart upload that holds ``src``'s parts, so that only this upload is
        ever resumed (begin() forgets it, so a crash in between means a fresh upload, never
        another version's parts). Conditional on the item still describing ``src``."""
        try:
            self._ddb.update_item(
                TableName=self.name, Key={"Key": {"S": job.table_key}},
                UpdateExpression="SET #uploadId = :u", ConditionExpression="#etag = :e",
                ExpressionAttributeNames=_names("uploadId", "etag"),
                ExpressionAttributeValues={":u": {"S": upload_id}, ":e": {"S": src.etag}})
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise

    def record_single(self, job: Job, src: SourceObject, instance_id: str, started_s: int,
                      status: Status) -> dict[str, Any]:
        """The one write of a copy by a single PUT, made after the PUT (or its failure):
        begin's and finish's attributes in one UpdateItem, ``tryTimes`` counted with ADD.
        Returns the item as it was before, from which the caller tells whether another version
        was copied meanwhile (``raced``): the race check that begin + a conditional finish give
        a multipart copy, for half the writes.

        ``done`` is written whatever the item held (the caller looks again on a race); a
        ``failed`` is not written over another version's running copy, nor over this version's
        ``done`` (a worker that lost a race must not undo the winner's record)."""
        done = status is Status.DONE
        condition = {} if done else {"ConditionExpression": (
            "NOT (#status = :running AND #etag <> :e) AND NOT (#status = :done AND #etag = :e)")}
        try:
            response = self._ddb.update_item(
                TableName=self.name,
                Key={"Key": {"S": job.table_key}},
                UpdateExpression=("SET #versionId = :v, #etag = :e, #Size = :s, #startTime = :t0, "
                                  "#endTime = :t1, #instanceId = :i, #status = :status, "
                                  "#percent = :pct ADD #tryTimes :one REMOVE #uploadId"),
                ExpressionAttributeNames=_names("versionId", "etag", "Size", "startTime",
                                                "endTime", "instanceId", "status", "percent",
                                                "tryTimes", "uploadId"),
                ExpressionAttributeValues={
                    ":v": {"S": src.version_id or NULL_VERSION}, ":e": {"S": src.etag},
                    ":s": {"N": str(src.size)}, ":t0": {"N": str(started_s)},
                    ":t1": {"N": str(int(time.time()))}, ":i": {"S": instance_id},
                    ":status": {"S": status.value}, ":pct": {"N": "100" if done else "0"},
                    ":one": {"N": "1"},
                    **({} if done else {":running": {"S": Status.RUNNING.value},
                                        ":done": {"S": Status.DONE.value}}),
                },
                ReturnValues="ALL_OLD",
                **condition,
            )
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            log.debug("table: %s records another version's copy or is done already; %s not "
                      "recorded", job.table_key, status.value)
            return {}
        return _plain_item(response.get("Attributes", {}))

    def finish(self, job: Job, src: SourceObject, status: Status) -> bool:
        """Mark the copy of ``src`` done or failed, with ``endTime`` (epoch seconds, usable as
        the table's TTL attribute). Returns whether it was written.

        Conditional, because two workers can race on one object: nothing is written when the
        item now records another source object (another worker has since begun a copy of a
        different version: its record stays), or is already ``done`` for this one (a worker
        that lost a race to complete the same upload must not turn ``done`` into ``failed``).
        """
        try:
            self._ddb.update_item(
                TableName=self.name,
                Key={"Key": {"S": job.table_key}},
                UpdateExpression="SET #status = :status, #endTime = :t, #percent = :pct",
                ConditionExpression="#etag = :e AND #status <> :done",
                ExpressionAttributeNames=_names("status", "endTime", "percent", "etag"),
                ExpressionAttributeValues={
                    ":status": {"S": status.value}, ":t": {"N": str(int(time.time()))},
                    ":pct": {"N": "100" if status is Status.DONE else "0"}, ":e": {"S": src.etag},
                    ":done": {"S": Status.DONE.value},
                },
            )
            return True
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                log.debug("table: %s records another source version or is done already; "
                          "%s not recorded", job.table_key, status.value)
                return False
            raise

    def confirm(self, job: Job, src: SourceObject, instance_id: str) -> bool:
        """The destination already holds ``src`` (a duplicate delivery): record it as done,
        creating the item when there is none (copied earlier by other means, or removed by the
        TTL), so a JobsenderCompareVersionId run does not send it again. Conditional: another
        version's running copy, or this version already done, is left as it is; another
        version's ended record is replaced (the destination holds this one). Returns whether
        written."""
        now = {"N": str(int(time.time()))}
        try:
            self._ddb.update_item(
                TableName=self.name,
                Key={"Key": {"S": job.table_key}},
                UpdateExpression=("SET #versionId = :v, #etag = :e, #Size = :s, #instanceId = :i, "
                                  "#status = :done, #percent = :pct, #endTime = :t, "
                                  "#startTime = if_not_exists(#startTime, :t)"),
                ConditionExpression=("attribute_not_exists(#etag) "
                                     "OR (#etag = :e AND #status <> :done) "
                                     "OR (#etag <> :e AND #status <> :running)"),
                ExpressionAttributeNames=_names("versionId", "etag", "Size", "instanceId",
                                                "status", "percent", "endTime", "startTime"),
                ExpressionAttributeValues={
                    ":v": {"S": src.version_id or NULL_VERSION}, ":e": {"S": src.etag},
                    ":s": {"N": str(src.size)}, ":i": {"S": instance_id},
                    ":done": {"S": Status.DONE.value}, ":pct": {"N": "100"}, ":t": now,
                    ":running": {"S": Status.RUNNING.value},
                },
            )
            return True
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise

    def get(self, table_key: str) -> dict[str, Any]:
        response = self._ddb.get_item(TableName=self.name, Key={"Key": {"S": table_key}},
                                      ConsistentRead=True)
        return _plain_item(response.get("Item", {}))


def _names(*attributes: str) -> dict[str, str]:
    """ExpressionAttributeNames for ``attributes`` (several are DynamoDB reserved words)."""
    return {f"#{name}": name for name in attributes}


def _plain_item(item: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """DynamoDB's typed attributes as plain values (whole numbers as int, others as float)."""
    plain: dict[str, Any] = {}
    for name, typed in item.items():
        (kind, value), = typed.items()
        if kind == "N":
            number = float(value)
            plain[name] = int(number) if number.is_integer() and "." not in value else number
        else:
            plain[name] = value
    return plain


# ---------------------------------------------------------------------------------------------
# Part planning and checksums.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PartPlan:
    """How an object of ``size`` bytes is cut into parts of ``part_size`` (the last shorter)."""

    size: int
    part_size: int

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def part_range(self, number: int) -> tuple[int, int]:
        """(start, length) of part ``number`` (1-based)."""
        start = (number - 1) * self.part_size
        return start, min(self.part_size, self.size - start)


def plan_parts(size: int, chunk_size: int) -> PartPlan:
    """Parts of ``chunk_size``, grown (to whole MiB) so no object needs more than 10,000."""
    if size < 0 or size > MAX_OBJECT_SIZE:
        raise ValueError(f"object size {size} is out of range")
    part_size = max(chunk_size, MIN_PART_SIZE)
    if -(-size // part_size) > MAX_PARTS:
        part_size = -(-size // MAX_PARTS)
        part_size = -(-part_size // MiB) * MiB
    return PartPlan(size=size, part_size=part_size)


# CRC32C combination (as zlib's crc32_combine, for the Castagnoli polynomial): the CRC of A+B
# from crc(A), crc(B) and len(B), by applying len(B) zero bytes to crc(A) with GF(2) matrices.
_CRC32C_POLY_REVERSED = 0x82F63B78


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    index = 0
    while vector:
        if vector & 1:
            total ^= matrix[index]
        vector >>= 1
        index += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC32C of A+B given crc32c(A), crc32c(B) and len(B)."""
    if length_b == 0:
        return crc_a
    odd = [_CRC32C_POLY_REVERSED] + [1 << i for i in range(31)]  # one zero bit
    even = _gf2_square(odd)   # two zero bits
    odd = _gf2_square(even)   # four zero bits
    while True:
        even = _gf2_square(odd)
        if length_b & 1:
            crc_a = _gf2_times(even, crc_a)
        length_b >>= 1
        if not length_b:
            break
        odd = _gf2_square(even)
        if length_b & 1:
            crc_a = _gf2_times(odd, crc_a)
        length_b >>= 1
        if not length_b:
            break
    return crc_a ^ crc_b


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)


def composite_etag(md5s: Sequence[bytes]) -> str:
    """The S3 multipart ETag: MD5 of the parts' binary MD5s, then ``-N``."""
    return f"{hashlib.md5(b''.join(md5s)).hexdigest()}-{len(md5s)}"


# ---------------------------------------------------------------------------------------------
# One-object copy.
# ---------------------------------------------------------------------------------------------
class Outcome(str, enum.Enum):
    COPIED = "copied"
    DUPLICATE = "duplicate"     # the destination already holds this source version
    IGNORED = "ignored"
    DELETED = "deleted"
    SOURCE_GONE = "source-gone"


class JobControl:
    """Shared between a job and the worker: a stop flag, progress time and byte counters."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.stop = threading.Event()
        self.stop_reason = ""
        self._clock = clock
        self._lock = threading.Lock()
        self.started_at = clock()
        self.last_progress_at = self.started_at
        self.bytes_read = 0
        self.bytes_written = 0
        self._linked: list[threading.Event] = []

    def request_stop(self, reason: str) -> None:
        with self._lock:
            if self.stop.is_set():
                return
            self.stop_reason = reason
            self.stop.set()
            for event in self._linked:
                event.set()

    @contextlib.contextmanager
    def linked_event(self) -> Iterator[threading.Event]:
        """An event of its own that a stop of the whole job also sets (for one group of parts)."""
        event = threading.Event()
        with self._lock:
            self._linked.append(event)
            if self.stop.is_set():
                event.set()
        try:
            yield event
        finally:
            with self._lock:
                self._linked.remove(event)

    def progressed(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written
            self.last_progress_at = self._clock()

    def check(self, what: str) -> None:
        if self.stop.is_set():
            raise JobStopped(f"{what}: {self.stop_reason or 'stop requested'}")


class ObjectCopier:
    """Copies one object from the source to the destination, verified, resumable (SPEC §4-§5)."""

    def __init__(self, settings: Settings, source: Source, destination: Destination,
                 versions: VersionTable, instance_id: str, metrics: "Metrics | None" = None):
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._source = source
        self._destination = destination
        self._versions = versions
        self._instance_id = instance_id

    # -- entry point ---------------------------------------------------------------------------
    def run(self, job: Job, control: JobControl) -> Outcome:
        """Copy (or delete) ``job``'s object; raises CopyError subclasses when it cannot.

        Versions (SPEC §5). Every read is pinned to the HEAD at the start of an attempt: its
        ETag (IfMatch) and, with GetObjectWithVersionId, its VersionId. An overwrite mid-copy
        therefore either lets a pinned version finish whole or (SourceChanged) aborts the
        upload and starts again on the new version; an unfinished upload is resumed only when
        the table says it holds the same source object (ETag). A job for a version that is no
        longer the current one is acknowledged without a copy when the destination already
        holds the current version, so a late or redelivered event never puts an older version
        back. After a copy the source is HEADed again, and a newer version copied too, with
        UpdateVersionId, and whenever the table shows another version copied meanwhile (a
        multipart copy's conditional finish fails; a single PUT's record replaced another
        version's recent one: the next round looks at source and destination again).
        """
        if job.action is Action.DELETE:
            return self._delete(job)
        wanted = self._requested_version(job)
        settled = Outcome.DUPLICATE     # what the destination holding the object means now
        for attempt in range(1, self._settings.max_retry + 1):
            started_s = int(time.time())
            # The duplicate check's HEAD goes out while the source is read: one round trip
            # less before a small object's PUT.
            lookup = _in_background(self._destination.head, job.dst_bucket, job.dst_key)
            src, data = self._describe(job, wanted)
            existing = lookup.result()
            if existing is not None and _holds(existing, src):
                _quietly(self._versions.confirm, job, src, self._instance_id)
                return settled
            if wanted is not None and existing is not None:
                try:
                    current = self._source.head(job.src_bucket, job.src_key)
                except SourceGone:
                    current = None
                if current is not None and current.etag != src.etag and _holds(existing, current):
                    log.info("s3://%s/%s: version %s is not the current one any more and the "
                             "destination holds the current one (%s); nothing to copy",
                             job.src_bucket, job.src_key, wanted, current.version_id)
                    return settled
            single = src.size <= self._settings.chunk_size_bytes
            previous = {} if single else self._versions.begin(job, src, self._instance_id)
            try:
                if single:
                    self._copy_single(job, src, control, data)
                else:
                    self._copy_multipart(job, src, previous, control)
            except SourceChanged as exc:
                self._record_failure(job, src, single, started_s)
                if attempt == self._settings.max_retry:
                    raise
                log.info("%s: %s; starting again with the new version", job.dst_key, exc)
                continue
            except BaseException:
                self._record_failure(job, src, single, started_s)
                raise
            settled = Outcome.COPIED
            if self._record_done(job, src, single, started_s):
                return settled
            # Another version may have reached the destination after this one: the next round
            # describes the source again and copies unless the destination holds its current
            # version.
            wanted = None   # from now on the job follows the source's current version
            log.info("s3://%s/%s: another version was copied while version %s was; looking "
                     "again", job.src_bucket, job.src_key, src.version_id or src.etag)
        raise SourceChanged(f"s3://{job.src_bucket}/{job.src_key} kept changing during "
                            f"{self._settings.max_retry} copies")

    def _record_done(self, job: Job, src: SourceObject, single: bool, started_s: int) -> bool:
        """Record a finished copy; returns whether it stands. A single PUT whose record
        replaced another version's recent one does not (the next round compares source and
        destination again); a multipart copy whose conditional finish was refused (another
        copy began since) stands if its version is still the source's current one. With
        UpdateVersionId a copy stands only while its version is the current one."""
        if single:
            before = self._versions.record_single(job, src, self._instance_id, started_s,
                                                  Status.DONE)
            if raced(before, src, started_s):
                return False    # the next round looks at the source and destination again
            return not self._settings.update_version_id or self._still_current(job, src)
        recorded = self._versions.finish(job, src, Status.DONE)
        return (recorded and not self._settings.update_version_id) or self._still_current(job, src)

    def _record_failure(self, job: Job, src: SourceObject, single: bool, started_s: int) -> None:
        if single:
            _quietly(self._versions.record_single, job, src, self._instance_id, started_s,
                     Status.FAILED)
        else:
            _quietly(self._versions.finish, job, src, Status.FAILED)

    def _requested_version(self, job: Job) -> str | None:
        """The version to HEAD and copy: the job's with GetObjectWithVersionId, unless
        UpdateVersionId replaces it with the current one (the seed's meaning); None means the
        current version, whose VersionId the reads are then pinned to."""
        if self._settings.update_version_id or not self._settings.get_object_with_version_id:
            return None
        return job.version_id if job.version_id != NULL_VERSION else None

    def _still_current(self, job: Job, copied: SourceObject) -> bool:
        """Whether ``copied`` is still the source's current version (a deleted source counts
        as current: there is nothing newer to copy)."""
        try:
            current = self._source.head(job.src_bucket, job.src_key)
        except SourceGone:
            return True
        return current.etag == copied.etag and current.version_id == copied.version_id

    def _delete(self, job: Job) -> Outcome:
        if not self._settings.propagate_deletes:
            return Outcome.IGNORED
        try:
            self._source.head(job.src_bucket, job.src_key)
        except SourceGone:
            self._destination.delete(job.dst_bucket, job.dst_key)
            return Outcome.DELETED
        log.info("s3://%s/%s exists again; not deleting it at the destination",
                 job.src_bucket, job.src_key)
        return Outcome.IGNORED

    def _describe(self, job: Job, wanted: str | None) -> tuple[SourceObject, bytes | None]:
        """The source object as it is now (``wanted``: that version). For a job small enough
        for one PUT also its bytes, from the same GET: no separate HEAD per small object.

        A missing bucket is not a deleted object (a HEAD's 404 does not tell them apart): the
        job is wrong, so it fails and its message goes on to the dead-letter queue."""
        try:
            if 0 < job.size <= self._settings.chunk_size_bytes:
                return self._source.fetch(job.src_bucket, job.src_key, wanted,
                                          self._settings.chunk_size_bytes)
            return self._source.head(job.src_bucket, job.src_key, wanted), None
        except SourceGone:
            if self._source.bucket_missing(job.src_bucket):
                raise CopyError(f"source bucket {job.src_bucket} does not exist") from None
            raise

    # -- small objects ---------------------------------------------------------------------------
    def _copy_single(self, job: Job, src: SourceObject, control: JobControl,
                     fetched: bytes | None = None) -> None:
        """One PUT. ``fetched``: the bytes ``_describe`` already read, used by the first
        attempt; a retry reads again, pinned to the ETag (IfMatch)."""
        def attempt() -> None:
            nonlocal fetched
            control.check("single PUT")
            data, fetched = fetched, None
            if data is None:
                data = self._source.read(src, 0, src.size, self._pin_version)
            md5 = hashlib.md5(data).digest()
            if src.md5 and src.md5 != md5:
                raise IntegrityError(f"s3://{src.bucket}/{src.key}: bytes read do not match "
                                     "the source ETag")
            control.progressed(read=len(data))
            self._destination.put(job.dst_bucket, job.dst_key, data, md5, src)
            control.progressed(written=len(data))
        retry_call(attempt, self._settings.max_retry, control.stop, f"{job.dst_key}")

    @property
    def _pin_version(self) -> bool:
        return self._settings.get_object_with_version_id

    # -- large objects ---------------------------------------------------------------------------
    def _copy_multipart(self, job: Job, src: SourceObject, previous: Mapping[str, Any],
                        control: JobControl) -> None:
        plan = plan_parts(src.size, self._settings.chunk_size_bytes)
        upload_id, kept = self._resume_or_create(job, src, plan, previous)
        resumable = src.size > self._settings.resumable_threshold_bytes
        try:
            parts = self._upload_parts(job, src, plan, upload_id, kept, control)
            self._destination.complete(job.dst_bucket, job.dst_key, upload_id, parts)
        except SourceChanged:
            self._destination.abort(job.dst_bucket, job.dst_key, upload_id)
            raise
        except SourceGone:
            # Nothing will ever resume it, and the store bills its parts until it is aborted.
            _quietly(self._destination.abort, job.dst_bucket, job.dst_key, upload_id)
            raise
        except BaseException:
            if not resumable:
                _quietly(self._destination.abort, job.dst_bucket, job.dst_key, upload_id)
            raise
        self._verify_whole(job, src, parts)
        log.debug("%s: %d parts, %d resumed", job.dst_key, plan.count, len(kept))

    def _resume_or_create(self, job: Job, src: SourceObject, plan: PartPlan,
                          previous: Mapping[str, Any]) -> tuple[str, dict[int, UploadedPart]]:
        """Resume the upload the table recorded for this very source object (same ETag) when
        its parts fit today's plan; otherwise start a new upload and record it (when
        resumable)."""
        bucket, key = job.dst_bucket, job.dst_key
        if self._settings.clean_unfinished_upload:
            for upload in list(self._destination.list_uploads(bucket, key, exact=True)):
                log.info("%s: aborting unfinished upload (CleanUnfinishedUpload)", key)
                self._destination.abort(bucket, key, upload.upload_id)
        elif src.size > self._settings.resumable_threshold_bytes:
            if previous.get("etag") == src.etag and previous.get("uploadId"):
                upload_id = previous["uploadId"]
                kept = self._usable_parts(job, plan, upload_id)
                if kept is not None:
                    self._versions.record_upload(job, src, upload_id)
                    return upload_id, kept
                _quietly(self._destination.abort, bucket, key, upload_id)
            elif previous.get("etag") not in (None, src.etag):
                for upload in list(self._destination.list_uploads(bucket, key, exact=True)):
                    log.info("%s: unfinished upload was of another source version; aborting it",
                             key)
                    self._destination.abort(bucket, key, upload.upload_id)
        upload_id = self._destination.create_upload(bucket, key, src)
        if src.size > self._settings.resumable_threshold_bytes:
            # Only a resumable copy is ever resumed; a smaller one aborts its upload on failure.
            self._versions.record_upload(job, src, upload_id)
        return upload_id, {}

    def _usable_parts(self, job: Job, plan: PartPlan,
                      upload_id: str) -> dict[int, UploadedPart] | None:
        """Parts of ``upload_id`` to keep, or None when the upload must be started again."""
        try:
            listed = self._destination.list_parts(job.dst_bucket, job.dst_key, upload_id)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) not in ("NoSuchUpload", "404"):
                raise
            log.info("%s: recorded upload is gone; starting again", job.dst_key)
            return None
        kept = {}
        for part in listed:
            if part.number > plan.count or part.size != plan.part_range(part.number)[1]:
                log.warning("%s: stored part %d (%d bytes) does not fit the part size %d "
                            "(ChunkSize changed?); starting again", job.dst_key, part.number,
                            part.size, plan.part_size)
                return None
            if part.md5:
                kept[part.number] = part
        log.info("%s: resuming upload, %d of %d parts already stored", job.dst_key, len(kept),
                 plan.count)
        return kept

    def _upload_parts(self, job: Job, src: SourceObject, plan: PartPlan, upload_id: str,
                      kept: Mapping[int, UploadedPart], control: JobControl) -> list[UploadedPart]:
        """Copy every part not in ``kept`` with MaxThread threads; returns all parts in order.

        The first part that fails for good stops the others (they check between attempts).
        """
        verify_kept = self._settings.verify_md5_twice
        todo = [n for n in range(1, plan.count + 1) if n not in kept or verify_kept]
        with control.linked_event() as stop:
            def copy_part(number: int) -> UploadedPart:
                def attempt() -> UploadedPart:
                    start, length = plan.part_range(number)
                    data = self._source.read(src, start, length, self._pin_version)
                    control.progressed(read=length)
                    md5 = hashlib.md5(data).digest()
                    stored = kept.get(number)
                    if stored is not None:   # re-read to check a part an earlier worker stored
                        if stored.md5 == md5:
                            return dataclasses.replace(stored, crc32c=crc32c(data))
                        log.warning("%s part %d: stored part differs from the source; "
                                    "uploading it again", job.dst_key, number)
                    etag = self._destination.upload_part(job.dst_bucket, job.dst_key, upload_id,
                                                         number, data, md5)
                    control.progressed(written=length)
                    return UploadedPart(number, length, etag, md5, crc32c(data))
                self._metrics.parts_in_flight(1)
                started = time.monotonic()
                try:
                    part = retry_call(attempt, self._settings.max_retry, stop,
                                      f"{job.dst_key} part {number}")
                except BaseException:
                    stop.set()
                    raise
                finally:
                    self._metrics.parts_in_flight(-1)
                self._metrics.part_copied(time.monotonic() - started)
                return part

            workers = min(self._settings.max_thread, max(1, len(todo)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="part") as pool:
                futures = [pool.submit(copy_part, n) for n in todo]
                wait(futures, return_when=FIRST_EXCEPTION)
                if stop.is_set():
                    for future in futures:
                        future.cancel()
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
        if errors or any(f.cancelled() for f in futures):
            control.check(job.dst_key)
            real = [e for e in errors if not isinstance(e, JobStopped)]
            raise (real or errors or [CopyError(f"{job.dst_key}: parts cancelled")])[0]
        merged = {**kept, **{part.number: part for part in (f.result() for f in futures)}}
        return [merged[n] for n in range(1, plan.count + 1)]

    def _verify_whole(self, job: Job, src: SourceObject, parts: Sequence[UploadedPart]) -> None:
        """After complete: size, then GCS's CRC32C or the S3 composite ETag, must match."""
        stored = self._destination.head(job.dst_bucket, job.dst_key)
        problem = None
        if stored is None:
            problem = "object missing after complete"
        elif stored.size != src.size:
            problem = f"size {stored.size}, expected {src.size}"
        elif stored.crc32c is not None:
            if all(p.crc32c is not None for p in parts):
                combined = parts[0].crc32c
                for part in parts[1:]:
                    combined = crc32c_combine(combined, part.crc32c, part.size)
                if combined != stored.crc32c:
                    problem = "CRC32C of the object differs from the parts' CRC32C"
            else:
                log.debug("%s: parts stored by an earlier worker have no CRC32C in hand; "
                          "each was checked by its Content-MD5", job.dst_key)
        elif "-" in stored.etag and stored.etag != composite_etag([p.md5 for p in parts]):
            problem = f"composite ETag {stored.etag} differs from the parts' MD5s"
        if problem:
            _quietly(self._destination.delete, job.dst_bucket, job.dst_key)
            raise IntegrityError(f"{job.dst_bucket}/{job.dst_key}: {problem}; object removed")


def raced(previous: Mapping[str, Any], src: SourceObject, started_s: int) -> bool:
    """Whether the table item as it was before a single-PUT copy's record shows another
    source version's copy running, or ended within RACE_WINDOW_S of this copy's start: then
    the destination may hold either version, whichever PUT came last."""
    if not previous or previous.get("etag") == src.etag:
        return False
    if previous.get("status") == Status.RUNNING.value:
        return True
    return previous.get("endTime", 0) >= started_s - RACE_WINDOW_S


def _holds(existing: DestinationObject, src: SourceObject) -> bool:
    """Whether the destination object is a copy of exactly this source version."""
    if existing.size != src.size or existing.metadata.get(META_SOURCE_ETAG) != src.etag:
        return False
    recorded_version = existing.metadata.get(META_SOURCE_VERSION)
    return src.version_id is None or recorded_version in (None, src.version_id)


def _in_background(fn: Callable[..., Any], *args: Any) -> "Future[Any]":
    """``fn(*args)`` on a thread of its own; the Future holds its result or exception. For a
    request that can overlap another (its client's timeouts bound it)."""
    future: Future[Any] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the result
            future.set_exception(exc)

    threading.Thread(target=run, name=f"{threading.current_thread().name}-lookup",
                     daemon=True).start()
    return future


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """Best-effort clean-up: log and swallow errors so the original error is the one raised."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("clean-up %s failed: %s", getattr(fn, "__name__", fn), error_code(exc))


# ---------------------------------------------------------------------------------------------
# Metrics: counters for dashboards and autoscaling (Prometheus when MetricsPort is set).
# ---------------------------------------------------------------------------------------------
class Metrics:
    """What the worker reports about itself; this base class records nothing."""

    def job_started(self) -> None:
        """A job began copying."""

    def job_finished(self, outcome: str, bytes_written: int) -> None:
        """A job ended with ``outcome`` after writing ``bytes_written`` bytes."""

    def part_copied(self, seconds: float) -> None:
        """One part was read and uploaded in ``seconds``."""

    def parts_in_flight(self, delta: int) -> None:
        """Parts being copied changed by ``delta``."""

    def oldest_message_age(self, seconds: float) -> None:
        """Age (since it was sent) of the oldest message being worked on."""

    def close(self) -> None:
        """Stop serving, if serving."""


class PrometheusMetrics(Metrics):
    """Metrics on a prometheus_client registry, served by ``serve(port)``."""

    def __init__(self, registry: Any = None):
        import prometheus_client as prom  # only when metrics are switched on
        self._prom = prom
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        options = {"registry": self.registry, "namespace": "gsync"}
        self._bytes = prom.Counter("copied_bytes", "Bytes written to the destination", **options)
        self._jobs = prom.Counter("jobs", "Jobs finished, by outcome", ["outcome"], **options)
        self._jobs_in_flight = prom.Gauge("jobs_in_flight", "Jobs being copied", **options)
        self._parts_in_flight = prom.Gauge("parts_in_flight", "Parts being copied", **options)
        self._part_seconds = prom.Histogram(
            "part_seconds", "Seconds to read and upload one part",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), **options)
        self._oldest = prom.Gauge("oldest_message_age_seconds",
                                  "Age of the oldest message being worked on", **options)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve /metrics on ``address:port`` from a background thread until close()."""
        self._server, _ = self._prom.start_http_server(port, addr=address, registry=self.registry)

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None

    def job_started(self) -> None:
        self._jobs_in_flight.inc()

    def job_finished(self, outcome: str, bytes_written: int) -> None:
        if outcome != Outcome.IGNORED.value:
            self._jobs_in_flight.dec()
        self._jobs.labels(outcome).inc()
        self._bytes.inc(bytes_written)

    def part_copied(self, seconds: float) -> None:
        self._part_seconds.observe(seconds)

    def parts_in_flight(self, delta: int) -> None:
        self._parts_in_flight.inc(delta)

    def oldest_message_age(self, seconds: float) -> None:
        self._oldest.set(seconds)


# ---------------------------------------------------------------------------------------------
# Worker: one consumer (this thread) long-polls SQS for free job slots, MaxParallelFile job
# threads copy, a heartbeat thread keeps progressing messages invisible and stops stuck ones.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _InFlight:
    message: Message
    control: JobControl
    extended_at: float


class _Acknowledger:
    """Deletes settled messages ten at a time (DeleteMessageBatch) instead of one call each.

    A job thread hands a message over only once it is settled for good (object verified at
    the destination, duplicate, ignored, test event, source gone). A batch goes out when ten
    are waiting or MAX_DELAY_S after the oldest arrived, and everything at once on ``flush``.
    A message whose delete is lost (worker killed before the batch left) reappears after its
    visibility timeout and is acknowledged by the duplicate check without a second copy.
    """

    MAX_DELAY_S = 0.5

    def __init__(self, queue: "JobQueue", clock: Callable[[], float] = time.monotonic):
        self._queue = queue
        self._clock = clock
        self._changed = threading.Condition()
        self._pending: list[Message] = []
        self._oldest_at = 0.0
        self._sending = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="acknowledger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, message: Message) -> None:
        """Hand over a settled message (after ``close``: deleted at once)."""
        with self._changed:
            if not self._closed:
                if not self._pending:
                    self._oldest_at = self._clock()
                self._pending.append(message)
                self._changed.notify_all()
                return
        self._send([message])

    def flush(self) -> None:
        """Delete everything handed over so far; returns when no batch is on its way."""
        with self._changed:
            batch, self._pending = self._pending, []
            self._sending += 1
        try:
            self._send(batch)
        finally:
            with self._changed:
                self._sending -= 1
                self._changed.notify_all()
                self._changed.wait_for(lambda: self._sending == 0, timeout=30)

    def close(self) -> None:
        """Flush and stop the background thread."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.flush()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._closed and not self._batch_due():
                    timeout = None
                    if self._pending:
                        timeout = max(0.0, self._oldest_at + self.MAX_DELAY_S - self._clock())
                    self._changed.wait(timeout)
                if self._closed:
                    return
                batch = self._pending[:SQS_MAX_BATCH]
                del self._pending[:SQS_MAX_BATCH]
                self._oldest_at = self._clock()
                self._sending += 1
            try:
                self._send(batch)
            finally:
                with self._changed:
                    self._sending -= 1
                    self._changed.notify_all()

    def _batch_due(self) -> bool:
        return len(self._pending) >= SQS_MAX_BATCH or bool(
            self._pending and self._clock() - self._oldest_at >= self.MAX_DELAY_S)

    def _send(self, batch: Sequence[Message]) -> None:
        if not batch:
            return
        try:
            self._queue.delete_batch(batch)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            log.warning("deleting %d settled messages failed (%s); they reappear after their "
                        "visibility timeout and are acknowledged as duplicates", len(batch),
                        error_code(exc))


class _KeyGuard:
    """Lets one job at a time work on a destination object in this worker.

    S3 sends two events for one multipart upload and SQS may deliver twice: the later job waits
    for the earlier (borrowing its progress, so its message is kept too), then finds the
    object already copied and is acknowledged without a second copy.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._owners: dict[str, JobControl] = {}

    @contextlib.contextmanager
    def hold(self, key: str, control: JobControl) -> Iterator[None]:
        with self._changed:
            while key in self._owners:
                if self._owners[key].last_progress_at > control.last_progress_at:
                    control.progressed()
                control.check(f"waiting for another job on {key}")
                self._changed.wait(timeout=1.0)
            self._owners[key] = control
        try:
            yield
        finally:
            with self._changed:
                del self._owners[key]
                self._changed.notify_all()


class Worker:
    """Runs jobs from the queue until asked to stop (or, with ``until_empty``, until it is empty)."""

    def __init__(self, settings: Settings, queue: JobQueue, copier: ObjectCopier,
                 ignore_list: IgnoreList, *, until_empty: bool = False,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._queue = queue
        self._copier = copier
        self._ignore = ignore_list
        self._until_empty = until_empty
        self._clock = clock
        self._stopping = threading.Event()
        self._stop_requested_at: float | None = None
        self._slots = threading.Semaphore(settings.max_parallel_file)
        self._lock = threading.Lock()
        self._in_flight: dict[str, _InFlight] = {}
        self._jobs_changed = threading.Condition(self._lock)
        self._finished = threading.Event()
        self._key_guard = _KeyGuard()
        self._acks = _Acknowledger(queue)
        self.counts: dict[str, int] = {}

    # -- control -----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Warm stop: take no new messages, let running jobs finish for ShutdownGrace seconds."""
        if not self._stopping.is_set():
            self._stop_requested_at = self._clock()
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve the queue; returns the process exit code."""
        log.info("worker started: %d job threads x %d part threads, part memory bound %d MiB",
                 self._settings.max_parallel_file, self._settings.max_thread,
                 self._settings.peak_part_memory_bytes // MiB)
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        self._acks.start()
        pool = ThreadPoolExecutor(self._settings.max_parallel_file, thread_name_prefix="job")
        try:
            self._consume(pool)
        finally:
            drained = self._drain()
            pool.shutdown(wait=drained, cancel_futures=True)
            self._acks.close()
            self._stopping.set()
            self._finished.set()
            heartbeat.join(timeout=5)
            self._metrics.close()
        log.info("worker stopped: %s", ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
                 or "no jobs")
        return EXIT_OK

    def _consume(self, pool: ThreadPoolExecutor) -> None:
        # A stop is seen when the long poll returns: poll for less than the shutdown grace.
        wait_s = 1 if self._until_empty else max(1, min(SQS_MAX_WAIT_S,
                                                        self._settings.shutdown_grace_s - 1))
        # Received messages stay invisible for a whole heartbeat step, whatever the queue's own
        # VisibilityTimeout: the first extension comes a third of a step later.
        visibility_s = self._settings.visibility_heartbeat_s
        while not self._stopping.is_set():
            free = self._acquire_slots()
            if free == 0:
                continue
            try:
                messages = self._queue.receive(free, wait_s, visibility_s)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                self._release_slots(free)
                log.warning("receive failed (%s); backing off", error_code(exc))
                self._stopping.wait(min(30, 2 + random.random() * 3))
                continue
            self._release_slots(free - len(messages))
            if self._stopping.is_set():
                self._queue.release(messages)
                self._release_slots(len(messages))
                break
            for message in messages:
                control = JobControl(self._clock)
                with self._lock:
                    self._in_flight[message.message_id] = _InFlight(message, control, self._clock())
                pool.submit(self._handle, message, control)
            if not messages and self._until_empty and self._queue_idle():
                log.info("queue is empty and no job is running; stopping (--until-empty)")
                break

    def _acquire_slots(self) -> int:
        """Wait (up to a second, so a stop is seen) for one free job slot; take all free ones."""
        if not self._slots.acquire(timeout=1):
            return 0
        free = 1
        while free < SQS_MAX_BATCH and self._slots.acquire(blocking=False):
            free += 1
        return free

    def _release_slots(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    def _queue_idle(self) -> bool:
        with self._lock:
            if self._in_flight:
                return False
        self._acks.flush()   # settled messages still count as in flight until deleted
        visible, in_flight = self._queue.depth()
        return visible == 0 and in_flight == 0

    def _drain(self) -> bool:
        """Wait for running jobs until ShutdownGrace has passed since the stop; then stop them
        and hand their messages back. Returns whether every job thread has finished."""
        requested = self._stop_requested_at if self._stop_requested_at is not None else self._clock()
        deadline = requested + self._settings.shutdown_grace_s
        # The whole shutdown fits in the grace (Spot and scale-in kill at 30 s): jobs get all
        # of it but the last moment, which hands their messages back and lets them stop.
        hand_back_at = deadline - min(SHUTDOWN_HAND_BACK_S, self._settings.shutdown_grace_s / 2)
        while self._busy() and self._clock() < hand_back_at:
            self._wait_for_jobs(min(0.5, max(0.0, hand_back_at - self._clock())))
        with self._lock:
            left = list(self._in_flight.values())
        for item in left:
            item.control.request_stop("worker shutting down")
        if left:
            log.warning("shutdown grace over: handing %d unfinished messages back to the queue",
                        len(left))
            _quietly(self._queue.release, [item.message for item in left])
        # Stopped jobs notice between parts and retries; one blocked in I/O is left behind
        # (the entry point exits without waiting for it): its message is already back.
        while self._busy() and self._clock() < deadline:
            self._wait_for_jobs(min(0.2, max(0.0, deadline - self._clock())))
        return not self._busy()

    def _busy(self) -> bool:
        with self._lock:
            return bool(self._in_flight)

    def _wait_for_jobs(self, timeout: float) -> None:
        with self._jobs_changed:
            self._jobs_changed.wait(timeout)

    # -- one message -------------------------------------------------------------------------------
    def _handle(self, message: Message, control: JobControl) -> None:
        """Run every job of one message and settle the message by how they ended."""
        outcome = "failed"
        try:
            outcome = self._run_jobs(message, control)
            self._acks.add(message)
        except JobStopped as exc:
            outcome = "stopped"
            log.warning("message %s: %s; handing it back", message.message_id, exc)
            _quietly(self._queue.release, [message])
        except MessageError as exc:
            outcome = "malformed"
            log.error("message %s malformed, left for the dead-letter queue: %s",
                      message.message_id, exc)
            self._retry_later(message)
        except Exception as exc:  # noqa: BLE001 - every failure leaves the message for a retry
            log.error("message %s failed (attempt %d), will be retried: %s: %s",
                      message.message_id, message.receive_count, error_code(exc), exc)
            self._retry_later(message)
        finally:
            with self._lock:
                self._in_flight.pop(message.message_id, None)
                self.counts[outcome] = self.counts.get(outcome, 0) + 1
                self._jobs_changed.notify_all()
            self._slots.release()

    def _retry_later(self, message: Message) -> None:
        """Leave the message in the queue, visible again after RetryDelay doubled per receive;
        SQS's redrive policy moves it to the dead-letter queue after maxReceiveCount."""
        delay = self._settings.retry_delay_s * 2 ** min(message.receive_count - 1, 10)
        _quietly(self._queue.set_visibility, [message], min(SQS_MAX_VISIBILITY_S, delay))

    def _run_jobs(self, message: Message, control: JobControl) -> str:
        jobs = parse_message(message.body, self._settings.dest_bucket_default,
                             self._settings.dest_prefix_default)
        if not jobs:
            log.info("message %s is a test event; acknowledged", message.message_id)
            return "test-event"
        outcomes = []
        for job in jobs:
            outcomes.append(self._run_job(job, message, control).value)
        return outcomes[0] if len(set(outcomes)) == 1 else "mixed"

    def _run_job(self, job: Job, message: Message, control: JobControl) -> Outcome:
        """Copy one job's object; logs one structured line at its start and one at its end."""
        pattern = self._ignore.matches(job.src_bucket, job.src_key)
        if pattern is not None:
            log.info("job ignored key=%s pattern=%s", job.src_key, pattern,
                     extra={"job": {"event": "job_end", "key": job.src_key,
                                    "outcome": Outcome.IGNORED.value, "pattern": pattern}})
            self._metrics.job_finished(Outcome.IGNORED.value, 0)
            return Outcome.IGNORED
        started = self._clock()
        read_before, written_before = control.bytes_read, control.bytes_written
        log.info("job start key=%s size=%d attempt=%d", job.src_key, job.size,
                 message.receive_count, extra={"job": {
                     "event": "job_start", "bucket": job.src_bucket, "key": job.src_key,
                     "size": job.size, "attempt": message.receive_count}})
        self._metrics.job_started()
        outcome, error = "failed", ""
        try:
            with self._key_guard.hold(f"{job.dst_bucket}/{job.dst_key}", control):
                outcome = self._copier.run(job, control).value
        except SourceGone as exc:
            outcome, error = Outcome.SOURCE_GONE.value, str(exc)
            return Outcome.SOURCE_GONE
        except JobStopped as exc:
            outcome, error = "stopped", control.stop_reason or str(exc)
            raise
        except Exception as exc:
            error = error_code(exc)
            raise
        finally:
            seconds = self._clock() - started
            fields = {"event": "job_end", "bucket": job.src_bucket, "key": job.src_key,
                      "size": job.size, "seconds": round(seconds, 3),
                      "mbps": round(job.size / MiB / seconds, 2) if seconds > 0 else 0.0,
                      "outcome": outcome, "attempt": message.receive_count,
                      "bytes_read": control.bytes_read - read_before, "error": error}
            log.log(logging.WARNING if error else logging.INFO,
                    "job end key=%s size=%d seconds=%.2f MB/s=%.1f outcome=%s attempt=%d "
                    "bytes_read=%d%s", job.src_key, job.size, seconds, fields["mbps"], outcome,
                    message.receive_count, fields["bytes_read"],
                    f" error={error}" if error else "", extra={"job": fields})
            self._metrics.job_finished(outcome, control.bytes_written - written_before)
        return Outcome(outcome)

    # -- heartbeat -------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        """Every third of VisibilityHeartbeat: extend progressing messages, stop stuck jobs.

        Runs until run() has finished, so jobs draining at shutdown keep their messages.
        """
        interval = max(0.2, self._settings.visibility_heartbeat_s / 3)
        while not self._finished.wait(interval):
            self._heartbeat_once()

    def _heartbeat_once(self) -> None:
        now = self._clock()
        step = self._settings.visibility_heartbeat_s
        extend = []
        with self._lock:
            items = list(self._in_flight.values())
        for item in items:
            control = item.control
            if now - control.started_at > self._settings.job_timeout_s:
                control.request_stop(f"JobTimeout of {self._settings.job_timeout_s}s reached")
            elif now - control.last_progress_at > step:
                control.request_stop(f"no progress for {step}s")
            elif now - item.extended_at >= step / 3:
                item.extended_at = now
                extend.append(item.message)
        self._metrics.oldest_message_age(
            max((time.time() - item.message.sent_at_s for item in items), default=0.0))
        if extend:
            try:
                self._queue.set_visibility(extend, step)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                log.warning("visibility heartbeat failed: %s", error_code(exc))
