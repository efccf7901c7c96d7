#!/usr/bin/env python3
"""Run the whole 3GSync pipeline on this machine, with no cloud account (SPEC 13).

Starts two moto servers (source side: S3, SQS, DynamoDB, SSM; destination: an S3-compatible
store standing in for GCS), creates the buckets, queue, dead-letter queue and table, wires the
source bucket's event notification to the queue, uploads sample objects (small and multipart),
runs one worker with ``--until-empty``, verifies every copy byte for byte, prints a report and
stops everything it started. Exit status 0 when every object arrived intact and both queues are
empty, 1 otherwise.

Usually run as ``tools/local-sync.sh`` (installs the requirements first). The worker's ini and
log and the moto logs are left in ``--workdir`` (default ``.local-sync/``) for a look afterwards.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.local_cloud import MiB, LocalCloud  # noqa: E402

log = logging.getLogger("local_sync")

WORKER = REPO / "s3_migration_cluster_worker.py"
CHUNK_SIZE_MB = 5
WORKER_TIMEOUT_S = 300.0
WORKER_STOP_GRACE_S = 30.0  # the worker's ShutdownGrace (25 s) and a little more
LOG_TAIL_LINES = 25
RUN_FILES = ("worker.ini", "worker.log", "moto-aws.log", "moto-dest.log")


@dataclass(frozen=True)
class Sample:
    """One sample object: its key, its size and, if uploaded in parts, the part size."""

    key: str
    size: int
    part_size: int | None = None

    def data(self) -> bytes:
        """Deterministic content, different for every key."""
        return random.Random(self.key).randbytes(self.size)


SAMPLES = (
    Sample("empty.txt", 0),
    Sample("hello.txt", 13),
    Sample("docs/readme.md", 4 * 1024),
    Sample("photos/red flower+ü 日本 100%.jpg", 100_000),
    Sample("data/64KiB.bin", 64 * 1024),
    Sample("data/exactly-5MiB.bin", CHUNK_SIZE_MB * MiB),
    Sample("big/12MiB.bin", 12 * MiB, part_size=5 * MiB),
    Sample("big/23MiB and a bit.bin", 23 * MiB + 12_345, part_size=8 * MiB),
)


@dataclass(frozen=True)
class WorkerRun:
    """How the worker process ended."""

    returncode: int | None
    seconds: float
    timed_out: bool


def upload_samples(cloud: LocalCloud, samples: tuple[Sample, ...]) -> None:
    """Upload every sample to the source bucket and wait for their notifications."""
    for sample in samples:
        cloud.upload(sample.key, sample.data(), part_size=sample.part_size)
    depth = cloud.wait_for_queue_depth(len(samples), timeout_s=30)
    log.info("uploaded %d objects; %d event messages in the queue", len(samples), depth)


def run_worker(cloud: LocalCloud, config: Path, log_path: Path, timeout_s: float) -> WorkerRun:
    """Run one worker until the queue is empty (or ``timeout_s``); output to ``log_path``."""
    command = [sys.executable, str(WORKER), "--config", str(config), "--until-empty"]
    started = time.monotonic()
    with open(log_path, "wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=cloud.subprocess_env(),
                                   stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout_s)
            return WorkerRun(returncode, time.monotonic() - started, timed_out=False)
        except subprocess.TimeoutExpired:
            log.error("worker still running after %.0f s; stopping it", timeout_s)
            return WorkerRun(None, time.monotonic() - started, timed_out=True)
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, wait for the grace period, then SIGKILL. Nothing if it already ended."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(WORKER_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(WORKER_STOP_GRACE_S)


class Report:
    """Checks the destination against the samples and prints the outcome."""

    def __init__(self, cloud: LocalCloud, samples: tuple[Sample, ...], run: WorkerRun) -> None:
        self.run = run
        self.samples = samples
        self.copied = {s.key: cloud.compare(s.key) for s in samples}
        self.depths = cloud.queue_depths()
        listing = cloud.clients.dest_s3.list_objects_v2(Bucket=cloud.dest_bucket)
        self.unexpected = sorted({o["Key"] for o in listing.get("Contents", [])}
                                 - {s.key for s in samples})

    @property
    def ok(self) -> bool:
        """Every object intact, nothing extra, queues empty, worker exited 0."""
        return (self.run.returncode == 0 and all(self.copied.values())
                and not self.unexpected and tuple(self.depths) == (0, 0, 0))

    def lines(self) -> list[str]:
        """The report, one line each."""
        total = sum(s.size for s in self.samples)
        seconds = max(self.run.seconds, 1e-9)
        status = "timed out" if self.run.timed_out else f"exit {self.run.returncode}"
        lines = [f"3GSync local sync: {len(self.samples)} objects, {total / MiB:.1f} MiB in "
                 f"{self.run.seconds:.1f} s ({total / 1e6 / seconds:.1f} MB/s), worker {status}"]
        for sample in self.samples:
            verdict = "OK" if self.copied[sample.key] else "FAILED"
            lines.append(f"  {verdict:<6} {human_size(sample.size):>10}  {sample.key}")
        lines += [f"  UNEXPECTED at destination: {key}" for key in self.unexpected]
        lines.append(f"queue: {self.depths.visible} visible, {self.depths.in_flight} in flight; "
                     f"dead-letter queue: {self.depths.dlq_visible}")
        lines.append("RESULT: " + ("OK" if self.ok else "FAILED"))
        return lines


def human_size(size: int) -> str:
    """Bytes as B, KiB or MiB with one decimal."""
    if size < 1024:
        return f"{size} B"
    if size < MiB:
        return f"{size / 1024:.1f} KiB"
    return f"{size / MiB:.1f} MiB"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file (empty if it does not exist)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".local-sync",
                        help="where the worker ini and logs go (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S,
                        help="seconds the worker may take (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser.parse_args(argv)


def exit_on_sigterm(signum: int, _frame: object) -> None:
    """Turn SIGTERM into SystemExit, so the worker and the servers are stopped on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (args.workdir / name).unlink(missing_ok=True)
    print("starting local emulators (moto server) on 127.0.0.1 ...", flush=True)
    with LocalCloud(log_dir=args.workdir) as cloud:
        upload_samples(cloud, SAMPLES)
        config = cloud.write_config(args.workdir / "worker.ini", ChunkSize=CHUNK_SIZE_MB)
        print(f"running the worker until the queue is empty (log: {args.workdir / 'worker.log'})",
              flush=True)
        run = run_worker(cloud, config, args.workdir / "worker.log", args.timeout)
        report = Report(cloud, SAMPLES, run)
    if not report.ok:
        print(f"--- last lines of {args.workdir / 'worker.log'} ---")
        print(log_tail(args.workdir / "worker.log"))
        print("---")
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
