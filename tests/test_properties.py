"""Property-based tests (hypothesis) for the pure parts: the whole part plan of any object up
to 5 TiB, destination key mapping, and message parsing (round trips for arbitrary keys, and
no exception but MessageError for anything a queue can hold). tests/test_parts.py and
tests/test_messages.py hold the example-based and the first property tests; these go further."""
from __future__ import annotations

import json
import urllib.parse

import google_crc32c
from hypothesis import assume, example, given, settings, strategies as st

import s3_migration_lib as lib

MiB = lib.MiB
MAX = lib.MAX_OBJECT_SIZE

# -- part planning ------------------------------------------------------------------------------
# Sizes anywhere up to 5 TiB, biased to the edges that matter: whole MiB, one byte either side,
# and around 10,000 parts of a chunk size.
sizes = st.one_of(
    st.integers(0, MAX),
    st.integers(0, 5 * 1024 * 1024).map(lambda mib: min(MAX, mib * MiB)),
    st.tuples(st.integers(1, 5 * 1024 * 1024), st.sampled_from([-1, 1])).map(
        lambda t: max(0, min(MAX, t[0] * MiB + t[1]))),
    st.tuples(st.integers(5, 600), st.integers(-2, 2)).map(
        lambda t: max(0, min(MAX, lib.MAX_PARTS * t[0] * MiB + t[1]))),
)
chunk_sizes = st.one_of(st.integers(1, lib.MAX_PART_SIZE),
                        st.integers(1, 5 * 1024).map(lambda mb: mb * MiB))


@given(size=sizes, chunk=chunk_sizes)
@settings(max_examples=300, deadline=None)
@example(size=MAX, chunk=5 * MiB)
@example(size=lib.MAX_PARTS * 5 * MiB, chunk=5 * MiB)
@example(size=lib.MAX_PARTS * 5 * MiB + 1, chunk=5 * MiB)
@example(size=0, chunk=1)
def test_every_part_of_the_plan(size, chunk):
    plan = lib.plan_parts(size, chunk)
    assert 1 <= plan.count <= lib.MAX_PARTS
    assert lib.MIN_PART_SIZE <= plan.part_size <= lib.MAX_PART_SIZE
    expected_start = 0
    for number in range(1, plan.count + 1):
        start, length = plan.part_range(number)
        assert start == expected_start                 # contiguous, in order
        if number < plan.count:
            assert length == plan.part_size >= lib.MIN_PART_SIZE
        else:
            assert 0 < length <= plan.part_size or size == length == 0
        expected_start = start + length
    assert expected_start == size                      # the parts cover the object exactly


@given(size=sizes, chunk=chunk_sizes)
@settings(max_examples=300)
def test_part_size_grows_only_as_much_as_10000_parts_need(size, chunk):
    plan = lib.plan_parts(size, chunk)
    wanted = max(chunk, lib.MIN_PART_SIZE)
    if -(-size // wanted) <= lib.MAX_PARTS:
        assert plan.part_size == wanted
    else:   # grown to whole MiB, and one MiB less would need too many parts
        assert plan.part_size % MiB == 0
        assert -(-size // (plan.part_size - MiB)) > lib.MAX_PARTS


@given(size=st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX + 1)))
def test_sizes_outside_0_to_5_tib_are_refused(size):
    try:
        lib.plan_parts(size, 5 * MiB)
    except ValueError:
        return
    raise AssertionError(f"plan_parts accepted {size}")


@given(data=st.binary(max_size=4000), cuts=st.lists(st.integers(0, 4000), max_size=12))
@settings(max_examples=200)
def test_crc32c_of_any_split_combines_to_the_whole(data, cuts):
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]
    total = lib.crc32c(pieces[0])
    for piece in pieces[1:]:
        total = lib.crc32c_combine(total, lib.crc32c(piece), len(piece))
    assert total == google_crc32c.value(data)


