#!/usr/bin/env python3
"""clean_uploads: list and abort unfinished multipart uploads at the destination.

A worker stopped in the middle of a large copy leaves its multipart upload unfinished so that
the next worker can resume it; the stored parts are billed until the upload is completed or
aborted. Uploads started more than --older-than hours ago (default 24) are aborted; newer ones
are listed and kept, because a worker may still be resuming them. --dry-run aborts nothing.
The bucket is the ini's Des_bucket_default unless --bucket (repeatable) names others; the
destination keys come from the SSM parameter ssm_parameter_credentials, as for the worker.

examples:
  python3 tools/clean_uploads.py --dry-run
  python3 tools/clean_uploads.py --older-than 72 --prefix backup/
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import botocore.exceptions  # noqa: E402

import s3_migration_lib as lib  # noqa: E402
from tools import toolkit  # noqa: E402

PROG = "clean_uploads"
log = logging.getLogger("3gsync.clean_uploads")

DEFAULT_OLDER_THAN_H = 24.0


def list_uploads(s3: Any, bucket: str, prefix: str = "") -> Iterator[lib.UnfinishedUpload]:
    """Every unfinished multipart upload in ``bucket`` under ``prefix``."""
    try:
        yield from lib.Destination(s3, "STANDARD").list_uploads(bucket, prefix)
    except botocore.exceptions.ClientError as exc:
        if lib.error_code(exc) in ("NoSuchBucket", "404"):
            raise toolkit.InputError(f"destination bucket {bucket!r} does not exist") from None
        raise


def age_hours(upload: lib.UnfinishedUpload, now: datetime.datetime) -> float:
    initiated = upload.initiated
    if initiated.tzinfo is None:
        initiated = initiated.replace(tzinfo=datetime.timezone.utc)
    return (now - initiated).total_seconds() / 3600


def clean(s3: Any, buckets: Sequence[str], prefix: str, older_than_h: float, dry_run: bool,
          now: datetime.datetime) -> list[dict[str, Any]]:
    """Abort (unless ``dry_run``) uploads older than ``older_than_h``; one report row each."""
    destination = lib.Destination(s3, "STANDARD")
    rows = []
    for bucket in buckets:
        for upload in list_uploads(s3, bucket, prefix):
            age = age_hours(upload, now)
            if age < older_than_h:
                action = "kept (newer)"
            elif dry_run:
                action = "would abort"
            else:
                try:
                    destination.abort(upload.bucket, upload.key, upload.upload_id)
                    action = "aborted"
                    log.info("aborted upload %s of %s/%s (%.1f h old)", upload.upload_id,
                             upload.bucket, upload.key, age)
                except (botocore.exceptions.ClientError,
                        botocore.exceptions.BotoCoreError) as exc:
                    action = f"failed: {lib.error_code(exc)}"
                    log.error("abort of %s/%s upload %s failed: %s", upload.bucket, upload.key,
                              upload.upload_id, lib.error_code(exc))
            rows.append({"bucket": upload.bucket, "key": upload.key,
                         "upload_id": upload.upload_id,
                         "initiated": upload.initiated.astimezone(datetime.timezone.utc)
                         .strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "age_hours": round(age, 2), "action": action})
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = toolkit.argument_parser(PROG, __doc__)
    parser.add_argument("--bucket", action="append", metavar="BUCKET",
                        help="destination bucket (repeatable; default: Des_bucket_default)")
    parser.add_argument("--prefix", default="", help="only keys starting with this")
    parser.add_argument("--older-than", type=toolkit.non_negative_float,
                        default=DEFAULT_OLDER_THAN_H, metavar="HOURS",
                        help="abort uploads started more than this long ago (default: "
                             "%(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="list only, abort nothing")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return toolkit.run(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    settings = toolkit.setup(args)
    buckets = args.bucket or [settings.dest_bucket_default]
    if not all(buckets):
        raise lib.ConfigError("config key Des_bucket_default is empty; give --bucket")
    clouds = toolkit.Clouds(settings)
    rows = clean(clouds.destination, buckets, args.prefix, args.older_than, args.dry_run,
                 toolkit.utc_now())
    counts = {"aborted": sum(r["action"] == "aborted" for r in rows),
              "would_abort": sum(r["action"] == "would abort" for r in rows),
              "kept": sum(r["action"].startswith("kept") for r in rows),
              "failed": sum(r["action"].startswith("failed") for r in rows)}
    if args.json:
        print(json.dumps({"buckets": buckets, "prefix": args.prefix,
                          "older_than_hours": args.older_than, "dry_run": args.dry_run,
                          "uploads": rows, **counts}, sort_keys=True))
    else:
        if rows:
            print(toolkit.format_table(
                ["bucket", "key", "initiated (UTC)", "age h", "upload id", "action"],
                [[r["bucket"], r["key"], r["initiated"], float(r["age_hours"]), r["upload_id"],
                  r["action"]] for r in rows]))
        older = counts["aborted"] + counts["would_abort"] + counts["failed"]
        verb = "would abort" if args.dry_run else "aborted"
        done = counts["would_abort"] if args.dry_run else counts["aborted"]
        print(f"{len(rows)} unfinished uploads in {', '.join(buckets)}; {older} older than "
              f"{args.older_than:g} h: {verb} {done}"
              + (f", {counts['failed']} failed" if counts["failed"] else "")
              + f"; kept {counts['kept']} newer")
    if counts["failed"]:
        print(f"{PROG}: error: {counts['failed']} aborts failed (see the log)", file=sys.stderr)
        return toolkit.EXIT_INCOMPLETE
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
