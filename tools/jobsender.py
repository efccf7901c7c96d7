#!/usr/bin/env python3
"""jobsender: backfill. Diff the source bucket(s) against the destination and send one job to
the worker queue for every object that is missing there or differs.

Bucket pairs come from --bucket-list FILE (the seed's jobsender_bucket_list.txt: a JSON list of
{"src_bucket", "src_prefix", "des_bucket", "des_prefix"}) or, without it, from the SSM parameter
named by ssm_parameter_bucket in the ini (same JSON). For every pair both sides are listed with
pagination and compared by key and size; with JobsenderCompareVersionId = True the source's
current versionIds are listed too and compared with the versionIds the DynamoDB table records
for finished copies (item "Key" = bucket/key), and jobs carry the real versionId. Objects the
ignore list matches are skipped. Jobs go out with SendMessageBatch, ten per call; entries SQS
fails are retried.

Key mapping (the seed's, and the worker's for S3 events): the destination key is des_prefix +
"/" + the whole source key, src_prefix included ("photos/a.jpg" with des_prefix "backup" ->
"backup/photos/a.jpg"); an empty des_prefix keeps the key as it is. src_prefix is a plain key
prefix: "photos" also matches "photos2/...".

Scale: each pair is cut into shards by sub-prefix ("directories", up to --split-depth levels),
listed --parallel at a time. Within a shard both listings arrive in key order and are merged as
they stream, so memory does not grow with the number of keys. A store that lists out of order
is detected and reported; --hold-destination then holds one shard's destination keys in memory
instead (the seed's way).

By default jobsender refuses to run while the queue holds messages (jobs sent now could repeat
them); --force overrides. Every job SQS accepted is written, one body a line, to a journal file
(--journal; default jobsender-<time>.sent.jsonl here), so an interrupted run says exactly what it
sent. --dry-run sends nothing and prints the job bodies to stdout instead (summary on stderr).

examples:
  python3 tools/jobsender.py --config s3_migration_cluster_config.ini --dry-run > jobs.jsonl
  python3 tools/jobsender.py --bucket-list tools/jobsender_bucket_list.txt --parallel 16
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import botocore.exceptions  # noqa: E402

import s3_migration_lib as lib  # noqa: E402
from tools import toolkit  # noqa: E402

PROG = "jobsender"
log = logging.getLogger("3gsync.jobsender")

DEFAULT_PAGE_SIZE = 1000          # ListObjectsV2's maximum
DEFAULT_PARALLEL = 8
DEFAULT_SEND_THREADS = 4
DEFAULT_SPLIT_DEPTH = 2
DISCOVERY_MAX_PAGES = 10          # a level listing longer than this is not split further
SHARDS_PER_THREAD = 4             # split until there are this many shards per listing thread
PAIR_FIELDS = ("src_bucket", "src_prefix", "des_bucket", "des_prefix")


# ---------------------------------------------------------------------------------------------
# Bucket pairs.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BucketPair:
    """One source bucket/prefix to keep in step with one destination bucket/prefix."""

    src_bucket: str
    src_prefix: str
    des_bucket: str
    des_prefix: str
    where: str = ""   # "file:line" of its entry, for error messages

    def destination_key(self, src_key: str) -> str:
        return lib.destination_key(self.des_prefix, src_key)

    def __str__(self) -> str:
        return f"{self.src_bucket}/{self.src_prefix} -> {self.des_bucket}/{self.des_prefix}"


def parse_bucket_pairs(text: str, source: str) -> list[BucketPair]:
    """The seed's bucket list (a JSON list of objects); InputError names ``source:line``."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise toolkit.InputError(f"{source}:{exc.lineno}: not valid JSON: {exc.msg} "
                                 f"(column {exc.colno})") from None
    if not isinstance(document, list):
        raise toolkit.InputError(f"{source}:1: expected a JSON list of bucket pairs, got a JSON "
                                 f"{type(document).__name__}")
    pairs = [_bucket_pair(item, f"{source}:{line}")
             for line, item in zip(_list_item_lines(text), document)]
    if not pairs:
        raise toolkit.InputError(f"{source}:1: the list of bucket pairs is empty")
    return pairs


