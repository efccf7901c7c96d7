"""Shared plumbing for the 3GSync command-line tools (jobsender, triggers, inventory_to_sqs,
clean_uploads, status).

* ``argument_parser``/``setup``: ``--config`` like the worker's, ``-v``/``-q``, logging to stderr;
* ``Clouds``: boto3 clients built from ``Settings`` the way ``lib.connect`` builds the worker's,
  but lazily (a tool that never touches the destination never reads its keys);
* ``run``: one-line errors and the exit codes below;
* ``format_table``/``human_bytes``/``Progress``: what an operator reads;
* ``BatchSender``: message bodies to SQS, ten per ``SendMessageBatch``, failed entries retried,
  every accepted body written to a journal, so an interrupted run says exactly what it sent.

Nothing here is imported by the library or the worker.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO

import botocore.config
import botocore.exceptions

import s3_migration_lib as lib

log = logging.getLogger("3gsync.tools")

EXIT_OK = lib.EXIT_OK
EXIT_UNEXPECTED = lib.EXIT_UNEXPECTED
EXIT_CONFIG = lib.EXIT_CONFIG
EXIT_CREDENTIALS = lib.EXIT_CREDENTIALS
EXIT_INPUT = 4
EXIT_REFUSED = 5
EXIT_INCOMPLETE = 6
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "exit status: 0 done; 1 unexpected or AWS error; 2 bad configuration; 3 credentials; "
    "4 bad input (the message names the file and line); 5 refused (the message says why); "
    "6 incomplete (the summary says what was not done); 130 interrupted")


# ---------------------------------------------------------------------------------------------
# Errors and exit codes.
# ---------------------------------------------------------------------------------------------
class ToolError(Exception):
    """An expected failure: reported as one line, exit code ``exit_code``."""

    exit_code = EXIT_UNEXPECTED


class InputError(ToolError):
    """A bad input file, row or bucket; the message starts with ``file:line:`` where known."""

    exit_code = EXIT_INPUT


class Refused(ToolError):
    """The tool will not go on without an explicit override (``--force``)."""

    exit_code = EXIT_REFUSED


def one_line(text: object) -> str:
    return " ".join(str(text).splitlines())


def run(prog: str, body: Callable[[], int]) -> int:
    """Call ``body``; turn every expected failure into ``prog: error: ...`` and an exit code."""
    try:
        return body()
    except KeyboardInterrupt:
        message, code = "interrupted", EXIT_INTERRUPTED
    except ToolError as exc:
        message, code = str(exc), exc.exit_code
    except lib.ConfigError as exc:
        message, code = f"configuration: {exc}", EXIT_CONFIG
    except lib.CredentialsError as exc:
        message, code = f"credentials: {exc}", EXIT_CREDENTIALS
    except botocore.exceptions.NoRegionError:
        message, code = "no AWS region: set AWS_DEFAULT_REGION (or a profile region)", EXIT_CONFIG
    except botocore.exceptions.NoCredentialsError:
        message, code = ("no AWS credentials: environment, ~/.aws or an instance role",
                         EXIT_CREDENTIALS)
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        message = (f"{exc.operation_name}: {error.get('Code', 'error')}: "
                   f"{error.get('Message', '')}".rstrip(": "))
        code = EXIT_UNEXPECTED
    except botocore.exceptions.BotoCoreError as exc:
        message, code = f"{type(exc).__name__}: {exc}", EXIT_UNEXPECTED
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------
# Arguments, settings and logging.
# ---------------------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """``--config``, ``-v`` and ``-q``; with ``suppress`` they default to nothing (subcommands)."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--config", type=Path, default=default(lib.DEFAULT_CONFIG_PATH),
                        help="the worker's ini file (default: %s)" % lib.DEFAULT_CONFIG_PATH)
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log at DEBUG level")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="log warnings and errors only, no progress display")


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose --help shows the module docstring and the exit codes."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    return parser


def int_between(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"{minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({bound})")
        return value
    return parse


positive_int = int_between(1)
non_negative_int = int_between(0)


