#!/usr/bin/env python3
"""inventory_to_sqs: turn S3 Inventory CSV reports into jobs on the worker queue, for buckets
too large to list.

Each INPUT is a local path or s3://bucket/key: a CSV report (plain or gzip, recognised by its
content) or the report's manifest.json, whose fileSchema names the columns and whose files are
read from the inventory's destination bucket. Without a manifest the columns are recognised from
the first row: "Bucket, Key, Size, ..." or, for reports with versions, "Bucket, Key, VersionId,
IsLatest, IsDeleteMarker, Size, ..."; --schema names them otherwise. Keys are URL-decoded (S3
writes them URL-encoded, a space as +). Only current versions become jobs: rows with IsLatest
false or IsDeleteMarker true are counted and skipped; jobs carry the row's versionId.

Destination: --des-bucket and --des-prefix, by default the ini's Des_bucket_default and
Des_prefix_default, mapped as the worker maps S3 events (des_prefix + "/" + key). The ignore list
applies and --prefix keeps only keys under a prefix. Nothing is diffed: the worker acknowledges
objects the destination already holds without copying them.

A row that cannot be read stops the run with "file:line: reason" once the jobs of every row
before it were sent; --skip-bad-rows logs such rows and goes on. Every job SQS accepted is
written to a journal (--journal; default inventory_to_sqs-<time>.sent.jsonl here); --dry-run
prints the jobs to stdout instead of sending them (summary on stderr).

examples:
  python3 tools/inventory_to_sqs.py s3://inventory-bucket/src/daily/2024-05-01T01-00Z/manifest.json
  python3 tools/inventory_to_sqs.py --dry-run part-00.csv.gz part-01.csv.gz > jobs.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gzip
import io
import json
import logging
import sys
import threading
import time
import urllib.parse
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import botocore.exceptions  # noqa: E402

import s3_migration_lib as lib  # noqa: E402
from tools import toolkit  # noqa: E402

PROG = "inventory_to_sqs"
log = logging.getLogger("3gsync.inventory")

PLAIN_COLUMNS = ("Bucket", "Key", "Size")
VERSION_COLUMNS = ("Bucket", "Key", "VersionId", "IsLatest", "IsDeleteMarker", "Size")
REQUIRED_COLUMNS = ("Bucket", "Key", "Size")
BOOLEANS = {"true": True, "false": False}
READ_BUFFER = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Columns and rows.
# ---------------------------------------------------------------------------------------------
class RowError(ValueError):
    """One CSV row cannot be turned into a job; the message says why."""


@dataclasses.dataclass(frozen=True)
class Schema:
    """The columns of a report, by name as S3 Inventory spells them."""

    columns: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, where: str) -> "Schema":
        columns = tuple(name.strip() for name in text.split(",") if name.strip())
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise toolkit.InputError(f"{where}: the columns {text!r} lack {', '.join(missing)}")
        return cls(columns)

    @classmethod
    def guess(cls, row: Sequence[str]) -> "Schema | None":
        """The layout of a first row: versioned when columns 4 and 5 are booleans."""
        if len(row) >= 6 and row[3].lower() in BOOLEANS and row[4].lower() in BOOLEANS:
            return cls(VERSION_COLUMNS)
        if len(row) >= 3 and row[2].strip().isdigit():
            return cls(PLAIN_COLUMNS)
        return None

    def index(self, name: str) -> int | None:
        return self.columns.index(name) if name in self.columns else None

    @property
    def has_versions(self) -> bool:
        return "VersionId" in self.columns


@dataclasses.dataclass(frozen=True)
class Target:
    """Where jobs go: the destination bucket and prefix, and which keys to keep."""

    des_bucket: str
    des_prefix: str
    prefix: str
    ignore: lib.IgnoreList


class RowReader:
    """Turns the rows of one report into jobs (None for rows that are not current objects)."""

    def __init__(self, schema: Schema, target: Target):
        self.schema = schema
        self.target = target
        self._bucket = schema.index("Bucket")
        self._key = schema.index("Key")
        self._size = schema.index("Size")
        self._version = schema.index("VersionId")
        self._latest = schema.index("IsLatest")
        self._marker = schema.index("IsDeleteMarker")
        self._width = 1 + max(i for i in (self._bucket, self._key, self._size, self._version,
                                          self._latest, self._marker) if i is not None)

    def read(self, row: Sequence[str]) -> tuple[str, lib.Job | None]:
        """(outcome, job): outcome is job, not-current, delete-marker, ignored or other-prefix."""
        if len(row) < self._width:
            raise RowError(f"{len(row)} columns, expected at least {self._width} "
                           f"({', '.join(self.schema.columns[:self._width])})")
        bucket = row[self._bucket].strip()
        if not bucket:
            raise RowError("Bucket is empty")
        key = urllib.parse.unquote_plus(row[self._key])
        if not key:
            raise RowError("Key is empty")
        if self._latest is not None and not self._flag(row, self._latest, "IsLatest"):
            return "not-current", None
        if self._marker is not None and self._flag(row, self._marker, "IsDeleteMarker"):
            return "delete-marker", None
        text = row[self._size].strip()
        try:
            size = int(text)
        except ValueError:
            raise RowError(f"Size {text!r} is not a whole number") from None
        if size < 0 or size > lib.MAX_OBJECT_SIZE:
            raise RowError(f"Size {size} is out of range")
        if not key.startswith(self.target.prefix):
            return "other-prefix", None
        if self.target.ignore.matches(bucket, key) is not None:
            return "ignored", None
        version = row[self._version].strip() if self._version is not None else ""
        return "job", lib.Job(src_bucket=bucket, src_key=key, size=size,
                              dst_bucket=self.target.des_bucket,
                              dst_key=lib.destination_key(self.target.des_prefix, key),
                              version_id=version or lib.NULL_VERSION)

    @staticmethod
    def _flag(row: Sequence[str], index: int, name: str) -> bool:
        value = BOOLEANS.get(row[index].strip().lower())
        if value is None:
            raise RowError(f"{name} {row[index]!r} is neither true nor false")
        return value


# ---------------------------------------------------------------------------------------------
# Inputs: local or s3://, gzip or plain, CSV or manifest.json.
# ---------------------------------------------------------------------------------------------
class _BodyStream(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, so it can be buffered and peeked at."""

    def __init__(self, body: Any):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def split_s3_url(location: str) -> tuple[str, str]:
    bucket, _, key = location[len("s3://"):].partition("/")
    if not bucket or not key:
        raise toolkit.InputError(f"{location}: expected s3://bucket/key")
    return bucket, key


