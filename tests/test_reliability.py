"""SPEC §16 on real processes: a worker killed mid-copy, signals, a flaky destination and poison
messages. Every worker here is ``s3_migration_cluster_worker.py`` as a child process; a
FaultProxy on loopback sits in front of the destination (and, where a test needs it, of the
source or of SQS). Tests wait for events (log lines, requests held at the proxy), never for a
fixed time, and compare every copy byte for byte with its source."""
from __future__ import annotations

import json
import random
import signal
import threading
import time
import zlib

import pytest

import s3_migration_lib as lib
from tests.support.faults import (Gate, JobLog, Mix, destination_writes, drain_bodies, either,
                                  part_upload, send_bodies, worker_counts)
from tests.support.proxy import (INTERNAL_ERROR, SLOW_DOWN, Delay, DropResponse, FailNth,
                                 FaultProxy, Reset, matching, s3_error)
from tests.support.workers import WorkerProcess
from tools.local_cloud import s3_event

MiB = lib.MiB
PART = 5 * MiB           # ChunkSize = 5 in every config here
EXIT_MARGIN_S = 2.0      # process teardown on a loaded 2-core machine


def data_of(size: int, seed: object) -> bytes:
    return random.Random(str(seed)).randbytes(size)


def put_objects(cloud, sizes: dict[str, int]) -> dict[str, bytes]:
    """Upload each object and queue one S3 event for it (no bucket notification)."""
    objects = {key: data_of(size, key) for key, size in sizes.items()}
    for key, data in objects.items():
        cloud.upload(key, data)
    send_bodies(cloud.clients.sqs, cloud.queue_url,
                [s3_event(cloud.src_bucket, key, len(data)) for key, data in objects.items()])
    return objects


def stored(cloud, key: str) -> bytes | None:
    try:
        response = cloud.clients.dest_s3.get_object(Bucket=cloud.dest_bucket, Key=key)
    except cloud.clients.dest_s3.exceptions.NoSuchKey:
        return None
    return response["Body"].read()


def unfinished_uploads(cloud) -> list[dict]:
    return cloud.clients.dest_s3.list_multipart_uploads(Bucket=cloud.dest_bucket).get("Uploads", [])


def worker(cloud, config, *args: str) -> WorkerProcess:
    return WorkerProcess(config, cloud.subprocess_env(), *args)


def finish(cloud, config, timeout_s: float = 90) -> WorkerProcess:
    """Run a fresh worker with --until-empty to the end; it must exit 0."""
    with worker(cloud, config, "--until-empty") as second:
        code = second.wait(timeout_s)
        assert code == lib.EXIT_OK, second.output[-3000:]
    return second


# ---------------------------------------------------------------------------------------------
# kill -9 in the middle of a multipart copy
# ---------------------------------------------------------------------------------------------
@pytest.mark.cloud(notify=False, visibility_timeout_s=3)
def test_kill_9_mid_copy_then_another_worker_resumes_from_the_stored_parts(
        cloud, tmp_config, dest_proxy):
    size = 8 * PART + MiB                     # nine parts
    (data,) = put_objects(cloud, {"big.bin": size}).values()
    gate = Gate(part_upload, after=4)         # parts 1-4 go through, later parts are held
    dest_proxy.fault = gate
    config = tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=2,
                        MaxParallelFile=1, ResumableThreshold=5, VisibilityHeartbeat=3)
    with worker(cloud, config) as first:
        first.wait_for_line(r"job start key=big\.bin .*attempt=1")
        gate.wait_held(2)   # both part threads wait on parts 5 and 6: parts 1-4 are stored
        first.process.kill()
        assert first.wait(10) == -signal.SIGKILL
        first_log = JobLog(first.lines)
    assert first_log.ends == []               # killed, not finished
    (upload,) = unfinished_uploads(cloud)
    listed = cloud.clients.dest_s3.list_parts(Bucket=cloud.dest_bucket, Key="big.bin",
                                              UploadId=upload["UploadId"])["Parts"]
    assert [p["PartNumber"] for p in listed] == [1, 2, 3, 4]

    dest_proxy.fault = None
    gate.open()                               # held requests of the dead worker: reset
    dest_proxy.clear()
    second = finish(cloud, config)            # the message reappears after its visibility

    (end,) = JobLog(second.lines).ends
    assert (end["key"], end["outcome"], end["attempt"]) == ("big.bin", "copied", "2")
    assert int(end["bytes_read"]) == size - 4 * PART < size
    assert stored(cloud, "big.bin") == data
    writes = destination_writes(dest_proxy.requests, cloud.dest_bucket)["big.bin"]
    assert writes == {"part": 5, "complete": 1}   # parts 5-9 only, into the same upload
    assert unfinished_uploads(cloud) == []
    item = lib.VersionTable(cloud.clients.dynamodb, cloud.table_name).get("src-bucket/big.bin")
    assert (item["status"], item["tryTimes"]) == ("done", 2)
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


