"""tools/jobsender.py on real moto servers: the jobs it sends (exact bodies), its diff, its
refusals and errors, the journal of what was sent, and a backfill copied by the worker."""
from __future__ import annotations

import io
import json
import logging
import random

import botocore.exceptions
import pytest

import s3_migration_lib as lib
from tests.support.workers import run_until_empty, set_cloud_environment
from tools import jobsender, toolkit
from tools.jobsender import Listed, Shard

MiB = lib.MiB


@pytest.fixture(autouse=True)
def environment(request, monkeypatch, tmp_path):
    """AWS variables point at the cloud (if the test has one); default journals land in tmp;
    the root logger the tool configured is restored."""
    if "cloud" in request.fixturenames:
        set_cloud_environment(monkeypatch, request.getfixturevalue("cloud"))
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def drain(cloud) -> list[dict]:
    """Every message on the queue (received and deleted), as parsed JSON bodies."""
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


def job(src_key: str, size: int, des_key: str | None = None, version: str = "null",
        src_bucket: str = "src-bucket", des_bucket: str = "dest-bucket") -> dict:
    return {"Src_bucket": src_bucket, "Src_key": src_key, "Size": size, "Des_bucket": des_bucket,
            "Des_key": des_key or src_key, "versionId": version}


def key_of(body: dict) -> str:
    return body["Src_key"]


def write_pairs(tmp_path, pairs: list[dict]):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs, indent=2))
    return path


def put(s3, bucket: str, key: str, size: int) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=b"x" * size)


# ---------------------------------------------------------------------------------------------
# Bucket lists.
# ---------------------------------------------------------------------------------------------
def test_bucket_list_errors_name_file_and_line():
    good = ('[\n  {"src_bucket": "a", "src_prefix": "p/", "des_bucket": "b", "des_prefix": "q"},'
            '\n  {"src_bucket": "c", "des_bucket": "d"}\n]\n')
    pairs = jobsender.parse_bucket_pairs(good, "list.txt")
    assert [(p.src_bucket, p.src_prefix, p.des_bucket, p.des_prefix, p.where) for p in pairs] == [
        ("a", "p/", "b", "q", "list.txt:2"), ("c", "", "d", "", "list.txt:3")]
    cases = {
        '[\n {"src_bucket": "a",\n  "des_bucket": "b",,}\n]': "list.txt:3: not valid JSON",
        '[\n {"src_bucket": "a", "des_bucket": "b"},\n\n {"src_bucket": "c"}\n]':
            "list.txt:4: field des_bucket is missing or empty",
        '[{"src_bucket": "a", "des_bucket": "b", "des_prefx": "x"}]':
            "list.txt:1: unknown field 'des_prefx'",
        '{"src_bucket": "a"}': "list.txt:1: expected a JSON list",
        '[]': "list.txt:1: the list of bucket pairs is empty",
        '[\n "a"\n]': "list.txt:2: expected an object",
        '[{"src_bucket": "a", "des_bucket": 5}]': "list.txt:1: field des_bucket must be a string",
    }
    for text, message in cases.items():
        with pytest.raises(toolkit.InputError) as error:
            jobsender.parse_bucket_pairs(text, "list.txt")
        assert str(error.value).startswith(message), (text, str(error.value))


