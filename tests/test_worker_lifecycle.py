"""Start-up errors, the visibility heartbeat and the job time limit, on real servers."""
from __future__ import annotations

import logging
import random
import subprocess
import sys

import pytest

import s3_migration_lib as lib
from tests.support.proxy import Delay, FailNth, matching
from tests.support.workers import WORKER, run_until_empty, set_cloud_environment
from tools.local_cloud import s3_event

MiB = lib.MiB
PART_UPLOAD = matching(method="PUT", query="partNumber")


def start_worker(config, env, timeout_s=30):
    return subprocess.run([sys.executable, str(WORKER), "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.parametrize("override, key", [
    ({"ChunkSize": 4}, "ChunkSize"),
    ({"MaxParallelFile": "many"}, "MaxParallelFile"),
    ({"JobType": "PULL"}, "JobType"),
    ({"sqs_queue_name": "no-such-queue"}, "sqs_queue_name"),
    ({"table_queue_name": "no-such-table"}, "table_queue_name"),
])
def test_bad_setting_stops_start_up_naming_the_key(cloud, tmp_config, override, key):
    result = start_worker(tmp_config(**override), cloud.subprocess_env())
    assert result.returncode == lib.EXIT_CONFIG
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and key in errors[0], result.stderr


def test_missing_config_file_exits_2(cloud, tmp_path):
    result = start_worker(tmp_path / "absent.ini", cloud.subprocess_env())
    assert result.returncode == lib.EXIT_CONFIG
    assert "absent.ini" in result.stderr


@pytest.fixture
def in_process(cloud, monkeypatch):
    set_cloud_environment(monkeypatch, cloud)


def slow_object(cloud, key="slow.bin", size=30 * MiB):
    data = random.Random(key).randbytes(size)
    cloud.upload(key, data)
    cloud.send_message(s3_event(cloud.src_bucket, key, size))
    return data


@pytest.mark.cloud(notify=False, visibility_timeout_s=2)
def test_heartbeat_keeps_a_long_copy_invisible(cloud, tmp_config, dest_proxy, in_process):
    slow_object(cloud)   # six 5 MiB parts, 0.7 s each: longer than the 2 s queue visibility
    dest_proxy.fault = lambda request: Delay(0.7) if PART_UPLOAD(request) else None
    worker = run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                                        VisibilityHeartbeat=3))
    assert worker.counts == {"copied": 1}   # received once: no redelivery, no duplicate
    assert cloud.compare("slow.bin")
    creates = [r for r in dest_proxy.requests if r.method == "POST" and "uploads" in r.query]
    assert len(creates) == 1


@pytest.mark.cloud(notify=False, visibility_timeout_s=2)
def test_a_job_without_progress_is_stopped_and_resumed(cloud, tmp_config, dest_proxy, in_process,
                                                       caplog):
    slow_object(cloud)
    dest_proxy.fault = FailNth(Delay(4.5), n=2, match=PART_UPLOAD)   # part 2 hangs once
    caplog.set_level(logging.INFO, logger="s3_migration_lib")
    worker = run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                                        VisibilityHeartbeat=3, RetryDelay=0))
    assert worker.counts == {"stopped": 1, "copied": 1}
    assert any("no progress for 3s" in r.getMessage() for r in caplog.records)
    assert cloud.compare("slow.bin")
    resumed = [r.getMessage() for r in caplog.records if "resuming upload" in r.getMessage()]
    assert resumed and "2 of 6 parts already stored" in resumed[0]


@pytest.mark.cloud(notify=False, visibility_timeout_s=2)
def test_job_timeout_stops_the_job_and_keeps_its_parts(cloud, tmp_config, dest_proxy, in_process,
                                                       caplog):
    slow_object(cloud)
    dest_proxy.fault = FailNth(Delay(1.5), n=[1, 2], match=PART_UPLOAD)
    caplog.set_level(logging.INFO, logger="s3_migration_lib")
    worker = run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                                        JobTimeout=2, VisibilityHeartbeat=3, RetryDelay=0))
    assert worker.counts == {"stopped": 1, "copied": 1}
    assert any("JobTimeout of 2s reached" in r.getMessage() for r in caplog.records)
    assert any("resuming upload" in r.getMessage() for r in caplog.records)
    assert cloud.compare("slow.bin")
