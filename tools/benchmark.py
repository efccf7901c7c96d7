#!/usr/bin/env python3
"""Benchmark 3GSync against rclone on local moto servers (SPEC 15).

One invocation starts its own two moto servers (``aws``: S3 source, SQS, DynamoDB, SSM; ``dest``:
the S3-compatible destination standing in for GCS's XML API), uploads a data set to the source
bucket and then, for each set (by default ``large`` = 8 x 64 MiB and ``small`` = 500 x 64 KiB)
and each run, copies it with

* **3GSync**: jobsender-format jobs go on the queue (SendMessageBatch, by this process: not the
  worker's CPU), then ``s3_migration_cluster_worker.py --until-empty`` drains it (timed, its
  start-up included). ``--feed-window`` jobs go on before it starts and the rest while it runs
  (see ``Feeder``: moto's SQS costs O(depth) per message received, real SQS does not);
* **rclone**: ``rclone copy src:BUCKET/SET dst:BUCKET/SET`` with the same concurrency
  (``--transfers`` = MaxParallelFile, ``--s3-upload-concurrency`` = MaxThread,
  ``--s3-chunk-size`` = ``--s3-upload-cutoff`` = ChunkSize), MD5 checks on (its default).
  Source objects are single-PUT, so their ETag is their MD5 and both tools can check it.

Each run writes into a fresh destination bucket, which is verified object by object (MD5 of
every byte read back; not timed) and then emptied. The tools alternate which goes first.

Measured per tool: wall seconds, MB/s, objects/s, client CPU seconds per GiB (``os.wait4`` on
each child: exactly that process's CPU, never the moto servers'), the same less the tool's
start-up CPU (a run with nothing to copy), peak RSS (``VmHWM``, see ``_PeakRss``), and each
moto server's CPU from ``/proc`` (psutil), to show when moto rather than the tool sets the
pace. Medians of the runs are reported with the ratios 3GSync / rclone and the SPEC 15 targets.

Writes ``result.json`` and ``benchmark.png`` into ``--out`` (and ``--chart`` if given) and prints
a short table. Only 127.0.0.1 is contacted; every process started here is stopped.

    python3 tools/benchmark.py --out bench-out --chart img/benchmark.png
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import s3_migration_lib as lib  # noqa: E402
from tools.local_cloud import (  # noqa: E402
    AWS_TEST_KEY, DEST_ACCESS_KEY_ID, DEST_SECRET_ACCESS_KEY, REGION, LocalCloud, MiB,
)

log = logging.getLogger("benchmark")

KiB = 1024
GiB = 1024 * MiB
MB = 1_000_000
WORKER = REPO / "s3_migration_cluster_worker.py"
TOOLS = ("3gsync", "rclone")
RSS_HEADROOM = 150 * MiB          # SPEC 15: peak RSS within P x T x ChunkSize + 150 MiB
SAMPLE_INTERVAL_S = 0.05          # how often the peak RSS (VmHWM) of a tool is read
TOOL_TIMEOUT_S = 900.0            # one tool run; a hung run is killed and reported
UPLOAD_THREADS = 4
VERIFY_THREADS = 4
DELETE_BATCH = 1000


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataSet:
    """``count`` objects of ``size`` bytes under the prefix ``name/`` of the source bucket."""

    name: str
    count: int
    size: int

    @property
    def total_bytes(self) -> int:
        return self.count * self.size

    def keys(self) -> list[str]:
        return [f"{self.name}/obj-{i:05d}.bin" for i in range(self.count)]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark invocation needs; ``validate`` names a bad value."""

    sets: tuple[DataSet, ...]
    runs: int = 3
    max_parallel_file: int = 4
    max_thread: int = 4
    chunk_size_mb: int = 8
    workers: int = 1
    feed_window: int = 40
    tools: tuple[str, ...] = TOOLS
    out_dir: Path = Path("bench-out")
    chart: Path | None = None
    rclone: str = "rclone"

    def validate(self) -> None:
        if self.runs < 1:
            raise ValueError("--runs must be at least 1")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.feed_window < 0:
            raise ValueError("--feed-window must be 0 (everything up front) or more")
        if min(self.max_parallel_file, self.max_thread) < 1:
            raise ValueError("--max-parallel-file and --max-thread must be at least 1")
        if self.chunk_size_mb < 5:
            raise ValueError("--chunk-size-mb must be at least 5 (ChunkSize)")
        if not self.sets:
            raise ValueError("no data set to run")
        for data_set in self.sets:
            if data_set.count < 1 or data_set.size < 0:
                raise ValueError(f"data set {data_set.name}: count must be >= 1, size >= 0")
        unknown = set(self.tools) - set(TOOLS)
        if unknown:
            raise ValueError(f"unknown tool(s) {sorted(unknown)}; choose from {TOOLS}")

    @property
    def rss_bound_bytes(self) -> int:
        """SPEC 15's bound for one worker process: MaxParallelFile x MaxThread x ChunkSize
        + 150 MiB."""
        return self.max_parallel_file * self.max_thread * self.chunk_size_mb * MiB + RSS_HEADROOM


