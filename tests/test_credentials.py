"""Credentials (SPEC §9): GET mode (GCE) with the seed's secret in Secret Manager, PUT mode
(EC2) with IMDSv2 and an SSM SecureString, and the service-account destination (OAuth2 bearer
tokens instead of HMAC keys).

Real processes and real protocols, all on 127.0.0.1: an in-process gRPC server implementing
Secret Manager's AccessSecretVersion, an HTTP server answering as the GCE and EC2 metadata
servers, moto servers behind recording proxies, and the worker run as a subprocess, whose exit
code and every log line are checked (no secret value may appear in any of them).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time

import pytest

import s3_migration_lib as lib
from tests.support.metadata_server import (MetadataServer, closed_address,
                                           unresponsive_address)
from tests.support.proxy import FaultProxy
from tests.support.secret_manager import SecretManagerServer
from tests.support.workers import WorkerProcess, set_cloud_environment
from tools.local_cloud import DEST_ACCESS_KEY_ID, DEST_SECRET_ACCESS_KEY, s3_event

MiB = lib.MiB
SECRET_ID = "projects/test-project/secrets/3gsync-credentials/versions/1"
SOURCE_KEY_ID = "AKIASOURCEKEY3GSYNC"
SOURCE_SECRET = "src-SECRET-7f3a9c0d1e"
DEST_KEY_ID = "GOOG1EDESTKEY3GSYNC"
DEST_SECRET = "dest-SECRET-b81e2d4c5f"
SECRET_VALUES = (SOURCE_SECRET, DEST_SECRET, DEST_SECRET_ACCESS_KEY)
SOURCE = {"aws_access_key_id": SOURCE_KEY_ID, "aws_secret_access_key": SOURCE_SECRET,
          "region": "us-east-1"}
DESTINATION = {"aws_access_key_id": DEST_KEY_ID, "aws_secret_access_key": DEST_SECRET,
               "region": "europe-west3"}
WORKER_TIMEOUT_S = 60


@pytest.fixture
def metadata():
    with MetadataServer() as server:
        yield server


def assert_no_secret(text: str, *documents: str) -> None:
    """No secret value in ``text``, nor any of ``documents`` base64-encoded (the form a logged
    Secret Manager payload would take)."""
    for value in SECRET_VALUES:
        assert value not in text, f"secret value {value[:8]}... found in the output"
    for document in documents:
        assert base64.b64encode(document.encode()).decode()[:40] not in text, \
            "the secret's payload was logged"


def get_mode_env(cloud, metadata: MetadataServer, secrets: SecretManagerServer, tmp_path,
                 **extra: str) -> dict[str, str]:
    """A GCE worker's environment: no AWS keys or region (they come from the secret), Google
    metadata and Secret Manager on loopback, no gcloud user credentials."""
    env = cloud.subprocess_env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "GOOGLE_APPLICATION_CREDENTIALS"):
        env.pop(name, None)
    env.update(metadata.env())
    env.update({"AWS_EC2_METADATA_DISABLED": "true", "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
                lib.SECRET_MANAGER_EMULATOR_ENV: secrets.address})
    env.update(extra)
    return env


def run_worker(config, env) -> tuple[int, str]:
    with WorkerProcess(config, env, "--until-empty") as worker:
        code = worker.wait(WORKER_TIMEOUT_S)
        return code, worker.output


def credential_ids(requests) -> set[str]:
    """The access key ids in SigV4 Authorization headers (``Credential=<id>/...``)."""
    ids = set()
    for request in requests:
        header = request.headers.get("Authorization", "")
        if "Credential=" in header:
            ids.add(header.split("Credential=")[1].split("/")[0])
    return ids


# ---------------------------------------------------------------------------------------------
# GET mode: Secret Manager and the GCE metadata server
# ---------------------------------------------------------------------------------------------
@pytest.mark.cloud(notify=False)
def test_get_mode_takes_both_keys_from_secret_manager(cloud, tmp_config, tmp_path, metadata,
                                                      dest_proxy):
    cloud.upload("small.txt", b"hello from s3")
    cloud.upload("big.bin", os.urandom(7 * MiB), part_size=5 * MiB)
    cloud.send_message(s3_event(cloud.src_bucket, "small.txt", 13))
    cloud.send_message(s3_event(cloud.src_bucket, "big.bin", 7 * MiB))
    secret = json.dumps({"source": SOURCE, "destination": DESTINATION}, indent=4)
    with SecretManagerServer({SECRET_ID: secret}) as secrets, \
            FaultProxy(cloud.aws_url) as aws_proxy:
        # Every AWS request (S3 source, SQS, DynamoDB) goes through aws_proxy, so its
        # Authorization header shows which key signed it.
        env = get_mode_env(cloud, metadata, secrets, tmp_path,
                           AWS_ENDPOINT_URL=aws_proxy.endpoint_url,
                           GOOGLE_SDK_PYTHON_LOGGING_SCOPE="google")
        config = tmp_config(JobType="GET", ssm_parameter_credentials=SECRET_ID,
                            SrcEndPointURL=aws_proxy.endpoint_url,
                            DestEndPointURL=dest_proxy.endpoint_url, LoggingLevel="DEBUG")
        code, output = run_worker(config, env)
        aws_requests = aws_proxy.requests
    assert code == 0, output
    cloud.assert_copied(["small.txt", "big.bin"])
    assert "instance gce-worker-7," in output
    assert [call.name for call in secrets.requests] == [SECRET_ID]
    name_requests = [r for r in metadata.requests
                     if r.url_path == "/computeMetadata/v1/instance/name"]
    assert [r.headers.get("metadata-flavor") for r in name_requests] == ["Google"]
    assert credential_ids(aws_requests) == {SOURCE_KEY_ID}
    assert {r.headers.get("x-amz-target", "").split(".")[0] for r in aws_requests} >= {
        "DynamoDB_20120810"}   # DynamoDB too was reached with the source key
    assert credential_ids(dest_proxy.requests) == {DEST_KEY_ID}
    assert all("/europe-west3/s3/" in r.headers["Authorization"] for r in dest_proxy.requests)
    assert_no_secret(output, secret)


BAD_SECRETS = {
    "missing": (None, "not found (check config key ssm_parameter_credentials)"),
    "denied": ("deny", "permission denied"),
    "not-json": ('{"source": {"aws_access_key_id": "%s", "aws_secret_access_key": "%s"'
                 % (SOURCE_KEY_ID, SOURCE_SECRET), "value is not valid JSON"),
    "not-an-object": (json.dumps([SOURCE_SECRET, DEST_SECRET]), "expected a JSON object"),
    "no-destination": (json.dumps({"source": SOURCE}), "field destination is missing"),
    "missing-field": (json.dumps({"source": SOURCE, "destination": {
        "aws_access_key_id": DEST_KEY_ID, "aws_secret_key": DEST_SECRET}}),
        "destination: field aws_secret_access_key is missing or empty"),
    "empty-field": (json.dumps({"source": {**SOURCE, "aws_access_key_id": ""},
                                "destination": DESTINATION}),
                    "source: field aws_access_key_id is missing or empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_SECRETS))
def test_get_mode_secret_problems_stop_the_worker_with_one_line(cloud, tmp_config, tmp_path,
                                                                metadata, case):
    value, expected = BAD_SECRETS[case]
    deny = frozenset({SECRET_ID}) if value == "deny" else frozenset()
    if value == "deny":   # a good secret the instance's service account may not read
        value = json.dumps({"source": SOURCE, "destination": DESTINATION})
    with SecretManagerServer({} if value is None else {SECRET_ID: value}, deny=deny) as secrets:
        code, output = run_worker(
            tmp_config(JobType="GET", ssm_parameter_credentials=SECRET_ID, LoggingLevel="DEBUG"),
            get_mode_env(cloud, metadata, secrets, tmp_path))
    assert code == lib.EXIT_CREDENTIALS, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    assert f"Secret Manager secret {SECRET_ID}: " in errors[0]
    assert expected in errors[0]
    assert "Traceback" not in output
    assert_no_secret(output)


def test_get_mode_resource_id_is_checked_and_latest_is_the_default_version():
    with SecretManagerServer({"projects/p/secrets/s/versions/1": "one",
                              "projects/p/secrets/s/versions/2": "two"}) as secrets:
        env = {lib.SECRET_MANAGER_EMULATOR_ENV: secrets.address}
        assert lib.read_gcp_secret("projects/p/secrets/s", env) == "two"
        assert lib.read_gcp_secret("projects/p/secrets/s/versions/1", env) == "one"
        assert [c.name for c in secrets.requests] == ["projects/p/secrets/s/versions/latest",
                                                      "projects/p/secrets/s/versions/1"]
        with pytest.raises(lib.CredentialsError, match="must be a Secret Manager resource id"):
            lib.read_gcp_secret("s3_migration_credentials", env)
        secrets.corrupt_checksum = True
        with pytest.raises(lib.CredentialsError, match="does not match its CRC32C"):
            lib.read_gcp_secret("projects/p/secrets/s", env)


def test_gce_instance_name_from_metadata_with_a_fast_fallback(metadata, caplog):
    assert lib.gce_identity(metadata.env()).instance_id == "gce-worker-7"
    (request,) = metadata.requests
    assert request.headers["metadata-flavor"] == "Google"
    caplog.set_level(logging.WARNING, logger="s3_migration_lib")
    with MetadataServer(gce_flavor=False) as impostor:   # answers, but not as GCE does
        assert lib.gce_identity({"GCE_METADATA_HOST": impostor.host}).instance_id == \
            socket.gethostname()
    with unresponsive_address() as silent:
        started = time.monotonic()
        identity = lib.gce_identity({"GCE_METADATA_HOST": silent, "AWS_REGION": "eu-west-1"})
        assert time.monotonic() - started < 2 * lib.METADATA_TIMEOUT_S + 0.5
    assert identity == lib.WorkerIdentity(socket.gethostname(), "eu-west-1")
    started = time.monotonic()
    assert lib.gce_identity({"GCE_METADATA_IP": closed_address()}).instance_id == \
        socket.gethostname()
    assert time.monotonic() - started < 0.5
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all("GCE metadata not reachable" in w for w in warnings)


# ---------------------------------------------------------------------------------------------
# PUT mode: EC2 metadata (IMDSv2) and the SSM SecureString
# ---------------------------------------------------------------------------------------------
def test_ec2_identity_takes_an_imdsv2_token_first_with_a_fast_fallback(metadata, caplog):
    identity = lib.ec2_identity(metadata.env())
    assert identity == lib.WorkerIdentity("i-0123456789abcdef0", "us-east-1")
    token, *reads = metadata.requests
    assert (token.method, token.url_path) == ("PUT", "/latest/api/token")
    assert int(token.headers["x-aws-ec2-metadata-token-ttl-seconds"]) > 0
    assert [r.url_path for r in reads] == ["/latest/meta-data/instance-id",
                                           "/latest/meta-data/placement/region"]
    assert all(r.headers["x-aws-ec2-metadata-token"] == metadata.ec2_token for r in reads)
    caplog.set_level(logging.WARNING, logger="s3_migration_lib")
    with unresponsive_address() as silent:
        started = time.monotonic()
        identity = lib.ec2_identity({"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{silent}",
                                     "AWS_DEFAULT_REGION": "ap-southeast-1"})
        assert time.monotonic() - started < 2 * lib.METADATA_TIMEOUT_S + 0.5
    assert identity == lib.WorkerIdentity(socket.gethostname(), "ap-southeast-1")
    assert "EC2 metadata not reachable" in caplog.records[-1].getMessage()
    count = len(metadata.requests)
    assert lib.ec2_identity({**metadata.env(), "AWS_EC2_METADATA_DISABLED": "true"}) == \
        lib.WorkerIdentity(socket.gethostname(), None)
    assert len(metadata.requests) == count   # disabled: not even asked


def put_mode_env(cloud, metadata: MetadataServer) -> dict[str, str]:
    """An EC2 worker's environment: the region from instance metadata, not the environment."""
    env = cloud.subprocess_env()
    env.pop("AWS_DEFAULT_REGION")
    env.update(metadata.env())
    return env


