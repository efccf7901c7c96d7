"""Part planning and checksum arithmetic (pure logic, property-based)."""
import hashlib

import google_crc32c
from hypothesis import given, settings, strategies as st

import s3_migration_lib as lib

MiB = lib.MiB


@given(size=st.integers(min_value=0, max_value=lib.MAX_OBJECT_SIZE),
       chunk_mb=st.integers(min_value=5, max_value=5 * 1024))
@settings(max_examples=500)
def test_plan_never_exceeds_limits_and_covers_the_object(size, chunk_mb):
    plan = lib.plan_parts(size, chunk_mb * MiB)
    assert 1 <= plan.count <= lib.MAX_PARTS
    assert lib.MIN_PART_SIZE <= plan.part_size <= lib.MAX_PART_SIZE
    assert plan.part_size >= chunk_mb * MiB
    last_start, last_length = plan.part_range(plan.count)
    assert last_start + last_length == size
    assert 0 <= last_length <= plan.part_size
    if plan.count > 1:
        # Every part but the last is exactly part_size (>= 5 MiB), so ranges are contiguous.
        assert plan.part_range(2)[0] == plan.part_size
        assert plan.part_range(plan.count - 1)[1] == plan.part_size
        assert last_length > 0


def test_plan_grows_part_size_for_huge_objects():
    plan = lib.plan_parts(lib.MAX_OBJECT_SIZE, 10 * MiB)
    assert plan.count <= lib.MAX_PARTS and plan.part_size % MiB == 0
    assert lib.plan_parts(100 * MiB, 10 * MiB).count == 10
    assert lib.plan_parts(100 * MiB + 1, 10 * MiB).count == 11


@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000))
@settings(max_examples=300)
def test_crc32c_combine_equals_crc_of_concatenation(a, b):
    combined = lib.crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), len(b))
    assert combined == google_crc32c.value(a + b)


def test_crc32c_combine_over_many_parts():
    parts = [bytes([i]) * (1000 + 37 * i) for i in range(20)]
    total = lib.crc32c(parts[0])
    for part in parts[1:]:
        total = lib.crc32c_combine(total, lib.crc32c(part), len(part))
    assert total == lib.crc32c(b"".join(parts))


def test_composite_etag_is_md5_of_md5s():
    md5s = [hashlib.md5(b"one").digest(), hashlib.md5(b"two").digest()]
    assert lib.composite_etag(md5s) == hashlib.md5(md5s[0] + md5s[1]).hexdigest() + "-2"


def test_goog_hash_header_parsing():
    value = google_crc32c.value(b"hello")
    import base64
    header = f"crc32c={base64.b64encode(value.to_bytes(4, 'big')).decode()},md5=XUFAKrxLKna5cZ2REBfFkg=="
    assert lib._crc32c_from_goog_hash(header) == value
    assert lib._crc32c_from_goog_hash(None) is None
    assert lib._crc32c_from_goog_hash("md5=abc") is None


def test_backoff_is_capped_and_jittered():
    import random
    delays = lib.backoff_delays(12, base_s=0.5, cap_s=20, rng=random.Random(7))
    assert len(delays) == 11
    assert all(0 <= d <= 20 for d in delays)
    assert delays[0] <= 0.5


def test_access_key_repr_hides_the_secret():
    key = lib.AccessKey("AKIDEXAMPLE", "very-secret-value", "us-east-1")
    assert "very-secret-value" not in repr(key)
    assert "very-secret-value" not in str(key)