# ---------------------------------------------------------------------------------------------
# Measuring one child process
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Measurement:
    """One tool run: wall time, its processes' CPU and peak RSS, and the moto servers' CPU."""

    wall_s: float
    cpu_user_s: float
    cpu_system_s: float
    peak_rss_bytes: int          # the largest single process's VmHWM
    peak_rss_total_bytes: int    # the VmHWM of every process of the tool, added up
    moto_cpu_s: dict[str, float]
    returncodes: tuple[int, ...]
    logs: tuple[Path, ...] = ()

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_system_s


class _PeakRss(threading.Thread):
    """Follows the peak RSS of the given processes (and their children) until stopped.

    It reads ``VmHWM`` from ``/proc/PID/status``: the kernel's own high-water mark of the
    process's resident set since its ``exec``, so a sample never misses a peak between two
    samples (only growth in the last interval before exit). ``ru_maxrss`` from ``wait4`` is not
    used for this: Linux carries the *parent's* high-water mark over ``fork``/``exec`` into the
    child's ``ru_maxrss``, so a child of this benchmark (which holds the data set's digests and
    boto3) would report at least the benchmark's own peak.
    """

    def __init__(self, pids: Sequence[int]):
        super().__init__(name="peak-rss", daemon=True)
        self._pids = list(pids)
        self._done = threading.Event()
        self.peaks: dict[int, int] = {}

    def run(self) -> None:
        while True:
            self._sample()
            if self._done.wait(SAMPLE_INTERVAL_S):
                return

    def _sample(self) -> None:
        pids = set(self._pids)
        for pid in self._pids:
            try:
                pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass
        for pid in pids:
            hwm = _vm_hwm(pid)
            if hwm:
                self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)

    def stop(self) -> dict[int, int]:
        self._done.set()
        self.join(timeout=5)
        return dict(self.peaks)


def _vm_hwm(pid: int) -> int:
    """Peak resident set size of ``pid`` in bytes (``VmHWM``), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cpu_of(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def run_measured(commands: Sequence[Sequence[str]], env: dict[str, str], log_paths: Sequence[Path],
                 moto_pids: dict[str, int], timeout_s: float = TOOL_TIMEOUT_S) -> Measurement:
    """Start ``commands`` side by side, wait for all of them and measure them.

    CPU comes from ``os.wait4`` on each child: the kernel's rusage of exactly that process (and
    any child it waited for). ``getrusage(RUSAGE_CHILDREN)`` would add up every child this
    benchmark ever waited for, and its ``ru_maxrss`` is the largest of them all. Peak RSS comes
    from ``VmHWM`` (see ``_PeakRss``).
    """
    moto_before = {name: _cpu_of(pid) for name, pid in moto_pids.items()}
    procs: list[subprocess.Popen] = []
    handles = []
    sampler: _PeakRss | None = None
    started = time.monotonic()
    try:
        for command, log_path in zip(commands, log_paths):
            log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log_path, "wb")
            handles.append(handle)
            procs.append(subprocess.Popen(list(command), env=env, stdin=subprocess.DEVNULL,
                                          stdout=handle, stderr=subprocess.STDOUT, cwd=REPO))
        sampler = _PeakRss([p.pid for p in procs])
        sampler.start()
        usages = [_wait4(proc, started + timeout_s) for proc in procs]
        wall = time.monotonic() - started
        peaks = sampler.stop()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                _wait4(proc, time.monotonic() + 10)
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        for handle in handles:
            handle.close()
    moto_cpu = {name: _cpu_of(pid) - moto_before[name] for name, pid in moto_pids.items()}
    return Measurement(
        wall_s=wall,
        cpu_user_s=sum(u.ru_utime for u in usages),
        cpu_system_s=sum(u.ru_stime for u in usages),
        peak_rss_bytes=max(peaks.values(), default=0),
        peak_rss_total_bytes=sum(peaks.values()),
        moto_cpu_s=moto_cpu,
        returncodes=tuple(p.returncode for p in procs),
        logs=tuple(log_paths),
    )


def _error_lines(path: Path) -> int:
    """ERROR lines in a tool's log: a retried failure still ends with exit code 0."""
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if b" ERROR " in line)
    except OSError:
        return 0


