"""Versions (SPEC §5, §6, §16): an object overwritten at a versioned source while its copy is in
flight, or while a worker is dead in the middle of it, ends at the destination as the old or the
new version whole, never a mix, with each of the seed's recommended settings; the DynamoDB
record; and a source that denies GetObjectVersion.

Real processes throughout: moto servers for S3, SQS and DynamoDB, a FaultProxy in front of the
destination to act at a precise request, and for the restart cases a worker subprocess killed
with SIGKILL while one of its parts is held in the proxy.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import random
import threading
from typing import Callable

import pytest

import s3_migration_lib as lib
from tests.support.proxy import FaultProxy, Reset, s3_error
from tests.support.workers import WorkerProcess, run_until_empty, set_cloud_environment
from tools.local_cloud import poll_until, s3_event

MiB = lib.MiB
KEY = "video/moving.bin"
SIZE = 16 * MiB   # ChunkSize 5: parts of 5, 5, 5 and 1 MiB


@pytest.fixture(autouse=True)
def cloud_environment(cloud, monkeypatch):
    set_cloud_environment(monkeypatch, cloud)


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def dest_bytes(cloud, key: str = KEY) -> bytes | None:
    try:
        return cloud.clients.dest_s3.get_object(Bucket=cloud.dest_bucket, Key=key)["Body"].read()
    except cloud.clients.dest_s3.exceptions.NoSuchKey:
        return None


def name_of(data: bytes | None, old: bytes, new: bytes) -> str:
    """'old', 'new', 'missing', or 'MIXED' for anything else (half old, half new...)."""
    if data is None:
        return "missing"
    return {old: "old", new: "new"}.get(data, "MIXED")


def table_item(cloud, key: str = KEY) -> dict:
    return lib.VersionTable(cloud.clients.dynamodb, cloud.table_name).get(
        f"{cloud.src_bucket}/{key}")


def unfinished_uploads(cloud) -> list:
    return cloud.clients.dest_s3.list_multipart_uploads(Bucket=cloud.dest_bucket).get(
        "Uploads", [])


def is_upload_part(request) -> bool:
    return request.method == "PUT" and "partNumber" in request.query


def is_create(request) -> bool:
    return request.method == "POST" and "uploads" in request.query


# ---------------------------------------------------------------------------------------------
# The seed's scenarios ("版本控制支持 / 场景") and what each must leave at the destination.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    settings: dict
    message: Callable[..., dict]   # (cloud, size, version_id, etag) -> message body
    event_per_version: bool        # S3 sends an event for the overwrite too
    in_flight: str                 # what the destination ends with: "old" or "new"
    in_flight_completed_first: tuple[str, ...]   # objects completed before the final one
    after_restart: str


def _event(cloud, size, version_id, etag):
    return s3_event(cloud.src_bucket, KEY, size, version_id=version_id, etag=etag)


def _plain_event(cloud, size, version_id, etag):
    return s3_event(cloud.src_bucket, KEY, size)   # unversioned event (as moto sends them)


def _jobsender_null(cloud, size, version_id, etag):
    return {"Src_bucket": cloud.src_bucket, "Src_key": KEY, "Size": size,
            "Des_bucket": cloud.dest_bucket, "Des_key": KEY, "versionId": "null"}


def _jobsender_versioned(cloud, size, version_id, etag):
    return {**_jobsender_null(cloud, size, version_id, etag), "versionId": version_id}


SCENARIOS = [
    # All switches off (the default; also right without GetObjectVersion permission): reads
    # are pinned by IfMatch to the ETag, the overwrite aborts the upload, the new version is
    # copied from the start.
    Scenario("switches-off", {}, _plain_event, False, "new", (), "new"),
    # S3 events: GetObjectWithVersionId = True, UpdateVersionId = False. The event's version is
    # copied whole, then the overwrite's own event copies the new one.
    Scenario("s3-events", {"GetObjectWithVersionId": True, "UpdateVersionId": False},
             _event, True, "new", ("old",), "new"),
    # jobsender, integrity: JobsenderCompareVersionId = False, UpdateVersionId = True,
    # GetObjectWithVersionId = True. The version HEADed at the start is copied whole, the
    # final check sees the overwrite and copies the new version.
    Scenario("jobsender-integrity", {"JobsenderCompareVersionId": False,
                                     "UpdateVersionId": True, "GetObjectWithVersionId": True},
             _jobsender_null, False, "new", ("old",), "new"),
    # jobsender, integrity and consistency: JobsenderCompareVersionId = True, UpdateVersionId =
    # False, GetObjectWithVersionId = True. The job names the version; that version is what
    # is copied (the next jobsender run sends the new one). After a restart the upload is
    # resumed with the same version.
    Scenario("jobsender-consistency", {"JobsenderCompareVersionId": True,
                                       "UpdateVersionId": False, "GetObjectWithVersionId": True},
             _jobsender_versioned, False, "old", (), "old"),
]


def _upload_old_and_send(cloud, scenario: Scenario, old: bytes) -> dict:
    response = cloud.upload(KEY, old, part_size=8 * MiB)
    cloud.send_message(scenario.message(cloud, len(old), response["VersionId"],
                                        response["ETag"].strip('"')))
    return response


def _overwrite(cloud, scenario: Scenario, new: bytes) -> dict:
    response = cloud.clients.src_s3.put_object(Bucket=cloud.src_bucket, Key=KEY, Body=new)
    if scenario.event_per_version:
        cloud.send_message(scenario.message(cloud, len(new), response["VersionId"],
                                            response["ETag"].strip('"')))
    return response


@pytest.mark.cloud(versioned=True, notify=False)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_overwrite_during_the_copy_leaves_old_or_new_whole(cloud, tmp_config, dest_proxy,
                                                           scenario):
    old, new = data_of(SIZE, 1), data_of(SIZE, 2)
    first = _upload_old_and_send(cloud, scenario, old)
    overwritten = threading.Event()
    completed_before: list[str] = []   # what the destination held when a later upload began

    def act(request):
        if is_upload_part(request) and not overwritten.is_set():
            overwritten.set()   # part 1 has been read from the source; parts 2-4 have not
            _overwrite(cloud, scenario, new)
        elif is_create(request) and overwritten.is_set():
            completed_before.append(name_of(dest_bytes(cloud), old, new))
        return None

    dest_proxy.fault = act
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                               **scenario.settings))
    assert overwritten.is_set()
    assert name_of(dest_bytes(cloud), old, new) == scenario.in_flight
    assert tuple(c for c in completed_before if c != "missing") == \
        scenario.in_flight_completed_first
    assert not unfinished_uploads(cloud)
    assert tuple(cloud.queue_depths()) == (0, 0, 0)
    item = table_item(cloud)
    assert item["status"] == "done"
    if scenario.in_flight == "old":
        assert item["versionId"] == first["VersionId"]


@pytest.mark.cloud(versioned=True, notify=False, visibility_timeout_s=2)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_overwrite_while_a_killed_worker_left_half_an_upload(cloud, tmp_config, dest_proxy,
                                                             scenario, caplog):
    old, new = data_of(SIZE, 3), data_of(SIZE, 4)
    first = _upload_old_and_send(cloud, scenario, old)
    held = threading.Event()
    release = threading.Event()

    def hold_second_part(request):
        if is_upload_part(request) and request.query["partNumber"] == ["2"] \
                and not release.is_set():
            held.set()
            release.wait(30)
            return Reset()
        return None

    dest_proxy.fault = hold_second_part
    # VisibilityHeartbeat 3: the dead worker's message is visible again within 3 s.
    config = tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                        VisibilityHeartbeat=3, **scenario.settings)
    with WorkerProcess(config, cloud.subprocess_env()) as dying:
        assert held.wait(30), "the first worker never reached part 2:\n" + dying.output
        dying.process.kill()   # SIGKILL: no clean-up, part 1 stays uploaded
        assert dying.wait(10) == -9
    release.set()
    assert len(unfinished_uploads(cloud)) == 1
    _overwrite(cloud, scenario, new)

    completed_before: list[str] = []

    def snapshot_at_create(request):
        if is_create(request):
            completed_before.append(name_of(dest_bytes(cloud), old, new))
        return None

    dest_proxy.fault = snapshot_at_create
    dest_proxy.clear()
    caplog.set_level(logging.INFO, logger="s3_migration_lib")
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                               VisibilityHeartbeat=3, **scenario.settings))
    assert name_of(dest_bytes(cloud), old, new) == scenario.after_restart
    assert not unfinished_uploads(cloud)
    assert tuple(cloud.queue_depths()) == (0, 0, 0)
    item = table_item(cloud)
    assert item["status"] == "done"
    assert item["tryTimes"] >= 2
    uploaded = sorted(int(r.query["partNumber"][0]) for r in dest_proxy.requests
                      if is_upload_part(r))
    if scenario.after_restart == "old":
        # Resumed with the version recorded at the start: part 1 is not sent again.
        assert item["versionId"] == first["VersionId"]
        assert uploaded == [2, 3, 4]
        ends = [r.getMessage() for r in caplog.records if "outcome=copied" in r.getMessage()]
        assert [int(e.split("bytes_read=")[1].split()[0]) for e in ends] == [SIZE - 5 * MiB]
    elif scenario.event_per_version:
        # Two messages: the new version's event, and the dead worker's (old version) back after
        # its visibility timeout. New first: the half upload (old) is aborted, the new version
        # copied whole, the old event then finds the current version copied. Old first: the
        # old version is resumed (parts 2-4), then the new one copied whole.
        assert uploaded in ([1, 2, 3, 4], [1, 2, 2, 3, 3, 4, 4])
        assert all(name in ("old", "missing") for name in completed_before)
    else:
        # The dead worker's part 1 was of the old version: never completed with new parts.
        assert uploaded == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Late and stale versions
# ---------------------------------------------------------------------------------------------
@pytest.mark.cloud(versioned=True, notify=False)
def test_a_late_event_of_an_older_version_does_not_put_it_back(cloud, tmp_config):
    v1 = cloud.upload("late.txt", b"version one")
    v2 = cloud.upload("late.txt", b"version two, newer")
    cloud.send_message(s3_event(cloud.src_bucket, "late.txt", 18, version_id=v2["VersionId"]))
    config = tmp_config(GetObjectWithVersionId=True)
    run_until_empty(config)
    # The redelivered (or late) event of version one comes after version two was copied.
    cloud.send_message(s3_event(cloud.src_bucket, "late.txt", 11, version_id=v1["VersionId"]))
    worker = run_until_empty(config)
    assert worker.counts == {"duplicate": 1}
    assert dest_bytes(cloud, "late.txt") == b"version two, newer"


@pytest.mark.cloud(versioned=True, notify=False)
def test_an_older_version_is_copied_while_the_destination_lacks_the_current_one(cloud,
                                                                               tmp_config):
    v1 = cloud.upload("pinned.txt", b"version one")
    cloud.upload("pinned.txt", b"version two")
    cloud.send_message(s3_event(cloud.src_bucket, "pinned.txt", 11, version_id=v1["VersionId"]))
    run_until_empty(tmp_config(GetObjectWithVersionId=True))
    assert dest_bytes(cloud, "pinned.txt") == b"version one"
    head = cloud.clients.dest_s3.head_object(Bucket=cloud.dest_bucket, Key="pinned.txt")
    assert head["Metadata"][lib.META_SOURCE_VERSION] == v1["VersionId"]


@pytest.mark.cloud(versioned=True, notify=False)
def test_update_version_id_replaces_the_jobs_version_with_the_current_one(cloud, tmp_config):
    v1 = cloud.upload("update.txt", b"version one")
    v2 = cloud.upload("update.txt", b"version two")
    cloud.send_message({"Src_bucket": cloud.src_bucket, "Src_key": "update.txt", "Size": 11,
                        "Des_bucket": cloud.dest_bucket, "Des_key": "update.txt",
                        "versionId": v1["VersionId"]})
    run_until_empty(tmp_config(UpdateVersionId=True, GetObjectWithVersionId=True))
    assert dest_bytes(cloud, "update.txt") == b"version two"
    assert table_item(cloud, "update.txt")["versionId"] == v2["VersionId"]


# ---------------------------------------------------------------------------------------------
# The DynamoDB record (SPEC §6)
# ---------------------------------------------------------------------------------------------
@pytest.mark.cloud(versioned=True, notify=False)
def test_the_table_records_the_copied_version(cloud, tmp_config):
    response = cloud.upload("record.bin", data_of(7 * MiB, 5), part_size=5 * MiB)
    cloud.send_message(s3_event(cloud.src_bucket, "record.bin", 7 * MiB,
                                version_id=response["VersionId"]))
    before = int(lib.time.time())
    run_until_empty(tmp_config(GetObjectWithVersionId=True))
    after = int(lib.time.time())
    item = table_item(cloud, "record.bin")
    assert item["Key"] == f"{cloud.src_bucket}/record.bin"
    assert item["versionId"] == response["VersionId"]
    assert item["etag"] == response["ETag"].strip('"')
    assert item["Size"] == 7 * MiB
    assert (item["status"], item["percent"], item["tryTimes"]) == ("done", 100, 1)
    assert before <= item["startTime"] <= item["endTime"] <= after   # epoch seconds: a TTL
    assert item["instanceId"]
    # The duplicate event moto does not send (S3 sends two per multipart upload) changes nothing.
    cloud.send_message(s3_event(cloud.src_bucket, "record.bin", 7 * MiB,
                                version_id=response["VersionId"]))
    worker = run_until_empty(tmp_config(GetObjectWithVersionId=True))
    assert worker.counts == {"duplicate": 1}
    assert table_item(cloud, "record.bin") == item
    # The TTL on endTime removed the item: a duplicate delivery records the copy again, so a
    # JobsenderCompareVersionId run does not send it once more.
    cloud.clients.dynamodb.delete_item(TableName=cloud.table_name, Key={"Key": {"S": item["Key"]}})
    cloud.send_message(s3_event(cloud.src_bucket, "record.bin", 7 * MiB,
                                version_id=response["VersionId"]))
    run_until_empty(tmp_config(GetObjectWithVersionId=True))
    again = table_item(cloud, "record.bin")
    assert (again["versionId"], again["etag"], again["status"]) == (
        response["VersionId"], item["etag"], "done")


def _src(etag: str, version: str = "v1") -> lib.SourceObject:
    return lib.SourceObject(bucket="src-bucket", key="k", size=10, etag=etag, version_id=version,
                            last_modified="", headers={}, metadata={})


def test_try_times_is_atomic_and_finish_is_conditional(cloud):
    calls = []
    cloud.clients.dynamodb.meta.events.register(
        "before-parameter-build.dynamodb",
        lambda model, params, **_: calls.append((model.name, params)))
    table = lib.VersionTable(cloud.clients.dynamodb, cloud.table_name)
    job = lib.Job("src-bucket", "k", 10, "dest-bucket", "k")
    for n in range(3):
        table.begin(job, _src("a" * 32), f"worker-{n}")
    assert table.get(job.table_key)["tryTimes"] == 3
    # Atomic: one UpdateItem with DynamoDB's ADD, no read-modify-write. (moto server does not
    # serialise concurrent updates of one item, so concurrency itself is DynamoDB's promise.)
    begins = [params for name, params in calls if name == "UpdateItem"]
    assert [name for name, _ in calls] == ["UpdateItem"] * 3 + ["GetItem"]
    assert all("ADD #tryTimes :one" in params["UpdateExpression"] for params in begins)
    assert all("ConditionExpression" not in params for params in begins)

    previous = table.begin(job, _src("b" * 32, "v2"), "worker-new")   # another version begins
    assert previous["etag"] == "a" * 32 and previous["status"] == "running"
    assert not table.finish(job, _src("a" * 32), lib.Status.DONE)      # the old copy ends late
    item = table.get(job.table_key)
    assert (item["etag"], item["versionId"], item["status"]) == ("b" * 32, "v2", "running")
    assert "endTime" not in item

    assert table.finish(job, _src("b" * 32, "v2"), lib.Status.DONE)
    done = table.get(job.table_key)
    assert done["status"] == "done" and done["endTime"] >= done["startTime"]
    # A worker that lost the race to complete the same upload does not turn done into failed.
    assert not table.finish(job, _src("b" * 32, "v2"), lib.Status.FAILED)
    assert table.get(job.table_key)["status"] == "done"
    # A new attempt clears endTime, so a TTL on it never removes a copy in progress.
    table.begin(job, _src("c" * 32, "v3"), "worker-3")
    assert "endTime" not in table.get(job.table_key)
    # A duplicate delivery confirms a copy a dead worker completed but never marked done...
    assert table.confirm(job, _src("c" * 32, "v3"), "worker-4")
    assert table.get(job.table_key)["status"] == "done"
    # ...and records the version the destination holds over another version's ended copy...
    assert table.confirm(job, _src("a" * 32), "worker-5")
    assert table.get(job.table_key)["etag"] == "a" * 32
    # ...but never over another version's running copy.
    table.begin(job, _src("d" * 32, "v4"), "worker-6")
    assert not table.confirm(job, _src("a" * 32), "worker-7")
    assert table.get(job.table_key)["etag"] == "d" * 32


def test_a_single_put_copy_is_recorded_in_one_write_that_shows_a_race(cloud):
    calls = []
    cloud.clients.dynamodb.meta.events.register(
        "before-parameter-build.dynamodb",
        lambda model, params, **_: calls.append(model.name))
    table = lib.VersionTable(cloud.clients.dynamodb, cloud.table_name)
    job = lib.Job("src-bucket", "k", 10, "dest-bucket", "k")
    now = int(lib.time.time())

    before = table.record_single(job, _src("a" * 32), "worker-1", now - 5, lib.Status.DONE)
    assert before == {} and not lib.raced(before, _src("a" * 32), now - 5)
    item = table.get(job.table_key)
    assert (item["etag"], item["status"], item["percent"], item["tryTimes"]) == (
        "a" * 32, "done", 100, 1)
    assert item["startTime"] == now - 5 <= item["endTime"]
    assert calls == ["UpdateItem", "GetItem"]
    # The same version again (a retry, a duplicate): counted, no race.
    before = table.record_single(job, _src("a" * 32), "worker-2", now, lib.Status.DONE)
    assert not lib.raced(before, _src("a" * 32), now)
    assert table.get(job.table_key)["tryTimes"] == 2
    # Another version recorded while this copy ran: a race, whichever PUT landed last.
    before = table.record_single(job, _src("b" * 32, "v2"), "worker-3", now - 1, lib.Status.DONE)
    assert before["etag"] == "a" * 32 and lib.raced(before, _src("b" * 32, "v2"), now - 1)
    # A failure never replaces this version's done record, nor another version's running copy.
    assert table.record_single(job, _src("b" * 32, "v2"), "w", now, lib.Status.FAILED) == {}
    assert table.get(job.table_key)["status"] == "done"
    table.begin(job, _src("c" * 32, "v3"), "worker-4")
    assert table.record_single(job, _src("b" * 32, "v2"), "w", now, lib.Status.FAILED) == {}
    assert table.get(job.table_key)["etag"] == "c" * 32
    # A multipart copy of another version running is a race; a record of one that ended
    # before this copy began (less the clock-skew window) is not.
    running = {"etag": "c" * 32, "status": "running", "startTime": now - 7200}
    assert lib.raced(running, _src("a" * 32), now)
    ended = {"etag": "c" * 32, "status": "done", "endTime": now - lib.RACE_WINDOW_S - 1}
    assert not lib.raced(ended, _src("a" * 32), now)
    assert lib.raced({**ended, "endTime": now - lib.RACE_WINDOW_S}, _src("a" * 32), now)


@pytest.mark.cloud(versioned=True, notify=False)
def test_an_older_versions_put_that_lands_last_is_put_right(cloud, tmp_config, dest_proxy,
                                                            caplog):
    """Two workers copy two versions of one small object; the older version's PUT is held in
    the proxy until the newer version's copy is recorded, so the older lands last. Its worker
    sees the other version in the table, looks again and copies the current version."""
    key = "small/racing.txt"
    old, new = data_of(100_000, 7), data_of(100_000, 8)
    cloud.clients.src_s3.put_object(Bucket=cloud.src_bucket, Key=key, Body=old)
    cloud.send_message(s3_event(cloud.src_bucket, key, len(old)))
    old_md5 = base64.b64encode(hashlib.md5(old).digest()).decode()
    held, release = threading.Event(), threading.Event()

    def hold_the_old_put(request):
        if request.method == "PUT" and request.headers.get("Content-MD5") == old_md5 \
                and not release.is_set():
            held.set()
            release.wait(30)
        return None

    dest_proxy.fault = hold_the_old_put
    caplog.set_level(logging.INFO, logger="s3_migration_lib")
    config = tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxParallelFile=1)
    workers: dict[str, lib.Worker] = {}
    first = threading.Thread(target=lambda: workers.update(first=run_until_empty(config)))
    first.start()
    try:
        assert held.wait(30), "the first worker's PUT never reached the proxy"
        newer = cloud.clients.src_s3.put_object(Bucket=cloud.src_bucket, Key=key, Body=new)
        cloud.send_message(s3_event(cloud.src_bucket, key, len(new)))
        second = threading.Thread(target=lambda: workers.update(second=run_until_empty(config)))
        second.start()
        poll_until(lambda: table_item(cloud, key).get("etag") == newer["ETag"].strip('"'),
                   30, "the newer version's copy to be recorded")
        assert dest_bytes(cloud, key) == new
    finally:
        release.set()
        first.join(60)
    second.join(60)
    assert dest_bytes(cloud, key) == new
    assert workers["first"].counts == {"copied": 1} and workers["second"].counts == {"copied": 1}
    assert "another version was copied while version" in caplog.text
    item = table_item(cloud, key)
    assert (item["etag"], item["status"]) == (newer["ETag"].strip('"'), "done")
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# A source bucket without GetObjectVersion permission
# ---------------------------------------------------------------------------------------------
ACCESS_DENIED = s3_error(403, "AccessDenied", "Access Denied")


def _deny_versions(request):
    """What a bucket policy denying s3:GetObjectVersion does: every GET or HEAD that names a
    version is refused, reads of the current object are allowed."""
    if request.method in ("GET", "HEAD") and "versionId" in request.query:
        return ACCESS_DENIED if request.method == "GET" else s3_error(403, "", "")
    return None


@pytest.fixture
def src_proxy(cloud):
    with FaultProxy(cloud.aws_url, fault=_deny_versions) as proxy:
        yield proxy


@pytest.mark.cloud(versioned=True)
def test_without_get_object_version_permission_the_default_settings_work(cloud, tmp_config,
                                                                         src_proxy, dest_proxy):
    old, new = data_of(SIZE, 6), data_of(SIZE, 7)
    cloud.upload(KEY, old, part_size=8 * MiB)   # moto's own (unversioned) event
    cloud.upload("small.txt", b"small")
    overwritten = threading.Event()

    def overwrite_after_first_part(request):
        if is_upload_part(request) and not overwritten.is_set():
            overwritten.set()
            cloud.clients.src_s3.put_object(Bucket=cloud.src_bucket, Key=KEY, Body=new)
        return None

    dest_proxy.fault = overwrite_after_first_part
    run_until_empty(tmp_config(SrcEndPointURL=src_proxy.endpoint_url,
                               DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1))
    assert name_of(dest_bytes(cloud), old, new) == "new"
    assert dest_bytes(cloud, "small.txt") == b"small"
    assert not any("versionId" in r.query for r in src_proxy.requests)
    assert not any(r.fault for r in src_proxy.requests)
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


@pytest.mark.cloud(versioned=True, notify=False, max_receive_count=1)
def test_without_the_permission_get_object_with_version_id_fails_as_the_seed_warns(
        cloud, tmp_config, src_proxy, caplog):
    response = cloud.upload("denied.txt", b"data")
    cloud.send_message(s3_event(cloud.src_bucket, "denied.txt", 4,
                                version_id=response["VersionId"]))
    caplog.set_level(logging.ERROR, logger="s3_migration_lib")
    worker = run_until_empty(tmp_config(SrcEndPointURL=src_proxy.endpoint_url,
                                        GetObjectWithVersionId=True, RetryDelay=0))
    assert worker.counts == {"failed": 1}
    assert dest_bytes(cloud, "denied.txt") is None
    assert any(r.fault for r in src_proxy.requests)
    errors = [r.getMessage() for r in caplog.records]
    assert any("403" in e or "AccessDenied" in e for e in errors), errors
    assert tuple(cloud.queue_depths()) == (0, 0, 1)   # in the dead-letter queue