def test_malformed_bucket_list_file_is_a_one_line_error(cloud, tmp_config, tmp_path, capsys):
    path = tmp_path / "pairs.json"
    path.write_text('[\n  {"src_bucket": "src-bucket",\n   "des_bucket": }\n]\n')
    code = jobsender.main(["--config", str(tmp_config()), "--bucket-list", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == toolkit.EXIT_INPUT
    assert err == f"jobsender: error: {path}:3: not valid JSON: Expecting value (column 18)"
    assert cloud.queue_depths().visible == 0


@pytest.mark.cloud(notify=False)
def test_missing_bucket_names_the_entry_and_sends_nothing(cloud, tmp_config, tmp_path, capsys):
    put(cloud.clients.src_s3, cloud.src_bucket, "a.txt", 3)
    path = write_pairs(tmp_path, [
        {"src_bucket": "src-bucket", "des_bucket": "dest-bucket"},
        {"src_bucket": "src-bucket", "des_bucket": "no-such-bucket"}])
    code = jobsender.main(["--config", str(tmp_config()), "--bucket-list", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == toolkit.EXIT_INPUT
    assert err[-1] == (f"jobsender: error: {path}:6: destination bucket 'no-such-bucket' "
                       "does not exist")
    assert cloud.queue_depths().visible == 0


# ---------------------------------------------------------------------------------------------
# Listing and diff, as pure logic.
# ---------------------------------------------------------------------------------------------
def test_sorted_merge_matches_a_held_set():
    rng = random.Random(1)
    keys = sorted({f"{rng.choice('abc')}/{rng.randrange(10**6):06d}" for _ in range(3000)})
    source = [Listed(k, rng.randrange(5)) for k in keys]
    dest = [Listed(f"bk/{k}", rng.randrange(5)) for k in keys if rng.random() < 0.7]
    dest += [Listed("bk/zz-only-at-destination", 1)]
    merged = list(jobsender.join_sorted(source, dest, "bk/"))
    held = list(jobsender.join_held(reversed(source), reversed(dest), "bk/"))
    assert merged == sorted(held)
    assert sum(size is None for _, size in merged) == len(source) - (len(dest) - 1)


def test_listing_order_is_checked_within_and_across_pages():
    assert jobsender.check_order([Listed("a", 1), Listed("b", 1)], None, "x") == "b"
    assert jobsender.check_order([], "b", "x") == "b"
    with pytest.raises(jobsender.ListingOrderError,
                       match="destination is not listed in ascending key order \\('a' after 'c'\\)"
                             "; run again with --hold-destination"):
        jobsender.check_order([Listed("b", 1), Listed("c", 1), Listed("a", 1)], None,
                              "destination")
    with pytest.raises(jobsender.ListingOrderError, match="'b' after 'b'"):
        jobsender.check_order([Listed("b", 1)], "b", "source")


class ListLister:
    """A lister over fixed lists of entries (one page each), in the order given."""

    def __init__(self, entries: list[Listed]):
        self.entries = entries

    def subprefixes(self, bucket, prefix, max_pages):
        return []

    def pages(self, bucket, shard):
        yield [e for e in self.entries if e.key.startswith(shard.prefix)]


def test_an_unordered_destination_stops_the_merge_and_hold_destination_copes():
    source = ListLister([Listed("a", 1), Listed("b", 2), Listed("c", 3)])
    unordered = ListLister([Listed("bk/c", 3), Listed("bk/a", 1)])
    for hold in (False, True):
        out = io.StringIO()
        sender = toolkit.BatchSender(None, "unused", dry_run=out)
        backfill = jobsender.Backfill([jobsender.BucketPair("s", "", "d", "bk", "list:1")],
                                      source, unordered, sender, lib.IgnoreList(),
                                      hold_destination=hold)
        try:
            if hold:
                backfill.run()
            else:
                with pytest.raises(jobsender.ListingOrderError, match="'bk/a' after 'bk/c'"):
                    backfill.run()
        finally:
            sender.close()
        if hold:
            assert [json.loads(line) for line in out.getvalue().splitlines()] == [
                job("b", 2, "bk/b", src_bucket="s", des_bucket="d")]
            assert backfill.tallies[0].in_sync == 2


def test_shards_cover_every_key_exactly_once(cloud):
    s3 = cloud.clients.src_s3
    keys = ["top", "a/1", "a/2", "a/b/1", "a/b/c/1", "a/c/", "b/1", "b//x", "bz", "c d/e+f",
            "ü/1", "z/y/x/w"]
    for key in keys:
        put(s3, cloud.src_bucket, key, 1)
    lister = jobsender.S3Lister(s3, page_size=2)
    for want, depth in ((1, 3), (4, 1), (100, 3)):
        shards = jobsender.plan_shards(lister, cloud.src_bucket, "", want=want, max_depth=depth)
        listed = [e.key for shard in shards for page in lister.pages(cloud.src_bucket, shard)
                  for e in page]
        assert sorted(listed) == sorted(keys), (want, depth, shards)
    assert Shard("a/b/", delimited=True) in shards
    flat = jobsender.plan_shards(lister, cloud.src_bucket, "", want=100, max_depth=3, max_pages=1)
    assert flat == [Shard("")]   # the top level needs more than one page: not split


# ---------------------------------------------------------------------------------------------
# Sending, against the servers.
# ---------------------------------------------------------------------------------------------
@pytest.mark.cloud(notify=False)
def test_sends_exactly_the_missing_and_changed_objects(cloud, tmp_config, tmp_path, capsys):
    src, dest = cloud.clients.src_s3, cloud.clients.dest_s3
    sizes = {"same.txt": 4, "dir/same.txt": 5, "dir/missing.txt": 6, "dir/sub/changed.bin": 7,
             "dir/sub/deep/missing 2+.txt": 8, "other/ü 日本.txt": 9, "other/skip.tmp": 10,
             "top-missing": 11, "empty": 0}
    for key, size in sizes.items():
        put(src, cloud.src_bucket, key, size)
    for key in ("same.txt", "dir/same.txt", "dir/sub/changed.bin"):
        size = 3 if key.endswith("changed.bin") else sizes[key]
        put(dest, cloud.dest_bucket, f"backup/{key}", size)
    put(dest, cloud.dest_bucket, "backup/only-at-destination", 1)
    ignore = tmp_path / "ignore.txt"
    ignore.write_text("*.tmp\n")
    pairs = write_pairs(tmp_path, [{"src_bucket": "src-bucket", "src_prefix": "",
                                    "des_bucket": "dest-bucket", "des_prefix": "backup/"}])
    journal = tmp_path / "sent.jsonl"
    code = jobsender.main(["--config", str(tmp_config(IgnoreListPath=str(ignore))),
                           "--bucket-list", str(pairs), "--page-size", "2", "--parallel", "3",
                           "--journal", str(journal), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = [job(k, sizes[k], f"backup/{k}") for k in sorted(sizes)
                if k not in ("same.txt", "dir/same.txt", "other/skip.tmp")]
    assert sorted(drain(cloud), key=key_of) == expected
    assert sorted(map(json.loads, journal.read_text().splitlines()), key=key_of) == expected
    summary = json.loads(out)
    total = summary["total"]
    assert (total["source"], total["destination"], total["in_sync"], total["missing"],
            total["size_differs"], total["ignored"], total["sent"], total["failed"],
            total["unsent"]) == (9, 4, 2, 6, 1, 1, 6, 0, 0)
    assert total["sent_bytes"] == sum(j["Size"] for j in expected)
    assert summary["complete"] is True and summary["journal"] == str(journal)
    assert "progress: shards" in err


@pytest.mark.cloud(notify=False)
def test_prefix_mapping_keeps_the_whole_source_key(cloud, tmp_config, tmp_path):
    src, dest = cloud.clients.src_s3, cloud.clients.dest_s3
    for key in ("photos/a.jpg", "photos/2024/b.jpg", "photos2/c.jpg", "videos/d.mp4"):
        put(src, cloud.src_bucket, key, 2)
    put(dest, cloud.dest_bucket, "bk/photos/a.jpg", 2)
    put(dest, cloud.dest_bucket, "photos/2024/b.jpg", 2)   # not under des_prefix: not a copy
    pairs = write_pairs(tmp_path, [{"src_bucket": "src-bucket", "src_prefix": "photos/",
                                    "des_bucket": "dest-bucket", "des_prefix": "bk"}])
    assert jobsender.main(["--config", str(tmp_config()), "--bucket-list", str(pairs)]) == 0
    assert drain(cloud) == [job("photos/2024/b.jpg", 2, "bk/photos/2024/b.jpg")]


@pytest.mark.cloud(notify=False)
def test_bucket_pairs_come_from_ssm_without_a_list(cloud, tmp_config, capsys):
    put(cloud.clients.src_s3, cloud.src_bucket, "from-ssm.txt", 3)
    assert jobsender.main(["--config", str(tmp_config()), "--no-journal"]) == 0
    assert drain(cloud) == [job("from-ssm.txt", 3)]
    assert "src-bucket/ -> dest-bucket/" in capsys.readouterr().out


@pytest.mark.cloud(notify=False)
def test_dry_run_prints_the_jobs_and_sends_nothing(cloud, tmp_config, tmp_path, capsys):
    for key in ("b.txt", "a.txt"):
        put(cloud.clients.src_s3, cloud.src_bucket, key, 2)
    assert jobsender.main(["--config", str(tmp_config()), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert sorted(map(json.loads, out.splitlines()), key=key_of) == [job("a.txt", 2),
                                                                      job("b.txt", 2)]
    assert "would send 2 jobs" in err
    assert cloud.queue_depths() == (0, 0, 0)
    assert not list(tmp_path.glob("*.jsonl"))


@pytest.mark.cloud(notify=False)
def test_a_non_empty_queue_is_refused_unless_forced(cloud, tmp_config, capsys):
    put(cloud.clients.src_s3, cloud.src_bucket, "a.txt", 2)
    cloud.send_message({"Event": "s3:TestEvent"})
    config = str(tmp_config())
    assert jobsender.main(["--config", config]) == toolkit.EXIT_REFUSED
    err = capsys.readouterr().err.strip()
    assert err == ("jobsender: error: queue s3_migration_file_list is not empty (1 waiting, 0 in "
                   "flight): jobs sent now may repeat them; let the workers drain it first, or "
                   "use --force")
    assert cloud.queue_depths().visible == 1
    assert jobsender.main(["--config", config, "--force"]) == 0
    assert sorted(drain(cloud), key=lambda b: b.get("Src_key", "")) == [
        {"Event": "s3:TestEvent"}, job("a.txt", 2)]


@pytest.mark.cloud(notify=False, versioned=True)
def test_version_compare_reads_the_table_and_sends_real_version_ids(cloud, tmp_config):
    src, dest = cloud.clients.src_s3, cloud.clients.dest_s3
    versions = {}
    for key in ("current.txt", "stale.txt", "running.txt", "missing.txt"):
        src.put_object(Bucket=cloud.src_bucket, Key=key, Body=b"old")
        versions[key] = src.put_object(Bucket=cloud.src_bucket, Key=key, Body=b"new")["VersionId"]
    src.put_object(Bucket=cloud.src_bucket, Key="deleted.txt", Body=b"gone")
    src.delete_object(Bucket=cloud.src_bucket, Key="deleted.txt")   # latest is a delete marker
    for key in ("current.txt", "stale.txt", "running.txt"):
        dest.put_object(Bucket=cloud.dest_bucket, Key=key, Body=b"new")

    def record(key: str, version: str, status: str) -> None:
        cloud.clients.dynamodb.put_item(TableName=cloud.table_name, Item={
            "Key": {"S": f"src-bucket/{key}"}, "versionId": {"S": version},
            "status": {"S": status}, "Size": {"N": "3"}})

    record("current.txt", versions["current.txt"], "done")
    record("stale.txt", "an-older-version", "done")
    record("running.txt", versions["running.txt"], "running")
    assert jobsender.main(["--config", str(tmp_config(JobsenderCompareVersionId=True)),
                           "--no-journal"]) == 0
    assert sorted(drain(cloud), key=key_of) == [
        job(key, 3, version=versions[key]) for key in ("missing.txt", "running.txt", "stale.txt")]


@pytest.mark.cloud(notify=False)
def test_entries_sqs_fails_are_retried_and_sender_faults_counted(cloud, monkeypatch):
    monkeypatch.setattr(toolkit.lib, "backoff_delays", lambda attempts, **_: [0.0] * attempts)
    real = cloud.clients.sqs
    calls = []

    class FlakySqs:
        """Fails entry 3 of the first call on SQS's side and rejects one body as malformed."""

        def send_message_batch(self, QueueUrl, Entries):
            calls.append([e["MessageBody"] for e in Entries])
            bad = {e["Id"] for e in Entries if e["MessageBody"] == "refused"}
            flaky = {"3"} if len(calls) == 1 else set()
            response = real.send_message_batch(
                QueueUrl=QueueUrl, Entries=[e for e in Entries if e["Id"] not in bad | flaky])
            response.setdefault("Failed", [])
            response["Failed"] += [{"Id": i, "SenderFault": False, "Code": "InternalError"}
                                   for i in flaky]
            response["Failed"] += [{"Id": i, "SenderFault": True, "Code": "InvalidMessageContents"}
                                   for i in bad]
            return response

    journal = io.StringIO()
    sender = toolkit.BatchSender(FlakySqs(), cloud.queue_url, threads=1, journal=journal)
    bodies = [json.dumps({"n": n}) for n in range(10)]
    for body in bodies[:5] + ["refused"] + bodies[5:]:
        sender.put(body, size=1)
    sender.close()
    assert [len(c) for c in calls] == [10, 1, 1]   # a full batch, the retry, the eleventh
    assert sorted(json.dumps(b) for b in drain(cloud)) == sorted(bodies)
    assert sorted(journal.getvalue().splitlines()) == sorted(bodies)
    counts = sender.totals()
    assert (counts.sent, counts.failed, counts.unsent, sender.error) == (10, 1, 0, None)


@pytest.mark.cloud(notify=False)
def test_sqs_failing_stops_the_run_and_the_journal_says_exactly_what_was_sent(
        cloud, tmp_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toolkit.lib, "backoff_delays", lambda attempts, **_: [0.0] * attempts)
    for n in range(60):
        put(cloud.clients.src_s3, cloud.src_bucket, f"k{n:02d}", 1)
    real = cloud.clients.sqs
    accepted = []

    class FailingSqs:
        """Accepts three batches, then fails every call."""

        def __getattr__(self, name):
            return getattr(real, name)

        def send_message_batch(self, **kwargs):
            if len(accepted) >= 3:
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "ServiceUnavailable", "Message": "down"}},
                    "SendMessageBatch")
            accepted.append(kwargs)
            return real.send_message_batch(**kwargs)

    monkeypatch.setattr(toolkit.Clouds, "sqs", property(lambda self: FailingSqs()))
    journal = tmp_path / "sent.jsonl"
    code = jobsender.main(["--config", str(tmp_config()), "--journal", str(journal),
                           "--send-threads", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == toolkit.EXIT_UNEXPECTED
    assert err.strip().splitlines()[-1] == ("jobsender: error: sending to SQS failed: "
                                            "ServiceUnavailable: An error occurred "
                                            "(ServiceUnavailable) when calling the "
                                            "SendMessageBatch operation: down")
    on_queue = drain(cloud)
    assert len(on_queue) == 30
    assert sorted(map(json.loads, journal.read_text().splitlines()), key=key_of) == \
        sorted(on_queue, key=key_of)
    summary = json.loads(out)
    assert summary["complete"] is False
    assert summary["total"]["sent"] == 30
    assert summary["total"]["sent"] + summary["total"]["unsent"] == summary["total"]["queued"]


@pytest.mark.cloud(notify=False)
def test_an_interrupted_run_reports_and_journals_exactly_what_it_sent(
        cloud, tmp_config, tmp_path, monkeypatch, capsys):
    for prefix in ("a", "b", "c"):
        for n in range(15):
            put(cloud.clients.src_s3, cloud.src_bucket, f"{prefix}/{n:02d}", 1)
    real_pages = jobsender.S3Lister.pages

    def pages(self, bucket, shard):
        if shard.prefix == "c/" and not bucket.startswith("dest"):
            raise KeyboardInterrupt   # Ctrl-C while shard c/ is being listed
        return real_pages(self, bucket, shard)

    monkeypatch.setattr(jobsender.S3Lister, "pages", pages)
    journal = tmp_path / "sent.jsonl"
    code = jobsender.main(["--config", str(tmp_config()), "--journal", str(journal),
                           "--parallel", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == toolkit.EXIT_INTERRUPTED
    assert err.strip().splitlines()[-1] == "jobsender: error: interrupted"
    summary = json.loads(out)
    on_queue = drain(cloud)
    assert summary["complete"] is False
    total = summary["total"]
    assert total["sent"] == len(on_queue) > 0
    assert total["sent"] + total["unsent"] == total["queued"] <= 30   # jobs still buffered
    assert not [b for b in on_queue if b["Src_key"].startswith("c/")]  # are dropped, counted
    assert sorted(map(json.loads, journal.read_text().splitlines()), key=key_of) == \
        sorted(on_queue, key=key_of)


# ---------------------------------------------------------------------------------------------
# End to end: jobsender, then the worker.
# ---------------------------------------------------------------------------------------------
@pytest.mark.cloud(notify=False)
def test_backfill_is_copied_by_the_worker_and_a_second_run_sends_nothing(
        cloud, tmp_config, capsys):
    objects = {"big/multipart.bin": 12 * MiB + 3, "small/a.txt": 10, "small/b c+.txt": 0,
               "ünï/日本.txt": 1000, "top.txt": 5}
    for index, (key, size) in enumerate(objects.items()):
        cloud.upload(key, random.Random(index).randbytes(size), part_size=5 * MiB)
    config = tmp_config()
    assert jobsender.main(["--config", str(config), "--no-journal"]) == 0
    assert cloud.queue_depths().visible == len(objects)
    worker = run_until_empty(config)
    cloud.assert_copied(objects)
    assert worker.counts.get("copied") == 5
    capsys.readouterr()
    assert jobsender.main(["--config", str(config), "--no-journal", "--json"]) == 0
    total = json.loads(capsys.readouterr().out)["total"]
    assert (total["in_sync"], total["sent"]) == (5, 0)
    assert cloud.queue_depths() == (0, 0, 0)