@contextlib.contextmanager
def open_input(location: str, s3: Callable[[], Any]) -> Iterator[io.BufferedReader]:
    """A buffered binary stream of a local file or an s3:// object."""
    if location.startswith("s3://"):
        bucket, key = split_s3_url(location)
        try:
            body = s3().get_object(Bucket=bucket, Key=key)["Body"]
        except botocore.exceptions.ClientError as exc:
            raise toolkit.InputError(f"{location}: cannot read: {lib.error_code(exc)}") from None
        stream = io.BufferedReader(_BodyStream(body), buffer_size=READ_BUFFER)
    else:
        try:
            stream = open(location, "rb", buffering=READ_BUFFER)  # noqa: SIM115
        except OSError as exc:
            raise toolkit.InputError(f"{location}: cannot read: {exc.strerror}") from None
    with stream:
        yield stream


def check_inputs(inputs: Sequence[str], s3: Callable[[], Any]) -> None:
    """Every input readable before anything is sent; InputError names the first that is not."""
    for location in inputs:
        if location.startswith("s3://"):
            bucket, key = split_s3_url(location)
            try:
                s3().head_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                code = lib.error_code(exc)
                code = {"404": "NoSuchKey", "403": "AccessDenied"}.get(code, code)
                raise toolkit.InputError(f"{location}: cannot read: {code}") from None
        else:
            try:
                with open(location, "rb"):
                    pass
            except OSError as exc:
                raise toolkit.InputError(f"{location}: cannot read: {exc.strerror}") from None


def is_gzip(stream: io.BufferedReader) -> bool:
    return stream.peek(2)[:2] == b"\x1f\x8b"


def looks_like_json(stream: io.BufferedReader) -> bool:
    return stream.peek(64).lstrip()[:1] == b"{"


def read_manifest(location: str, data: bytes) -> tuple[Schema, list[str]]:
    """The schema and the s3:// locations of the CSV files a manifest.json lists."""
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise toolkit.InputError(f"{location}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise toolkit.InputError(f"{location}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(document, dict):
        raise toolkit.InputError(f"{location}:1: expected a manifest object")
    file_format = str(document.get("fileFormat", "CSV"))
    if file_format.upper() != "CSV":
        raise toolkit.InputError(f"{location}: fileFormat {file_format} is not supported "
                                 "(only CSV reports)")
    schema = Schema.parse(str(document.get("fileSchema", "")), f"{location}: fileSchema")
    bucket = str(document.get("destinationBucket", "")).rsplit(":", 1)[-1]
    files = document.get("files")
    if not bucket or not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("key"), str) for f in files):
        raise toolkit.InputError(f"{location}: a manifest needs destinationBucket and files "
                                 "[{\"key\": ...}]")
    return schema, [f"s3://{bucket}/{f['key']}" for f in files]


