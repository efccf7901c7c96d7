"""The worker end to end on real moto servers: S3 events in SQS -> verified copies at the
destination server, compared byte for byte."""
from __future__ import annotations

import hashlib
import json
import logging
import random

import pytest

import s3_migration_lib as lib
from tests.support.proxy import Respond, matching
from tests.support.workers import run_until_empty, set_cloud_environment
from tools.local_cloud import s3_event

MiB = lib.MiB


@pytest.fixture(autouse=True)
def cloud_environment(cloud, monkeypatch):
    set_cloud_environment(monkeypatch, cloud)


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def dest_keys(cloud) -> set[str]:
    listing = cloud.clients.dest_s3.list_objects_v2(Bucket=cloud.dest_bucket)
    return {item["Key"] for item in listing.get("Contents", [])}


def assert_queues_empty(cloud) -> None:
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


def test_copies_every_size_and_odd_key_byte_for_byte(cloud, tmp_config):
    objects = {
        "empty": 0,
        "one byte": 1,
        "exactly one part": 5 * MiB,
        "one byte over": 5 * MiB + 1,
        "many/parts.bin": 23 * MiB + 7,
        "unicode ü/日本語/ключ.txt": 100,
        "plus+and space+.txt": 10,
        "100% done?#frag.txt": 11,
        "dir/": 0,
    }
    for index, (key, size) in enumerate(objects.items()):
        cloud.upload(key, data_of(size, index), part_size=8 * MiB)
    run_until_empty(tmp_config())
    cloud.assert_copied(objects)
    assert dest_keys(cloud) == set(objects)
    assert_queues_empty(cloud)


def test_metadata_is_carried_over(cloud, tmp_config):
    response = cloud.upload("meta.bin", data_of(12 * MiB, 1), part_size=5 * MiB,
                            ContentType="video/mp4", CacheControl="max-age=60",
                            ContentDisposition="attachment", ContentLanguage="de",
                            Metadata={"owner": "ops", "team": "data"})
    cloud.upload("small.txt", b"hello", ContentType="text/plain", ContentEncoding="identity",
                 Metadata={"a": "b"})
    run_until_empty(tmp_config())
    big = cloud.clients.dest_s3.head_object(Bucket=cloud.dest_bucket, Key="meta.bin")
    assert big["ContentType"] == "video/mp4"
    assert big["CacheControl"] == "max-age=60"
    assert big["ContentDisposition"] == "attachment"
    assert big["ContentLanguage"] == "de"
    assert big["Metadata"]["owner"] == "ops"
    assert big["Metadata"][lib.META_SOURCE_ETAG] == response["ETag"].strip('"')
    assert big["Metadata"][lib.META_SOURCE_MTIME]
    small = cloud.clients.dest_s3.head_object(Bucket=cloud.dest_bucket, Key="small.txt")
    assert (small["ContentType"], small["ContentEncoding"], small["Metadata"]["a"]) == (
        "text/plain", "identity", "b")
    assert small["ETag"].strip('"') == hashlib.md5(b"hello").hexdigest()


def test_destination_never_receives_flexible_checksums(cloud, tmp_config, dest_proxy):
    cloud.upload("big.bin", data_of(11 * MiB, 2), part_size=5 * MiB)
    cloud.upload("small.bin", data_of(1000, 3))
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url))
    cloud.assert_copied(["big.bin", "small.bin"])
    requests = dest_proxy.requests
    writes = [r for r in requests if r.method == "PUT"]
    assert len(writes) == 1 + 3   # one PutObject, three UploadPart
    for request in requests:
        names = {name.lower() for name in request.headers}
        assert not any(name.startswith("x-amz-checksum-") for name in names), request
        assert "x-amz-sdk-checksum-algorithm" not in names, request
        assert "aws-chunked" not in request.headers.get("content-encoding", ""), request
        assert "STREAMING" not in request.headers.get("x-amz-content-sha256", ""), request
        assert "x-amz-decoded-content-length" not in names, request
    for request in writes:
        assert "content-md5" in request.headers, request