@pytest.mark.cloud(notify=False, visibility_timeout_s=2)
def test_a_long_copy_is_held_by_one_worker_whatever_the_queues_visibility_timeout(
        cloud, tmp_config, dest_proxy):
    # The queue's own VisibilityTimeout (2 s here, 30 s by SQS's default) is shorter than the
    # first heartbeat (a third of VisibilityHeartbeat): the receive itself must cover the gap.
    objects = put_objects(cloud, {"long.bin": 2 * PART + 1})
    dest_proxy.fault = lambda request: Delay(1.5) if part_upload(request) else None
    config = tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                        MaxParallelFile=2, VisibilityHeartbeat=30)
    run = finish(cloud, config)
    assert [(e["outcome"], e["attempt"]) for e in JobLog(run.lines).ends] == [("copied", "1")]
    assert stored(cloud, "long.bin") == objects["long.bin"]
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# SIGTERM / SIGINT
# ---------------------------------------------------------------------------------------------
@pytest.mark.cloud(notify=False)
def test_sigterm_lets_running_copies_finish_and_takes_nothing_new(cloud, tmp_config, dest_proxy):
    objects = put_objects(cloud, {f"run-{i}.bin": 2 * PART + i for i in range(5)})
    gate = Gate(part_upload, then=None)       # hold every first part until the signal is in
    dest_proxy.fault = gate
    config = tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                        MaxParallelFile=2, ShutdownGrace=20)
    with worker(cloud, config) as first:
        gate.wait_held(2)                     # two copies running, both mid-part
        signalled = time.monotonic()
        first.signal(signal.SIGTERM)
        first.wait_for_line("SIGTERM: taking no new messages")
        gate.open()                           # let them finish
        assert first.wait(30) == lib.EXIT_OK
        elapsed = time.monotonic() - signalled
        log = JobLog(first.lines)
    assert elapsed < 20
    running = [start["key"] for start in log.starts]
    assert len(running) == 2
    assert sorted(e["key"] for e in log.ends if e["outcome"] == "copied") == sorted(running)
    for key in running:
        assert stored(cloud, key) == objects[key]
    assert tuple(cloud.queue_depths()) == (3, 0, 0)   # the other three were never taken

    finish(cloud, config)
    cloud.assert_copied(objects)
    writes = destination_writes(dest_proxy.requests, cloud.dest_bucket)
    assert {key: w["create"] for key, w in writes.items()} == {key: 1 for key in objects}
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