# ---------------------------------------------------------------------------------------------
# Sending.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FileTally:
    """What one CSV file held."""

    file: str
    rows: int = 0
    jobs: int = 0
    job_bytes: int = 0
    not_current: int = 0
    delete_markers: int = 0
    ignored: int = 0
    other_prefix: int = 0
    bad_rows: int = 0


_OUTCOME_FIELDS = {"not-current": "not_current", "delete-marker": "delete_markers",
                   "ignored": "ignored", "other-prefix": "other_prefix"}


class InventoryRun:
    """Reads every input in order and hands a job per current object to the sender."""

    def __init__(self, target: Target, sender: toolkit.BatchSender, s3: Callable[[], Any], *,
                 schema: Schema | None = None, skip_bad_rows: bool = False):
        self.target = target
        self.sender = sender
        self.s3 = s3
        self.schema = schema
        self.skip_bad_rows = skip_bad_rows
        self.files: list[FileTally] = []
        self._lock = threading.Lock()
        self.started = time.monotonic()

    def run(self, inputs: Sequence[str]) -> None:
        for location in inputs:
            with open_input(location, self.s3) as stream:
                manifest = None
                if not is_gzip(stream) and looks_like_json(stream):
                    manifest = read_manifest(location, stream.read())
                else:
                    self._read_csv(location, stream, self.schema)
            if manifest is not None:
                schema, files = manifest
                log.info("%s: %d report files, columns %s", location, len(files),
                         ", ".join(schema.columns))
                for data_file in files:
                    with open_input(data_file, self.s3) as stream:
                        self._read_csv(data_file, stream, self.schema or schema)

    def _read_csv(self, name: str, stream: io.BufferedReader, schema: Schema | None) -> None:
        tally = FileTally(name)
        with self._lock:
            self.files.append(tally)
        tag = len(self.files) - 1
        binary: BinaryIO = gzip.GzipFile(fileobj=stream) if is_gzip(stream) else stream
        text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        reader = csv.reader(text)
        rows: RowReader | None = RowReader(schema, self.target) if schema else None
        try:
            for row in reader:
                if not row or row == [""]:
                    continue
                if rows is None:
                    guessed = Schema.guess(row)
                    if guessed is None:
                        raise toolkit.InputError(
                            f"{name}:{reader.line_num}: cannot tell the columns from the first "
                            "row; give --schema (e.g. \"Bucket, Key, Size\") or the manifest.json")
                    rows = RowReader(guessed, self.target)
                with self._lock:
                    tally.rows += 1
                try:
                    outcome, job = rows.read(row)
                except RowError as exc:
                    self._bad_row(tally, f"{name}:{reader.line_num}: {exc}")
                    continue
                if job is None:
                    with self._lock:
                        field = _OUTCOME_FIELDS[outcome]
                        setattr(tally, field, getattr(tally, field) + 1)
                    continue
                self.sender.put(lib.jobsender_message(job), tag=tag, size=job.size,
                                what=f"s3://{job.src_bucket}/{job.src_key}")
                with self._lock:
                    tally.jobs += 1
                    tally.job_bytes += job.size
        except UnicodeDecodeError as exc:
            raise toolkit.InputError(f"{name}:{reader.line_num + 1}: not UTF-8 text "
                                     f"({exc.reason})") from None
        except csv.Error as exc:
            raise toolkit.InputError(f"{name}:{reader.line_num}: bad CSV: {exc}") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise toolkit.InputError(f"{name}: after line {reader.line_num}: damaged gzip data "
                                     f"({exc or type(exc).__name__})") from None

    def _bad_row(self, tally: FileTally, message: str) -> None:
        if not self.skip_bad_rows:
            raise toolkit.InputError(message + "; stopped there, after sending the jobs of the "
                                     "rows before it (see the summary)")
        log.warning("skipping bad row %s", message)
        with self._lock:
            tally.bad_rows += 1

    def progress_line(self) -> str:
        with self._lock:
            rows = sum(f.rows for f in self.files)
            jobs = sum(f.jobs for f in self.files)
            files = len(self.files)
        seconds = max(1e-6, time.monotonic() - self.started)
        return (f"files {files}  rows {rows:,} ({rows / seconds:,.0f}/s)  jobs {jobs:,}  "
                f"sent {self.sender.totals().sent:,}")

    def summary(self) -> dict[str, Any]:
        files = []
        with self._lock:
            tallies = [dataclasses.replace(f) for f in self.files]
        for index, tally in enumerate(tallies):
            files.append({**dataclasses.asdict(tally),
                          **dataclasses.asdict(self.sender.counts(index))})
        total = {name: sum(f[name] for f in files) for name in files[0] if name != "file"} \
            if files else {}
        return {"files": files, "total": total}


