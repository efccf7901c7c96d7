#!/usr/bin/env python3
"""3GSync worker daemon: copies S3 objects named by SQS messages to GCS, until SIGTERM.

Exit codes: 0 stopped cleanly, 1 unexpected error, 2 bad configuration,
3 credentials or metadata error, 130 forced by a second signal.
"""
from __future__ import annotations

import gc

if __name__ == "__main__":
    # Start-up (boto3's imports, five service models) builds ~140,000 long-lived objects and
    # next to no garbage: collecting meanwhile is wasted CPU. main() freezes what start-up
    # built and turns the collector back on before the first job.
    gc.disable()

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import botocore.config
import botocore.exceptions

import s3_migration_lib as lib

log = logging.getLogger("3gsync")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=lib.DEFAULT_CONFIG_PATH,
                        help="ini file (default: %(default)s)")
    parser.add_argument("--until-empty", action="store_true",
                        help="exit once the queue is empty and no job is running (backfills, demos)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config file, print the settings and exit")
    return parser.parse_args(argv)


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for Cloud Logging and CloudWatch: ``severity``, ``message``,
    and a job's structured fields (key, size, seconds, mbps, outcome, attempt) when present."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "severity": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        document.update(getattr(record, "job", {}))
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def configure_logging(settings: lib.Settings) -> None:
    """The one place that configures the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: "
                                      "%(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.logging_level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def install_signal_handlers(worker: lib.Worker, grace_s: int) -> None:
    """First SIGTERM/SIGINT: warm stop. Second: leave at once, non-zero."""
    def handle(signum: int, _frame: object) -> None:
        if worker.stopping:
            log.error("second %s: exiting now; unfinished messages reappear after their "
                      "visibility timeout", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(lib.EXIT_FORCED)
        # Stop first, log second: a second signal can interrupt this handler mid-logging, and
        # it must then find the worker stopping and exit at once.
        worker.request_stop()
        log.warning("%s: taking no new messages, finishing running jobs for up to %ss",
                    signal.Signals(signum).name, grace_s)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def build_worker(settings: lib.Settings, until_empty: bool) -> lib.Worker:
    """Connect to both clouds and assemble the worker from its parts."""
    access = lib.connect(settings)
    pool = settings.max_parallel_file + 4
    aws_config = botocore.config.Config(max_pool_connections=pool,
                                        retries={"mode": "standard", "max_attempts": 5})
    queue = lib.JobQueue.by_name(access.aws.client("sqs", config=aws_config), settings.queue_name)
    table = lib.VersionTable(access.aws.client("dynamodb", config=aws_config), settings.table_name)
    table.check_exists()
    metrics = lib.Metrics()
    if settings.metrics_port:
        metrics = lib.PrometheusMetrics()
        metrics.serve(settings.metrics_port)
        log.info("metrics on port %d at /metrics", settings.metrics_port)
    copier = lib.ObjectCopier(settings, lib.Source(access.source),
                              lib.Destination(access.destination, settings.storage_class),
                              table, access.identity.instance_id, metrics)
    ignore = lib.IgnoreList.load(settings.ignore_list_path)
    log.info("instance %s, queue %s, table %s, destination %s, %d ignore patterns",
             access.identity.instance_id, settings.queue_name, settings.table_name,
             settings.dest_endpoint_url, len(ignore.patterns))
    return lib.Worker(settings, queue, copier, ignore, until_empty=until_empty, metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    gc.disable()   # see the top of this file
    args = parse_args(argv)
    try:
        settings = lib.Settings.from_ini(args.config)
    except lib.ConfigError as exc:
        print(f"3gsync: configuration error: {exc}", file=sys.stderr)
        return lib.EXIT_CONFIG
    if args.check_config:
        for name, value in sorted(vars(settings).items()):
            print(f"{name} = {value}")
        print(f"peak part memory = {settings.peak_part_memory_bytes // lib.MiB} MiB")
        return lib.EXIT_OK
    configure_logging(settings)
    try:
        worker = build_worker(settings, args.until_empty)
    except lib.ConfigError as exc:
        log.error("configuration error: %s", exc)
        return lib.EXIT_CONFIG
    except lib.CredentialsError as exc:
        log.error("credentials error: %s", exc)
        return lib.EXIT_CREDENTIALS
    except botocore.exceptions.NoRegionError:
        log.error("no AWS region: set AWS_DEFAULT_REGION, or the source region in the secret "
                  "(GET mode), or run on EC2 with instance metadata (PUT mode)")
        return lib.EXIT_CREDENTIALS   # metadata may come back: let systemd restart us
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        log.error("cannot reach AWS at start: %s: %s", lib.error_code(exc), exc)
        return lib.EXIT_UNEXPECTED
    install_signal_handlers(worker, settings.shutdown_grace_s)
    # Everything built so far lives as long as the process: keep the cyclic collector from
    # walking it again and again while copying.
    gc.freeze()
    gc.enable()
    try:
        code = worker.run()
    except Exception:  # noqa: BLE001 - the process exit code is the report
        log.exception("worker failed")
        code = lib.EXIT_UNEXPECTED
    logging.shutdown()
    if threading.active_count() > 1:
        # Part threads still blocked in I/O after the grace period must not hold the exit.
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