@pytest.mark.cloud(notify=False)
def test_sigterm_past_the_grace_exits_0_in_time_and_hands_messages_back_at_once(
        cloud, tmp_config, dest_proxy):
    objects = put_objects(cloud, {f"stuck-{i}.bin": 2 * PART + i for i in range(3)}
                          | {f"queued-{i}.txt": 1000 + i for i in range(2)})
    gate = Gate(part_upload)                  # the destination never answers a part
    dest_proxy.fault = gate
    grace = 2
    config = tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                        MaxParallelFile=3, ShutdownGrace=grace)
    with worker(cloud, config) as first:
        gate.wait_held(3)
        signalled = time.monotonic()
        first.signal(signal.SIGTERM)
        assert first.wait(30) == lib.EXIT_OK
        elapsed = time.monotonic() - signalled
        first.wait_for_line("handing 3 unfinished messages back")
    # The queue's VisibilityTimeout is 60 s: visible now means handed back, not timed out.
    assert tuple(cloud.queue_depths()) == (5, 0, 0)
    assert elapsed < grace + EXIT_MARGIN_S, f"exit took {elapsed:.1f}s, grace {grace}s"

    dest_proxy.fault = None
    gate.open()
    finish(cloud, config)
    cloud.assert_copied(objects)
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


@pytest.mark.cloud(notify=False, visibility_timeout_s=3)
def test_a_second_signal_exits_at_once_and_the_messages_come_back(cloud, tmp_config, dest_proxy):
    objects = put_objects(cloud, {f"forced-{i}.bin": 2 * PART + i for i in range(2)})
    gate = Gate(part_upload)
    dest_proxy.fault = gate
    config = tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                        MaxParallelFile=2, ShutdownGrace=60, VisibilityHeartbeat=3)
    with worker(cloud, config) as first:
        gate.wait_held(2)
        first.signal(signal.SIGINT)
        first.wait_for_line("SIGINT: taking no new messages")
        signalled = time.monotonic()
        first.signal(signal.SIGTERM)
        assert first.wait(10) == lib.EXIT_FORCED
        assert time.monotonic() - signalled < EXIT_MARGIN_S
        first.wait_for_line("second SIGTERM: exiting now")
    dest_proxy.fault = None
    gate.open()
    finish(cloud, config)                     # they reappear after the visibility timeout
    cloud.assert_copied(objects)
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


@pytest.mark.cloud(notify=False)
def test_sigterm_while_waiting_on_an_empty_queue_exits_within_the_grace(cloud, tmp_config):
    receiving = threading.Event()
    receive = matching(method="POST")

    def watch(request):
        if receive(request) and "ReceiveMessage" in request.headers.get("X-Amz-Target", ""):
            receiving.set()
        return None

    with FaultProxy(cloud.aws_url, fault=watch) as sqs_proxy:
        env = cloud.subprocess_env() | {"AWS_ENDPOINT_URL_SQS": sqs_proxy.endpoint_url}
        grace = 2
        with WorkerProcess(tmp_config(ShutdownGrace=grace), env) as idle:
            assert receiving.wait(30), idle.output
            signalled = time.monotonic()
            idle.signal(signal.SIGTERM)
            assert idle.wait(30) == lib.EXIT_OK
            elapsed = time.monotonic() - signalled
    assert elapsed < grace + EXIT_MARGIN_S, f"exit took {elapsed:.1f}s, grace {grace}s"


# ---------------------------------------------------------------------------------------------
# A flaky destination
# ---------------------------------------------------------------------------------------------
FLAKY = {
    "http-500": INTERNAL_ERROR,
    "http-503-slowdown": SLOW_DOWN,
    "connection-reset": Reset(),
    "slow-response": Delay(0.4),
    "stored-but-response-lost": DropResponse(),
}


def check_every_object_correct_or_dead_lettered(cloud, objects, lines) -> set[str]:
    """Each object is byte-identical at the destination, or absent with its message in the
    DLQ; nothing is left in the queue. Returns the dead-lettered keys."""
    assert cloud.queue_depths()[:2] == (0, 0)
    dead = drain_bodies(cloud.clients.sqs, cloud.dlq_url, cloud.queue_depths().dlq_visible)
    dead_keys = {lib.parse_message(body, cloud.dest_bucket, "")[0].src_key for body in dead}
    log = JobLog(lines)
    reported = {e["key"] for e in log.ends if e["outcome"] in ("copied", "duplicate")}
    for key, data in objects.items():
        got = stored(cloud, key)
        if key in dead_keys:
            assert got in (None, data), f"{key}: dead-lettered but a different object is stored"
        else:
            assert got == data, f"{key}: message gone but the object is not byte-identical"
            assert key in reported
    assert not reported & dead_keys, "a dead-lettered object was reported as done"
    return dead_keys