@given(attempts=st.integers(1, 30), base=st.floats(0.01, 5), cap=st.floats(0.1, 60))
def test_backoff_delays_are_jittered_below_their_cap(attempts, base, cap):
    delays = lib.backoff_delays(attempts, base_s=base, cap_s=cap)
    assert len(delays) == attempts - 1
    for i, delay in enumerate(delays):
        assert 0 <= delay <= min(cap, base * 2 ** i)


# -- key mapping --------------------------------------------------------------------------------
# S3 keys: any Unicode but lone surrogates (a key is UTF-8), up to 1,024 bytes.
keys = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200).filter(
    lambda key: len(key.encode()) <= 1024)
prefixes = st.one_of(st.just(""), st.text(st.characters(blacklist_categories=("Cs",)),
                                          max_size=30))


@given(prefix=prefixes, key=keys)
@example(prefix="backup//", key="/leading/slash")
@example(prefix="/", key="dir/")
def test_destination_key_is_the_prefix_one_slash_and_the_exact_key(prefix, key):
    joined = lib.destination_key(prefix, key)
    stem = prefix.rstrip("/")
    if stem:
        assert joined == f"{stem}/{key}"
        assert not joined[:len(stem) + 1].endswith("//")   # one slash at the join
    else:
        assert joined == key
    assert joined.endswith(key)                            # the key itself is byte-exact


# -- message parsing ----------------------------------------------------------------------------
versions = st.one_of(st.none(), st.text(st.characters(blacklist_categories=("Cs",)),
                                        min_size=1, max_size=40))
object_sizes = st.integers(0, MAX)
buckets = st.from_regex(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", fullmatch=True)


def s3_record(bucket, key, size, version, encode_slash):
    safe = "" if encode_slash else "/"      # moto encodes "/", real S3 keeps it
    obj = {"key": urllib.parse.quote_plus(key, safe=safe), "size": size, "eTag": "e"}
    if version is not None:
        obj["versionId"] = version
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": bucket}, "object": obj}}


records = st.lists(st.tuples(buckets, keys, object_sizes, versions, st.booleans()),
                   min_size=1, max_size=5)


@given(items=records, prefix=prefixes, wrap=st.sampled_from(["plain", "sns"]))
@settings(max_examples=150)
def test_s3_events_round_trip_any_key(items, prefix, wrap):
    body = json.dumps({"Records": [s3_record(*item) for item in items]})
    if wrap == "sns":
        body = json.dumps({"Type": "Notification", "Message": body})
    jobs = lib.parse_message(body, "dest-bucket", prefix)
    assert [(j.src_bucket, j.src_key, j.size, j.version_id, j.dst_bucket, j.dst_key)
            for j in jobs] == [
        (bucket, key, size, version or lib.NULL_VERSION, "dest-bucket",
         lib.destination_key(prefix, key)) for bucket, key, size, version, _ in items]
    assert all(j.action is lib.Action.COPY for j in jobs)


@given(bucket=buckets, key=keys, size=object_sizes, version=versions, prefix=prefixes)
def test_eventbridge_keys_are_taken_as_they_are(bucket, key, size, version, prefix):
    obj = {"key": key, "size": size}
    if version is not None:
        obj["version-id"] = version
    body = json.dumps({"detail-type": "Object Created", "source": "aws.s3",
                       "detail": {"bucket": {"name": bucket}, "object": obj}})
    (job,) = lib.parse_message(body, "dest-bucket", prefix)
    assert (job.src_key, job.size, job.dst_key) == (key, size, lib.destination_key(prefix, key))
    assert job.version_id == (version or lib.NULL_VERSION)


jobs = st.builds(lib.Job, src_bucket=buckets, src_key=keys, size=object_sizes, dst_bucket=buckets,
                 dst_key=keys, version_id=st.one_of(st.just(lib.NULL_VERSION), versions.filter(
                     lambda v: v is not None)))


@given(job=jobs)
@settings(max_examples=150)
def test_jobsender_messages_round_trip(job):
    assert lib.parse_message(lib.jobsender_message(job), "", "") == [job]


@given(size=st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX + 1)),
       shape=st.sampled_from(["s3", "jobsender", "eventbridge"]))