def _list_item_lines(text: str) -> Iterator[int]:
    """The line on which each element of a (valid) top-level JSON list starts."""
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    line = 1 + text.count("\n", 0, index)
    while True:
        start = index
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        line += text.count("\n", start, index)
        if index >= len(text) or text[index] == "]":
            return
        yield line
        _, end = decoder.raw_decode(text, index)
        line += text.count("\n", index, end)
        index = end


def _bucket_pair(item: Any, where: str) -> BucketPair:
    if not isinstance(item, dict):
        raise toolkit.InputError(f"{where}: expected an object with {', '.join(PAIR_FIELDS)}")
    unknown = sorted(set(item) - set(PAIR_FIELDS))
    if unknown:
        raise toolkit.InputError(f"{where}: unknown field {unknown[0]!r} "
                                 f"(expected {', '.join(PAIR_FIELDS)})")
    values = {}
    for name in PAIR_FIELDS:
        value = item.get(name) or ""
        if not isinstance(value, str):
            raise toolkit.InputError(f"{where}: field {name} must be a string, got {value!r}")
        values[name] = value
    for name in ("src_bucket", "des_bucket"):
        values[name] = values[name].strip()
        if not values[name]:
            raise toolkit.InputError(f"{where}: field {name} is missing or empty")
    return BucketPair(**values, where=where)


def load_bucket_pairs(path: Path | None, settings: lib.Settings,
                      clouds: toolkit.Clouds) -> list[BucketPair]:
    """Pairs from ``path``, or from the SSM parameter ``ssm_parameter_bucket`` without one."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise toolkit.InputError(
                f"{path}: cannot read the bucket list: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise toolkit.InputError(f"{path}: not UTF-8 text ({exc.reason})") from None
        return parse_bucket_pairs(text, str(path))
    name = settings.ssm_parameter_bucket
    if not name:
        raise lib.ConfigError("config key ssm_parameter_bucket is empty; give --bucket-list FILE")
    try:
        value = clouds.ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
    except botocore.exceptions.ClientError as exc:
        if lib.error_code(exc) == "ParameterNotFound":
            raise toolkit.InputError(
                f"SSM parameter {name} (config key ssm_parameter_bucket) does not exist; "
                "create it or give --bucket-list FILE") from None
        raise
    return parse_bucket_pairs(value, f"SSM parameter {name}")


# ---------------------------------------------------------------------------------------------
# Listing: pages of (key, size, versionId), shards by sub-prefix.
# ---------------------------------------------------------------------------------------------
class Listed(NamedTuple):
    """One listed object (the key relative to the listing's mapping, see Backfill)."""

    key: str
    size: int
    version_id: str = lib.NULL_VERSION


@dataclasses.dataclass(frozen=True, order=True)
class Shard:
    """The keys under ``prefix``; with ``delimited`` only those without a further "/"."""

    prefix: str
    delimited: bool = False


class ListingOrderError(toolkit.ToolError):
    """A listing did not come in ascending key order, so the streaming merge cannot be used."""


class S3Lister:
    """Lists one S3-compatible store page by page (current objects, or latest versions)."""

    def __init__(self, s3: Any, page_size: int = DEFAULT_PAGE_SIZE, latest_versions: bool = False):
        self._s3 = s3
        self.page_size = page_size
        self.latest_versions = latest_versions

    def bucket_problem(self, bucket: str) -> str | None:
        """None when ``bucket`` can be read, else why not (its error code)."""
        try:
            self._s3.head_bucket(Bucket=bucket)
            return None
        except botocore.exceptions.ClientError as exc:
            code = lib.error_code(exc)
            return {"404": "does not exist", "NoSuchBucket": "does not exist",
                    "403": "is not accessible (403)"}.get(code, code)

    def _paginate(self, bucket: str, prefix: str, delimited: bool) -> Iterator[dict]:
        operation = "list_object_versions" if self.latest_versions else "list_objects_v2"
        args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix,
                                "PaginationConfig": {"PageSize": self.page_size}}
        if delimited:
            args["Delimiter"] = "/"
        return self._s3.get_paginator(operation).paginate(**args)

    def pages(self, bucket: str, shard: Shard) -> Iterator[list[Listed]]:
        """The shard's objects, a page at a time, in the store's (ascending) key order."""
        for page in self._paginate(bucket, shard.prefix, shard.delimited):
            if self.latest_versions:
                yield [Listed(v["Key"], v["Size"], v.get("VersionId") or lib.NULL_VERSION)
                       for v in page.get("Versions", ()) if v.get("IsLatest")]
            else:
                yield [Listed(o["Key"], o["Size"]) for o in page.get("Contents", ())]

    def subprefixes(self, bucket: str, prefix: str, max_pages: int) -> list[str] | None:
        """The sub-prefixes one "/" below ``prefix``; None when that level has more than
        ``max_pages`` pages of entries (a flat level is not worth the extra listing)."""
        found: list[str] = []
        for number, page in enumerate(self._paginate(bucket, prefix, True), start=1):
            found += [p["Prefix"] for p in page.get("CommonPrefixes", ())]
            if number >= max_pages and page.get("IsTruncated"):
                return None
        return found