def _wait4(proc: subprocess.Popen, deadline: float) -> Any:
    """Reap ``proc`` with wait4 (killing it at ``deadline``); sets its returncode."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() > deadline:
            log.error("pid %d ran past its time limit; killing it", proc.pid)
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# The data set and its verification
# ---------------------------------------------------------------------------------------------
def object_data(key: str, size: int, block: bytes) -> bytes:
    """Distinct content per key: a key-seeded head, then a shared random block rotated by a
    key-dependent offset (fast for 64 MiB objects, and no two objects are equal)."""
    rng = random.Random(key)
    head = rng.randbytes(min(size, 4096))
    if size <= len(head):
        return head
    offset = rng.randrange(len(block))
    body = (block[offset:] + block[:offset]) * (-(-(size - len(head)) // len(block)))
    return head + body[:size - len(head)]


def upload_data(cloud: LocalCloud, sets: Iterable[DataSet]) -> dict[str, str]:
    """Put every object of ``sets`` in the source bucket (single PUTs, so each source ETag is
    the object's MD5 and both tools can check it); returns {key: md5 hex}."""
    block = random.Random(1234).randbytes(4 * MiB + 17)
    s3 = cloud.clients.src_s3
    digests: dict[str, str] = {}

    def put(key: str, size: int) -> None:
        data = object_data(key, size, block)
        md5 = hashlib.md5(data).hexdigest()
        s3.put_object(Bucket=cloud.src_bucket, Key=key, Body=data)
        digests[key] = md5

    with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        futures = [pool.submit(put, key, data_set.size)
                   for data_set in sets for key in data_set.keys()]
        for future in futures:
            future.result()
    return digests


def verify_copy(cloud: LocalCloud, bucket: str, data_set: DataSet,
                digests: dict[str, str]) -> list[str]:
    """Read back every object of ``data_set`` from ``bucket``; returns the keys that are missing
    or differ from the source (empty: every object arrived byte-identical)."""
    s3 = cloud.clients.dest_s3

    def bad(key: str) -> bool:
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        except s3.exceptions.NoSuchKey:
            return True
        md5 = hashlib.md5()
        with body:
            for chunk in iter(lambda: body.read(MiB), b""):
                md5.update(chunk)
        return md5.hexdigest() != digests[key]

    keys = data_set.keys()
    with concurrent.futures.ThreadPoolExecutor(VERIFY_THREADS) as pool:
        flags = list(pool.map(bad, keys))
    return [key for key, flag in zip(keys, flags) if flag]


def empty_bucket(cloud: LocalCloud, bucket: str) -> None:
    """Delete every object version and unfinished upload in ``bucket``, then the bucket (frees
    moto's memory)."""
    s3 = cloud.clients.dest_s3
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"], "VersionId": item["VersionId"]}
                for item in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        for start in range(0, len(keys), DELETE_BATCH):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + DELETE_BATCH],
                                                     "Quiet": True})
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    s3.delete_bucket(Bucket=bucket)


# ---------------------------------------------------------------------------------------------
# The two tools
# ---------------------------------------------------------------------------------------------
class Feeder(threading.Thread):
    """Puts the jobs on the queue: ``window`` of them before the worker starts, the rest while
    it runs, topping the outstanding jobs up to ``window`` whenever fewer than half are left,
    as S3 events keep arriving during near-real-time sync. ``window`` 0 sends everything up
    front.

    Why not always everything up front: moto's ReceiveMessage walks the whole queue, and
    again for every message it returns (its retention check recomputes the queue's
    attributes), so a queue preloaded with N messages costs moto O(N^2) CPU in all (measured:
    ~40 s of moto CPU for 500 messages). Real SQS does not; the window keeps moto's cost at
    what a short queue costs. The feeder's requests are made by this process (not counted as
    the worker's CPU); what they cost moto is in moto's numbers.

    Outstanding = sent - "job end" lines in the workers' logs, read as they grow. Asking moto
    (GetQueueAttributes) instead cost its server ~30 ms of CPU per call, 10 % of what it
    spent on a small-set run, slowing the worker's own requests. A failed job's message goes
    back to the queue after its end line, so the window can be exceeded by the failures.

    The worker (``--until-empty``) stops after a whole second of empty long poll with nothing
    in flight; the feeder refills within POLL_S of the queue running low, so it would have to
    stall for over a second to end a run early. A run that ended early shows up as unsent
    jobs and missing objects in its record.
    """

    POLL_S = 0.1
    JOB_END = b" job end "

    def __init__(self, sqs: Any, queue_url: str, bodies: Sequence[str], window: int,
                 logs: Sequence[Path]):
        super().__init__(name="feeder", daemon=True)
        self._sqs = sqs
        self._url = queue_url
        self._bodies = list(bodies)
        self._window = window
        self._logs = {path: 0 for path in logs}     # path -> bytes of whole lines counted
        self._done = threading.Event()
        self.sent = 0
        self.ended = 0
        self.fed = 0        # sent while the worker ran
        self.error: BaseException | None = None

    def prefill(self) -> None:
        self._send(len(self._bodies) if self._window <= 0 else self._window)

    def run(self) -> None:
        try:
            while self.sent < len(self._bodies) and not self._done.wait(self.POLL_S):
                self._count_ended()
                outstanding = self.sent - self.ended
                if outstanding * 2 < self._window:
                    before = self.sent
                    self._send(self._window - outstanding)
                    self.fed += self.sent - before
        except BaseException as exc:  # noqa: BLE001 - reported with the run
            self.error = exc
            log.error("feeder failed: %s", exc)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(timeout=10)

    def _count_ended(self) -> None:
        """Add the "job end" lines the workers logged since the last look (whole lines only)."""
        for path, counted in self._logs.items():
            try:
                with path.open("rb") as handle:
                    handle.seek(counted)
                    grown = handle.read()
            except FileNotFoundError:
                continue
            whole = grown[:grown.rfind(b"\n") + 1]
            self.ended += whole.count(self.JOB_END)
            self._logs[path] = counted + len(whole)

    def _send(self, count: int) -> None:
        """Send the next ``count`` bodies, ten per SendMessageBatch."""
        end = min(len(self._bodies), self.sent + max(0, count))
        while self.sent < end:
            batch = self._bodies[self.sent:min(end, self.sent + lib.SQS_MAX_BATCH)]
            response = self._sqs.send_message_batch(QueueUrl=self._url, Entries=[
                {"Id": str(i), "MessageBody": body} for i, body in enumerate(batch)])
            if response.get("Failed"):
                raise RuntimeError(f"SendMessageBatch failed: {response['Failed']}")
            self.sent += len(batch)


