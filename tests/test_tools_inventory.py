"""tools/inventory_to_sqs.py on real moto servers: S3 Inventory CSV reports (plain and gzip,
with and without versions, through manifest.json) become exact jobs on the queue; a bad row
stops the run naming file and line after the rows before it were sent."""
from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import random
from urllib.parse import quote_plus

import pytest

import s3_migration_lib as lib
from tests.support.workers import run_until_empty, set_cloud_environment
from tools import inventory_to_sqs, toolkit

INVENTORY_BUCKET = "inventory-bucket"


@pytest.fixture(autouse=True)
def environment(cloud, monkeypatch, tmp_path):
    set_cloud_environment(monkeypatch, cloud)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def report(rows: list[list[str]], gzipped: bool = False) -> bytes:
    """CSV as S3 Inventory writes it: no header, every field quoted."""
    text = io.StringIO()
    csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    data = text.getvalue().encode("utf-8")
    return gzip.compress(data) if gzipped else data


def drain(cloud) -> list[dict]:
    sqs, bodies = cloud.clients.sqs, []
    for _ in range(1000):
        messages = sqs.receive_message(QueueUrl=cloud.queue_url, MaxNumberOfMessages=10,
                                       VisibilityTimeout=60).get("Messages", [])
        if not messages:
            return bodies
        bodies += [json.loads(m["Body"]) for m in messages]
        sqs.delete_message_batch(QueueUrl=cloud.queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])
    raise AssertionError("queue did not drain")


def job(key: str, size: int, des_key: str | None = None, version: str = "null") -> dict:
    return {"Src_bucket": "src-bucket", "Src_key": key, "Size": size,
            "Des_bucket": "dest-bucket", "Des_key": des_key or key, "versionId": version}


def by_key(bodies: list[dict]) -> list[dict]:
    return sorted(bodies, key=lambda b: b["Src_key"])