def _dead_worker_upload(cloud, key: str, data: bytes, part_size: int, parts: list[int],
                        record_etag: str | None = "source") -> str:
    """Leave what a worker killed mid-copy leaves: an unfinished upload with some parts and
    the DynamoDB record of the source version it was copying."""
    source = lib.Source(cloud.clients.src_s3)
    src = source.head(cloud.src_bucket, key)
    upload_id = lib.Destination(cloud.clients.dest_s3, "STANDARD").create_upload(
        cloud.dest_bucket, key, src)
    for number in parts:
        chunk = data[(number - 1) * part_size: number * part_size]
        cloud.clients.dest_s3.upload_part(Bucket=cloud.dest_bucket, Key=key, UploadId=upload_id,
                                          PartNumber=number, Body=chunk)
    if record_etag is not None:
        if record_etag != "source":
            src = lib.dataclasses.replace(src, etag=record_etag)
        job = lib.Job(cloud.src_bucket, key, len(data), cloud.dest_bucket, key)
        table = lib.VersionTable(cloud.clients.dynamodb, cloud.table_name)
        table.begin(job, src, "dead-worker")
        table.record_upload(job, src, upload_id)
    return upload_id


def uploaded_part_numbers(proxy) -> list[int]:
    return sorted(int(r.query["partNumber"][0]) for r in proxy.requests
                  if r.method == "PUT" and "partNumber" in r.query and not r.fault)


def test_resume_uploads_only_the_missing_parts(cloud, tmp_config, dest_proxy, caplog):
    data = data_of(23 * MiB, 4)
    cloud.upload("resume.bin", data, part_size=8 * MiB)
    _dead_worker_upload(cloud, "resume.bin", data, 5 * MiB, parts=[1, 2, 4])
    caplog.set_level(logging.INFO, logger="s3_migration_lib")
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, ResumableThreshold=5))
    cloud.assert_copied(["resume.bin"])
    assert uploaded_part_numbers(dest_proxy) == [3, 5]
    (end,) = [r.getMessage() for r in caplog.records if "outcome=copied" in r.getMessage()]
    bytes_read = int(end.split("bytes_read=")[1].split()[0])
    assert bytes_read == 5 * MiB + 3 * MiB   # part 3 and the short last part only
    assert not cloud.clients.dest_s3.list_multipart_uploads(
        Bucket=cloud.dest_bucket).get("Uploads")
    assert_queues_empty(cloud)


def test_verify_twice_rereads_stored_parts_and_replaces_a_bad_one(cloud, tmp_config, dest_proxy):
    data = data_of(15 * MiB, 5)
    cloud.upload("twice.bin", data, part_size=8 * MiB)
    corrupt = bytearray(data)
    corrupt[5 * MiB + 10] ^= 0xFF   # part 2 as stored is wrong
    _dead_worker_upload(cloud, "twice.bin", bytes(corrupt), 5 * MiB, parts=[1, 2])
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, ifVerifyMD5Twice=True))
    cloud.assert_copied(["twice.bin"])
    assert uploaded_part_numbers(dest_proxy) == [2, 3]


def test_changed_chunk_size_restarts_the_upload(cloud, tmp_config, dest_proxy):
    data = data_of(20 * MiB, 6)
    cloud.upload("rechunk.bin", data, part_size=8 * MiB)
    old = _dead_worker_upload(cloud, "rechunk.bin", data, 6 * MiB, parts=[1, 2])
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, ChunkSize=5))
    cloud.assert_copied(["rechunk.bin"])
    assert uploaded_part_numbers(dest_proxy) == [1, 2, 3, 4]
    uploads = cloud.clients.dest_s3.list_multipart_uploads(Bucket=cloud.dest_bucket)
    assert old not in {u["UploadId"] for u in uploads.get("Uploads", [])}