def plan_shards(lister: S3Lister, bucket: str, prefix: str, want: int, max_depth: int,
                max_pages: int = DISCOVERY_MAX_PAGES) -> list[Shard]:
    """Cut the keys under ``prefix`` into disjoint shards covering all of them: breadth first,
    a prefix becomes "its own level" plus one shard per sub-prefix, until there are ``want``
    shards or ``max_depth`` levels were cut."""
    final: list[Shard] = []
    pending = [prefix]
    for _ in range(max_depth):
        if not pending or len(final) + len(pending) >= want:
            break
        deeper: list[str] = []
        for current in pending:
            children = lister.subprefixes(bucket, current, max_pages)
            if children:
                final.append(Shard(current, delimited=True))
                deeper += children
            else:
                final.append(Shard(current))
        pending = deeper
    return sorted(final + [Shard(p) for p in pending])


def check_order(page: Sequence[Listed], previous: str | None, what: str) -> str | None:
    """The page's last key; ListingOrderError unless its keys ascend strictly from ``previous``
    (the last key of the page before). Costs a C-level pass over the page, not a Python one."""
    if not page:
        return previous
    keys = [entry.key for entry in page]
    if (previous is not None and keys[0] <= previous) or keys != sorted(set(keys)):
        before = previous
        for key in keys:
            if before is not None and key <= before:
                raise ListingOrderError(
                    f"{what} is not listed in ascending key order ({key!r} after {before!r}); "
                    "run again with --hold-destination")
            before = key
    return keys[-1]


def join_sorted(source: Iterable[Listed], destination: Iterable[Listed], prefix: str = ""
                ) -> Iterator[tuple[Listed, int | None]]:
    """Each source entry with the size of the destination entry whose key is ``prefix`` + its
    key (None when there is none). Both inputs in ascending key order, so memory stays constant
    (a common prefix keeps the order). The rest of the destination is read to the end (so it is
    counted)."""
    dest = iter(destination)
    current = next(dest, None)
    for entry in source:
        wanted = prefix + entry.key
        while current is not None and current.key < wanted:
            current = next(dest, None)
        if current is not None and current.key == wanted:
            yield entry, current.size
        else:
            yield entry, None
    for _ in dest:
        pass


