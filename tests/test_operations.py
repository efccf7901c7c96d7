"""Operations: Prometheus metrics scraped during a real copy, JSON log lines, no secrets."""
from __future__ import annotations

import json
import random
import urllib.request

import pytest

import s3_migration_lib as lib
from tests.support.proxy import Delay, matching
from tests.support.workers import WorkerProcess, run_until_empty, set_cloud_environment
from tools.local_cloud import DEST_SECRET_ACCESS_KEY, free_loopback_port, s3_event

MiB = lib.MiB


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.mark.cloud(notify=False)
def test_metrics_are_scraped_during_a_copy(cloud, tmp_config, dest_proxy, monkeypatch):
    set_cloud_environment(monkeypatch, cloud)
    size = 15 * MiB
    cloud.upload("metered.bin", random.Random(1).randbytes(size))
    cloud.send_message(s3_event(cloud.src_bucket, "metered.bin", size))
    port = free_loopback_port()
    during = []
    part_upload = matching(method="PUT", query="partNumber")

    def scrape_at_second_part(request):
        if part_upload(request) and request.query["partNumber"] == ["2"]:
            during.append(scrape(port))
            return Delay(0.1)
        return None

    dest_proxy.fault = scrape_at_second_part
    run_until_empty(tmp_config(DestEndPointURL=dest_proxy.endpoint_url, MaxThread=1,
                               MetricsPort=port))
    assert cloud.compare("metered.bin")
    (mid,) = during
    assert mid["gsync_jobs_in_flight"] == 1
    assert mid["gsync_parts_in_flight"] == 1
    assert mid["gsync_part_seconds_count"] == 1            # part 1 done, part 2 on the wire
    assert mid["gsync_oldest_message_age_seconds"] >= 0
    assert mid.get('gsync_jobs_total{outcome="copied"}', 0) == 0
    with pytest.raises(OSError):   # the worker stopped its metrics server when it stopped
        scrape(port)


@pytest.mark.cloud(notify=False)
def test_json_logs_have_one_line_per_job_start_and_end_and_no_secret(cloud, tmp_config):
    cloud.upload("logged.txt", b"x" * 1000)
    cloud.send_message(s3_event(cloud.src_bucket, "logged.txt", 1000))
    cloud.send_message("this is not a job")
    config = tmp_config(LogFormat="json", RetryDelay=0, LoggingLevel="DEBUG")
    with WorkerProcess(config, cloud.subprocess_env(), "--until-empty") as worker:
        assert worker.wait(60) == 0
        lines = worker.lines
    records = [json.loads(line) for line in lines]   # every line is JSON
    starts = [r for r in records if r.get("event") == "job_start"]
    ends = [r for r in records if r.get("event") == "job_end"]
    assert len(starts) == len(ends) == 1
    (end,) = ends
    assert (end["key"], end["size"], end["outcome"], end["attempt"]) == (
        "logged.txt", 1000, "copied", 1)
    assert end["seconds"] >= 0 and "mbps" in end
    assert any(r["severity"] == "ERROR" and "not JSON" in r["message"] for r in records)
    assert DEST_SECRET_ACCESS_KEY not in "\n".join(lines)
