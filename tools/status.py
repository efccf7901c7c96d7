#!/usr/bin/env python3
"""status: how the copy is going. Queue and dead-letter queue depths, the DynamoDB table's
records by status (objects and bytes), the slowest objects (finished, or still running for
that long), the most retried ones, and running records older than JobTimeout (probably left by
a worker that died; their messages come back to the queue by themselves).

The table is read with one paginated Scan (memory holds only the top lists), so on a table of
millions of records this takes a while and reads the whole table's capacity once.
The dead-letter queue is the one the queue's redrive policy names. --json prints the same as
one JSON object for scripts.

examples:
  python3 tools/status.py
  python3 tools/status.py --top 20 --json | jq .table.by_status
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import botocore.exceptions  # noqa: E402

import s3_migration_lib as lib  # noqa: E402
from tools import toolkit  # noqa: E402

PROG = "status"
DEFAULT_TOP = 10
_ATTRIBUTES = ("Key", "status", "Size", "startTime", "endTime", "tryTimes", "instanceId",
               "versionId")


# ---------------------------------------------------------------------------------------------
# Queues.
# ---------------------------------------------------------------------------------------------
def queue_status(sqs: Any, name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(queue, dead-letter queue or None): names and approximate message counts."""
    url = lib.JobQueue.by_name(sqs, name).url
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed", "RedrivePolicy"])["Attributes"]
    main = {"name": name, **_depths(attributes)}
    policy = attributes.get("RedrivePolicy")
    if not policy:
        return main, None
    arn = json.loads(policy).get("deadLetterTargetArn", "")
    parts = arn.split(":")
    dlq_name, owner = parts[-1], parts[4] if len(parts) > 4 else None
    try:
        args = {"QueueName": dlq_name, **({"QueueOwnerAWSAccountId": owner} if owner else {})}
        dlq_url = sqs.get_queue_url(**args)["QueueUrl"]
    except botocore.exceptions.ClientError as exc:
        return main, {"name": dlq_name, "error": lib.error_code(exc)}
    dlq = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed"])["Attributes"]
    return main, {"name": dlq_name, "max_receive_count": int(json.loads(policy).get(
        "maxReceiveCount", 0)), **_depths(dlq)}


