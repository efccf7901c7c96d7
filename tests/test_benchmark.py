"""Smoke test of tools/benchmark.py on a tiny data set: the machinery runs both tools, every copy
is byte-identical, and the result has the documented shape. No timing is asserted here: the
numbers belong to the benchmark's own report (SPEC 15), not to a test that a loaded machine
could fail."""
from __future__ import annotations

import json
import shutil

import pytest

from tools import benchmark
from tools.local_cloud import MiB

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None,
                                reason="rclone is not installed (apt-get install rclone)")

PER_RUN = {"wall_s", "mb_per_s", "objects_per_s", "cpu_s", "cpu_s_per_gib",
           "cpu_s_per_gib_after_start", "peak_rss_mib", "moto_cpu_s", "moto_busy",
           "machine_busy", "returncodes", "verified_objects", "bad_keys", "log_errors"}


def test_both_tools_copy_every_object_and_the_result_has_its_shape(tmp_path):
    sets = (benchmark.DataSet("large", 1, 6 * MiB), benchmark.DataSet("small", 3, 1000))
    config = benchmark.BenchConfig(sets=sets, runs=1, max_parallel_file=2, max_thread=2,
                                   chunk_size_mb=5, feed_window=2, out_dir=tmp_path / "out",
                                   chart=tmp_path / "img" / "chart.png")

    result = benchmark.run_benchmark(config, progress=lambda text: None)

    assert result["all_verified"] is True and result["log_errors"] == 0
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == json.loads(
        json.dumps(result))
    for png in (tmp_path / "out" / "benchmark.png", tmp_path / "img" / "chart.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result) >= {"machine", "settings", "sets", "results", "targets", "seconds"}
    assert result["settings"]["rss_bound_mib"] == 2 * 2 * 5 + 150
    assert set(result["settings"]["start_up_cpu_s"]) == {"3gsync", "rclone"}
    for data_set in sets:
        per_set = result["results"][data_set.name]
        assert result["sets"][data_set.name]["total_bytes"] == data_set.total_bytes
        for tool in benchmark.TOOLS:
            (run,) = per_set[tool]["runs"]
            assert PER_RUN <= set(run), PER_RUN - set(run)
            assert run["verified_objects"] == data_set.count and run["bad_keys"] == []
            assert run["returncodes"] == [0] and run["log_errors"] == 0
            assert set(run["moto_cpu_s"]) == {"aws", "dest"}
            assert run["wall_s"] > 0 and run["cpu_s"] > 0 and run["peak_rss_mib"] > 0
            assert set(per_set[tool]["median"]) >= set(benchmark.MEDIAN_FIELDS)
        assert per_set["3gsync"]["runs"][0]["queue_left"] == 0
        assert per_set["3gsync"]["runs"][0]["dlq"] == 0
        assert set(per_set["ratios"]) >= {"wall_s", "mb_per_s", "cpu_s_per_gib", "peak_rss_mib"}
    assert {check["met"] for check in result["targets"].values()} <= {True, False}
    assert any(label.startswith("large: CPU/GiB") for label in result["targets"])
    table = benchmark.format_table(result)
    assert "| large | 3GSync/rclone |" in table and "| small | rclone |" in table


def test_command_line_sets_and_sizes():
    config = benchmark.parse_args(["--out", "x", "--large", "2x5MiB", "--small", "0",
                                   "--runs", "1", "--chunk-size-mb", "6"])
    assert config.sets == (benchmark.DataSet("large", 2, 5 * MiB),)
    assert config.rss_bound_bytes == 4 * 4 * 6 * MiB + 150 * MiB
    assert benchmark.parse_size("64KiB") == 64 * 1024
    assert benchmark.parse_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="chunk-size"):
        benchmark.BenchConfig(sets=config.sets, chunk_size_mb=4).validate()


def test_feeder_counts_job_ends_from_whole_log_lines_as_the_logs_grow(tmp_path):
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    feeder = benchmark.Feeder(sqs=None, queue_url="", bodies=[], window=4, logs=logs)
    line = b"2026-11-26 06:31:24,412 INFO job_1 s3_migration_lib: job end key=k outcome=copied\n"
    start = b"2026-11-26 06:31:24,400 INFO job_1 s3_migration_lib: job start key=k size=1\n"

    feeder._count_ended()                       # no log yet: nothing ended
    logs[0].write_bytes(start + line + line[:30])
    feeder._count_ended()
    assert feeder.ended == 1                    # the half-written line is not counted yet
    with logs[0].open("ab") as handle:
        handle.write(line[30:] + line)
    logs[1].write_bytes(line)
    feeder._count_ended()
    assert feeder.ended == 4
    feeder._count_ended()
    assert feeder.ended == 4                    # nothing counted twice
