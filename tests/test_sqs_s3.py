"""The stack's default transport for real: an SQS broker and an S3 result store
(moto in server mode on a loopback port), real `celery worker` processes and
the real launcher, with the settings the stack gives the workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import boto3
import psutil
import pytest

from app.launcher.job import JobOptions
from app.launcher.launcher import Launcher
from app.launcher.sources import Source
from app.settings import Settings
from scripts.local.fleet import LocalFleet
from scripts.local.processes import free_port, stop_process, wait_port
from tests.conftest import TASKS, read_output

VISIBILITY = 1860  # what the stack sets on the queue for the default max batch time


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """A moto server with the queue and bucket the stack would create."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
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


def sqs_settings(aws, queue: str) -> Settings:
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


def check_exactly_once(out: Path, n: int) -> list[dict]:
    rows = read_output(out)
    counts = Counter(r["id"] for r in rows)
    assert set(counts) == set(range(n)), "IDs lost"
    assert max(counts.values()) == 1, "IDs written twice"
    return rows


@pytest.mark.timeout(120)
def test_job_completes_with_errors_recorded(aws, tmp_path):
    settings = sqs_settings(aws, "fleet-basic")
    out = tmp_path / "out.jsonl"
    with LocalFleet(2, settings=settings, workdir=tmp_path / "fleet"):
        summary = Launcher(settings).run(
            JobOptions(task="poison", source=Source.parse("range:0:1500"), out=out, progress=False)
        )
    rows = check_exactly_once(out, 1500)
    assert summary.items == 1500
    assert summary.errors == sum(1 for i in range(1500) if i % 7 == 0)
    assert all(r["result"] == r["id"] + 1 for r in rows if "result" in r)


@pytest.mark.timeout(180)
def test_killed_worker_batch_is_recovered_before_visibility_timeout(aws, tmp_path):
    """SQS would hide the dead worker's batch for 31 minutes; the lease brings it back."""
    settings = sqs_settings(aws, "fleet-kill")
    out = tmp_path / "out.jsonl"
    n = 400
    with LocalFleet(
        2, settings=settings, workdir=tmp_path / "fleet", env={"FLEET_TEST_ITEM_MS": "10"}
    ) as fleet:
        result: dict = {}
        launcher = threading.Thread(
            target=lambda: result.update(
                summary=Launcher(settings).run(
                    JobOptions(
                        task="slow",
                        source=Source.parse(f"range:0:{n}"),
                        batch_size=25,
                        out=out,
                        progress=False,
                    )
                )
            )
        )
        started = time.monotonic()
        launcher.start()
        victim = fleet.instances[0].proc
        # Wait until the victim's pool is busy on a batch, then kill the whole worker.
        deadline = time.monotonic() + 60
        pool = []
        while time.monotonic() < deadline:
            pool = psutil.Process(victim.pid).children()
            if any(p.cpu_times().user > 0.2 for p in pool):
                break
            time.sleep(0.1)
        os.killpg(victim.pid, signal.SIGKILL)
        launcher.join(timeout=150)
        elapsed = time.monotonic() - started
    assert not launcher.is_alive(), "the job did not finish"
    rows = check_exactly_once(out, n)
    assert all(r["result"] == 2 * r["id"] for r in rows)
    assert result["summary"].resent >= 1
    assert elapsed < VISIBILITY / 10, f"took {elapsed:.0f} s: waited for the visibility timeout"