@pytest.mark.cloud(notify=False, max_receive_count=4)
@pytest.mark.parametrize("name", list(FLAKY))
def test_a_flaky_destination_never_leaves_a_bad_object(cloud, tmp_config, dest_proxy, name):
    sizes = {f"small-{i}.txt": 1000 * (i + 1) for i in range(8)}
    sizes |= {f"large-{i}.bin": 2 * PART + 1000 * (i + 1) for i in range(2)}   # three parts
    objects = put_objects(cloud, sizes)
    faults = Mix([(0.3, FLAKY[name])], match=lambda r: True, seed=zlib.crc32(name.encode()))
    dest_proxy.fault = faults
    config = tmp_config(DestEndPointURL=dest_proxy.endpoint_url, RetryDelay=0, MaxThread=2)
    run = finish(cloud, config, timeout_s=150)
    assert sum(faults.applied.values()) > 3, faults.applied
    dead = check_every_object_correct_or_dead_lettered(cloud, objects, run.lines)
    assert len(dead) <= 1, f"{name}: too many objects gave up: {dead}"
    if name == "stored-but-response-lost":
        # Some bodies reached the destination more than once: 8 PUTs and 2 x 3 parts at least.
        writes = destination_writes(dest_proxy.requests, cloud.dest_bucket).values()
        assert sum(w["put"] + w["part"] for w in writes) > 8 + 2 * 3


@pytest.mark.cloud(notify=False, max_receive_count=2)
def test_an_object_the_destination_always_refuses_ends_in_the_dlq_and_others_are_copied(
        cloud, tmp_config, dest_proxy):
    objects = put_objects(cloud, {"doomed.bin": 2 * PART, "fine.bin": 2 * PART,
                                  "doomed.txt": 10, "fine.txt": 10})
    doomed = lambda r: "/doomed." in r.url_path and r.method in ("PUT", "POST")  # noqa: E731
    dest_proxy.fault = either(lambda r: SLOW_DOWN if doomed(r) else None,
                              Mix([(0.2, INTERNAL_ERROR), (0.1, Reset())], seed=3))
    # MaxRetry = 1: botocore's own four tries per request are enough to show the retries.
    config = tmp_config(DestEndPointURL=dest_proxy.endpoint_url, RetryDelay=0, MaxRetry=1)
    run = finish(cloud, config, timeout_s=150)
    dead = check_every_object_correct_or_dead_lettered(cloud, objects, run.lines)
    assert dead == {"doomed.bin", "doomed.txt"}
    assert stored(cloud, "doomed.bin") is None and stored(cloud, "doomed.txt") is None
    outcomes = {(e["key"], e["outcome"]) for e in JobLog(run.lines).ends}
    assert ("doomed.bin", "copied") not in outcomes and ("doomed.txt", "copied") not in outcomes