@pytest.mark.cloud(notify=False)
def test_put_mode_identity_from_imdsv2_and_destination_key_from_ssm(cloud, tmp_config,
                                                                    metadata, dest_proxy):
    cloud.upload("put.bin", os.urandom(6 * MiB), part_size=5 * MiB)
    cloud.send_message(s3_event(cloud.src_bucket, "put.bin", 6 * MiB))
    code, output = run_worker(tmp_config(DestEndPointURL=dest_proxy.endpoint_url,
                                         LoggingLevel="DEBUG"),
                              put_mode_env(cloud, metadata))
    assert code == 0, output
    cloud.assert_copied(["put.bin"])
    assert "instance i-0123456789abcdef0," in output
    token, instance_id, region = metadata.requests[:3]
    assert (token.method, token.url_path) == ("PUT", "/latest/api/token")
    assert (instance_id.url_path, region.url_path) == ("/latest/meta-data/instance-id",
                                                       "/latest/meta-data/placement/region")
    # The SecureString was read with decryption (moto returns "kms:alias/aws/ssm:<value>"
    # without it, which would not parse): the destination was signed with its key.
    assert credential_ids(dest_proxy.requests) == {DEST_ACCESS_KEY_ID}
    assert_no_secret(output)


@pytest.mark.parametrize("case", ["missing", "not-json", "missing-field"])
def test_put_mode_parameter_problems_stop_the_worker_with_one_line(cloud, tmp_config, case):
    if case == "missing":
        name, expected = "no_such_parameter", "SSM parameter no_such_parameter: ParameterNotFound"
    else:
        name = "bad_credentials"
        value = ('{"aws_access_key_id": "%s", "aws_secret_access_key": "%s",'
                 % (DEST_KEY_ID, DEST_SECRET)) if case == "not-json" else \
            json.dumps({"aws_access_key_id": DEST_KEY_ID, "secret": DEST_SECRET})
        cloud.clients.ssm.put_parameter(Name=name, Type="SecureString", Value=value)
        expected = (f"SSM parameter {name}: value is not valid JSON" if case == "not-json" else
                    f"SSM parameter {name}: field aws_secret_access_key is missing or empty")
    code, output = run_worker(tmp_config(ssm_parameter_credentials=name, LoggingLevel="DEBUG"),
                              cloud.subprocess_env())
    assert code == lib.EXIT_CREDENTIALS, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and expected in errors[0], output
    assert "Traceback" not in output
    assert_no_secret(output)


