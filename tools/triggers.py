#!/usr/bin/env python3
"""triggers: add, list and remove the S3 event notifications that send a source bucket's new
objects to the worker queue, one entry per prefix of a prefix list.

S3 keeps one notification configuration per bucket and PutBucketNotificationConfiguration
replaces all of it. So "add" reads what the bucket has, keeps every entry (other queues, SNS
topics, Lambda functions, EventBridge), adds one queue entry per new prefix and writes the
merged configuration back. A prefix the queue already gets (the same prefix, or a broader one
with the same events) is left alone. S3 refuses entries that overlap (a shared event type and
one prefix starting with the other) and more than 100 entries: both are checked before anything
is written, and the error names the file and line.

Prefix list: one prefix a line; blank lines and lines starting with # are skipped; spaces around
a prefix are removed. For the whole bucket use --prefix "".

The queue is the worker's (sqs_queue_name) unless --queue-arn says otherwise. After a change S3
sends an s3:TestEvent message to the queue, which the worker acknowledges.

examples:
  python3 tools/triggers.py add --bucket my-src --prefix-list tools/prefix_list.txt --dry-run
  python3 tools/triggers.py list --bucket my-src
  python3 tools/triggers.py remove --bucket my-src --prefix logs/
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import botocore.exceptions  # noqa: E402

import s3_migration_lib as lib  # noqa: E402
from tools import toolkit  # noqa: E402

PROG = "triggers"
log = logging.getLogger("3gsync.triggers")

MAX_ENTRIES = 100
DEFAULT_EVENTS = ("s3:ObjectCreated:*",)
QUEUE = "QueueConfigurations"
TARGETS = {QUEUE: "QueueArn", "TopicConfigurations": "TopicArn",
           "LambdaFunctionConfigurations": "LambdaFunctionArn"}
KIND_NAMES = {QUEUE: "queue", "TopicConfigurations": "topic",
              "LambdaFunctionConfigurations": "lambda"}


# ---------------------------------------------------------------------------------------------
# Notification entries.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of a bucket's notification configuration, of any kind, as S3 spells it."""

    kind: str
    raw: dict

    @property
    def id(self) -> str:
        return self.raw.get("Id", "")

    @property
    def target(self) -> str:
        return self.raw.get(TARGETS[self.kind], "")

    @property
    def events(self) -> list[str]:
        return list(self.raw.get("Events", []))

    def _rule(self, name: str) -> str:
        rules = self.raw.get("Filter", {}).get("Key", {}).get("FilterRules", [])
        return next((r.get("Value", "") for r in rules if r.get("Name", "").lower() == name), "")

    @property
    def prefix(self) -> str:
        return self._rule("prefix")

    @property
    def suffix(self) -> str:
        return self._rule("suffix")

    def describe(self) -> str:
        return (f"{self.id!r}: {KIND_NAMES[self.kind]} {self.target}, events "
                f"{','.join(self.events)}, prefix {self.prefix!r}, suffix {self.suffix!r}")


def entries_of(configuration: dict) -> list[Entry]:
    return [Entry(kind, raw) for kind in TARGETS for raw in configuration.get(kind, [])]


def _event_covers(general: str, specific: str) -> bool:
    return general == specific or (general.endswith("*") and specific.startswith(general[:-1]))


def events_overlap(a: Iterable[str], b: Iterable[str]) -> bool:
    b = list(b)
    return any(_event_covers(x, y) or _event_covers(y, x) for x in a for y in b)


def events_cover(general: Iterable[str], specific: Iterable[str]) -> bool:
    general = list(general)
    return all(any(_event_covers(g, s) for g in general) for s in specific)


def filters_overlap(prefix_a: str, suffix_a: str, prefix_b: str, suffix_b: str) -> bool:
    """S3's rule: two filters overlap when one prefix starts the other and one suffix ends
    the other (an empty prefix or suffix overlaps everything)."""
    return ((prefix_a.startswith(prefix_b) or prefix_b.startswith(prefix_a))
            and (suffix_a.endswith(suffix_b) or suffix_b.endswith(suffix_a)))


def entry_id(prefix: str) -> str:
    """A stable Id for the entry of ``prefix`` (prefixes may hold any character)."""
    return "3gsync-" + hashlib.sha256(prefix.encode("utf-8")).hexdigest()[:16]