@pytest.mark.cloud(notify=False, max_receive_count=3)
def test_a_completed_upload_whose_answer_was_lost_is_acknowledged_on_redelivery(
        cloud, tmp_config, dest_proxy):
    objects = put_objects(cloud, {"completed.bin": 2 * PART + 5})
    complete = matching(method="POST", query="uploadId")
    # botocore tries a request four times (max_attempts = 3 retries): lose every answer.
    dest_proxy.fault = FailNth(DropResponse(), n=range(1, 5), match=complete)
    run = finish(cloud, tmp_config(DestEndPointURL=dest_proxy.endpoint_url, RetryDelay=0))
    log = JobLog(run.lines)
    assert [(e["outcome"], e["attempt"]) for e in log.ends] == [("failed", "1"),
                                                                ("duplicate", "2")]
    assert stored(cloud, "completed.bin") == objects["completed.bin"]
    writes = destination_writes(dest_proxy.requests, cloud.dest_bucket)["completed.bin"]
    assert writes["create"] == 1 and writes["part"] == 3
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Poison messages (SPEC §3.5, §7)
# ---------------------------------------------------------------------------------------------
def malformed_bodies(bucket: str) -> dict[str, str]:
    """Every malformed shape, by name; each must end in the DLQ, logged as malformed."""
    good = s3_event(bucket, "k.txt", 10)

    def event_with(**obj):
        body = json.loads(json.dumps(good))
        body["Records"][0]["s3"]["object"].update(obj)
        return json.dumps(body)

    def record_without(*path):
        body = json.loads(json.dumps(good))
        node = body["Records"][0]
        for name in path[:-1]:
            node = node[name]
        del node[path[-1]]
        return json.dumps(body)

    job = {"Src_bucket": bucket, "Src_key": "k.txt", "Size": 10, "Des_bucket": "d",
           "Des_key": "k.txt"}
    return {
        "not json": "this is not json {",
        "truncated json": json.dumps(good)[:-3],
        "json list": "[1, 2, 3]",
        "json string": '"Records"',
        "json null": "null",
        "deeply nested json": "[" * 5000 + "]" * 5000,
        "unknown shape": json.dumps({"hello": "world"}),
        "records not a list": json.dumps({"Records": {"a": 1}}),
        "records empty": json.dumps({"Records": []}),
        "record not an object": json.dumps({"Records": ["x"]}),
        "no eventName": record_without("eventName"),
        "unsupported eventName": json.dumps(s3_event(bucket, "k.txt", 1,
                                                     event_name="ObjectRestore:Post")),
        "no key": record_without("s3", "object", "key"),
        "no bucket": record_without("s3", "bucket"),
        "no size": record_without("s3", "object", "size"),
        "key of wrong type": event_with(key=12345),
        "bucket of wrong type": json.dumps(s3_event(bucket, "k", 1)).replace(
            f'"name": "{bucket}"', '"name": ["a"]'),
        "versionId of wrong type": event_with(versionId=7),
        "negative size": event_with(size=-1),
        "absurd size": event_with(size=10 ** 30),
        "size over 5 TiB": event_with(size=lib.MAX_OBJECT_SIZE + 1),
        "float size": event_with(size=1.5),
        "boolean size": event_with(size=True),
        "size as text": event_with(size="ten"),
        "jobsender without Des_key": json.dumps({k: v for k, v in job.items() if k != "Des_key"}),
        "jobsender size a list": json.dumps(job | {"Size": [10]}),
        "jobsender empty key": json.dumps(job | {"Src_key": ""}),
        "sns message not json": json.dumps({"Type": "Notification", "Message": "nope"}),
        "sns message not a string": json.dumps({"Type": "Notification", "Message": {"a": 1}}),
        "eventbridge unknown detail-type": json.dumps({"detail-type": "Object Restore Completed",
                                                       "detail": {}}),
        "eventbridge without object": json.dumps({"detail-type": "Object Created",
                                                  "detail": {"bucket": {"name": bucket}}}),
    }


@pytest.mark.cloud(notify=False)
def test_a_key_deleted_during_its_copy_is_acknowledged_and_leaves_no_upload(
        cloud, tmp_config, dest_proxy):
    put_objects(cloud, {"vanishing.bin": 3 * PART})
    deleted = []

    def delete_source_at_first_part(request):
        if part_upload(request) and not deleted:
            deleted.append(True)
            cloud.clients.src_s3.delete_object(Bucket=cloud.src_bucket, Key="vanishing.bin")
        return None

    dest_proxy.fault = delete_source_at_first_part
    run = finish(cloud, tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1))
    assert [e["outcome"] for e in JobLog(run.lines).ends] == ["source-gone"]
    assert stored(cloud, "vanishing.bin") is None
    assert unfinished_uploads(cloud) == []    # GCS bills unfinished uploads' parts
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