class Bench:
    """One benchmark invocation on one LocalCloud."""

    def __init__(self, config: BenchConfig, cloud: LocalCloud, digests: dict[str, str]):
        self.config = config
        self.cloud = cloud
        self.digests = digests
        self.logs = config.out_dir / "logs"
        self.moto_pids = {name: server.pid for name, server in
                          zip(cloud.servers._fields, cloud.servers)}
        self.worker_env = self._worker_env()

    def _worker_env(self) -> dict[str, str]:
        """The worker's environment, with a warm bytecode cache of its own.

        A deployed worker runs from byte-compiled modules; an environment with
        PYTHONDONTWRITEBYTECODE set would instead compile the library at every start and count
        that as copy CPU. The cache lives in the output folder (PYTHONPYCACHEPREFIX), filled
        by one untimed import before the first run.
        """
        env = self.cloud.subprocess_env()
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str((self.config.out_dir / "pycache").resolve())
        subprocess.run([sys.executable, "-c", "import s3_migration_cluster_worker"], env=env,
                       cwd=REPO, check=True, stdin=subprocess.DEVNULL)
        return env

    def run_tool(self, tool: str, data_set: DataSet, run: int) -> dict[str, Any]:
        """Copy ``data_set`` with ``tool`` into a fresh bucket, verify it, empty it."""
        bucket = f"bench-{tool}-{data_set.name}-{run}".lower()
        self.cloud.clients.dest_s3.create_bucket(Bucket=bucket)
        # Versioned, as a GCS bucket with object versioning: moto answers an unversioned
        # bucket's CompleteMultipartUpload with "x-amz-version-id: null" and then refuses
        # rclone's HEAD ?versionId=null (400), which makes rclone retry the whole copy.
        self.cloud.clients.dest_s3.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        try:
            if tool == "3gsync":
                measured, extra = self._run_3gsync(data_set, bucket, run)
            else:
                measured, extra = self._run_rclone(data_set, bucket, run)
            bad = verify_copy(self.cloud, bucket, data_set, self.digests)
        finally:
            empty_bucket(self.cloud, bucket)
        record = summarise(measured, data_set)
        record.update(extra)
        record["log_errors"] = sum(_error_lines(path) for path in measured.logs)
        record["verified_objects"] = data_set.count - len(bad)
        record["bad_keys"] = bad[:20]
        if bad or any(measured.returncodes) or record["log_errors"]:
            log.error("%s %s run %d: exit codes %s, %d objects missing or different, %d ERROR "
                      "log lines (logs in %s)", tool, data_set.name, run, measured.returncodes,
                      len(bad), record["log_errors"], self.logs)
        return record

    def start_up_cpu(self, tool: str) -> float:
        """CPU seconds of a run with nothing to copy: the tool's fixed cost per invocation
        (3GSync: interpreter, boto3, five service models, one empty long poll; rclone: its
        listings). A daemon pays it once; a one-shot copy pays it every time."""
        return self.run_tool(tool, DataSet("idle", 0, 0), 0)["cpu_s"]

    def _run_3gsync(self, data_set: DataSet, bucket: str, run: int) -> tuple[Measurement, dict]:
        config = self.config
        ini = self.cloud.write_config(
            config.out_dir / "worker.ini", MaxThread=config.max_thread,
            MaxParallelFile=config.max_parallel_file, ChunkSize=config.chunk_size_mb,
            ResumableThreshold=50, Des_bucket_default=bucket)
        bodies = [lib.jobsender_message(lib.Job(
            src_bucket=self.cloud.src_bucket, src_key=key, size=data_set.size,
            dst_bucket=bucket, dst_key=key)) for key in data_set.keys()]
        command = [sys.executable, str(WORKER), "--config", str(ini), "--until-empty"]
        logs = [self.logs / f"3gsync-{data_set.name}-{run}-w{i}.log"
                for i in range(config.workers)]
        for path in logs:       # the feeder counts what these logs say from the start
            path.unlink(missing_ok=True)
        feeder = Feeder(self.cloud.clients.sqs, self.cloud.queue_url, bodies, config.feed_window,
                        logs)
        started = time.monotonic()
        feeder.prefill()
        enqueue_s = time.monotonic() - started
        feeder.start()
        try:
            measured = run_measured([command] * config.workers, self.worker_env, logs,
                                    self.moto_pids)
        finally:
            feeder.stop()
        depths = self.cloud.queue_depths()
        return measured, {"enqueue_s": round(enqueue_s, 3), "fed_while_running": feeder.fed,
                          "unsent": len(bodies) - feeder.sent,
                          "queue_left": depths.visible + depths.in_flight,
                          "dlq": depths.dlq_visible}

    def _run_rclone(self, data_set: DataSet, bucket: str, run: int) -> tuple[Measurement, dict]:
        config = self.config
        chunk = f"{config.chunk_size_mb}M"
        command = [
            config.rclone, "copy", f"src:{self.cloud.src_bucket}/{data_set.name}",
            f"dst:{bucket}/{data_set.name}",
            "--transfers", str(config.max_parallel_file * config.workers),
            "--s3-upload-concurrency", str(config.max_thread),
            "--s3-chunk-size", chunk, "--s3-upload-cutoff", chunk,
            "--s3-no-check-bucket", "--stats", "0", "--log-level", "NOTICE",
        ]
        measured = run_measured([command], rclone_env(self.cloud),
                                [self.logs / f"rclone-{data_set.name}-{run}.log"], self.moto_pids)
        return measured, {}


