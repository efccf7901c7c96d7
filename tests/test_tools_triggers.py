"""tools/triggers.py on real moto servers: notification entries merged (never clobbered),
overlaps and the 100-entry limit refused before anything is written, list and remove."""
from __future__ import annotations

import json
import logging

import pytest

from tests.support.workers import set_cloud_environment
from tools import toolkit, triggers

@pytest.fixture(autouse=True)
def environment(cloud, monkeypatch, tmp_path):
    set_cloud_environment(monkeypatch, cloud)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def configuration(cloud) -> dict:
    config = cloud.clients.src_s3.get_bucket_notification_configuration(Bucket=cloud.src_bucket)
    config.pop("ResponseMetadata")
    return config


def arn_of(cloud, url: str) -> str:
    return cloud.clients.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def other_queue_entry(cloud, events: list[str], prefix: str) -> dict:
    """A notification to a second queue, as another team might have set it up."""
    url = cloud.clients.sqs.create_queue(QueueName="other-team")["QueueUrl"]
    return {"Id": "their-entry", "QueueArn": arn_of(cloud, url), "Events": events,
            "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}}


def put_configuration(cloud, *queue_entries: dict) -> None:
    cloud.clients.src_s3.put_bucket_notification_configuration(
        Bucket=cloud.src_bucket,
        NotificationConfiguration={"QueueConfigurations": list(queue_entries)})
    cloud.clients.sqs.purge_queue(QueueUrl=cloud.queue_url)


def ours(cloud, prefix: str) -> dict:
    return {"Id": triggers.entry_id(prefix), "QueueArn": arn_of(cloud, cloud.queue_url),
            "Events": ["s3:ObjectCreated:*"],
            "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}}


def prefix_file(tmp_path, text: str):
    path = tmp_path / "prefixes.txt"
    path.write_text(text)
    return path


def received_keys(cloud) -> list[str]:
    messages = cloud.clients.sqs.receive_message(QueueUrl=cloud.queue_url,
                                                 MaxNumberOfMessages=10).get("Messages", [])
    keys = []
    for message in messages:
        body = json.loads(message["Body"])
        keys += [r["s3"]["object"]["key"] for r in body.get("Records", [])]
    return sorted(keys)


@pytest.mark.cloud(notify=False)
def test_add_merges_with_the_existing_entries_and_events_flow(cloud, tmp_config, tmp_path,
                                                              capsys):
    theirs = other_queue_entry(cloud, ["s3:ObjectRemoved:*"], "logs/")
    put_configuration(cloud, theirs)
    path = prefix_file(tmp_path, "# what we copy\nphotos/\n\n  videos/raw/  \nphotos/2024/\n"
                                 "photos/\n")
    args = ["add", "--config", str(tmp_config()), "--bucket", cloud.src_bucket,
            "--prefix-list", str(path)]
    assert triggers.main(args) == 0
    out = capsys.readouterr().out
    assert configuration(cloud) == {"QueueConfigurations": [
        theirs, ours(cloud, "photos/"), ours(cloud, "videos/raw/")]}
    assert f"'photos/2024/'  {path}:5  covered by 'photos/'" in out
    assert f"'photos/'       {path}:6  present" in out
    assert "now has 3 notification entries" in out

    cloud.clients.sqs.purge_queue(QueueUrl=cloud.queue_url)   # S3's s3:TestEvent
    for key in ("photos/a.jpg", "videos/raw/b.mp4", "videos/c.mp4", "logs/d.log"):
        cloud.clients.src_s3.put_object(Bucket=cloud.src_bucket, Key=key, Body=b"x")
    assert received_keys(cloud) == ["photos%2Fa.jpg", "videos%2Fraw%2Fb.mp4"]

    assert triggers.main(args) == 0   # again: nothing to add
    assert "nothing to change" in capsys.readouterr().out
    assert len(configuration(cloud)["QueueConfigurations"]) == 3


@pytest.mark.cloud(notify=False)
def test_an_overlap_is_refused_naming_the_line_and_nothing_changes(cloud, tmp_config,
                                                                   tmp_path, capsys):
    theirs = other_queue_entry(cloud, ["s3:ObjectCreated:Put"], "data/")
    put_configuration(cloud, theirs)
    path = prefix_file(tmp_path, "photos/\ndata/2024/\n")
    code = triggers.main(["add", "--config", str(tmp_config()), "--bucket", cloud.src_bucket,
                          "--prefix-list", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == toolkit.EXIT_INPUT
    assert err.startswith(f"triggers: error: {path}:2: prefix 'data/2024/' overlaps the entry "
                          "'their-entry': queue arn:aws:sqs:")
    assert "\n" not in err
    assert configuration(cloud) == {"QueueConfigurations": [theirs]}


@pytest.mark.cloud(notify=False)
def test_more_than_100_entries_are_refused_before_writing(cloud, tmp_config, tmp_path, capsys):
    path = prefix_file(tmp_path, "".join(f"p{n:03d}/\n" for n in range(101)))
    code = triggers.main(["add", "--config", str(tmp_config()), "--bucket", cloud.src_bucket,
                          "--prefix-list", str(path)])
    assert code == toolkit.EXIT_INPUT
    assert capsys.readouterr().err.strip() == (
        f"triggers: error: {path}: the bucket would have 101 notification entries (0 now, 101 "
        "to add); S3 allows at most 100: use broader prefixes")
    assert configuration(cloud) == {}


def test_whole_bucket_entry_covers_every_prefix(cloud, tmp_config, capsys):
    before = configuration(cloud)   # the fixture's ObjectCreated:* for the whole bucket
    assert triggers.main(["add", "--config", str(tmp_config()), "--bucket", cloud.src_bucket,
                          "--prefix", "a/", "--prefix", "b/"]) == 0
    assert "covered by ''" in capsys.readouterr().out
    assert configuration(cloud) == before


@pytest.mark.cloud(notify=False)
def test_dry_run_prints_the_merged_configuration_and_writes_nothing(cloud, tmp_config, capsys):
    assert triggers.main(["add", "--config", str(tmp_config()), "--bucket", cloud.src_bucket,
                          "--prefix", "a/", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):out.rindex("}") + 1]) == {
        "QueueConfigurations": [ours(cloud, "a/")]}
    assert configuration(cloud) == {}


@pytest.mark.cloud(notify=False)
def test_list_and_remove(cloud, tmp_config, capsys):
    theirs = other_queue_entry(cloud, ["s3:ObjectRemoved:*"], "logs/")
    put_configuration(cloud, theirs, ours(cloud, "a/"), ours(cloud, "b/"))
    config = str(tmp_config())
    assert triggers.main(["list", "--config", config, "--bucket", cloud.src_bucket,
                          "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["id"], e["type"], e["prefix"], e["events"]) for e in listed["entries"]] == [
        ("their-entry", "queue", "logs/", ["s3:ObjectRemoved:*"]),
        (triggers.entry_id("a/"), "queue", "a/", ["s3:ObjectCreated:*"]),
        (triggers.entry_id("b/"), "queue", "b/", ["s3:ObjectCreated:*"])]
    assert triggers.main(["list", "--config", config, "--bucket", cloud.src_bucket]) == 0
    assert "3 entries (at most 100)" in capsys.readouterr().out

    assert triggers.main(["remove", "--config", config, "--bucket", cloud.src_bucket,
                          "--prefix", "a/", "--prefix", "logs/", "--prefix", "zz/"]) == 0
    out = capsys.readouterr().out
    assert "'a/'     --prefix  removed" in out and "'zz/'    --prefix  not found" in out
    assert "'logs/'  --prefix  not found" in out   # another queue's entry is not ours to remove
    assert configuration(cloud) == {"QueueConfigurations": [theirs, ours(cloud, "b/")]}


def test_unknown_bucket_is_a_one_line_error(cloud, tmp_config, capsys):
    code = triggers.main(["list", "--config", str(tmp_config()), "--bucket", "nope"])
    assert code == toolkit.EXIT_INPUT
    assert capsys.readouterr().err.strip() == \
        "triggers: error: --bucket: bucket 'nope' does not exist"