def join_held(source: Iterable[Listed], destination: Iterable[Listed], prefix: str = ""
              ) -> Iterator[tuple[Listed, int | None]]:
    """Like join_sorted for listings in any order: holds the destination's keys in memory."""
    sizes = {entry.key: entry.size for entry in destination}
    for entry in source:
        yield entry, sizes.get(prefix + entry.key)


def load_versions(dynamodb: Any, table: str, pairs: Sequence[BucketPair]) -> dict[str, str]:
    """{"bucket/key": versionId} of every copy the table records as done under the pairs'
    source prefixes (one Scan, paginated)."""
    prefixes = tuple(sorted({f"{p.src_bucket}/{p.src_prefix}" for p in pairs}))
    versions: dict[str, str] = {}
    paginator = dynamodb.get_paginator("scan")
    for page in paginator.paginate(
            TableName=table, ProjectionExpression="#k, #v, #s",
            ExpressionAttributeNames={"#k": "Key", "#v": "versionId", "#s": "status"}):
        for item in page.get("Items", ()):
            key = item.get("Key", {}).get("S", "")
            done = item.get("status", {}).get("S") == lib.Status.DONE.value
            if done and key.startswith(prefixes):
                versions[key] = item.get("versionId", {}).get("S", lib.NULL_VERSION)
    return versions


# ---------------------------------------------------------------------------------------------
# The backfill: shards listed and merged in parallel, jobs to the sender.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Tally:
    """Counts (and bytes) of one bucket pair."""

    source: int = 0
    source_bytes: int = 0
    destination: int = 0
    destination_bytes: int = 0
    in_sync: int = 0
    missing: int = 0
    missing_bytes: int = 0
    size_differs: int = 0
    size_differs_bytes: int = 0
    version_differs: int = 0
    version_differs_bytes: int = 0
    ignored: int = 0
    ignored_bytes: int = 0
    queued: int = 0
    queued_bytes: int = 0

    def add(self, other: "Tally") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class _Stop(Exception):
    """Another shard failed or the run was interrupted."""