def _depths(attributes: Mapping[str, str]) -> dict[str, int]:
    return {"visible": int(attributes.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
            "delayed": int(attributes.get("ApproximateNumberOfMessagesDelayed", 0))}


# ---------------------------------------------------------------------------------------------
# Table.
# ---------------------------------------------------------------------------------------------
def scan_records(dynamodb: Any, table: str) -> Iterator[dict[str, Any]]:
    """Every record of the table, as plain values (numbers as int)."""
    names = {f"#a{i}": name for i, name in enumerate(_ATTRIBUTES)}
    paginator = dynamodb.get_paginator("scan")
    for page in paginator.paginate(TableName=table, ProjectionExpression=", ".join(names),
                                   ExpressionAttributeNames=names):
        for item in page.get("Items", ()):
            record: dict[str, Any] = {}
            for name, typed in item.items():
                (kind, value), = typed.items()
                record[name] = int(float(value)) if kind == "N" else value
            yield record


class TableReport:
    """Counts by status and the top-N lists, kept in bounded memory while records stream by."""

    def __init__(self, top: int, now_s: float, job_timeout_s: int):
        self.top = top
        self.now_s = now_s
        self.job_timeout_s = job_timeout_s
        self.records = 0
        self.by_status: dict[str, dict[str, int]] = {}
        self.stuck = 0
        self._slowest: list[tuple[float, int, dict]] = []
        self._retried: list[tuple[int, int, dict]] = []
        self._order = itertools.count()

    def add(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        status = str(record.get("status", "unknown"))
        size = int(record.get("Size", 0))
        counts = self.by_status.setdefault(status, {"objects": 0, "bytes": 0})
        counts["objects"] += 1
        counts["bytes"] += size
        tries = int(record.get("tryTimes", 0))
        start = record.get("startTime")
        seconds = None
        if start is not None:
            end = record.get("endTime")
            if end is None and status == lib.Status.RUNNING.value:
                end = self.now_s
            if end is not None:
                seconds = max(0.0, float(end) - float(start))
        if status == lib.Status.RUNNING.value and seconds is not None \
                and seconds > self.job_timeout_s:
            self.stuck += 1
        row = {"key": record.get("Key", ""), "size": size, "status": status, "tries": tries,
               "seconds": seconds, "instance": record.get("instanceId", ""),
               "mib_per_s": round(size / lib.MiB / seconds, 2) if seconds else None}
        order = next(self._order)
        if seconds is not None:
            self._keep(self._slowest, (seconds, -order, row))
        if tries > 1:
            self._keep(self._retried, (tries, -order, row))

    def _keep(self, heap: list, item: tuple) -> None:
        if len(heap) < self.top:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)

    @property
    def slowest(self) -> list[dict]:
        return [row for _, _, row in sorted(self._slowest, reverse=True)]

    @property
    def most_retried(self) -> list[dict]:
        return [row for _, _, row in sorted(self._retried, reverse=True)]

    def as_dict(self, name: str) -> dict[str, Any]:
        return {"name": name, "records": self.records,
                "bytes": sum(c["bytes"] for c in self.by_status.values()),
                "by_status": self.by_status, "stuck_running": self.stuck,
                "job_timeout_s": self.job_timeout_s}


def collect(clouds: toolkit.Clouds, settings: lib.Settings, top: int,
            now_s: float | None = None) -> dict[str, Any]:
    """Everything the report shows, as one JSON-able dict."""
    queue, dead_letter = queue_status(clouds.sqs, settings.queue_name)
    lib.VersionTable(clouds.dynamodb, settings.table_name).check_exists()
    report = TableReport(top, time.time() if now_s is None else now_s, settings.job_timeout_s)
    for record in scan_records(clouds.dynamodb, settings.table_name):
        report.add(record)
    return {"queue": queue, "dead_letter": dead_letter,
            "table": report.as_dict(settings.table_name), "slowest": report.slowest,
            "most_retried": report.most_retried}


def render(status: Mapping[str, Any], top: int) -> str:
    queue, dlq, table = status["queue"], status["dead_letter"], status["table"]
    lines = [f"queue {queue['name']}: {queue['visible']:,} waiting, {queue['in_flight']:,} in "
             f"flight, {queue['delayed']:,} delayed"]
    if dlq is None:
        lines.append("dead-letter queue: none (the queue has no redrive policy)")
    elif "error" in dlq:
        lines.append(f"dead-letter queue {dlq['name']}: cannot read it ({dlq['error']})")
    else:
        lines.append(f"dead-letter queue {dlq['name']}: {dlq['visible']:,} messages"
                     f"{' (look at them!)' if dlq['visible'] else ''}")
    lines += ["", f"table {table['name']}: {table['records']:,} records, "
                  f"{toolkit.human_bytes(table['bytes'])}"]
    order = {lib.Status.DONE.value: 0, lib.Status.RUNNING.value: 1, lib.Status.FAILED.value: 2}
    if table["by_status"]:
        lines.append(toolkit.format_table(
            ["status", "objects", "bytes"],
            [[name, counts["objects"], toolkit.human_bytes(counts["bytes"])]
             for name, counts in sorted(table["by_status"].items(),
                                        key=lambda item: (order.get(item[0], 9), item[0]))]))
    if table["stuck_running"]:
        lines.append(f"{table['stuck_running']:,} running for longer than JobTimeout "
                     f"({table['job_timeout_s']} s): their workers probably died")
    if status["slowest"]:
        lines += ["", f"slowest (top {top}; running ones so far):", toolkit.format_table(
            ["key", "size", "seconds", "MiB/s", "status", "tries", "instance"],
            [[r["key"], toolkit.human_bytes(r["size"]), float(r["seconds"]), r["mib_per_s"],
              r["status"], r["tries"], r["instance"]] for r in status["slowest"]])]
    if status["most_retried"]:
        lines += ["", f"most retried (top {top}):", toolkit.format_table(
            ["key", "tries", "status", "size", "instance"],
            [[r["key"], r["tries"], r["status"], toolkit.human_bytes(r["size"]), r["instance"]]
             for r in status["most_retried"]])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = toolkit.argument_parser(PROG, __doc__)
    parser.add_argument("--top", type=toolkit.positive_int, default=DEFAULT_TOP, metavar="N",
                        help="length of the slowest and most-retried lists (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return toolkit.run(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    settings = toolkit.setup(args)
    status = collect(toolkit.Clouds(settings), settings, args.top)
    print(json.dumps(status, sort_keys=True) if args.json else render(status, args.top))
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