def test_an_upload_the_table_does_not_name_is_not_resumed(cloud, tmp_config, dest_proxy):
    # A worker recorded its start, then died before recording its upload: the parts at the
    # destination may be anyone's, so the copy starts a new upload.
    data = data_of(12 * MiB, 12)
    cloud.upload("unnamed.bin", data, part_size=8 * MiB)
    _dead_worker_upload(cloud, "unnamed.bin", data, 5 * MiB, parts=[1, 2])
    src = lib.Source(cloud.clients.src_s3).head(cloud.src_bucket, "unnamed.bin")
    job = lib.Job(cloud.src_bucket, "unnamed.bin", len(data), cloud.dest_bucket, "unnamed.bin")
    lib.VersionTable(cloud.clients.dynamodb, cloud.table_name).begin(job, src, "dead-worker")
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url))
    cloud.assert_copied(["unnamed.bin"])
    assert uploaded_part_numbers(dest_proxy) == [1, 2, 3]


def test_upload_of_another_source_version_is_not_resumed(cloud, tmp_config, dest_proxy):
    data = data_of(12 * MiB, 7)
    cloud.upload("other.bin", data, part_size=8 * MiB)
    stale = data_of(12 * MiB, 70)   # parts of an older object under the same key
    _dead_worker_upload(cloud, "other.bin", stale, 5 * MiB, parts=[1, 2], record_etag="0" * 32)
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url))
    cloud.assert_copied(["other.bin"])
    assert uploaded_part_numbers(dest_proxy) == [1, 2, 3]


def test_below_resumable_threshold_a_copy_starts_again(cloud, tmp_config, dest_proxy):
    data = data_of(12 * MiB, 8)
    cloud.upload("small-large.bin", data, part_size=8 * MiB)
    _dead_worker_upload(cloud, "small-large.bin", data, 5 * MiB, parts=[1])
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, ResumableThreshold=50))
    cloud.assert_copied(["small-large.bin"])
    assert uploaded_part_numbers(dest_proxy) == [1, 2, 3]
    # Nothing will resume an upload below the threshold: the table is not told its id.
    item = lib.VersionTable(cloud.clients.dynamodb, cloud.table_name).get(
        f"{cloud.src_bucket}/small-large.bin")
    assert item["status"] == "done" and "uploadId" not in item


def test_duplicate_deliveries_copy_once(cloud, tmp_config, dest_proxy):
    # moto (like S3) sends two events for one multipart upload; we add a third delivery.
    data = data_of(11 * MiB, 9)
    cloud.upload("twice-sent.bin", data, part_size=5 * MiB)
    cloud.send_message(s3_event(cloud.src_bucket, "twice-sent.bin", len(data)))
    worker = run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url))
    cloud.assert_copied(["twice-sent.bin"])
    creates = [r for r in dest_proxy.requests if r.method == "POST" and "uploads" in r.query]
    assert len(creates) == 1
    assert worker.counts == {"copied": 1, "duplicate": 2}
    assert_queues_empty(cloud)


@pytest.mark.cloud(notify=False)
def test_every_message_shape_is_served(cloud, tmp_config):
    for key in ("a.txt", "b c.txt", "sns.txt", "bridge.txt", "jobsender.txt"):
        cloud.upload(key, key.encode() * 100)
    two_records = s3_event(cloud.src_bucket, "a.txt", 500)
    two_records["Records"] += s3_event(cloud.src_bucket, "b c.txt", 800)["Records"]
    cloud.send_message(two_records)
    cloud.send_message({"Type": "Notification",
                        "Message": json.dumps(s3_event(cloud.src_bucket, "sns.txt", 700))})
    cloud.send_message({"detail-type": "Object Created", "source": "aws.s3", "detail": {
        "bucket": {"name": cloud.src_bucket}, "object": {"key": "bridge.txt", "size": 1000}}})
    cloud.send_message({"Src_bucket": cloud.src_bucket, "Src_key": "jobsender.txt",
                        "Size": 1300, "Des_bucket": cloud.dest_bucket,
                        "Des_key": "backfill/jobsender.txt"})
    cloud.send_message({"Service": "Amazon S3", "Event": "s3:TestEvent"})
    worker = run_until_empty(tmp_config(Des_prefix_default="events/"))
    assert dest_keys(cloud) == {"events/a.txt", "events/b c.txt", "events/sns.txt",
                                "events/bridge.txt", "backfill/jobsender.txt"}
    assert cloud.compare("jobsender.txt", "backfill/jobsender.txt")
    assert cloud.compare("b c.txt", "events/b c.txt")
    assert worker.counts == {"copied": 4, "test-event": 1}
    assert_queues_empty(cloud)


