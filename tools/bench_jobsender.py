#!/usr/bin/env python3
"""bench_jobsender: time and peak memory of the jobsender's diff for many keys (default 1,000,000).

The real pipeline runs (shard planning, parallel listing threads, the streaming merge or the held
destination map, the ignore list, job bodies, SendMessageBatch batching with a journal written to
disk), fed by a fake lister that generates sorted pages in-process and a fake SQS client that
accepts every batch, so what is measured is jobsender's own cost, not the network's.

Data set: --keys source keys spread over --dirs sub-prefixes, the destination holding them under
the prefix "backup/"; 10% are missing there and 1% have another size, so 11% become jobs.
Each mode runs in a child process of its own and reports wall seconds, keys/s, the process's RSS
before the run and its peak (ru_maxrss):

  list-only  only generate both listings' pages (the floor: the fake lister's cost)
  merge      jobsender's default: both listings streamed and merged shard by shard
  hold       --hold-destination: each shard's destination keys held in a dict

--moto N additionally runs the real jobsender against local moto servers with N objects (S3
listing and SQS over HTTP on 127.0.0.1), to show the end-to-end rate on this machine.

usage: python3 tools/bench_jobsender.py [--keys 1000000] [--modes merge hold] [--moto 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import s3_migration_lib as lib  # noqa: E402
from tools import jobsender, toolkit  # noqa: E402
from tools.jobsender import BucketPair, Listed, Shard  # noqa: E402

DEST_PREFIX = "backup"
MISSING_PERCENT = 10
CHANGED_PERCENT = 1


def _bucket_of(d: int, i: int) -> int:
    """0..99, spread evenly and deterministically over the keys."""
    return (i * 2654435761 + d * 40503) % 100


def size_of(d: int, i: int) -> int:
    return 1000 + (i * 7919 + d * 104729) % 10_000_000


class FakeLister:
    """Sorted pages of generated keys ``[prefix/]dNNNN/obj-NNNNNNNN.bin``, like S3Lister's."""

    def __init__(self, dirs: int, per_dir: int, key_prefix: str, destination: bool,
                 page_size: int = 1000):
        self.dirs = dirs
        self.per_dir = per_dir
        self.key_prefix = key_prefix
        self.destination = destination
        self.page_size = page_size

    def bucket_problem(self, bucket: str) -> None:
        return None

    def subprefixes(self, bucket: str, prefix: str, max_pages: int) -> list[str] | None:
        if prefix != self.key_prefix:
            return []
        return [f"{self.key_prefix}d{d:04d}/" for d in range(self.dirs)]

    def _dirs(self, shard: Shard) -> range:
        rest = shard.prefix[len(self.key_prefix):] if shard.prefix.startswith(self.key_prefix) \
            else None
        if rest is None:
            return range(0)
        if rest == "":
            return range(0) if shard.delimited else range(self.dirs)
        d = int(rest[1:5])
        return range(d, d + 1)

    def pages(self, bucket: str, shard: Shard) -> Iterator[list[Listed]]:
        page: list[Listed] = []
        for d in self._dirs(shard):
            head = f"{self.key_prefix}d{d:04d}/obj-"
            for i in range(self.per_dir):
                size = size_of(d, i)
                if self.destination:
                    bucket_number = _bucket_of(d, i)
                    if bucket_number < MISSING_PERCENT:
                        continue
                    if bucket_number < MISSING_PERCENT + CHANGED_PERCENT:
                        size += 1
                page.append(Listed(f"{head}{i:08d}.bin", size))
                if len(page) == self.page_size:
                    yield page
                    page = []
        if page:
            yield page


