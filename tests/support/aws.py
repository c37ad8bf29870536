"""AWS on this machine: moto in server mode, with the queue and bucket the stack makes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3

from app.settings import Settings
from scripts.local.processes import free_port, stop_process, wait_port
from tests.support.fleets import TASKS

VISIBILITY = 1860  # what the stack sets on the queue for the default max batch time
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_server() -> Iterator[tuple[int, str]]:
    """(port, endpoint) of a moto server with the result bucket; test credentials in
    os.environ meanwhile."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    port = free_port()
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, moto, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="fleet-results")
        yield port, endpoint
    finally:
        stop_process(moto, timeout=5)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sqs_settings(aws: tuple[int, str], queue: str) -> Settings:
    """The settings the stack gives its workers, for a new queue `queue` on the moto server."""
    port, endpoint = aws
    url = boto3.client("sqs", endpoint_url=endpoint).create_queue(
        QueueName=queue, Attributes={"VisibilityTimeout": str(VISIBILITY)}
    )["QueueUrl"]
    return Settings(
        broker_url=f"sqs://testing:testing@127.0.0.1:{port}",
        result_url=f"s3://fleet-results/{queue}?endpoint_url={endpoint}&region=us-east-1",
        queue=queue,
        include=TASKS,
        aws_region="us-east-1",
        sqs_queue_url=url,
        lease_seconds=2,
    )
