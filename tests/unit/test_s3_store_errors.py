"""The S3 store when S3 refuses it: a 403 for a key not written yet names what is missing.

S3 answers a GET or HEAD of a missing key with 404 only to a caller allowed
s3:ListBucket on the bucket, 403 to anyone else. moto enforces no IAM, so a
small HTTP stub plays S3 for the refusals (boto3 parses its answers as it
parses S3's); moto in-process shows the same calls pass where S3 allows them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import boto3
import pytest
from moto import mock_aws

from app.store import StoreUnavailable
from app.store.s3 import S3Store

BUCKET = "fleet-results"
ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message>"
    b"<RequestId>1</RequestId><HostId>h</HostId></Error>"
)


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)


class Refusing(BaseHTTPRequestHandler):
    """S3 for a caller without s3:ListBucket: the bucket as `bucket_status`, any key 403."""

    bucket_status = 200
    seen: ClassVar[list[tuple[str, str]]] = []

    def _answer(self, body: bool) -> None:
        self.seen.append((self.command, self.path))
        is_bucket = self.path.split("?")[0].strip("/") == BUCKET
        status = self.bucket_status if is_bucket else 403
        payload = ACCESS_DENIED if status == 403 and body else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_HEAD(self) -> None:  # HEAD answers carry no body: boto3 sees code "403"
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_s3() -> Iterator[type[Refusing]]:
    handler = type("Handler", (Refusing,), {"seen": [], "bucket_status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def store_at(endpoint: str) -> S3Store:
    return S3Store(f"s3://{BUCKET}/results?endpoint_url={endpoint}&region=us-east-1")


def assert_names_the_grant(message: str) -> None:
    assert "403" in message
    assert f"s3:ListBucket on arn:aws:s3:::{BUCKET}" in message
    assert "no s3:prefix condition" in message
    assert "pulumi up" in message


def test_head_of_a_batch_not_written_yet_says_s3_list_bucket_is_missing(refusing_s3):
    store = store_at(refusing_s3.endpoint)
    with pytest.raises(StoreUnavailable) as caught:
        store.is_committed("job1", 3)
    assert_names_the_grant(str(caught.value))
    assert "HeadObject of results/jobs/job1/results/0000000003" in str(caught.value)
    assert refusing_s3.seen == [("HEAD", f"/{BUCKET}/results/jobs/job1/results/0000000003")]


def test_get_of_a_missing_key_says_the_same(refusing_s3):
    store = store_at(refusing_s3.endpoint)
    with pytest.raises(StoreUnavailable) as caught:
        store.get_meta("job1")
    assert_names_the_grant(str(caught.value))
    assert "GetObject of results/jobs/job1/meta.json" in str(caught.value)


def test_ping_fails_where_every_batch_would(refusing_s3):
    """The bucket answers, a missing key does not read as missing: ping says so, once."""
    store = store_at(refusing_s3.endpoint)
    with pytest.raises(StoreUnavailable) as caught:
        store.ping()
    assert_names_the_grant(str(caught.value))
    assert [method for method, _ in refusing_s3.seen] == ["HEAD", "HEAD"]
    assert refusing_s3.seen[1][1].startswith(f"/{BUCKET}/results/ping/")


def test_ping_refused_head_bucket_names_s3_list_bucket(refusing_s3):
    refusing_s3.bucket_status = 403
    store = store_at(refusing_s3.endpoint)
    with pytest.raises(StoreUnavailable) as caught:
        store.ping()
    assert_names_the_grant(str(caught.value))
    assert "refused HeadBucket" in str(caught.value)


def test_where_s3_allows_it_a_missing_key_is_just_missing():
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        store = S3Store(f"s3://{BUCKET}/results?region=us-east-1")
        store.ping()
        assert store.is_committed("job1", 3) is False
        assert store.get_meta("job1") is None