@pytest.mark.cloud(notify=False)
def test_ignored_and_vanished_objects_are_acknowledged_without_copy(cloud, tmp_config, tmp_path):
    ignore = tmp_path / "ignore.txt"
    ignore.write_text("# skip temp files\n*.tmp\nsrc-bucket/private/*\n")
    for key in ("keep.txt", "x.tmp", "private/secret.txt"):
        cloud.upload(key, b"data")
        cloud.send_message(s3_event(cloud.src_bucket, key, 4))
    cloud.send_message(s3_event(cloud.src_bucket, "never-existed.txt", 4))
    worker = run_until_empty(tmp_config(IgnoreListPath=str(ignore)))
    assert dest_keys(cloud) == {"keep.txt"}
    assert worker.counts == {"copied": 1, "ignored": 2, "source-gone": 1}
    assert_queues_empty(cloud)


@pytest.mark.cloud(notify=False, max_receive_count=2)
def test_malformed_messages_end_in_the_dlq_and_good_ones_are_served(cloud, tmp_config, caplog):
    bad_bodies = [
        "not json at all",
        json.dumps({"unknown": "shape"}),
        json.dumps(s3_event(cloud.src_bucket, "neg.txt", -5)),
        json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]}),
        json.dumps({"Src_bucket": "b", "Src_key": "k", "Size": "huge", "Des_bucket": "d",
                    "Des_key": "k"}),
    ]
    for body in bad_bodies:
        cloud.send_message(body)
    cloud.upload("good.txt", b"good")
    cloud.send_message(s3_event(cloud.src_bucket, "good.txt", 4))
    caplog.set_level(logging.ERROR, logger="s3_migration_lib")
    run_until_empty(tmp_config(RetryDelay=0))
    assert cloud.compare("good.txt")
    dlq = []
    for _ in range(5):
        response = cloud.clients.sqs.receive_message(QueueUrl=cloud.dlq_url,
                                                     MaxNumberOfMessages=10)
        dlq += [m["Body"] for m in response.get("Messages", [])]
        if len(dlq) >= len(bad_bodies):
            break
    assert sorted(dlq) == sorted(bad_bodies)
    errors = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert errors and all("\n" not in e for e in errors)
    assert any("not JSON" in e for e in errors) and any("out of range" in e for e in errors)


@pytest.mark.cloud(notify=False, max_receive_count=2)
def test_a_copy_the_destination_refuses_is_retried_then_dead_lettered(cloud, tmp_config,
                                                                      dest_proxy):
    cloud.upload("refused.txt", b"abc")
    cloud.send_message(s3_event(cloud.src_bucket, "refused.txt", 3))
    dest_proxy.fault = lambda request: Respond(403) if request.method == "PUT" else None
    worker = run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, RetryDelay=0))
    assert worker.counts == {"failed": 2}
    assert "refused.txt" not in dest_keys(cloud)
    assert tuple(cloud.queue_depths()) == (0, 0, 1)


def test_source_overwritten_mid_copy_is_copied_whole(cloud, tmp_config, dest_proxy):
    old = data_of(16 * MiB, 10)
    new = data_of(16 * MiB, 11)
    cloud.upload("moving.bin", old, part_size=8 * MiB)
    overwritten = []

    def overwrite_after_first_part(request):
        if request.method == "PUT" and "partNumber" in request.query and not overwritten:
            overwritten.append(True)
            cloud.clients.src_s3.put_object(Bucket=cloud.src_bucket, Key="moving.bin", Body=new)
        return None

    dest_proxy.fault = overwrite_after_first_part
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1))
    got = cloud.clients.dest_s3.get_object(Bucket=cloud.dest_bucket, Key="moving.bin")["Body"].read()
    assert got == new
    assert_queues_empty(cloud)
