"""FaultProxy against a real moto server: forwarding, recording and every fault action."""

from __future__ import annotations

import http.client
import socket
import time
from urllib.parse import urlsplit

import botocore.exceptions
import pytest
from botocore.config import Config

from tests.support.proxy import (SLOW_DOWN, Delay, DropResponse, FailNth, FailRandomly,
                                 FaultProxy, Headers, RecordedRequest, Reset, Respond, matching)
from tools.local_cloud import AWS_TEST_KEY, REGION, LocalCloud, isolated_session

MiB = 1024 * 1024


def s3_client(endpoint_url: str, total_attempts: int = 1, read_timeout: float = 10):
    """An S3 client on ``endpoint_url`` configured like the worker's destination client.

    Note botocore's ``retries={"max_attempts": 1}`` still allows one retry (it counts retries
    after the first attempt); ``total_max_attempts=1`` is what turns retries off.
    """
    config = Config(s3={"addressing_style": "path"}, proxies={},
                    retries={"total_max_attempts": total_attempts, "mode": "standard"},
                    connect_timeout=5, read_timeout=read_timeout,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    return isolated_session().client("s3", endpoint_url=endpoint_url, region_name=REGION,
                                     aws_access_key_id=AWS_TEST_KEY,
                                     aws_secret_access_key=AWS_TEST_KEY, config=config)


@pytest.fixture
def s3(dest_proxy: FaultProxy):
    """S3 client through the proxy, botocore retries off."""
    return s3_client(dest_proxy.endpoint_url)


def stored(cloud: LocalCloud, key: str) -> bytes:
    return cloud.clients.dest_s3.get_object(Bucket=cloud.dest_bucket, Key=key)["Body"].read()


def test_put_and_get_through_the_proxy_are_forwarded_and_recorded(
        cloud: LocalCloud, dest_proxy: FaultProxy, s3) -> None:
    s3.put_object(Bucket=cloud.dest_bucket, Key="dir/a b+ü", Body=b"hello",
                  ContentMD5="XUFAKrxLKna5cZ2REBfFkg==")
    assert stored(cloud, "dir/a b+ü") == b"hello"
    assert s3.get_object(Bucket=cloud.dest_bucket, Key="dir/a b+ü")["Body"].read() == b"hello"
    assert s3.head_object(Bucket=cloud.dest_bucket, Key="dir/a b+ü")["ContentLength"] == 5
    put, get, head = dest_proxy.requests
    assert (put.method, get.method, head.method) == ("PUT", "GET", "HEAD")
    assert put.url_path.startswith(f"/{cloud.dest_bucket}/dir/a%20b")
    assert put.body_length == 5 and get.body_length == 0
    assert put.headers["content-md5"] == put.headers["Content-MD5"] == "XUFAKrxLKna5cZ2REBfFkg=="
    assert "authorization" in put.headers
    assert not any(name.lower().startswith("x-amz-checksum") for name in put.headers)
    assert put.fault is None


def test_large_put_with_expect_100_continue(cloud: LocalCloud, dest_proxy: FaultProxy,
                                            s3) -> None:
    data = bytes(range(256)) * (6 * MiB // 256)
    s3.put_object(Bucket=cloud.dest_bucket, Key="big", Body=data)
    [put] = dest_proxy.requests
    assert put.headers.get("Expect") == "100-continue"
    assert put.body_length == len(data)
    assert stored(cloud, "big") == data


def test_multipart_upload_through_the_proxy(cloud: LocalCloud, dest_proxy: FaultProxy,
                                            s3) -> None:
    bucket = cloud.dest_bucket
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    parts = []
    for n in (1, 2):
        etag = s3.upload_part(Bucket=bucket, Key="mp", UploadId=upload_id, PartNumber=n,
                              Body=bytes([n]) * 5 * MiB)["ETag"]
        parts.append({"PartNumber": n, "ETag": etag})
    s3.complete_multipart_upload(Bucket=bucket, Key="mp", UploadId=upload_id,
                                 MultipartUpload={"Parts": parts})
    assert stored(cloud, "mp") == bytes([1]) * 5 * MiB + bytes([2]) * 5 * MiB
    uploads = [r for r in dest_proxy.requests if matching(method="PUT", query="partNumber")(r)]
    assert [r.query["partNumber"] for r in uploads] == [["1"], ["2"]]


def test_respond_503_reaches_the_client_as_slow_down(cloud: LocalCloud, dest_proxy: FaultProxy,
                                                     s3) -> None:
    dest_proxy.fault = lambda request: SLOW_DOWN
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3.put_object(Bucket=cloud.dest_bucket, Key="k", Body=b"x")
    error = caught.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert error["Error"]["Code"] == "SlowDown"
    assert [r.fault for r in dest_proxy.requests] == ["Respond"]
    dest_proxy.fault = None
    with pytest.raises(cloud.clients.dest_s3.exceptions.NoSuchKey):
        cloud.clients.dest_s3.get_object(Bucket=cloud.dest_bucket, Key="k")


def test_respond_with_custom_status_headers_and_body(dest_proxy: FaultProxy) -> None:
    dest_proxy.fault = lambda request: Respond(418, b"teapot", {"X-Test": "1"})
    connection = http.client.HTTPConnection(urlsplit(dest_proxy.endpoint_url).netloc, timeout=5)
    try:
        connection.request("GET", "/anything")
        response = connection.getresponse()
        assert (response.status, response.read(), response.getheader("x-test")) == (
            418, b"teapot", "1")
        connection.request("GET", "/again")  # the connection is kept alive
        assert connection.getresponse().status == 418
    finally:
        connection.close()


def test_reset_is_a_connection_error(cloud: LocalCloud, dest_proxy: FaultProxy, s3) -> None:
    dest_proxy.fault = lambda request: Reset()
    with pytest.raises((botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError)):
        s3.put_object(Bucket=cloud.dest_bucket, Key="k", Body=b"x")
    assert dest_proxy.requests[0].fault == "Reset"
    dest_proxy.fault = None
    s3.put_object(Bucket=cloud.dest_bucket, Key="k", Body=b"y")  # the proxy still serves
    assert stored(cloud, "k") == b"y"


def test_reset_sends_tcp_rst(dest_proxy: FaultProxy) -> None:
    dest_proxy.fault = lambda request: Reset()
    netloc = urlsplit(dest_proxy.endpoint_url)
    with socket.create_connection((netloc.hostname, netloc.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)


def test_drop_response_stores_the_object_but_the_client_sees_an_error(
        cloud: LocalCloud, dest_proxy: FaultProxy, s3) -> None:
    dest_proxy.fault = lambda request: DropResponse()
    with pytest.raises((botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError)):
        s3.put_object(Bucket=cloud.dest_bucket, Key="lost-reply", Body=b"stored")
    assert stored(cloud, "lost-reply") == b"stored"


def test_delay_then_forward(cloud: LocalCloud, dest_proxy: FaultProxy, s3) -> None:
    dest_proxy.fault = lambda request: Delay(0.3)
    started = time.monotonic()
    s3.put_object(Bucket=cloud.dest_bucket, Key="slow", Body=b"x")
    assert time.monotonic() - started >= 0.3
    assert stored(cloud, "slow") == b"x"


def test_fail_nth_matching_request_and_botocore_retries_through_it(
        cloud: LocalCloud, dest_proxy: FaultProxy) -> None:
    dest_proxy.fault = FailNth(SLOW_DOWN, n=2, match=matching(method="PUT"))
    retrying = s3_client(dest_proxy.endpoint_url, total_attempts=3)
    for key in ("a", "b", "c"):
        retrying.put_object(Bucket=cloud.dest_bucket, Key=key, Body=key.encode())
    puts = [r for r in dest_proxy.requests if r.method == "PUT"]
    assert [r.fault for r in puts] == [None, "Respond", None, None]
    assert puts[1].url_path == puts[2].url_path  # the retry of "b"
    cloud.clients.dest_s3.head_object(Bucket=cloud.dest_bucket, Key="b")


def test_fail_randomly_is_repeatable_for_a_seed() -> None:
    request = RecordedRequest("PUT", "/b/k?partNumber=1&uploadId=u", Headers(), 1)
    other = RecordedRequest("GET", "/b/k", Headers(), 0)

    def pattern(seed: int) -> list[bool]:
        fault = FailRandomly(Reset(), p=0.3, seed=seed, match=matching(query="partNumber"))
        assert fault(other) is None
        return [fault(request) is not None for _ in range(200)]

    assert pattern(7) == pattern(7)
    assert pattern(7) != pattern(8)
    assert 30 <= sum(pattern(7)) <= 90
    with pytest.raises(ValueError):
        FailRandomly(Reset(), p=1.5)


def test_fault_that_raises_is_ignored(cloud: LocalCloud, dest_proxy: FaultProxy, s3) -> None:
    dest_proxy.fault = lambda request: 1 / 0
    s3.put_object(Bucket=cloud.dest_bucket, Key="k", Body=b"x")
    assert stored(cloud, "k") == b"x"


def test_chunked_request_body_is_forwarded(cloud: LocalCloud, dest_proxy: FaultProxy) -> None:
    connection = http.client.HTTPConnection(urlsplit(dest_proxy.endpoint_url).netloc, timeout=5)
    try:
        connection.request("PUT", f"/{cloud.dest_bucket}/chunked", body=iter([b"ab", b"cde"]),
                           headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    finally:
        connection.close()
    assert stored(cloud, "chunked") == b"abcde"
    assert dest_proxy.requests[0].body_length == 5


def test_upstream_down_gives_502() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with FaultProxy(dead) as proxy:
            connection = http.client.HTTPConnection(urlsplit(proxy.endpoint_url).netloc,
                                                    timeout=5)
            connection.request("GET", "/")
            assert connection.getresponse().status == 502
            connection.close()


def test_stop_is_prompt_with_idle_keep_alive_and_delayed_requests(cloud: LocalCloud) -> None:
    proxy = FaultProxy(cloud.dest_url).start()
    idle = http.client.HTTPConnection(urlsplit(proxy.endpoint_url).netloc, timeout=5)
    idle.request("GET", "/")
    idle.getresponse().read()  # now an idle kept-alive connection
    proxy.fault = lambda request: Delay(30)
    slow = socket.create_connection(("127.0.0.1", urlsplit(proxy.endpoint_url).port), timeout=5)
    slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until_recorded(proxy, 2)
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 3
    idle.close()
    slow.close()
    proxy.stop()  # idempotent


def wait_until_recorded(proxy: FaultProxy, count: int, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while len(proxy.requests) < count:
        assert time.monotonic() < deadline, "request never reached the proxy"
        time.sleep(0.01)