def test_connect_in_put_mode_needs_the_parameter_name(cloud, tmp_config, monkeypatch):
    set_cloud_environment(monkeypatch, cloud)
    settings = lib.Settings.from_ini(tmp_config(ssm_parameter_credentials=""))
    with pytest.raises(lib.CredentialsError, match="ssm_parameter_credentials is empty"):
        lib.connect(settings)


# ---------------------------------------------------------------------------------------------
# Beyond the seed: DestCredentials = service-account (OAuth2 bearer tokens, GET mode)
# ---------------------------------------------------------------------------------------------
@pytest.mark.cloud(notify=False)
def test_service_account_destination_sends_bearer_tokens_refreshed_before_expiry(
        cloud, tmp_config, tmp_path, dest_proxy):
    cloud.upload("sa.bin", os.urandom(12 * MiB), part_size=5 * MiB)
    cloud.upload("sa.txt", b"small one")
    cloud.send_message(s3_event(cloud.src_bucket, "sa.bin", 12 * MiB))
    cloud.send_message(s3_event(cloud.src_bucket, "sa.txt", 9))
    # google-auth refreshes a token from 3m45s before its expiry: the first two are stale the
    # moment they arrive, the third is good for an hour.
    tokens = [("ya29.first", 100), ("ya29.second", 200), ("ya29.third", 3599)]
    with MetadataServer(tokens=tokens) as metadata, \
            SecretManagerServer({SECRET_ID: json.dumps({"source": SOURCE})}) as secrets:
        config = tmp_config(JobType="GET", DestCredentials="service-account",
                            ssm_parameter_credentials=SECRET_ID,
                            DestEndPointURL=dest_proxy.endpoint_url, LoggingLevel="DEBUG")
        code, output = run_worker(config, get_mode_env(cloud, metadata, secrets, tmp_path))
        issued = list(metadata.tokens_issued)
        token_requests = [r for r in metadata.requests if r.url_path.endswith("/token")]
    assert code == 0, output
    cloud.assert_copied(["sa.bin", "sa.txt"])
    # Start-up took a first token (and found it stale); the first request refreshed it to
    # the second (stale too), the next to the third, which every later request used.
    assert issued == ["ya29.first", "ya29.second", "ya29.third"]
    assert all(r.headers.get("metadata-flavor") == "Google" for r in token_requests)
    headers = [r.headers.get("Authorization") for r in dest_proxy.requests]
    assert headers.count("Bearer ya29.second") == 1
    assert headers.count("Bearer ya29.third") == len(headers) - 1 > 5
    for request in dest_proxy.requests:
        names = {name.lower() for name in request.headers}
        assert not any(name.startswith("x-amz-") for name in names), request   # no SigV4
        assert "content-md5" in names or request.method not in ("PUT",), request
    creates = [r for r in dest_proxy.requests
               if (r.method == "POST" and "uploads" in r.query)
               or (r.method == "PUT" and "partNumber" not in r.query)]
    assert len(creates) == 2
    for request in creates:   # metadata and storage class in GCS's own header names
        assert "x-goog-meta-source-etag" in request.headers, request
        assert request.headers["x-goog-storage-class"] == "STANDARD"
    assert "ya29." not in output
    assert_no_secret(output)


@pytest.mark.cloud(notify=False)
def test_service_account_without_a_metadata_server_stops_the_worker(cloud, tmp_config,
                                                                    tmp_path):
    nowhere = closed_address()
    with SecretManagerServer({SECRET_ID: json.dumps({"source": SOURCE})}) as secrets, \
            MetadataServer() as unused:
        env = get_mode_env(cloud, unused, secrets, tmp_path, GCE_METADATA_HOST=nowhere,
                           GCE_METADATA_IP=nowhere, GCE_METADATA_DETECT_RETRIES="1")
        code, output = run_worker(tmp_config(JobType="GET", DestCredentials="service-account",
                                             ssm_parameter_credentials=SECRET_ID), env)
        assert not unused.requests
    assert code == lib.EXIT_CREDENTIALS, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "DestCredentials = service-account" in errors[0], output
    assert_no_secret(output)