class Backfill:
    """Diffs every pair shard by shard on ``parallel`` threads and hands jobs to ``sender``."""

    def __init__(self, pairs: Sequence[BucketPair], source: S3Lister, destination: S3Lister,
                 sender: toolkit.BatchSender, ignore: lib.IgnoreList, *,
                 versions: Mapping[str, str] | None = None, parallel: int = DEFAULT_PARALLEL,
                 split_depth: int = DEFAULT_SPLIT_DEPTH, hold_destination: bool = False):
        self.pairs = list(pairs)
        self.source = source
        self.destination = destination
        self.sender = sender
        self.ignore = ignore
        self.versions = versions
        self.parallel = parallel
        self.split_depth = split_depth
        self.hold_destination = hold_destination
        self.tallies = [Tally() for _ in self.pairs]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._listed_source = 0
        self._listed_destination = 0
        self._queued = 0
        self.shards_total = 0
        self.shards_done = 0
        self.started = time.monotonic()

    # -- running ---------------------------------------------------------------------------------
    def run(self) -> None:
        """Plan the shards, diff them all; the first failure stops the others and is raised."""
        with concurrent.futures.ThreadPoolExecutor(self.parallel,
                                                   thread_name_prefix="shard") as pool:
            try:
                plans = list(pool.map(self._plan, range(len(self.pairs))))
                work = [(index, shard) for index, shards in enumerate(plans) for shard in shards]
                with self._lock:
                    self.shards_total = len(work)
                log.info("%d pairs in %d shards, %d listing threads", len(self.pairs), len(work),
                         self.parallel)
                futures = [pool.submit(self._diff_shard, index, shard) for index, shard in work]
                for future in concurrent.futures.as_completed(futures):
                    future.result()
            except BaseException as exc:
                self._stop.set()
                if isinstance(exc, KeyboardInterrupt):
                    self.sender.abort("interrupted")
                raise

    def _plan(self, index: int) -> list[Shard]:
        pair = self.pairs[index]
        return plan_shards(self.source, pair.src_bucket, pair.src_prefix,
                           want=self.parallel * SHARDS_PER_THREAD, max_depth=self.split_depth)

    def _diff_shard(self, index: int, shard: Shard) -> None:
        pair = self.pairs[index]
        tally = Tally()
        where = f"{pair.where or pair}: shard {shard.prefix!r}"
        check = not self.hold_destination
        source = itertools.chain.from_iterable(self._pages(
            self.source.pages(pair.src_bucket, shard), "source", tally,
            f"source s3://{pair.src_bucket} ({where})" if check else None))
        dest_shard = Shard(pair.destination_key(shard.prefix), shard.delimited)
        destination = itertools.chain.from_iterable(self._pages(
            self.destination.pages(pair.des_bucket, dest_shard), "destination", tally,
            f"destination {pair.des_bucket} ({where})" if check else None))
        join = join_held if self.hold_destination else join_sorted
        # Destination key = this prefix + source key (des_prefix + "/", or nothing).
        joined = join(source, destination, pair.destination_key(""))
        stopped = self._stop.is_set
        compare_versions = self.versions is not None
        try:
            for entry, dest_size in joined:
                if stopped():
                    raise _Stop()
                if dest_size == entry.size and not compare_versions:
                    tally.in_sync += 1
                else:
                    self._classify(index, pair, entry, dest_size, tally)
        except toolkit.Stopped:
            raise _Stop() from None
        finally:
            with self._lock:
                self.tallies[index].add(tally)
                self.shards_done += 1

    def _pages(self, pages: Iterable[list[Listed]], side: str, tally: Tally,
               ordered: str | None) -> Iterator[list[Listed]]:
        """The pages, counted; with ``ordered`` (what they are), checked to ascend."""
        last = None
        for page in pages:
            if self._stop.is_set():
                raise _Stop()
            if ordered is not None:
                last = check_order(page, last, ordered)
            size = sum(entry.size for entry in page)
            if side == "source":
                tally.source += len(page)
                tally.source_bytes += size
            else:
                tally.destination += len(page)
                tally.destination_bytes += size
            with self._lock:
                if side == "source":
                    self._listed_source += len(page)
                else:
                    self._listed_destination += len(page)
            yield page

    def _classify(self, index: int, pair: BucketPair, entry: Listed, dest_size: int | None,
                  tally: Tally) -> None:
        if dest_size is None:
            reason = "missing"
        elif dest_size != entry.size:
            reason = "size_differs"
        elif (self.versions is not None
              and self.versions.get(f"{pair.src_bucket}/{entry.key}") != entry.version_id):
            reason = "version_differs"
        else:
            tally.in_sync += 1
            return
        setattr(tally, reason, getattr(tally, reason) + 1)
        setattr(tally, f"{reason}_bytes", getattr(tally, f"{reason}_bytes") + entry.size)
        if self.ignore.matches(pair.src_bucket, entry.key) is not None:
            tally.ignored += 1
            tally.ignored_bytes += entry.size
            return
        job = lib.Job(src_bucket=pair.src_bucket, src_key=entry.key, size=entry.size,
                      dst_bucket=pair.des_bucket, dst_key=pair.destination_key(entry.key),
                      version_id=entry.version_id)
        self.sender.put(lib.jobsender_message(job), tag=index, size=entry.size,
                        what=f"s3://{pair.src_bucket}/{entry.key}")
        tally.queued += 1
        tally.queued_bytes += entry.size
        with self._lock:
            self._queued += 1

    # -- reporting -------------------------------------------------------------------------------
    def progress_line(self) -> str:
        with self._lock:
            listed_source, listed_dest = self._listed_source, self._listed_destination
            queued, done, total = self._queued, self.shards_done, self.shards_total
        sent = self.sender.totals().sent
        seconds = max(1e-6, time.monotonic() - self.started)
        return (f"shards {done}/{total or '?'}  listed source {listed_source:,} destination "
                f"{listed_dest:,} ({listed_source / seconds:,.0f} keys/s)  to send {queued:,}  "
                f"sent {sent:,}")

    def summary(self) -> dict[str, Any]:
        """Per pair and in total: what was listed, how it compared, what was sent."""
        rows = []
        total = Tally()
        total_sent = toolkit.SendCounts()
        for index, pair in enumerate(self.pairs):
            tally = self.tallies[index]
            sent = self.sender.counts(index)
            total.add(tally)
            for field in dataclasses.fields(sent):
                setattr(total_sent, field.name,
                        getattr(total_sent, field.name) + getattr(sent, field.name))
            rows.append({**{name: getattr(pair, name) for name in PAIR_FIELDS},
                         **dataclasses.asdict(tally), **dataclasses.asdict(sent)})
        return {"pairs": rows, "total": {**dataclasses.asdict(total),
                                         **dataclasses.asdict(total_sent)}}