@pytest.mark.cloud(notify=False)
def test_plain_csv_rows_become_jobs_with_decoded_keys(cloud, tmp_config, tmp_path, capsys):
    keys = {"a.txt": 1, "dir/b c.txt": 22, "dir/plus+sign.txt": 333, "ünï/日本 語.bin": 0,
            "100% done?.txt": 7}
    rows = [["src-bucket", quote_plus(k, safe="/"), str(size), "2024-05-01T00:00:00.000Z",
             "etag", "STANDARD"] for k, size in keys.items()]
    path = tmp_path / "report.csv"
    path.write_bytes(report(rows))
    journal = tmp_path / "sent.jsonl"
    code = inventory_to_sqs.main(["--config", str(tmp_config()), str(path), "--des-prefix",
                                  "inv/", "--journal", str(journal), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = by_key([job(k, size, f"inv/{k}") for k, size in keys.items()])
    assert by_key(drain(cloud)) == expected
    assert by_key([json.loads(line) for line in journal.read_text().splitlines()]) == expected
    summary = json.loads(out)
    assert (summary["total"]["rows"], summary["total"]["jobs"], summary["total"]["sent"],
            summary["total"]["sent_bytes"]) == (5, 5, 5, sum(keys.values()))


@pytest.mark.cloud(notify=False)
def test_manifest_with_gzip_versioned_reports_in_s3(cloud, tmp_config, tmp_path, capsys):
    s3 = cloud.clients.src_s3
    s3.create_bucket(Bucket=INVENTORY_BUCKET)
    part1 = [["src-bucket", "a.txt", "v2", "true", "false", "10", "etag"],
             ["src-bucket", "a.txt", "v1", "false", "false", "9", "etag"],
             ["src-bucket", "gone.txt", "v5", "true", "true", "", ""],
             ["src-bucket", "b+b.txt", "", "true", "false", "20", "etag"]]
    part2 = [["src-bucket", "logs/skip.tmp", "v7", "true", "false", "5", "etag"],
             ["src-bucket", "c.txt", "v9", "TRUE", "FALSE", "30", "etag"]]
    prefix = "src-bucket/daily/2024-05-01T01-00Z"
    for name, rows in (("part1.csv.gz", part1), ("part2.csv.gz", part2)):
        s3.put_object(Bucket=INVENTORY_BUCKET, Key=f"src-bucket/daily/data/{name}",
                      Body=report(rows, gzipped=True))
    manifest = {"sourceBucket": "src-bucket", "version": "2016-11-30", "fileFormat": "CSV",
                "destinationBucket": f"arn:aws:s3:::{INVENTORY_BUCKET}",
                "fileSchema": "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, ETag",
                "files": [{"key": f"src-bucket/daily/data/{n}", "size": 1, "MD5checksum": "x"}
                          for n in ("part1.csv.gz", "part2.csv.gz")]}
    s3.put_object(Bucket=INVENTORY_BUCKET, Key=f"{prefix}/manifest.json",
                  Body=json.dumps(manifest).encode())
    ignore = tmp_path / "ignore.txt"
    ignore.write_text("*.tmp\n")
    code = inventory_to_sqs.main(["--config", str(tmp_config(IgnoreListPath=str(ignore))),
                                  f"s3://{INVENTORY_BUCKET}/{prefix}/manifest.json",
                                  "--no-journal"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert by_key(drain(cloud)) == [job("a.txt", 10, version="v2"), job("b b.txt", 20),
                                    job("c.txt", 30, version="v9")]
    assert f"s3://{INVENTORY_BUCKET}/src-bucket/daily/data/part1.csv.gz" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:-1]}
    # rows, jobs, job bytes (2 words), sent, not sent, not current, delete markers, ignored, ...
    assert lines["total"] == ["6", "3", "60", "B", "3", "0", "1", "1", "1", "0", "0"]


@pytest.mark.cloud(notify=False)
def test_a_bad_row_stops_after_the_rows_before_it_were_sent(cloud, tmp_config, tmp_path,
                                                            capsys):
    rows = [["src-bucket", f"k{n}", str(n)] for n in range(25)]
    rows.insert(21, ["src-bucket", "broken", "twelve"])
    path = tmp_path / "report.csv.gz"
    path.write_bytes(report(rows, gzipped=True))
    config = str(tmp_config())
    code = inventory_to_sqs.main(["--config", config, str(path), "--no-journal", "--json"])
    out, err = capsys.readouterr()
    assert code == toolkit.EXIT_INPUT
    assert err.strip().splitlines()[-1] == (
        f"inventory_to_sqs: error: {path}:22: Size 'twelve' is not a whole number; stopped "
        "there, after sending the jobs of the rows before it (see the summary)")
    assert by_key(drain(cloud)) == by_key([job(f"k{n}", n) for n in range(21)])
    summary = json.loads(out)
    assert (summary["complete"], summary["total"]["sent"]) == (False, 21)

    code = inventory_to_sqs.main(["--config", config, str(path), "--no-journal",
                                  "--skip-bad-rows"])
    assert code == 0
    assert f"skipping bad row {path}:22: Size 'twelve'" in capsys.readouterr().err
    assert len(drain(cloud)) == 25


@pytest.mark.cloud(notify=False)
def test_unknown_columns_need_a_schema(cloud, tmp_config, tmp_path, capsys):
    path = tmp_path / "odd.csv"
    path.write_bytes(report([["2024-05-01", "src-bucket", "x.txt", "4"]]))
    config = str(tmp_config())
    assert inventory_to_sqs.main(["--config", config, str(path)]) == toolkit.EXIT_INPUT
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"inventory_to_sqs: error: {path}:1: cannot tell the columns from the first row; give "
        "--schema (e.g. \"Bucket, Key, Size\") or the manifest.json")
    assert inventory_to_sqs.main(["--config", config, str(path), "--no-journal", "--schema",
                                  "LastModifiedDate, Bucket, Key, Size"]) == 0
    assert drain(cloud) == [job("x.txt", 4)]
    short = tmp_path / "short.csv"
    short.write_bytes(report([["src-bucket", "a", "1"], ["src-bucket", "b"]]))
    assert inventory_to_sqs.main(["--config", config, str(short), "--dry-run"]) == \
        toolkit.EXIT_INPUT
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"inventory_to_sqs: error: {short}:2: 2 columns, expected at least 3 (Bucket, Key, Size)")


@pytest.mark.cloud(notify=False)
def test_dry_run_prints_jobs_and_inventory_jobs_are_copied(cloud, tmp_config, tmp_path, capsys):
    data = {"x/one.bin": random.Random(1).randbytes(6 * lib.MiB), "two.txt": b"two"}
    for key, body in data.items():
        cloud.upload(key, body)
    path = tmp_path / "report.csv"
    path.write_bytes(report([["src-bucket", k, str(len(v))] for k, v in data.items()]))
    config = tmp_config()
    assert inventory_to_sqs.main(["--config", str(config), str(path), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert by_key([json.loads(line) for line in out.splitlines()]) == by_key(
        [job(k, len(v)) for k, v in data.items()])
    assert "would send 2 jobs" in err and cloud.queue_depths().visible == 0
    assert inventory_to_sqs.main(["--config", str(config), str(path), "--no-journal"]) == 0
    run_until_empty(config)
    cloud.assert_copied(data)


@pytest.mark.cloud(notify=False)
def test_missing_input_is_a_one_line_error(cloud, tmp_config, tmp_path, capsys):
    config = str(tmp_config())
    code = inventory_to_sqs.main(["--config", config, str(tmp_path / "nope.csv")])
    assert code == toolkit.EXIT_INPUT
    assert capsys.readouterr().err.strip() == (
        f"inventory_to_sqs: error: {tmp_path / 'nope.csv'}: cannot read: No such file or directory")
    code = inventory_to_sqs.main(["--config", config, "s3://src-bucket/missing/manifest.json"])
    assert code == toolkit.EXIT_INPUT
    assert capsys.readouterr().err.strip() == (
        "inventory_to_sqs: error: s3://src-bucket/missing/manifest.json: cannot read: NoSuchKey")
