"""LocalCloud: the moto-backed stand-in for S3/SQS/DynamoDB/SSM and the destination.

These tests also pin the moto behaviours the worker tests rely on (notification shape, key
encoding, two events per multipart upload, no versionId, dead-letter redrive), so a moto
upgrade that changes them fails here first, with a clear name.
"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import unquote_plus

import pytest

from tools.local_cloud import (BUCKET_PARAMETER, DEST_ACCESS_KEY_ID, SEED_KEYS, LocalCloud,
                               MotoServer, s3_event)

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]


def receive_bodies(cloud: LocalCloud, expected: int) -> list[dict]:
    """Receive and delete ``expected`` messages (bounded number of receives)."""
    bodies = []
    for _ in range(expected + 3):
        if len(bodies) >= expected:
            break
        response = cloud.clients.sqs.receive_message(QueueUrl=cloud.queue_url,
                                                     MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in response.get("Messages", []):
            bodies.append(json.loads(message["Body"]))
            cloud.clients.sqs.delete_message(QueueUrl=cloud.queue_url,
                                             ReceiptHandle=message["ReceiptHandle"])
    return bodies


def test_cloud_starts_with_empty_queues(cloud: LocalCloud) -> None:
    assert tuple(cloud.queue_depths()) == (0, 0, 0)  # S3's s3:TestEvent was removed


@pytest.mark.parametrize("key", ["plain.txt", "dir/a b+c ü 日本%?#.txt"])
def test_upload_sends_a_notification_with_bucket_key_and_size(cloud: LocalCloud,
                                                              key: str) -> None:
    cloud.upload(key, b"hello world")
    assert cloud.wait_for_queue_depth(1) == 1
    [body] = receive_bodies(cloud, 1)
    [record] = body["Records"]
    assert record["eventName"] == "ObjectCreated:Put"
    assert record["s3"]["bucket"]["name"] == cloud.src_bucket
    assert unquote_plus(record["s3"]["object"]["key"]) == key
    assert record["s3"]["object"]["size"] == 11
    assert "versionId" not in record["s3"]["object"]


def test_moto_encodes_keys_with_quote_plus_and_no_safe_characters(cloud: LocalCloud) -> None:
    cloud.upload("a b+c/ü", b"x")
    [body] = receive_bodies(cloud, 1)
    assert body["Records"][0]["s3"]["object"]["key"] == "a+b%2Bc%2F%C3%BC"


def test_multipart_upload_sends_two_events(cloud: LocalCloud) -> None:
    data = bytes(11 * MiB)
    cloud.upload("big.bin", data, part_size=5 * MiB)
    bodies = receive_bodies(cloud, 2)
    names = sorted(b["Records"][0]["eventName"] for b in bodies)
    assert names == ["ObjectCreated:CompleteMultipartUpload", "ObjectCreated:Put"]
    assert {b["Records"][0]["s3"]["object"]["size"] for b in bodies} == {len(data)}
    assert all(b["Records"][0]["s3"]["object"]["eTag"].endswith("-3") for b in bodies)


@pytest.mark.cloud(versioned=True)
def test_versioned_bucket_events_carry_no_version_id(cloud: LocalCloud) -> None:
    versioning = cloud.clients.src_s3.get_bucket_versioning(Bucket=cloud.src_bucket)
    assert versioning["Status"] == "Enabled"
    assert cloud.upload("v.txt", b"one")["VersionId"]
    [body] = receive_bodies(cloud, 1)
    assert "versionId" not in body["Records"][0]["s3"]["object"]


@pytest.mark.cloud(notify=False)
def test_notify_false_sends_nothing(cloud: LocalCloud) -> None:
    cloud.upload("quiet.txt", b"x")
    assert tuple(cloud.queue_depths()) == (0, 0, 0)


@pytest.mark.cloud(max_receive_count=2)
def test_message_received_max_receive_count_times_moves_to_dlq(cloud: LocalCloud) -> None:
    cloud.send_message("not a job")
    sqs = cloud.clients.sqs
    counts = []
    for _ in range(cloud.max_receive_count):
        [message] = sqs.receive_message(QueueUrl=cloud.queue_url, VisibilityTimeout=0,
                                        AttributeNames=["ApproximateReceiveCount"])["Messages"]
        counts.append(message["Attributes"]["ApproximateReceiveCount"])
    assert counts == ["1", "2"]
    # moto moves the message on the receive after the last allowed one
    assert "Messages" not in sqs.receive_message(QueueUrl=cloud.queue_url, VisibilityTimeout=0)
    assert tuple(cloud.queue_depths()) == (0, 0, 1)
    [dead] = sqs.receive_message(QueueUrl=cloud.dlq_url)["Messages"]
    assert dead["Body"] == "not a job"


def test_in_flight_messages_are_counted(cloud: LocalCloud) -> None:
    cloud.send_message(s3_event(cloud.src_bucket, "k", 1))
    cloud.clients.sqs.receive_message(QueueUrl=cloud.queue_url, VisibilityTimeout=30)
    assert tuple(cloud.queue_depths()) == (0, 1, 0)


def test_wait_for_queue_depth_times_out(cloud: LocalCloud) -> None:
    with pytest.raises(TimeoutError, match="1 visible messages"):
        cloud.wait_for_queue_depth(1, timeout_s=0.2)


def test_s3_event_helper_matches_real_s3_shape() -> None:
    body = s3_event("b", "dir/a b+c", 7, version_id="v1")
    obj = body["Records"][0]["s3"]["object"]
    assert obj == {"key": "dir/a+b%2Bc", "size": 7, "versionId": "v1"}
    assert body["Records"][0]["s3"]["bucket"]["name"] == "b"


def test_resources_exist(cloud: LocalCloud) -> None:
    c = cloud.clients
    table = c.dynamodb.describe_table(TableName=cloud.table_name)["Table"]
    assert table["KeySchema"] == [{"AttributeName": "Key", "KeyType": "HASH"}]
    secret = c.ssm.get_parameter(Name=cloud.credentials_parameter, WithDecryption=True)
    assert secret["Parameter"]["Type"] == "SecureString"
    assert json.loads(secret["Parameter"]["Value"])["aws_access_key_id"] == DEST_ACCESS_KEY_ID
    pairs = json.loads(c.ssm.get_parameter(Name=BUCKET_PARAMETER)["Parameter"]["Value"])
    assert pairs[0]["des_bucket"] == cloud.dest_bucket
    redrive = c.sqs.get_queue_attributes(QueueUrl=cloud.queue_url,
                                         AttributeNames=["RedrivePolicy"])["Attributes"]
    assert json.loads(redrive["RedrivePolicy"])["deadLetterTargetArn"].endswith("_deadletter")
    assert c.dest_s3.head_bucket(Bucket=cloud.dest_bucket)
    with pytest.raises(c.src_s3.exceptions.ClientError):
        c.src_s3.head_bucket(Bucket=cloud.dest_bucket)  # source and destination are apart


def test_write_config_keeps_every_seed_key_and_places_overrides(cloud: LocalCloud,
                                                                tmp_path) -> None:
    path = cloud.write_config(tmp_path / "w.ini", maxthread=8, ChunkSize=16,
                              PropagateDeletes=True, MetricsPort=9100, Brand_New=1)
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(path)
    for section, keys in SEED_KEYS.items():
        assert set(keys) <= set(parser[section]), section
    assert parser["Basic"]["SrcEndPointURL"] == cloud.aws_url
    assert parser["Basic"]["DestEndPointURL"] == cloud.dest_url
    assert parser["Basic"]["Des_prefix_default"] == ""
    assert parser["Mode"]["MaxThread"] == "8"
    assert "maxthread" not in parser["Mode"]
    assert parser["Debug"]["ChunkSize"] == "16"
    assert parser["Mode"]["PropagateDeletes"] == "True"
    assert parser["Debug"]["MetricsPort"] == "9100"
    assert parser["Mode"]["Brand_New"] == "1"


def test_compare_and_assert_copied(cloud: LocalCloud) -> None:
    cloud.upload("same", b"abc")
    cloud.upload("differs", b"abc")
    cloud.clients.dest_s3.put_object(Bucket=cloud.dest_bucket, Key="same", Body=b"abc")
    cloud.clients.dest_s3.put_object(Bucket=cloud.dest_bucket, Key="differs", Body=b"abd")
    assert cloud.compare("same")
    assert not cloud.compare("differs")
    assert not cloud.compare("same", dest_key="missing")
    cloud.assert_copied(["same"])
    with pytest.raises(AssertionError, match="differs"):
        cloud.assert_copied(["same", "differs"])


WORKER_LIKE = textwrap.dedent("""
    import json, os, boto3
    assert "AWS_PROFILE" not in os.environ
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=os.environ["QUEUE"])["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="from a subprocess")
    ssm = boto3.client("ssm")
    value = ssm.get_parameter(Name=os.environ["PARAM"], WithDecryption=True)
    print(json.loads(value["Parameter"]["Value"])["region"])
""")


def test_subprocess_env_reaches_the_cloud_through_aws_endpoint_url(cloud: LocalCloud) -> None:
    hostile = {"PATH": "/usr/bin:/bin", "AWS_PROFILE": "no-such-profile",
               "AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:9", "QUEUE": cloud.queue_name,
               "PARAM": cloud.credentials_parameter}
    done = subprocess.run([sys.executable, "-c", WORKER_LIKE], env=cloud.subprocess_env(hostile),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "us-east-1"
    assert cloud.queue_depths().visible == 1


def test_moto_server_starts_answers_and_stops(tmp_path) -> None:
    log = tmp_path / "moto.log"
    with MotoServer("solo", log_path=log) as server:
        pid = server.pid
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        server.reset()
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "Running on http://127.0.0.1" in log.read_text()


def test_local_sync_copies_every_sample_end_to_end(tmp_path) -> None:
    """README command one (without the pip step): real moto servers, the real worker."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "local_sync.py"),
                           "--workdir", str(tmp_path), "--timeout", "120"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("RESULT: OK")
    assert "FAILED" not in done.stdout