def summary_table(summary: Mapping[str, Any]) -> str:
    headers = ["file", "rows", "jobs", "job bytes", "sent", "not sent", "not current",
               "delete markers", "ignored", "other prefix", "bad rows"]

    def row(label: str, r: Mapping[str, Any]) -> list[object]:
        return [label, r["rows"], r["jobs"], toolkit.human_bytes(r["job_bytes"]), r["sent"],
                r["jobs"] - r["sent"], r["not_current"], r["delete_markers"], r["ignored"],
                r["other_prefix"], r["bad_rows"]]

    rows = [row(f["file"], f) for f in summary["files"]]
    if len(rows) > 1:
        rows.append(row("total", summary["total"]))
    return toolkit.format_table(headers, rows)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = toolkit.argument_parser(PROG, __doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="CSV report (.csv or .csv.gz) or manifest.json; a path or s3://")
    parser.add_argument("--des-bucket", help="destination bucket (default: Des_bucket_default)")
    parser.add_argument("--des-prefix", help="destination prefix (default: Des_prefix_default)")
    parser.add_argument("--prefix", default="", help="only keys starting with this")
    parser.add_argument("--schema", metavar="COLUMNS",
                        help="the CSV columns, comma-separated, as in a manifest's fileSchema")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="log and skip rows that cannot be read instead of stopping")
    parser.add_argument("--dry-run", action="store_true",
                        help="send nothing: print the job bodies to stdout, the summary to stderr")
    parser.add_argument("--send-threads", type=toolkit.positive_int, default=4, metavar="N",
                        help="SendMessageBatch calls at once (default: %(default)s)")
    parser.add_argument("--journal", type=Path, metavar="FILE",
                        help="where to write every job body sent (default: "
                             "inventory_to_sqs-<time>.sent.jsonl in the current directory)")
    parser.add_argument("--no-journal", action="store_true", help="write no journal")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return toolkit.run(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    settings = toolkit.setup(args)
    clouds = toolkit.Clouds(settings, pool=args.send_threads + 4)
    des_bucket = args.des_bucket or settings.dest_bucket_default
    if not des_bucket:
        raise lib.ConfigError("config key Des_bucket_default is empty; give --des-bucket")
    des_prefix = settings.dest_prefix_default if args.des_prefix is None else args.des_prefix
    schema = Schema.parse(args.schema, "--schema") if args.schema else None
    target = Target(des_bucket, des_prefix, args.prefix,
                    lib.IgnoreList.load(settings.ignore_list_path))
    check_inputs(args.inputs, lambda: clouds.source)
    queue = clouds.queue()
    journal_path = None if args.dry_run or args.no_journal else (
        args.journal or toolkit.default_journal_path(PROG))
    with toolkit.open_journal(journal_path) as journal:
        sender = toolkit.BatchSender(clouds.sqs, queue.url, threads=args.send_threads,
                                     journal=journal, dry_run=sys.stdout if args.dry_run else None)
        inventory = InventoryRun(target, sender, lambda: clouds.source, schema=schema,
                                 skip_bad_rows=args.skip_bad_rows)
        failure: BaseException | None = None
        with toolkit.Progress(inventory.progress_line, enabled=not args.quiet):
            try:
                inventory.run(args.inputs)
            except KeyboardInterrupt as exc:
                sender.abort("interrupted")
                failure = exc
            except BaseException as exc:  # noqa: BLE001 - reported after the summary, re-raised
                failure = exc
            finally:
                sender.close()
    summary = inventory.summary()
    summary.update(queue=settings.queue_name, dry_run=args.dry_run,
                   journal=str(journal_path) if journal_path else None,
                   seconds=round(time.monotonic() - inventory.started, 3),
                   complete=failure is None and sender.error is None)
    print_summary(summary, args)
    if failure is not None:
        raise failure
    if sender.error:
        raise toolkit.ToolError(sender.error)
    total = summary["total"]
    if total and total["jobs"] != total["sent"]:
        print(f"{PROG}: error: {total['jobs'] - total['sent']:,} jobs were not sent (see the log)",
              file=sys.stderr)
        return toolkit.EXIT_INCOMPLETE
    return toolkit.EXIT_OK


def print_summary(summary: Mapping[str, Any], args: argparse.Namespace) -> None:
    stream = sys.stderr if args.dry_run else sys.stdout
    if args.json:
        print(json.dumps(summary, sort_keys=True), file=stream)
        return
    if summary["files"]:
        print(summary_table(summary), file=stream)
    print(toolkit.sent_line(summary, args.dry_run), file=stream)


if __name__ == "__main__":
    sys.exit(main())
