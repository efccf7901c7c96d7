"""Load (SPEC §16): 2,000 small and 20 multipart objects, with duplicate deliveries, drained by
three worker processes at once. Every object must arrive byte-identical, the queue and the
dead-letter queue must end empty, and no object may be uploaded more often than its
deliveries explain (uploads are counted at a proxy in front of the destination)."""
from __future__ import annotations

import collections
import hashlib
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import s3_migration_lib as lib
from tests.support.faults import JobLog, destination_writes, send_bodies, worker_counts
from tests.support.moto_servers import LockedMotoServer, create_table_like
from tests.support.proxy import FaultProxy
from tests.support.workers import WorkerProcess
from tools.local_cloud import (AWS_TEST_KEY, LocalCloud, MotoServer, ServerPair, isolated_session,
                               poll_until, s3_event, stop_servers)

MiB = lib.MiB
SMALL = 2000
LARGE = 20
DUPLICATES = 60          # extra deliveries of random objects, as SQS and S3 sometimes send
WORKERS = 3
FEED_WINDOW = 30         # messages sent ahead of the jobs the workers have finished


def make_objects(seed: int = 20) -> dict[str, bytes]:
    rng = random.Random(seed)
    objects = {}
    for i in range(SMALL):
        odd = ("", " space", "+plus", "%pct", "ü")[i % 5]
        objects[f"small/{i // 100:02d}/{i:04d}{odd}.txt"] = rng.randbytes(rng.randint(0, 4096))
    for i in range(LARGE):   # ChunkSize 5: two parts, every fourth three
        size = (10 if i % 4 == 0 else 5) * MiB + rng.randint(1, 2 * MiB)
        objects[f"large/{i:02d}.bin"] = rng.randbytes(size)
    return objects


def upload_all(cloud, objects: dict[str, bytes]) -> None:
    s3 = cloud.clients.src_s3

    def put(item):
        key, data = item
        s3.put_object(Bucket=cloud.src_bucket, Key=key, Body=data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, objects.items()))


def read_destination(cloud, keys) -> dict[str, bytes | None]:
    s3 = cloud.clients.dest_s3

    def get(key):
        try:
            return key, s3.get_object(Bucket=cloud.dest_bucket, Key=key)["Body"].read()
        except s3.exceptions.NoSuchKey:
            return key, None

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(get, keys))


def jobs_ended(workers: list[WorkerProcess]) -> int:
    return sum(sum(1 for line in list(w.lines) if " job end " in line) for w in workers)


def feed(cloud, bodies: list[dict], workers: list[WorkerProcess], window: int = FEED_WINDOW,
         timeout_s: float = 400) -> None:
    """Send ``bodies`` as the workers drain the queue, at most ``window`` messages ahead of
    the jobs the workers have finished (counted from their log lines, not asked of SQS).

    moto's SQS copies the whole queue for every message it hands out (a deepcopy per received
    message), so its cost grows with the queue's depth: measured here, a 10-message receive
    costs 2.2 CPU-seconds at depth 2,000 and 0.08 at depth 50, and sending 2,000 messages up
    front took 80 CPU-seconds. Fed as the workers drain it, the queue stays a few dozen deep;
    and polling the queue's depth instead would itself cost moto ~12 ms a call."""
    sent = 0
    deadline = time.monotonic() + timeout_s
    for _ in range(1_000_000):
        if sent == len(bodies):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"feeding stalled: {sent} of {len(bodies)} sent")
        if any(w.process.poll() is not None for w in workers):
            raise AssertionError("a worker exited while the queue was being fed")
        room = window - (sent - jobs_ended(workers))
        if room >= 10:
            batch = bodies[sent:sent + room]
            send_bodies(cloud.clients.sqs, cloud.queue_url, batch)
            sent += len(batch)
        else:
            time.sleep(0.05)
    raise AssertionError("feeding took too many rounds")


@pytest.fixture
def load_cloud(tmp_path_factory):
    """A LocalCloud of its own: SQS on a moto server whose deletes are safe under concurrency
    (see tests/support/moto_servers.py), DynamoDB on a third server, the destination behind a
    FaultProxy that counts uploads. Yields (cloud, worker environment, proxy)."""
    logs = tmp_path_factory.mktemp("load-moto-logs")
    servers = [LockedMotoServer("aws", logs / "aws.log"), MotoServer("dest", logs / "dest.log"),
               MotoServer("dynamodb", logs / "dynamodb.log")]
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda server: server.start(), servers))
        aws, dest, table_server = servers
        with LocalCloud(servers=ServerPair(aws, dest), notify=False) as cloud, \
                FaultProxy(cloud.dest_url) as proxy:
            create_table_like(cloud, isolated_session().client(
                "dynamodb", endpoint_url=table_server.endpoint_url,
                aws_access_key_id=AWS_TEST_KEY, aws_secret_access_key=AWS_TEST_KEY))
            env = cloud.subprocess_env() | {"AWS_ENDPOINT_URL_DYNAMODB": table_server.endpoint_url}
            yield cloud, env, proxy
    finally:
        stop_servers(servers)