def summary_table(summary: Mapping[str, Any], versions: bool) -> str:
    headers = ["pair", "source", "source bytes", "dest", "in sync", "missing", "size differs"]
    headers += ["version differs"] if versions else []
    headers += ["ignored", "sent", "sent bytes", "not sent"]

    def row(label: str, r: Mapping[str, Any]) -> list[object]:
        values: list[object] = [label, r["source"], toolkit.human_bytes(r["source_bytes"]),
                                r["destination"], r["in_sync"], r["missing"], r["size_differs"]]
        values += [r["version_differs"]] if versions else []
        values += [r["ignored"], r["sent"], toolkit.human_bytes(r["sent_bytes"]),
                   r["queued"] - r["sent"]]
        return values

    rows = [row(f"{r['src_bucket']}/{r['src_prefix']} -> {r['des_bucket']}/{r['des_prefix']}", r)
            for r in summary["pairs"]]
    if len(rows) > 1:
        rows.append(row("total", summary["total"]))
    return toolkit.format_table(headers, rows)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = toolkit.argument_parser(PROG, __doc__)
    parser.add_argument("--bucket-list", type=Path, metavar="FILE",
                        help="JSON bucket pairs (default: the SSM parameter ssm_parameter_bucket)")
    parser.add_argument("--dry-run", action="store_true",
                        help="send nothing: print the job bodies to stdout, the summary to stderr")
    parser.add_argument("--force", action="store_true",
                        help="send even though the queue is not empty")
    parser.add_argument("--parallel", type=toolkit.positive_int, default=DEFAULT_PARALLEL,
                        metavar="N", help="shards listed at once (default: %(default)s)")
    parser.add_argument("--send-threads", type=toolkit.positive_int, default=DEFAULT_SEND_THREADS,
                        metavar="N", help="SendMessageBatch calls at once (default: %(default)s)")
    parser.add_argument("--split-depth", type=toolkit.non_negative_int,
                        default=DEFAULT_SPLIT_DEPTH, metavar="N",
                        help="sub-prefix levels to split into shards (default: %(default)s)")
    parser.add_argument("--page-size", type=toolkit.int_between(1, 1000),
                        default=DEFAULT_PAGE_SIZE, metavar="N",
                        help="keys per listing request (default: %(default)s)")
    parser.add_argument("--hold-destination", action="store_true",
                        help="hold each shard's destination keys in memory instead of merging "
                             "sorted listings (for stores that do not list in key order)")
    parser.add_argument("--journal", type=Path, metavar="FILE",
                        help="where to write every job body sent (default: "
                             "jobsender-<time>.sent.jsonl in the current directory)")
    parser.add_argument("--no-journal", action="store_true", help="write no journal")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def check_buckets(pairs: Sequence[BucketPair], source: S3Lister, destination: S3Lister) -> None:
    """Every bucket readable before anything is listed or sent; InputError names the entry."""
    for pair in pairs:
        for side, lister, bucket in (("source", source, pair.src_bucket),
                                     ("destination", destination, pair.des_bucket)):
            problem = lister.bucket_problem(bucket)
            if problem:
                raise toolkit.InputError(f"{pair.where}: {side} bucket {bucket!r} {problem}")