def test_sizes_out_of_range_are_malformed_in_every_shape(size, shape):
    if shape == "s3":
        body = {"Records": [s3_record("b", "k", size, None, False)]}
    elif shape == "jobsender":
        body = {"Src_bucket": "b", "Src_key": "k", "Size": size, "Des_bucket": "d",
                "Des_key": "k"}
    else:
        body = {"detail-type": "Object Created",
                "detail": {"bucket": {"name": "b"}, "object": {"key": "k", "size": size}}}
    try:
        lib.parse_message(json.dumps(body), "dest", "")
    except lib.MessageError as exc:
        assert "out of range" in str(exc)
        return
    raise AssertionError(f"size {size} accepted")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=12), children, max_size=4),
    max_leaves=20)
SHAPE_KEYS = ["Records", "eventName", "s3", "bucket", "name", "object", "key", "size",
              "versionId", "Type", "Message", "Event", "detail-type", "detail", "version-id",
              "Src_bucket", "Src_key", "Size", "Des_bucket", "Des_key"]
shaped_values = st.recursive(
    json_values,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(SHAPE_KEYS), children, max_size=5),
    max_leaves=25)


def assert_parses_or_is_malformed(body: str) -> None:
    try:
        jobs = lib.parse_message(body, "dest-bucket", "pre")
    except lib.MessageError as exc:
        assert str(exc) and "\n" not in str(exc)      # one log line with a reason
        return
    for job in jobs:                                  # anything accepted is a usable job
        assert job.src_bucket and job.src_key and job.dst_bucket and job.dst_key
        assert 0 <= job.size <= MAX and job.version_id


@given(body=st.text(max_size=300))
@settings(max_examples=300)
@example(body="[" * 5000 + "]" * 5000)          # deeper than Python's recursion limit
@example(body='{"Records": [' + "[" * 3000 + "]" * 3000 + "]}")
@example(body="1" * 5000)                        # an integer longer than int() takes
@example(body='{"Src_bucket": "b", "Src_key": "k", "Size": "' + "9" * 5000 + '", '
              '"Des_bucket": "d", "Des_key": "k"}')
def test_any_text_parses_or_is_malformed(body):
    assert_parses_or_is_malformed(body)


@given(value=shaped_values)
@settings(max_examples=200)
def test_any_json_of_the_known_shapes_parses_or_is_malformed(value):
    assert_parses_or_is_malformed(json.dumps(value))


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for name, child in node.items():
            yield from _paths(child, path + (name,))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _paths(child, path + (index,))


VALID = [
    {"Records": [s3_record("src", "a b+c", 10, "v1", False)]},
    {"Type": "Notification", "Message": json.dumps({"Records": [s3_record("s", "k", 1, None,
                                                                           True)]})},
    {"detail-type": "Object Created", "detail": {"bucket": {"name": "b"},
                                                 "object": {"key": "k", "size": 3}}},
    {"Src_bucket": "s", "Src_key": "k", "Size": 5, "Des_bucket": "d", "Des_key": "p/k",
     "versionId": "v"},
]


@given(which=st.integers(0, len(VALID) - 1), pick=st.integers(0, 10 ** 6),
       replacement=st.one_of(st.just("<delete>"), json_values))
@settings(max_examples=300)
def test_a_valid_message_with_any_field_broken_parses_or_is_malformed(which, pick, replacement):
    document = json.loads(json.dumps(VALID[which]))
    paths = [p for p in _paths(document) if p]
    path = paths[pick % len(paths)]
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    if replacement == "<delete>":
        del parent[path[-1]]
    else:
        assume(parent[path[-1]] != replacement)
        parent[path[-1]] = replacement
    assert_parses_or_is_malformed(json.dumps(document))
