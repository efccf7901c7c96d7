"""tools/clean_uploads.py on real moto servers: old unfinished uploads at the destination are
aborted (gone from the listing), newer ones and other prefixes kept, --dry-run changes nothing."""
from __future__ import annotations

import datetime
import json
import logging

import pytest

from tests.support.workers import set_cloud_environment
from tools import clean_uploads, toolkit


@pytest.fixture(autouse=True)
def environment(cloud, monkeypatch, tmp_path):
    set_cloud_environment(monkeypatch, cloud)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def start_upload(cloud, key: str) -> str:
    s3 = cloud.clients.dest_s3
    upload_id = s3.create_multipart_upload(Bucket=cloud.dest_bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=cloud.dest_bucket, Key=key, UploadId=upload_id, PartNumber=1,
                   Body=b"part")
    return upload_id


def unfinished(cloud) -> set[tuple[str, str]]:
    uploads = cloud.clients.dest_s3.list_multipart_uploads(Bucket=cloud.dest_bucket)
    return {(u["Key"], u["UploadId"]) for u in uploads.get("Uploads", [])}


def test_old_uploads_are_aborted_and_a_dry_run_changes_nothing(cloud, tmp_config, capsys):
    ids = {key: start_upload(cloud, key) for key in ("big/a.bin", "big/b c.bin", "other/c.bin")}
    config = str(tmp_config())
    # moto dates every upload 2010-11-10: all are far older than any threshold.
    assert clean_uploads.main(["--config", config, "--older-than", "1", "--dry-run",
                               "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted((u["key"], u["upload_id"], u["action"]) for u in report["uploads"]) == sorted(
        (key, upload_id, "would abort") for key, upload_id in ids.items())
    assert report["would_abort"] == 3 and report["aborted"] == 0
    assert unfinished(cloud) == set(ids.items())

    assert clean_uploads.main(["--config", config, "--older-than", "1", "--prefix", "big/"]) == 0
    out = capsys.readouterr().out
    assert "2 unfinished uploads in dest-bucket; 2 older than 1 h: aborted 2; kept 0 newer" in out
    assert unfinished(cloud) == {("other/c.bin", ids["other/c.bin"])}


def test_uploads_newer_than_the_threshold_are_kept(cloud):
    upload_id = start_upload(cloud, "young.bin")
    (listed,) = clean_uploads.list_uploads(cloud.clients.dest_s3, cloud.dest_bucket)
    half_an_hour_later = listed.initiated + datetime.timedelta(minutes=30)
    rows = clean_uploads.clean(cloud.clients.dest_s3, [cloud.dest_bucket], "", 1.0, False,
                               half_an_hour_later)
    assert [(r["key"], r["action"], r["age_hours"]) for r in rows] == [
        ("young.bin", "kept (newer)", 0.5)]
    assert unfinished(cloud) == {("young.bin", upload_id)}
    rows = clean_uploads.clean(cloud.clients.dest_s3, [cloud.dest_bucket], "", 0.25, False,
                               half_an_hour_later)
    assert [r["action"] for r in rows] == ["aborted"]
    assert unfinished(cloud) == set()


def test_unknown_bucket_is_a_one_line_error(cloud, tmp_config, capsys):
    code = clean_uploads.main(["--config", str(tmp_config()), "--bucket", "nope"])
    assert code == toolkit.EXIT_INPUT
    assert capsys.readouterr().err.strip() == \
        "clean_uploads: error: destination bucket 'nope' does not exist"
