"""tools/status.py on real moto servers: queue and dead-letter depths, records by status, the
slowest and most retried objects, as a table and as JSON."""
from __future__ import annotations

import json
import logging
import time

import pytest

from tests.support.workers import set_cloud_environment
from tools import status, toolkit


@pytest.fixture(autouse=True)
def environment(cloud, monkeypatch, tmp_path):
    set_cloud_environment(monkeypatch, cloud)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(cloud, key: str, state: str, size: int, start: int, end: int | None = None,
           tries: int = 1, instance: str = "i-1") -> None:
    item = {"Key": {"S": f"src-bucket/{key}"}, "status": {"S": state}, "Size": {"N": str(size)},
            "startTime": {"N": str(start)}, "tryTimes": {"N": str(tries)},
            "instanceId": {"S": instance}, "versionId": {"S": "null"}}
    if end is not None:
        item["endTime"] = {"N": str(end)}
    cloud.clients.dynamodb.put_item(TableName=cloud.table_name, Item=item)


@pytest.mark.cloud(notify=False)
def test_status_reports_queues_and_table(cloud, tmp_config, capsys):
    now = int(time.time())
    record(cloud, "fast.bin", "done", 100 * 2**20, now - 100, now - 90)           # 10 s
    record(cloud, "slow.bin", "done", 50 * 2**20, now - 600, now - 100, tries=2)  # 500 s
    record(cloud, "medium.bin", "done", 1000, now - 60, now - 30)                  # 30 s
    record(cloud, "copying.bin", "running", 5000, now - 20, instance="i-2")
    record(cloud, "stuck.bin", "running", 7000, now - 9000, tries=3)              # > JobTimeout
    record(cloud, "broken.bin", "failed", 300, now - 50, now - 40, tries=5)
    for n in range(3):
        cloud.send_message({"n": n})
    cloud.clients.sqs.receive_message(QueueUrl=cloud.queue_url, MaxNumberOfMessages=1,
                                      VisibilityTimeout=300)
    cloud.clients.sqs.send_message(QueueUrl=cloud.dlq_url, MessageBody="poison")
    config = str(tmp_config())

    assert status.main(["--config", config, "--json", "--top", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["queue"] == {"name": "s3_migration_file_list", "visible": 2, "in_flight": 1,
                               "delayed": 0}
    assert report["dead_letter"] == {"name": "s3_migration_file_list_deadletter", "visible": 1,
                                     "in_flight": 0, "delayed": 0, "max_receive_count": 3}
    table = report["table"]
    assert table["records"] == 6 and table["stuck_running"] == 1
    assert table["by_status"] == {
        "done": {"objects": 3, "bytes": 150 * 2**20 + 1000},
        "running": {"objects": 2, "bytes": 12000},
        "failed": {"objects": 1, "bytes": 300}}
    assert [r["key"] for r in report["slowest"]] == ["src-bucket/stuck.bin",
                                                     "src-bucket/slow.bin",
                                                     "src-bucket/medium.bin"]
    assert report["slowest"][1]["seconds"] == 500 and report["slowest"][1]["mib_per_s"] == 0.1
    assert [(r["key"], r["tries"]) for r in report["most_retried"]] == [
        ("src-bucket/broken.bin", 5), ("src-bucket/stuck.bin", 3), ("src-bucket/slow.bin", 2)]

    assert status.main(["--config", config, "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "queue s3_migration_file_list: 2 waiting, 1 in flight, 0 delayed" in text
    assert "dead-letter queue s3_migration_file_list_deadletter: 1 messages (look at them!)" in text
    assert "table s3_migration_file_list: 6 records, 150.0 MiB" in text
    assert "1 running for longer than JobTimeout (600 s)" in text
    lines = text.splitlines()
    done = next(line for line in lines if line.startswith("done"))
    assert done.split() == ["done", "3", "150.0", "MiB"]
    slowest = lines[lines.index("slowest (top 2; running ones so far):") + 2]
    assert slowest.split()[:3] == ["src-bucket/stuck.bin", "6.8", "KiB"]


def test_empty_table_and_missing_table(cloud, tmp_config, capsys):
    assert status.main(["--config", str(tmp_config())]) == 0
    assert "table s3_migration_file_list: 0 records, 0 B" in capsys.readouterr().out
    code = status.main(["--config", str(tmp_config(table_queue_name="no-such-table"))])
    assert code == toolkit.EXIT_CONFIG
    assert capsys.readouterr().err.strip() == (
        "status: error: configuration: config key table_queue_name: table 'no-such-table': "
        "ResourceNotFoundException")