def non_negative_float(text: str) -> float:
    """An argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def setup(args: argparse.Namespace) -> lib.Settings:
    """Load the worker's settings and configure logging (LoggingLevel, or -v / -q)."""
    settings = lib.Settings.from_ini(args.config)
    level = "DEBUG" if args.verbose else "WARNING" if args.quiet else settings.logging_level
    configure_logging(level)
    return settings


def configure_logging(level: str) -> None:
    """The tools' one place that configures the root logger (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# ---------------------------------------------------------------------------------------------
# Clients.
# ---------------------------------------------------------------------------------------------
class Clouds:
    """boto3 clients for one tool run, from the worker's Settings.

    PUT mode: built as ``lib.connect`` builds the worker's (AWS default credential chain,
    endpoints from ``AWS_ENDPOINT_URL*``, ``SrcEndPointURL`` for the source, the destination's
    keys from the SSM SecureString ``ssm_parameter_credentials``), minus the EC2 metadata
    look-up a tool on an operator's machine has no use for, and each client only when first
    used. GET mode: both clouds' keys live in the Secret Manager secret, so ``lib.connect``
    itself reads them and its AWS session serves SQS, DynamoDB and SSM too.
    """

    def __init__(self, settings: lib.Settings, pool: int = 10):
        self.settings = settings
        self.pool = pool
        self._access: lib.CloudAccess | None = None
        if settings.job_type == "GET":
            self._access = lib.connect(settings)
            self.session = self._access.aws
        else:
            self.session = lib.aws_session(None)

    def client(self, service: str) -> Any:
        """An AWS client (SQS, DynamoDB, SSM) on the default chain and endpoint variables."""
        return self.session.client(service, config=botocore.config.Config(
            max_pool_connections=self.pool, retries={"mode": "standard", "max_attempts": 5}))

    @functools.cached_property
    def sqs(self) -> Any:
        return self.client("sqs")

    @functools.cached_property
    def dynamodb(self) -> Any:
        return self.client("dynamodb")

    @functools.cached_property
    def ssm(self) -> Any:
        return self.client("ssm")

    @functools.cached_property
    def source(self) -> Any:
        """The source S3 client (``SrcEndPointURL``, path-style when an endpoint is set)."""
        if self._access is not None:
            return self._access.source
        url = self.settings.src_endpoint_url
        return self.session.client("s3", endpoint_url=url,
                                   config=lib.s3_client_config(self.pool, path_style=bool(url)))

    @functools.cached_property
    def destination(self) -> Any:
        """The destination's S3-compatible client (PUT mode: HMAC keys from SSM)."""
        if self._access is not None:
            return self._access.destination
        settings = self.settings
        where = f"SSM parameter {settings.ssm_parameter_credentials}"
        key = lib.parse_access_key_json(
            lib.read_ssm_secure_string(self.session, settings.ssm_parameter_credentials), where)
        region = key.region if settings.dest_region == "auto" else settings.dest_region
        # As lib.connect does: this session with the destination's own keys, so boto3 loads
        # its endpoint and S3 models once.
        return self.session.client(
            "s3", endpoint_url=settings.dest_endpoint_url, region_name=region or "auto",
            aws_access_key_id=key.access_key_id, aws_secret_access_key=key.secret_access_key,
            config=lib.s3_client_config(self.pool, path_style=True))

    def queue(self, name: str | None = None) -> lib.JobQueue:
        """The job queue (``sqs_queue_name``); ConfigError naming the key when it is missing."""
        return lib.JobQueue.by_name(self.sqs, name or self.settings.queue_name)


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------
def human_bytes(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def sent_line(summary: Mapping[str, Any], dry_run: bool) -> str:
    """The closing line of a run that sends jobs: how many, how many bytes, where, the journal,
    and whether the run stopped early."""
    total = summary["total"] or {"sent": 0, "sent_bytes": 0}
    verb = "would send" if dry_run else "sent"
    line = (f"{verb} {total['sent']:,} jobs ({human_bytes(total['sent_bytes'])}) to queue "
            f"{summary['queue']} in {summary['seconds']:.1f} s")
    if summary["journal"]:
        line += f"; journal: {summary['journal']}"
    if not summary["complete"]:
        line += "; INCOMPLETE: the run stopped early, the journal lists every job sent"
    return line


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table; numbers are right-aligned and get thousands separators."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i][0]) for row in cells])
              for i, header in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in cells:
        lines.append("  ".join(text.rjust(w) if right else text.ljust(w)
                               for (text, right), w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _cell(value: object) -> tuple[str, bool]:
    """(text, right-aligned) for one table cell."""
    if isinstance(value, bool) or value is None:
        return ("-" if value is None else str(value)), False
    if isinstance(value, int):
        return f"{value:,}", True
    if isinstance(value, float):
        return f"{value:,.1f}", True
    return str(value), False


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class Progress:
    """A status line on stderr while a tool works: rewritten in place on a terminal, a log line
    every ``log_interval_s`` otherwise; the last state is shown once more at the end."""

    def __init__(self, render: Callable[[], str], *, enabled: bool = True,
                 stream: TextIO | None = None, tty_interval_s: float = 0.5,
                 log_interval_s: float = 15.0):
        self._render = render
        self._stream = stream or sys.stderr
        self._tty = enabled and hasattr(self._stream, "isatty") and self._stream.isatty()
        self._enabled = enabled
        self._interval = tty_interval_s if self._tty else log_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> "Progress":
        if self._enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._enabled:
            self._show(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._show(final=False)

    def _show(self, final: bool) -> None:
        line = self._render()
        if self._tty:
            self._stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
            self._stream.flush()
        else:
            log.info("progress: %s", line)


# ---------------------------------------------------------------------------------------------
# Sending jobs to SQS.
# ---------------------------------------------------------------------------------------------
class Stopped(Exception):
    """The sender was aborted; producers stop putting."""


@dataclasses.dataclass
class SendCounts:
    """What happened to the bodies of one tag (a bucket pair, an inventory file)."""

    sent: int = 0
    sent_bytes: int = 0
    failed: int = 0
    unsent: int = 0


@dataclasses.dataclass(frozen=True)
class _Item:
    body: str
    tag: int
    size: int
    what: str


_DONE = object()


def default_journal_path(prog: str) -> Path:
    """``<prog>-<UTC time>.sent.jsonl`` in the current directory."""
    return Path(f"{prog}-{utc_now():%Y%m%dT%H%M%SZ}-{os.getpid()}.sent.jsonl")


@contextlib.contextmanager
def open_journal(path: Path | None) -> Iterator[TextIO | None]:
    """The journal file at ``path`` (appended to), or None; InputError when it cannot be made."""
    if path is None:
        yield None
        return
    try:
        handle = open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the journal: {exc.strerror}") from None
    with handle:
        yield handle


class BatchSender:
    """Message bodies to one SQS queue, ``SendMessageBatch`` of ten, from ``threads`` threads.

    ``put`` blocks while ``capacity`` bodies are waiting (back-pressure, never a sleep). Entries
    SQS fails on its side are retried with capped, jittered back-off up to ``attempts`` times;
    entries it rejects as the sender's fault are logged and counted as failed. A batch still
    failing after every attempt aborts the run (SQS is not healthy). Every body SQS accepted is
    written to ``journal`` as one line, so "what was sent" is exact even after an abort.
    With ``dry_run``, bodies are written to ``dry_run`` instead of being sent.
    """

    def __init__(self, sqs: Any, queue_url: str, *, threads: int = 8,
                 journal: TextIO | None = None, dry_run: TextIO | None = None,
                 attempts: int = 5, capacity: int = 1000, retry_base_s: float = 0.5):
        if threads < 1 or attempts < 1 or capacity < 1:
            raise ValueError("threads, attempts and capacity must be at least 1")
        self._sqs = sqs
        self._url = queue_url
        self._journal = journal
        self._dry_run = dry_run
        self._attempts = attempts
        self._retry_base_s = retry_base_s
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts: dict[int, SendCounts] = {}
        self.error: str | None = None
        self._threads = [threading.Thread(target=self._serve, name=f"sender-{n}", daemon=True)
                         for n in range(threads)]
        for thread in self._threads:
            thread.start()

    # -- producers -------------------------------------------------------------------------------
    def put(self, body: str, tag: int = 0, size: int = 0, what: str = "") -> None:
        """Queue one body for sending; raises Stopped once the sender was aborted."""
        item = _Item(body, tag, size, what)
        while True:
            if self._stop.is_set():
                raise Stopped(self.error or "stopped")
            try:
                self._queue.put(item, timeout=0.25)
                return
            except queue.Full:
                continue

    def abort(self, reason: str) -> None:
        """Send nothing more; bodies still waiting are counted as unsent."""
        with self._lock:
            if self.error is None:
                self.error = reason
        self._stop.set()

    @property
    def aborted(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Send what is waiting (unless aborted) and stop the sender threads."""
        for _ in self._threads:
            self._queue.put(_DONE)
        for thread in self._threads:
            thread.join()
        if self._journal is not None:
            self._journal.flush()

    def counts(self, tag: int) -> SendCounts:
        with self._lock:
            return dataclasses.replace(self._counts.get(tag, SendCounts()))

    def totals(self) -> SendCounts:
        with self._lock:
            total = SendCounts()
            for counts in self._counts.values():
                for field in dataclasses.fields(SendCounts):
                    setattr(total, field.name,
                            getattr(total, field.name) + getattr(counts, field.name))
            return total

    # -- sender threads --------------------------------------------------------------------------
    def _serve(self) -> None:
        done = False
        while not done:
            first = self._queue.get()
            if first is _DONE:
                return
            batch = [first]
            while len(batch) < lib.SQS_MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _DONE:
                    done = True
                    break
                batch.append(item)
            if self._stop.is_set():
                self._count(batch, "unsent")
                continue
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - reported through abort() and the summary
                self.abort(f"sending to SQS failed: {lib.error_code(exc)}: {one_line(exc)}")

    def _send(self, batch: list[_Item]) -> None:
        if self._dry_run is not None:
            with self._lock:
                for item in batch:
                    self._dry_run.write(item.body + "\n")
            self._count(batch, "sent")
            return
        pending = batch
        delays = lib.backoff_delays(self._attempts, base_s=self._retry_base_s)
        for attempt in range(1, self._attempts + 1):
            try:
                response = self._sqs.send_message_batch(QueueUrl=self._url, Entries=[
                    {"Id": str(i), "MessageBody": item.body} for i, item in enumerate(pending)])
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                if attempt == self._attempts:
                    self._count(pending, "unsent")
                    raise
                log.warning("SendMessageBatch failed (%s), attempt %d of %d", lib.error_code(exc),
                            attempt, self._attempts)
                if self._stop.wait(delays[attempt - 1]):
                    self._count(pending, "unsent")
                    return
                continue
            accepted = [pending[int(ok["Id"])] for ok in response.get("Successful", [])]
            self._record_sent(accepted)
            retry = []
            for failure in response.get("Failed", []):
                item = pending[int(failure["Id"])]
                if failure.get("SenderFault"):
                    log.error("SQS refused the job for %s: %s %s", item.what or item.body,
                              failure.get("Code"), failure.get("Message", ""))
                    self._count([item], "failed")
                else:
                    retry.append(item)
            pending = retry
            if not pending:
                return
            log.warning("%d of %d entries failed on the SQS side, attempt %d of %d",
                        len(pending), len(batch), attempt, self._attempts)
            if attempt < self._attempts and self._stop.wait(delays[attempt - 1]):
                self._count(pending, "unsent")
                return
        self._count(pending, "unsent")
        raise ToolError(f"{len(pending)} entries still failing after {self._attempts} attempts")

    def _record_sent(self, items: list[_Item]) -> None:
        if self._journal is not None and items:
            with self._lock:
                self._journal.write("".join(item.body + "\n" for item in items))
                self._journal.flush()
        self._count(items, "sent")

    def _count(self, items: list[_Item], outcome: str) -> None:
        with self._lock:
            for item in items:
                counts = self._counts.setdefault(item.tag, SendCounts())
                setattr(counts, outcome, getattr(counts, outcome) + 1)
                if outcome == "sent":
                    counts.sent_bytes += item.size
