"""Message parsing: every accepted shape of SPEC §3 becomes jobs; anything else a MessageError."""
import json
import urllib.parse

import pytest

import s3_migration_lib as lib


def s3_event(*records):
    return json.dumps({"Records": list(records)})


def record(key, size=10, event="ObjectCreated:Put", bucket="src", version=None, etag="abc"):
    obj = {"key": urllib.parse.quote_plus(key), "size": size, "eTag": etag}
    if version:
        obj["versionId"] = version
    return {"eventName": event, "s3": {"bucket": {"name": bucket}, "object": obj}}


def parse(body, prefix=""):
    return lib.parse_message(body, "dest", prefix)


def test_every_record_of_an_s3_event_is_a_job():
    jobs = parse(s3_event(record("a.txt", 1), record("b/c.bin", 2, version="v2")))
    assert [(j.src_key, j.size, j.version_id, j.dst_bucket) for j in jobs] == [
        ("a.txt", 1, "null", "dest"), ("b/c.bin", 2, "v2", "dest")]


@pytest.mark.parametrize("key", ["with space.txt", "plus+sign", "100%/pct", "ü/ñ/日本.txt",
                                 "q?#hash", "a" * 900, "trailing/"])
def test_odd_keys_decode_exactly(key):
    (job,) = parse(s3_event(record(key)))
    assert job.src_key == key and job.dst_key == key


def test_destination_prefix_joins_without_double_slash():
    assert lib.destination_key("", "k") == "k"
    assert lib.destination_key("pre", "k") == "pre/k"
    assert lib.destination_key("pre/", "k") == "pre/k"
    assert lib.destination_key("pre//", "dir/") == "pre/dir/"
    (job,) = parse(s3_event(record("x/y")), prefix="backup/")
    assert job.dst_key == "backup/x/y"


def test_test_event_is_no_job():
    assert parse(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"})) == []


def test_jobsender_job_missing_version_means_null():
    body = json.dumps({"Src_bucket": "s", "Src_key": "k", "Size": 5, "Des_bucket": "d",
                       "Des_key": "p/k"})
    (job,) = parse(body)
    assert (job.src_bucket, job.dst_bucket, job.dst_key, job.version_id) == ("s", "d", "p/k", "null")
    assert lib.parse_message(lib.jobsender_message(job), "", "") == [job]


def test_sns_wrapped_event():
    body = json.dumps({"Type": "Notification", "Message": s3_event(record("sns key"))})
    (job,) = parse(body)
    assert job.src_key == "sns key"


def test_eventbridge_object_created_key_is_not_url_encoded():
    body = json.dumps({"detail-type": "Object Created", "source": "aws.s3", "detail": {
        "bucket": {"name": "src"}, "object": {"key": "a+b c", "size": 7, "version-id": "v1"}}})
    (job,) = parse(body)
    assert (job.src_key, job.size, job.version_id) == ("a+b c", 7, "v1")


def test_removed_events_are_delete_jobs():
    (job,) = parse(s3_event(record("gone", event="ObjectRemoved:Delete")))
    assert job.action is lib.Action.DELETE


@pytest.mark.parametrize("body, reason", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON list"),
    ('{"hello": 1}', "unknown message shape"),
    (s3_event(), "non-empty list"),
    (json.dumps({"Records": "x"}), "non-empty list"),
    (s3_event({"eventName": "ObjectCreated:Put"}), "s3.bucket.name"),
    (s3_event(record("k", size=-1)), "out of range"),
    (s3_event(record("k", size="big")), "whole number"),
    (s3_event(record("k", size=10 ** 20)), "out of range"),
    (s3_event(record("k", event="ObjectRestore:Post")), "unsupported eventName"),
    (json.dumps({"Src_bucket": "s", "Src_key": "", "Size": 1, "Des_bucket": "d", "Des_key": "k"}),
     "Src_key"),
    (json.dumps({"Src_bucket": "s", "Src_key": "k", "Size": True, "Des_bucket": "d",
                 "Des_key": "k"}), "whole number"),
    (json.dumps({"Type": "Notification", "Message": 5}), "non-string"),
])
def test_malformed_messages_name_the_reason(body, reason):
    with pytest.raises(lib.MessageError, match=reason):
        parse(body)


def test_event_without_default_bucket_is_malformed():
    with pytest.raises(lib.MessageError, match="Des_bucket_default"):
        lib.parse_message(s3_event(record("k")), "", "")