def check_queue(queue: lib.JobQueue, name: str, force: bool, dry_run: bool) -> None:
    visible, in_flight = queue.depth()
    if not visible and not in_flight:
        return
    message = (f"queue {name} is not empty ({visible:,} waiting, {in_flight:,} in flight): jobs "
               "sent now may repeat them; let the workers drain it first, or use --force")
    if force or dry_run:
        log.warning("%s", message)
        return
    raise toolkit.Refused(message)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return toolkit.run(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    settings = toolkit.setup(args)
    clouds = toolkit.Clouds(settings, pool=max(args.parallel, args.send_threads) + 4)
    pairs = load_bucket_pairs(args.bucket_list, settings, clouds)
    compare_versions = settings.jobsender_compare_version_id
    source = S3Lister(clouds.source, args.page_size, latest_versions=compare_versions)
    destination = S3Lister(clouds.destination, args.page_size)
    check_buckets(pairs, source, destination)
    queue = clouds.queue()
    check_queue(queue, settings.queue_name, args.force, args.dry_run)
    versions = None
    if compare_versions:
        lib.VersionTable(clouds.dynamodb, settings.table_name).check_exists()
        versions = load_versions(clouds.dynamodb, settings.table_name, pairs)
        log.info("%d finished copies recorded in table %s", len(versions), settings.table_name)
    ignore = lib.IgnoreList.load(settings.ignore_list_path)

    journal_path = None if args.dry_run or args.no_journal else (
        args.journal or toolkit.default_journal_path(PROG))
    with toolkit.open_journal(journal_path) as journal:
        sender = toolkit.BatchSender(clouds.sqs, queue.url, threads=args.send_threads,
                                     journal=journal, dry_run=sys.stdout if args.dry_run else None)
        backfill = Backfill(pairs, source, destination, sender, ignore, versions=versions,
                            parallel=args.parallel, split_depth=args.split_depth,
                            hold_destination=args.hold_destination)
        failure: BaseException | None = None
        with toolkit.Progress(backfill.progress_line, enabled=not args.quiet):
            try:
                backfill.run()
            except BaseException as exc:  # noqa: BLE001 - reported after the summary, re-raised
                failure = exc
            finally:
                sender.close()
    summary = backfill.summary()
    summary.update(queue=settings.queue_name, dry_run=args.dry_run,
                   journal=str(journal_path) if journal_path else None,
                   seconds=round(time.monotonic() - backfill.started, 3),
                   complete=failure is None and sender.error is None)
    print_summary(summary, args, compare_versions)
    if isinstance(failure, _Stop) and sender.error:
        failure = None   # a shard stopped because sending failed: that error is the one to show
    if failure is not None:
        raise failure
    if sender.error:
        raise toolkit.ToolError(sender.error)
    total = summary["total"]
    if total["failed"] or total["unsent"]:
        print(f"{PROG}: error: {total['failed'] + total['unsent']:,} jobs were not sent "
              "(see the log)", file=sys.stderr)
        return toolkit.EXIT_INCOMPLETE
    return toolkit.EXIT_OK


def print_summary(summary: Mapping[str, Any], args: argparse.Namespace, versions: bool) -> None:
    stream = sys.stderr if args.dry_run else sys.stdout
    if args.json:
        print(json.dumps(summary, sort_keys=True), file=stream)
        return
    print(summary_table(summary, versions), file=stream)
    print(toolkit.sent_line(summary, args.dry_run), file=stream)


if __name__ == "__main__":
    sys.exit(main())
