"""Settings: the seed's ini keys, defaults for new keys, overrides, and errors that name the key."""
from pathlib import Path

import pytest

import s3_migration_lib as lib

REPO = Path(__file__).resolve().parent.parent
SEED_INI = """\
[Basic]
SrcEndPointURL = https://s3.amazonaws.com
DestEndPointURL = https://storage.googleapis.com
JobType = GET
table_queue_name = s3_migration_file_list
sqs_queue_name = s3_migration_file_list
ssm_parameter_bucket = s3_migration_bucket_para
ssm_parameter_credentials = projects/123/secrets/s3_migration_credentials/versions/1
Des_bucket_default = from-s3-migration
Des_prefix_default =

[Mode]
StorageClass = STANDARD
ResumableThreshold = 50
MaxRetry = 3
MaxThread = 5
MaxParallelFile = 5
JobTimeout = 3500
JobsenderCompareVersionId = False
UpdateVersionId = False
GetObjectWithVersionId = False

[Debug]
CleanUnfinishedUpload = False
LoggingLevel = INFO
LocalProfileMode = False
ifVerifyMD5Twice = False
ChunkSize = 10
"""


def write(tmp_path, text):
    path = tmp_path / "config.ini"
    path.write_text(text)
    return path


def test_seed_ini_loads_with_units_and_new_defaults(tmp_path):
    settings = lib.Settings.from_ini(write(tmp_path, SEED_INI), environ={})
    assert settings.job_type == "GET"
    assert settings.chunk_size_bytes == 10 * lib.MiB
    assert settings.resumable_threshold_bytes == 50 * lib.MiB
    assert settings.src_endpoint_url == "https://s3.amazonaws.com"
    assert settings.visibility_heartbeat_s == 300
    assert settings.shutdown_grace_s == 25
    assert settings.propagate_deletes is False
    assert settings.peak_part_memory_bytes == 5 * 5 * 10 * lib.MiB


def test_shipped_ini_is_valid():
    settings = lib.Settings.from_ini(REPO / "s3_migration_cluster_config.ini", environ={})
    assert settings.ignore_list_path == REPO / "s3_migration_ignore_list.txt"


def test_environment_overrides_the_seed_keys(tmp_path):
    settings = lib.Settings.from_ini(write(tmp_path, SEED_INI), environ={
        "table_queue_name": "table-from-env", "sqs_queue_name": "queue-from-env",
        "ssm_parameter_bucket": "param-from-env"})
    assert (settings.table_name, settings.queue_name, settings.ssm_parameter_bucket) == (
        "table-from-env", "queue-from-env", "param-from-env")


def test_keys_are_case_insensitive_like_the_seed_parser(tmp_path):
    settings = lib.Settings.from_ini(write(tmp_path, SEED_INI.replace("MaxThread", "maxthread")),
                                     environ={})
    assert settings.max_thread == 5


@pytest.mark.parametrize("line, replacement, key", [
    ("ChunkSize = 10", "ChunkSize = 4", "ChunkSize"),
    ("ChunkSize = 10", "ChunkSize = ten", "ChunkSize"),
    ("MaxThread = 5", "MaxThread = 0", "MaxThread"),
    ("JobType = GET", "JobType = PULL", "JobType"),
    ("StorageClass = STANDARD", "StorageClass = COLD", "StorageClass"),
    ("UpdateVersionId = False", "UpdateVersionId = maybe", "UpdateVersionId"),
    ("LoggingLevel = INFO", "LoggingLevel = LOUD", "LoggingLevel"),
    ("sqs_queue_name = s3_migration_file_list", "sqs_queue_name =", "sqs_queue_name"),
    ("DestEndPointURL = https://storage.googleapis.com", "DestEndPointURL = storage", "DestEndPointURL"),
    ("JobTimeout = 3500", "JobTimeout = -1", "JobTimeout"),
])
def test_bad_value_names_the_key(tmp_path, line, replacement, key):
    assert line in SEED_INI
    with pytest.raises(lib.ConfigError) as raised:
        lib.Settings.from_ini(write(tmp_path, SEED_INI.replace(line, replacement)), environ={})
    assert key in str(raised.value)
    assert "\n" not in str(raised.value)


def test_missing_file_and_broken_ini_are_config_errors(tmp_path):
    with pytest.raises(lib.ConfigError, match="cannot read config file"):
        lib.Settings.from_ini(tmp_path / "nope.ini", environ={})
    with pytest.raises(lib.ConfigError, match="not a valid ini"):
        lib.Settings.from_ini(write(tmp_path, "no section header\n"), environ={})


def test_service_account_credentials_need_get_mode(tmp_path):
    text = SEED_INI.replace("JobType = GET", "JobType = PUT") + "DestCredentials = service-account\n"
    with pytest.raises(lib.ConfigError, match="DestCredentials"):
        lib.Settings.from_ini(write(tmp_path, text), environ={})


def test_ignore_list_patterns_match_bucket_key_and_key(tmp_path):
    path = tmp_path / "ignore.txt"
    path.write_text("# comment\n\nsrc/exact.mp4\n*.jpg\n*/readme.md\nother/logs/*\n")
    ignore = lib.IgnoreList.load(path)
    assert ignore.matches("src", "exact.mp4") == "src/exact.mp4"
    assert ignore.matches("src", "a/b/photo.jpg") == "*.jpg"
    assert ignore.matches("src", "docs/readme.md") == "*/readme.md"
    assert ignore.matches("other", "logs/2024/x") == "other/logs/*"
    assert ignore.matches("src", "exact.mp4.bak") is None
    assert ignore.matches("src", "README.MD") is None
    assert lib.IgnoreList.load(tmp_path / "missing.txt").patterns == ()