def queue_entry(queue_arn: str, prefix: str, events: Sequence[str]) -> Entry:
    raw: dict[str, Any] = {"Id": entry_id(prefix), "QueueArn": queue_arn, "Events": list(events)}
    if prefix:
        raw["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    return Entry(QUEUE, raw)


@dataclasses.dataclass(frozen=True)
class Prefix:
    value: str
    where: str   # "file:line" or "--prefix"


@dataclasses.dataclass(frozen=True)
class Outcome:
    prefix: Prefix
    action: str     # added, present, covered by '...', removed, not found
    entry_id: str


def merge(configuration: dict, prefixes: Sequence[Prefix], queue_arn: str,
          events: Sequence[str]) -> tuple[dict, list[Outcome]]:
    """The configuration with a queue entry for each prefix not yet sent to ``queue_arn``.

    Prefixes are taken broadest first, so a nested one is "covered" rather than an overlap.
    InputError (naming the prefix's file and line) for an overlap S3 would refuse, or for more
    than 100 entries.
    """
    existing = entries_of(configuration)
    added: list[Entry] = []
    outcomes = []
    for prefix in sorted(prefixes, key=lambda p: p.value):
        current = existing + added
        covering = next((e for e in current if e.kind == QUEUE and e.target == queue_arn
                         and prefix.value.startswith(e.prefix) and not e.suffix
                         and events_cover(e.events, events)), None)
        if covering is not None:
            action = "present" if covering.prefix == prefix.value else \
                f"covered by {covering.prefix!r}"
            outcomes.append(Outcome(prefix, action, covering.id))
            continue
        clash = next((e for e in current if events_overlap(e.events, events)
                      and filters_overlap(e.prefix, e.suffix, prefix.value, "")), None)
        if clash is not None:
            raise toolkit.InputError(
                f"{prefix.where}: prefix {prefix.value!r} overlaps the entry {clash.describe()}; "
                "S3 refuses overlapping notifications for one event type (remove one first)")
        entry = queue_entry(queue_arn, prefix.value, events)
        added.append(entry)
        outcomes.append(Outcome(prefix, "added", entry.id))
    total = len(existing) + len(added)
    if total > MAX_ENTRIES:
        where = prefixes[0].where.rsplit(":", 1)[0] if prefixes else "prefixes"
        raise toolkit.InputError(
            f"{where}: the bucket would have {total} notification entries ({len(existing)} now, "
            f"{len(added)} to add); S3 allows at most {MAX_ENTRIES}: use broader prefixes")
    merged = dict(configuration)
    if added:
        merged[QUEUE] = list(configuration.get(QUEUE, [])) + [e.raw for e in added]
    return merged, outcomes


def remove(configuration: dict, prefixes: Sequence[Prefix], queue_arn: str
           ) -> tuple[dict, list[Outcome]]:
    """The configuration without the queue entries to ``queue_arn`` for exactly these prefixes
    (no suffix); every other entry is kept."""
    wanted = {p.value for p in prefixes}
    kept, outcomes = [], []
    found: dict[str, str] = {}
    for raw in configuration.get(QUEUE, []):
        entry = Entry(QUEUE, raw)
        if entry.target == queue_arn and entry.prefix in wanted and not entry.suffix:
            found.setdefault(entry.prefix, entry.id)
        else:
            kept.append(raw)
    for prefix in prefixes:
        if prefix.value in found:
            outcomes.append(Outcome(prefix, "removed", found[prefix.value]))
        else:
            outcomes.append(Outcome(prefix, "not found", ""))
    merged = dict(configuration)
    merged[QUEUE] = kept
    if not kept:
        del merged[QUEUE]
    return merged, outcomes


# ---------------------------------------------------------------------------------------------
# Inputs and S3.
# ---------------------------------------------------------------------------------------------
def read_prefix_list(path: Path) -> list[Prefix]:
    """Prefixes of a prefix list file, each with its ``file:line``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise toolkit.InputError(f"{path}: cannot read the prefix list: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise toolkit.InputError(f"{path}: not UTF-8 text ({exc.reason})") from None
    prefixes = []
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.strip()
        if not value or value.startswith("#"):
            continue
        if len(value.encode("utf-8")) > 1024:
            raise toolkit.InputError(f"{path}:{number}: prefix longer than 1024 bytes")
        prefixes.append(Prefix(value, f"{path}:{number}"))
    if not prefixes:
        raise toolkit.InputError(f"{path}:1: no prefixes in the prefix list")
    return prefixes


def prefixes_from(args: argparse.Namespace) -> list[Prefix]:
    prefixes = [Prefix(value, "--prefix") for value in args.prefix or []]
    if args.prefix_list is not None:
        prefixes += read_prefix_list(args.prefix_list)
    if not prefixes:
        raise toolkit.InputError("give --prefix-list FILE or --prefix PREFIX")
    return prefixes


def read_configuration(s3: Any, bucket: str) -> dict:
    """The bucket's notification configuration as S3 returns it (without response metadata)."""
    try:
        configuration = s3.get_bucket_notification_configuration(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if lib.error_code(exc) in ("NoSuchBucket", "404"):
            raise toolkit.InputError(f"--bucket: bucket {bucket!r} does not exist") from None
        raise
    configuration.pop("ResponseMetadata", None)
    return configuration


def queue_arn(clouds: toolkit.Clouds, given: str | None) -> str:
    if given:
        return given
    queue = clouds.queue()
    return clouds.sqs.get_queue_attributes(QueueUrl=queue.url, AttributeNames=["QueueArn"]
                                           )["Attributes"]["QueueArn"]


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = toolkit.argument_parser(PROG, __doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("add", "add a queue notification per prefix (merged)"),
                       ("list", "list the bucket's notifications"),
                       ("remove", "remove the queue notifications of these prefixes")):
        sub = commands.add_parser(name, help=text, description=text,
                                  epilog=toolkit.EXIT_CODES_HELP)
        toolkit.add_common_arguments(sub, suppress=True)
        sub.add_argument("--bucket", required=True, help="the source bucket")
        if name == "list":
            sub.add_argument("--json", action="store_true", help="print JSON")
            continue
        sub.add_argument("--prefix-list", type=Path, metavar="FILE",
                         help="one prefix a line (# comments)")
        sub.add_argument("--prefix", action="append", metavar="PREFIX",
                         help="a prefix (repeatable; \"\" is the whole bucket)")
        sub.add_argument("--queue-arn", help="the queue (default: sqs_queue_name's ARN)")
        if name == "add":
            sub.add_argument("--events", nargs="+", default=list(DEFAULT_EVENTS), metavar="EVENT",
                             help="event types (default: %(default)s)")
        sub.add_argument("--dry-run", action="store_true",
                         help="print the configuration that would be written, change nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return toolkit.run(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    settings = toolkit.setup(args)
    clouds = toolkit.Clouds(settings)
    s3 = clouds.source
    if args.command == "list":
        return _list(s3, args)
    prefixes = prefixes_from(args)
    configuration = read_configuration(s3, args.bucket)
    arn = queue_arn(clouds, args.queue_arn)
    if args.command == "add":
        merged, outcomes = merge(configuration, prefixes, arn, args.events)
        changed = any(o.action == "added" for o in outcomes)
    else:
        merged, outcomes = remove(configuration, prefixes, arn)
        changed = any(o.action == "removed" for o in outcomes)
    print(toolkit.format_table(["prefix", "where", "outcome", "id"],
                               [[repr(o.prefix.value), o.prefix.where, o.action, o.entry_id]
                                for o in outcomes]))
    count = len(entries_of(merged))
    if args.dry_run:
        print(json.dumps(merged, indent=2, sort_keys=True))
        print(f"dry run: nothing written; the bucket would have {count} entries "
              f"(at most {MAX_ENTRIES})")
    elif changed:
        s3.put_bucket_notification_configuration(Bucket=args.bucket,
                                                 NotificationConfiguration=merged)
        log.info("notification configuration of %s written (%d entries)", args.bucket, count)
        print(f"bucket {args.bucket} now has {count} notification entries (at most {MAX_ENTRIES})")
    else:
        print(f"nothing to change; bucket {args.bucket} has {count} notification entries")
    return toolkit.EXIT_OK


def _list(s3: Any, args: argparse.Namespace) -> int:
    configuration = read_configuration(s3, args.bucket)
    entries = entries_of(configuration)
    eventbridge = "EventBridgeConfiguration" in configuration
    if args.json:
        print(json.dumps({"bucket": args.bucket, "eventbridge": eventbridge, "entries": [
            {"id": e.id, "type": KIND_NAMES[e.kind], "target": e.target, "events": e.events,
             "prefix": e.prefix, "suffix": e.suffix} for e in entries]}, sort_keys=True))
        return toolkit.EXIT_OK
    rows = [[e.id, KIND_NAMES[e.kind], e.target, ",".join(e.events), repr(e.prefix),
             repr(e.suffix)] for e in sorted(entries, key=lambda e: (e.prefix, e.id))]
    print(toolkit.format_table(["id", "type", "target", "events", "prefix", "suffix"], rows))
    print(f"{len(entries)} entries (at most {MAX_ENTRIES}); EventBridge "
          f"{'on' if eventbridge else 'off'}")
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