def rclone_env(cloud: LocalCloud, base: dict[str, str] | None = None) -> dict[str, str]:
    """rclone's two remotes from environment variables; no config file, no AWS_* (rclone must
    not see AWS_CA_BUNDLE here), no proxy."""
    env = {k: v for k, v in dict(os.environ if base is None else base).items()
           if not k.startswith(("AWS_", "RCLONE_")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy")}
    env["RCLONE_CONFIG"] = os.devnull
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    remotes = {"SRC": (cloud.aws_url, AWS_TEST_KEY, AWS_TEST_KEY),
               "DST": (cloud.dest_url, DEST_ACCESS_KEY_ID, DEST_SECRET_ACCESS_KEY)}
    for name, (url, key_id, secret) in remotes.items():
        prefix = f"RCLONE_CONFIG_{name}_"
        env.update({prefix + "TYPE": "s3", prefix + "PROVIDER": "Other",
                    prefix + "ENDPOINT": url, prefix + "REGION": REGION,
                    prefix + "ACCESS_KEY_ID": key_id, prefix + "SECRET_ACCESS_KEY": secret,
                    prefix + "FORCE_PATH_STYLE": "true", prefix + "ENV_AUTH": "false"})
    return env


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------
def summarise(m: Measurement, data_set: DataSet) -> dict[str, Any]:
    """The reported numbers of one run."""
    wall = max(m.wall_s, 1e-9)
    moto_total = sum(m.moto_cpu_s.values())
    return {
        "wall_s": round(m.wall_s, 3),
        "mb_per_s": round(data_set.total_bytes / MB / wall, 2),
        "objects_per_s": round(data_set.count / wall, 2),
        "cpu_s": round(m.cpu_s, 3),
        "cpu_user_s": round(m.cpu_user_s, 3),
        "cpu_system_s": round(m.cpu_system_s, 3),
        "cpu_s_per_gib": round(m.cpu_s / max(data_set.total_bytes / GiB, 1e-12), 3),
        "peak_rss_mib": round(m.peak_rss_bytes / MiB, 1),
        "peak_rss_total_mib": round(m.peak_rss_total_bytes / MiB, 1),
        "moto_cpu_s": {name: round(cpu, 3) for name, cpu in m.moto_cpu_s.items()},
        # Share of one core each moto server was busy: moto serves requests under the GIL,
        # so a server near 1.0 is saturated and sets the pace for any client.
        "moto_busy": {name: round(cpu / wall, 2) for name, cpu in m.moto_cpu_s.items()},
        "moto_cpu_s_total": round(moto_total, 3),
        # Share of the whole machine busy (client + moto), of os.cpu_count() cores.
        "machine_busy": round((m.cpu_s + moto_total) / wall / (os.cpu_count() or 1), 2),
        "returncodes": list(m.returncodes),
    }


MEDIAN_FIELDS = ("wall_s", "mb_per_s", "objects_per_s", "cpu_s", "cpu_s_per_gib",
                 "cpu_s_per_gib_after_start", "peak_rss_mib", "moto_cpu_s_total",
                 "machine_busy")


def median_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each number's median over the runs (moto's per-server numbers too)."""
    median: dict[str, Any] = {name: round(statistics.median(r[name] for r in runs), 3)
                              for name in MEDIAN_FIELDS}
    for group in ("moto_cpu_s", "moto_busy"):
        median[group] = {name: round(statistics.median(r[group][name] for r in runs), 3)
                         for name in runs[0][group]}
    return median


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float | None]:
    def ratio(name: str) -> float | None:
        return round(ours[name] / peer[name], 3) if peer[name] else None
    return {name: ratio(name) for name in ("wall_s", "mb_per_s", "objects_per_s",
                                           "cpu_s_per_gib", "cpu_s_per_gib_after_start",
                                           "peak_rss_mib")}


def targets(config: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    """SPEC 15 targets, each with its numbers and whether it was met."""
    checks: dict[str, Any] = {}
    bound_mib = config.rss_bound_bytes / MiB
    for name, result in results.items():
        ours = result.get("3gsync", {}).get("median")
        peer = result.get("rclone", {}).get("median")
        if ours:
            checks[f"{name}: peak RSS <= {bound_mib:.0f} MiB"] = {
                "value": ours["peak_rss_mib"], "limit": bound_mib,
                "met": ours["peak_rss_mib"] <= bound_mib}
        if ours and peer:
            checks[f"{name}: MB/s >= rclone's"] = {
                "value": result["ratios"]["mb_per_s"], "limit": 1.0,
                "met": ours["mb_per_s"] >= peer["mb_per_s"]}
            if name == "large":
                checks["large: CPU/GiB <= half of rclone's"] = {
                    "value": result["ratios"]["cpu_s_per_gib"], "limit": 0.5,
                    "met": ours["cpu_s_per_gib"] <= 0.5 * peer["cpu_s_per_gib"]}
    return checks


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rclone_version = subprocess.run(["rclone", "version"], capture_output=True, text=True,
                                        timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        rclone_version = ""
    import boto3
    import moto
    return {
        "cpu": model, "cores": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
        "os": platform.platform(), "python": platform.python_version(),
        "boto3": boto3.__version__, "moto": moto.__version__, "rclone": rclone_version,
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def format_table(result: dict[str, Any]) -> str:
    """The short table printed at the end (and pasted into the README)."""
    header = ("| set | tool | wall s | MB/s | objects/s | client CPU s/GiB "
              "| ... after start-up | peak RSS MiB | moto CPU s (aws+dest) |")
    lines = [header, "|" + "---|" * 9]
    for name, per_set in result["results"].items():
        for tool in TOOLS:
            median = per_set.get(tool, {}).get("median")
            if not median:
                continue
            moto = median["moto_cpu_s"]
            lines.append(
                f"| {name} | {tool} | {median['wall_s']:.2f} | {median['mb_per_s']:.1f} "
                f"| {median['objects_per_s']:.1f} | {median['cpu_s_per_gib']:.1f} "
                f"| {median['cpu_s_per_gib_after_start']:.1f} | {median['peak_rss_mib']:.0f} "
                f"| {moto.get('aws', 0):.1f}+{moto.get('dest', 0):.1f} |")
        r = per_set.get("ratios")
        if r:
            lines.append(f"| {name} | 3GSync/rclone | {r['wall_s']:.2f} | {r['mb_per_s']:.2f} "
                         f"| {r['objects_per_s']:.2f} | {r['cpu_s_per_gib']:.2f} "
                         f"| {r['cpu_s_per_gib_after_start'] or 0:.2f} "
                         f"| {r['peak_rss_mib']:.2f} | |")
    lines.append("")
    for label, check in result["targets"].items():
        lines.append(f"- {'met' if check['met'] else 'NOT met'}: {label} "
                     f"(value {check['value']}, limit {check['limit']:g})")
    return "\n".join(lines)


def draw_chart(result: dict[str, Any], paths: Iterable[Path]) -> None:
    """One row per set: MB/s, objects/s, client CPU s/GiB (whole bar) and its part after
    start-up (dark), peak RSS, and the CPU seconds of one run split into the tool's and each
    moto server's (which shows when moto, not the tool, sets the pace)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = [t for t in TOOLS if any(t in r for r in result["results"].values())]
    names = {"3gsync": "3GSync", "rclone": "rclone"}
    colours = {"3gsync": "#2b7bba", "rclone": "#9a9a9a"}
    sets = list(result["results"])
    fig, grid = plt.subplots(len(sets), 5, figsize=(17, 3.1 * len(sets)), squeeze=False)
    for row, set_name in zip(grid, sets):
        medians = [result["results"][set_name][tool]["median"] for tool in tools]
        xs = range(len(tools))
        labels = [names[t] for t in tools]
        info = result["sets"][set_name]
        title = f"{set_name} ({info['count']} x {_size_text(info['size'])})"
        for ax, metric, text in ((row[0], "mb_per_s", "MB/s (higher is better)"),
                                 (row[1], "objects_per_s", "objects/s (higher is better)"),
                                 (row[3], "peak_rss_mib", "peak RSS MiB")):
            bars = ax.bar(xs, [m[metric] for m in medians], color=[colours[t] for t in tools])
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
            ax.set_title(f"{title}: {text}", fontsize=9)
        bound = result["settings"]["rss_bound_mib"]
        row[3].axhline(bound, color="#c0392b", linestyle="--", linewidth=1)
        row[3].annotate(f"SPEC bound {bound:.0f}", (-0.4, bound), fontsize=7, color="#c0392b",
                        xytext=(0, 2), textcoords="offset points")
        ax = row[2]
        bars = ax.bar(xs, [m["cpu_s_per_gib"] for m in medians], color=[colours[t] for t in tools],
                      alpha=0.45)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        inner = ax.bar(xs, [m["cpu_s_per_gib_after_start"] for m in medians], width=0.4,
                       color=[colours[t] for t in tools])
        ax.bar_label(inner, fmt="%.1f", fontsize=7, label_type="center", color="white")
        ax.set_title(f"{title}: client CPU s/GiB\n(dark: after start-up; lower is better)",
                     fontsize=9)
        ax = row[4]
        bottoms = [0.0] * len(tools)
        parts = (("tool", [m["cpu_s"] for m in medians], None),
                 ("moto aws", [m["moto_cpu_s"].get("aws", 0) for m in medians], "#e67e22"),
                 ("moto dest", [m["moto_cpu_s"].get("dest", 0) for m in medians], "#27ae60"))
        for label, values, colour in parts:
            ax.bar(xs, values, bottom=bottoms, label=label,
                   color=colour or [colours[t] for t in tools])
            bottoms = [b + v for b, v in zip(bottoms, values)]
        walls = [m["wall_s"] for m in medians]
        ax.scatter(xs, walls, marker="_", s=600, color="black", label="wall s", zorder=3)
        ax.set_title(f"{title}: CPU s of one run\n(tool, moto aws, moto dest; bar: wall s)",
                     fontsize=9)
        ax.legend(fontsize=6, loc="upper right", framealpha=0.8)
        for ax in row:
            ax.set_xticks(list(xs), labels)
            ax.tick_params(labelsize=8)
            ax.margins(y=0.18)
    st = result["settings"]
    fig.suptitle(f"3GSync vs rclone, local moto servers, {result['machine']['cores']} cores: "
                 f"MaxParallelFile={st['max_parallel_file']}, MaxThread={st['max_thread']}, "
                 f"ChunkSize={st['chunk_size_mb']} MB; median of {st['runs']} runs", fontsize=10)
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    plt.close(fig)


def _size_text(size: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def run_benchmark(config: BenchConfig,
                  progress: Callable[[str], None] = lambda text: log.info("%s", text)
                  ) -> dict[str, Any]:
    """Start the servers, run every set x tool x run, write result.json and the chart."""
    config.validate()
    if "rclone" in config.tools and shutil.which(config.rclone) is None:
        raise FileNotFoundError(f"{config.rclone} not found (apt-get install rclone)")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_at_start = os.getloadavg()
    with LocalCloud(notify=False, visibility_timeout_s=120,
                    log_dir=config.out_dir / "logs") as cloud:
        progress(f"moto servers up: aws {cloud.aws_url}, dest {cloud.dest_url}")
        digests = upload_data(cloud, config.sets)
        progress(f"uploaded {len(digests)} source objects in {time.monotonic() - started:.1f}s")
        bench = Bench(config, cloud, digests)
        start_up = {tool: bench.start_up_cpu(tool) for tool in config.tools}
        progress(f"start-up CPU (nothing to copy): {start_up}")
        results: dict[str, Any] = {}
        for data_set in config.sets:
            runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in config.tools}
            for run in range(1, config.runs + 1):
                order = config.tools if run % 2 else tuple(reversed(config.tools))
                for tool in order:
                    record = bench.run_tool(tool, data_set, run)
                    record["cpu_s_per_gib_after_start"] = round(
                        max(0.0, record["cpu_s"] - start_up[tool])
                        / max(data_set.total_bytes / GiB, 1e-12), 3)
                    runs[tool].append(record)
                    progress(f"{data_set.name} run {run} {tool}: {record['wall_s']:.2f}s "
                             f"{record['mb_per_s']:.1f} MB/s {record['objects_per_s']:.1f} obj/s "
                             f"cpu {record['cpu_s']:.2f}s rss {record['peak_rss_mib']:.0f} MiB "
                             f"moto {record['moto_cpu_s']} verified "
                             f"{record['verified_objects']}/{data_set.count}")
            per_set: dict[str, Any] = {tool: {"runs": r, "median": median_of(r)}
                                       for tool, r in runs.items()}
            if len(config.tools) == 2:
                per_set["ratios"] = ratios(per_set["3gsync"]["median"], per_set["rclone"]["median"])
            results[data_set.name] = per_set
    result = {
        "machine": {**machine_info(), "load_average_at_start": load_at_start},
        "settings": {"max_parallel_file": config.max_parallel_file,
                     "max_thread": config.max_thread, "chunk_size_mb": config.chunk_size_mb,
                     "workers": config.workers, "runs": config.runs,
                     "feed_window": config.feed_window,
                     "start_up_cpu_s": start_up,
                     "rss_bound_mib": config.rss_bound_bytes / MiB},
        "sets": {s.name: {"count": s.count, "size": s.size, "total_bytes": s.total_bytes}
                 for s in config.sets},
        "results": results,
        "targets": targets(config, results),
        "all_verified": all(r["verified_objects"] == s.count and not any(r["returncodes"])
                            for s in config.sets for tool in config.tools
                            for r in results[s.name][tool]["runs"]),
        "log_errors": sum(r["log_errors"] for s in config.sets for tool in config.tools
                          for r in results[s.name][tool]["runs"]),
        "seconds": round(time.monotonic() - started, 1),
    }
    (config.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    charts = [config.out_dir / "benchmark.png"] + ([config.chart] if config.chart else [])
    draw_chart(result, charts)
    return result


def parse_size(text: str) -> int:
    """``64MiB``, ``64KiB``, ``5MB``, ``1000`` -> bytes."""
    units = {"gib": GiB, "mib": MiB, "kib": KiB, "gb": 10**9, "mb": MB, "kb": 1000, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[:-len(unit)]) * factor)
    return int(lowered)


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for result.json, benchmark.png and the logs")
    parser.add_argument("--chart", type=Path, help="also write the chart here "
                        "(e.g. img/benchmark.png)")
    parser.add_argument("--large", default="8x64MiB",
                        help="COUNTxSIZE of the large set, or 0 to skip (default %(default)s)")
    parser.add_argument("--small", default="500x64KiB",
                        help="COUNTxSIZE of the small set, or 0 to skip (default %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs per set and tool; the median "
                        "is reported (default %(default)s)")
    parser.add_argument("--max-parallel-file", type=int, default=4,
                        help="MaxParallelFile, and rclone --transfers (default %(default)s)")
    parser.add_argument("--max-thread", type=int, default=4,
                        help="MaxThread, and rclone --s3-upload-concurrency (default %(default)s)")
    parser.add_argument("--chunk-size-mb", type=int, default=8,
                        help="ChunkSize, and rclone --s3-chunk-size/--s3-upload-cutoff "
                             "(default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="3GSync worker processes (rclone gets workers x transfers)")
    parser.add_argument("--feed-window", type=int, default=40,
                        help="jobs outstanding on the queue while the worker runs; 0 puts "
                             "every job on the queue before it starts (default %(default)s)")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--rclone", default="rclone", help="rclone binary")
    args = parser.parse_args(argv)
    sets = []
    for name, spec in (("large", args.large), ("small", args.small)):
        if spec.strip() in ("", "0"):
            continue
        count, _, size = spec.lower().partition("x")
        sets.append(DataSet(name, int(count), parse_size(size)))
    return BenchConfig(sets=tuple(sets), runs=args.runs, max_parallel_file=args.max_parallel_file,
                       max_thread=args.max_thread, chunk_size_mb=args.chunk_size_mb,
                       workers=args.workers, feed_window=args.feed_window,
                       tools=tuple(t for t in args.tools.split(",") if t),
                       out_dir=args.out, chart=args.chart, rclone=args.rclone)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        config = parse_args(argv)
        result = run_benchmark(config)
    except (ValueError, FileNotFoundError) as exc:
        log.error("benchmark: %s", exc)
        return 2
    print(format_table(result))
    print(f"\nresult: {config.out_dir / 'result.json'}, chart: {config.out_dir / 'benchmark.png'}"
          f"; {result['seconds']:.0f}s; every copy verified: {result['all_verified']}; "
          f"ERROR lines in the tools' logs: {result['log_errors']}")
    return 0 if result["all_verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