@pytest.mark.cloud(notify=False, max_receive_count=2)
def test_every_poison_message_ends_where_the_spec_says_and_good_ones_are_served(
        cloud, tmp_config):
    sqs = cloud.clients.sqs
    cloud.clients.src_s3.create_bucket(Bucket="forbidden")
    cloud.clients.src_s3.put_object(Bucket="forbidden", Key="secret.txt", Body=b"no")
    cloud.upload("gone.txt", b"soon deleted")
    cloud.clients.src_s3.delete_object(Bucket=cloud.src_bucket, Key="gone.txt")
    good = {f"good-{i}.txt": data_of(100 + i, i) for i in range(6)}
    good["lying-small.bin"] = data_of(2 * PART + 3, "lying-small")   # message says 3 bytes
    good["lying-large.txt"] = data_of(7, "lying-large")              # message says 12 MiB
    claimed = {"lying-small.bin": 3, "lying-large.txt": 12 * MiB}
    for key, data in good.items():
        cloud.upload(key, data)

    malformed = malformed_bodies(cloud.src_bucket)
    unreadable = {"bucket the worker may not read":
                  json.dumps(s3_event("forbidden", "secret.txt", 2)),
                  # A typo in a jobsender bucket is not "the object was deleted": keep it.
                  "bucket that does not exist":
                  json.dumps({"Src_bucket": "no-such-bucket", "Src_key": "k", "Size": 2,
                              "Des_bucket": cloud.dest_bucket, "Des_key": "k"}),
                  "bucket that does not exist, large object":
                  json.dumps({"Src_bucket": "no-such-bucket", "Src_key": "big", "Size": 9 * MiB,
                              "Des_bucket": cloud.dest_bucket, "Des_key": "big"})}
    acknowledged = {"key that no longer exists": json.dumps(s3_event(cloud.src_bucket,
                                                                     "gone.txt", 12)),
                    "test event": json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})}
    bad = malformed | unreadable | acknowledged
    ids = dict(zip(bad, send_bodies(sqs, cloud.queue_url, list(bad.values()))))
    send_bodies(sqs, cloud.queue_url, [s3_event(cloud.src_bucket, key, claimed.get(key, len(d)))
                                       for key, d in good.items()])

    def forbid(request):
        if request.url_path.startswith("/forbidden"):
            return s3_error(403, "AccessDenied", "Access Denied")
        return None

    with FaultProxy(cloud.aws_url, fault=forbid) as source_proxy:
        config = tmp_config(SrcEndPointURL=source_proxy.endpoint_url, RetryDelay=0,
                            MaxParallelFile=3)
        run = finish(cloud, config, timeout_s=120)

    for key, data in good.items():
        assert stored(cloud, key) == data, key
    assert stored(cloud, "gone.txt") is None
    assert cloud.queue_depths()[:2] == (0, 0)
    dead = drain_bodies(sqs, cloud.dlq_url, len(malformed) + len(unreadable))
    assert sorted(dead) == sorted(list(malformed.values()) + list(unreadable.values()))

    output = run.output
    for name in malformed:
        # Logged at ERROR with the message id and a reason, on each of its two receives.
        lines = [line for line in run.lines if ids[name] in line and " ERROR " in line]
        assert len(lines) == 2 and all("malformed" in line for line in lines), (name, lines)
    for name in unreadable:
        lines = [line for line in run.lines if ids[name] in line and " ERROR " in line]
        assert len(lines) == 2 and all("will be retried" in line for line in lines), (name, lines)
    assert "Traceback" not in output
    ends = JobLog(run.lines).ends
    assert [e["outcome"] for e in ends if e["key"] == "gone.txt"] == ["source-gone"]
    counts = worker_counts(run.lines)
    assert counts["malformed"] == 2 * len(malformed)
    assert counts["copied"] == len(good) and counts["test-event"] == 1