def test_three_workers_copy_2000_small_and_20_multipart_objects_once(load_cloud, tmp_path):
    cloud, env, dest_proxy = load_cloud
    timings = {}
    started = time.monotonic()
    objects = make_objects()
    upload_all(cloud, objects)
    rng = random.Random(7)
    extra = rng.sample(sorted(objects), DUPLICATES - 5) + rng.sample(
        [k for k in objects if k.startswith("large/")], 5)
    bodies = [s3_event(cloud.src_bucket, key, len(objects[key])) for key in [*objects, *extra]]
    rng.shuffle(bodies)
    timings["upload"] = time.monotonic() - started

    config = cloud.write_config(tmp_path / "worker.ini", DestEndPointURL=dest_proxy.endpoint_url,
                                MaxParallelFile=4, MaxThread=2, RetryDelay=0, ShutdownGrace=5)
    started = time.monotonic()
    workers = [WorkerProcess(config, env) for _ in range(WORKERS)]
    try:
        feed(cloud, bodies, workers)
        try:
            poll_until(lambda: tuple(cloud.queue_depths()) == (0, 0, 0), 300, "queue drained",
                       interval_s=0.5)
        except TimeoutError:
            problems = [line for w in workers for line in w.lines
                        if " WARNING " in line or " ERROR " in line]
            raise AssertionError(f"queue not drained: {cloud.queue_depths()}, "
                                 f"{jobs_ended(workers)} jobs ended, {len(problems)} warnings:\n"
                                 + "\n".join(problems[-20:])) from None
        timings["copy"] = time.monotonic() - started
        for w in workers:   # daemons: stop them as an operator would
            w.signal(signal.SIGTERM)
        codes = [w.wait(30) for w in workers]
    finally:
        for w in workers:
            w.stop()
    assert codes == [lib.EXIT_OK] * WORKERS, [w.output[-2000:] for w in workers]
    assert tuple(cloud.queue_depths()) == (0, 0, 0)

    started = time.monotonic()
    # Byte-identical: every single-PUT copy's ETag is the MD5 of the bytes the destination
    # stored, so size + MD5 from one listing check all 2,000 small objects; the multipart
    # copies (composite ETags) and a sample of small ones are read back whole.
    listed = {item["Key"]: item for page in cloud.clients.dest_s3.get_paginator(
        "list_objects_v2").paginate(Bucket=cloud.dest_bucket) for item in page.get("Contents", [])}
    assert sorted(listed) == sorted(objects)
    small = [key for key in objects if not key.startswith("large/")]
    wrong = [key for key in small if (listed[key]["Size"], listed[key]["ETag"].strip('"')) !=
             (len(objects[key]), hashlib.md5(objects[key]).hexdigest())]
    assert not wrong, f"{len(wrong)} objects not byte-identical, e.g. {wrong[:5]}"
    sample = [key for key in objects if key.startswith("large/")] + rng.sample(small, 100)
    copies = read_destination(cloud, sample)
    wrong = sorted(key for key in sample if copies[key] != objects[key])
    assert not wrong, f"{len(wrong)} objects not byte-identical, e.g. {wrong[:5]}"
    timings["check"] = time.monotonic() - started

    # Every message was handled once or more; outcomes account for all of them.
    logs = [JobLog(w.lines) for w in workers]
    counts = sum((worker_counts(w.lines) for w in workers), collections.Counter())
    deliveries = sum((log.starts_by_key() for log in logs), collections.Counter())
    # SQS delivers at least once (and moto's receive, without a lock, does hand one message
    # to two workers now and then): every delivery ends copied or duplicate, none failed.
    assert counts["copied"] + counts["duplicate"] == sum(deliveries.values()) >= len(bodies)
    assert counts["failed"] == counts["malformed"] == counts["stopped"] == 0, counts
    assert all(worker_counts(w.lines)["copied"] > 0 for w in workers)   # the load was shared

    # Uploads per object (PutObject, or CreateMultipartUpload) never exceed its deliveries;
    # an object delivered once was uploaded exactly once.
    writes = destination_writes(dest_proxy.requests, cloud.dest_bucket)
    uploads = {key: writes[key]["put"] + writes[key]["create"] for key in objects}
    assert all(uploads[key] >= 1 for key in objects)
    too_many = {key: (uploads[key], deliveries[key]) for key in objects
                if uploads[key] > deliveries[key]}
    assert not too_many, f"uploaded more often than delivered: {too_many}"
    once = [key for key in objects if deliveries[key] == 1]
    assert all(uploads[key] == 1 for key in once)
    repeated = sum(uploads.values()) - len(objects)
    assert repeated <= sum(deliveries.values()) - len(objects)
    print(f"\nload: {len(bodies)} messages, {repeated} repeated uploads, timings "
          + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items()))