class FakeSqs:
    """Accepts every batch."""

    def __init__(self) -> None:
        self.calls = 0

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:  # noqa: N803
        self.calls += 1
        return {"Successful": [{"Id": e["Id"], "MessageId": e["Id"]} for e in Entries],
                "Failed": []}


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_child(mode: str, keys: int, dirs: int, parallel: int) -> dict[str, Any]:
    per_dir = keys // dirs
    total = per_dir * dirs
    source = FakeLister(dirs, per_dir, "", destination=False)
    destination = FakeLister(dirs, per_dir, f"{DEST_PREFIX}/", destination=True)
    before_kib = rss_kib()
    started = time.perf_counter()
    jobs = 0
    sqs_calls = 0
    if mode == "list-only":
        for d in range(dirs):
            for lister, prefix in ((source, ""), (destination, f"{DEST_PREFIX}/")):
                for _page in lister.pages("bucket", Shard(f"{prefix}d{d:04d}/")):
                    pass
    else:
        sqs = FakeSqs()
        with tempfile.TemporaryDirectory() as scratch:
            with open(Path(scratch) / "journal.jsonl", "w", encoding="utf-8") as journal:
                sender = toolkit.BatchSender(sqs, "queue-url", threads=4, journal=journal)
                backfill = jobsender.Backfill(
                    [BucketPair("src", "", "dest", DEST_PREFIX)], source, destination, sender,
                    lib.IgnoreList(["*.tmp"]), parallel=parallel, split_depth=2,
                    hold_destination=(mode == "hold"))
                try:
                    backfill.run()
                finally:
                    sender.close()
        summary = backfill.summary()["total"]
        jobs, sqs_calls = summary["sent"], sqs.calls
        expected = sum(1 for d in range(dirs) for i in range(per_dir)
                       if _bucket_of(d, i) < MISSING_PERCENT + CHANGED_PERCENT)
        assert jobs == expected and summary["in_sync"] == total - expected, summary
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "keys": total, "jobs": jobs, "sqs_calls": sqs_calls,
            "seconds": round(seconds, 2), "keys_per_s": round(total / seconds),
            "rss_before_mib": round(before_kib / 1024, 1),
            "peak_rss_mib": round(peak_kib / 1024, 1)}


def run_moto(objects: int) -> dict[str, Any]:
    """The real jobsender on local moto servers (S3 listing and SQS over loopback HTTP)."""
    from concurrent.futures import ThreadPoolExecutor

    from tools.local_cloud import LocalCloud
    with tempfile.TemporaryDirectory() as scratch, LocalCloud(notify=False) as cloud:
        src, dest = cloud.clients.src_s3, cloud.clients.dest_s3

        def upload(n: int) -> None:
            key = f"d{n % 20:02d}/obj-{n:08d}.bin"
            src.put_object(Bucket=cloud.src_bucket, Key=key, Body=b"x")
            if _bucket_of(0, n) >= MISSING_PERCENT:
                dest.put_object(Bucket=cloud.dest_bucket, Key=key, Body=b"x")

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(upload, range(objects)))
        config = cloud.write_config(Path(scratch) / "bench.ini")
        env_before = dict(os.environ)
        os.environ.update(cloud.env())
        try:
            started = time.perf_counter()
            code = jobsender.main(["--config", str(config), "-q", "--no-journal", "--json",
                                   "--parallel", "8"])
            seconds = time.perf_counter() - started
        finally:
            os.environ.clear()
            os.environ.update(env_before)
        assert code == 0
        sent = cloud.queue_depths().visible
    return {"mode": "moto end-to-end", "keys": objects, "jobs": sent, "seconds": round(seconds, 2),
            "keys_per_s": round(objects / seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_jobsender", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=toolkit.positive_int, default=1_000_000)
    parser.add_argument("--dirs", type=toolkit.positive_int, default=100,
                        help="sub-prefixes the keys are spread over (default: %(default)s)")
    parser.add_argument("--parallel", type=toolkit.positive_int, default=8)
    parser.add_argument("--modes", nargs="+", default=["list-only", "merge", "hold"],
                        choices=["list-only", "merge", "hold"])
    parser.add_argument("--moto", type=toolkit.non_negative_int, default=0, metavar="N",
                        help="also run the real jobsender on moto with N objects")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.keys, args.dirs, args.parallel)))
        return 0
    results = []
    for mode in args.modes:
        child = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--keys", str(args.keys), "--dirs",
             str(args.dirs), "--parallel", str(args.parallel)],
            capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        results.append(json.loads(child.stdout.splitlines()[-1]))
    if args.moto:
        results.append(run_moto(args.moto))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(toolkit.format_table(
        ["mode", "keys", "jobs", "seconds", "keys/s", "RSS before MiB", "peak RSS MiB"],
        [[r["mode"], r["keys"], r["jobs"], float(r["seconds"]), r["keys_per_s"],
          r.get("rss_before_mib"), r.get("peak_rss_mib")] for r in results]))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; peak RSS includes the "
          "interpreter and boto3 (see RSS before)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
