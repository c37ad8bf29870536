"""Workers publish their busy slots and finished batches to CloudWatch (FLEET_METRICS=cloudwatch).

The request is a pure function of one minute's numbers; the publisher loop runs
here on a fake clock against moto's CloudWatch, read back with list_metrics and
get_metric_statistics as the dashboard reads it.
"""

from __future__ import annotations

import datetime
import threading

import boto3
import pytest
from moto import mock_aws

from app.names import (
    BUSY_SLOTS_METRIC,
    INSTANCE_DIMENSION,
    METRIC_DIMENSION,
    METRIC_NAMESPACE,
    WORKER_BATCHES_METRIC,
)
from app.settings import Settings
from app.worker.heartbeat import InstanceMetrics, instance_metrics, metric_data
from tests.support.wait import FakeClock

SETTINGS = Settings("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1", stack="dev")


def test_metric_data_is_per_instance_and_for_the_stack():
    request = metric_data("dev", "i-1", busy=3, finished=7)
    assert request["Namespace"] == METRIC_NAMESPACE == "CeleryFleet"
    both = [
        {"Name": METRIC_DIMENSION, "Value": "dev"},
        {"Name": INSTANCE_DIMENSION, "Value": "i-1"},
    ]
    stack = [{"Name": METRIC_DIMENSION, "Value": "dev"}]
    assert request["MetricData"] == [
        {"MetricName": BUSY_SLOTS_METRIC, "Dimensions": both, "Value": 3.0, "Unit": "Count"},
        {"MetricName": BUSY_SLOTS_METRIC, "Dimensions": stack, "Value": 3.0, "Unit": "Count"},
        {"MetricName": WORKER_BATCHES_METRIC, "Dimensions": both, "Value": 7.0, "Unit": "Count"},
        {"MetricName": WORKER_BATCHES_METRIC, "Dimensions": stack, "Value": 7.0, "Unit": "Count"},
    ]


def test_metrics_are_off_unless_asked_for_and_complete():
    assert instance_metrics(SETTINGS, {}) is None
    assert instance_metrics(SETTINGS, {"FLEET_METRICS": "off"}) is None
    # No instance id (not written by app.boot off EC2), or no stack: nothing to name them by.
    assert instance_metrics(SETTINGS, {"FLEET_METRICS": "cloudwatch"}) is None
    no_stack = Settings("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1")
    env = {"FLEET_METRICS": "cloudwatch", "FLEET_INSTANCE_ID": "i-1"}
    assert instance_metrics(no_stack, env) is None
    publisher = instance_metrics(SETTINGS, {**env, "AWS_DEFAULT_REGION": "eu-west-1"})
    assert isinstance(publisher, InstanceMetrics)
    assert (publisher.stack, publisher.instance_id) == ("dev", "i-1")
    assert publisher.client.meta.region_name == "eu-west-1"


@pytest.fixture
def cloudwatch(monkeypatch):
    for key, value in {
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield boto3.client("cloudwatch")


def test_publisher_loop_publishes_once_a_minute_what_the_worker_did(cloudwatch):
    clock = FakeClock(1000.0)
    # (busy slots, batches finished since the worker started), sampled at each publish.
    samples = iter([(0, 0), (4, 0), (4, 5), (2, 12), (0, 20)])
    waits: list[float] = []
    stop = threading.Event()

    def wait(seconds: float) -> None:
        waits.append(seconds)
        clock.now += 20  # the loop wakes every 20 s of the fake clock
        if len(waits) == 12:
            stop.set()

    publisher = InstanceMetrics("dev", "i-1", cloudwatch, lambda: next(samples), clock)
    publisher.run(stop, wait)
    # Published at 1000, 1060, 1120, 1180: the 4 minutes the loop ran; in between, it waited.
    assert waits[:4] == [60.0, 40.0, 20.0, 60.0]
    listed = cloudwatch.list_metrics(Namespace=METRIC_NAMESPACE)["Metrics"]
    names = {
        (m["MetricName"], tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"])))
        for m in listed
    }
    assert names == {
        (name, dims)
        for name in (BUSY_SLOTS_METRIC, WORKER_BATCHES_METRIC)
        for dims in (((INSTANCE_DIMENSION, "i-1"), (METRIC_DIMENSION, "dev")), (("Stack", "dev"),))
    }
    now = datetime.datetime.now(datetime.UTC)

    def stats(name: str, stat: str, **dims: str) -> float:
        points = cloudwatch.get_metric_statistics(
            Namespace=METRIC_NAMESPACE,
            MetricName=name,
            Dimensions=[{"Name": k, "Value": v} for k, v in dims.items()],
            StartTime=now - datetime.timedelta(hours=1),
            EndTime=now + datetime.timedelta(hours=1),
            Period=3600,
            Statistics=[stat],
        )["Datapoints"]
        (point,) = points
        return float(point[stat])

    # Finished batches per minute: 0, 5, 7, 8 (the counter's steps), 20 in all.
    assert stats(WORKER_BATCHES_METRIC, "Sum", Stack="dev", InstanceId="i-1") == 20
    assert stats(BUSY_SLOTS_METRIC, "Maximum", Stack="dev", InstanceId="i-1") == 4
    assert stats(BUSY_SLOTS_METRIC, "SampleCount", Stack="dev", InstanceId="i-1") == 4
    # (moto matches dimensions as a subset, so the Stack-only series is not read back alone
    # here; list_metrics above shows it is there, with the same datums as metric_data's.)


def test_a_failed_publish_is_counted_in_the_next(cloudwatch):
    clock = FakeClock()
    samples = iter([(0, 0), (1, 3), (1, 5)])

    class Flaky:
        def __init__(self) -> None:
            self.calls: list[dict] = []

        def put_metric_data(self, **request):
            self.calls.append(request)
            if len(self.calls) == 1:
                raise ConnectionError("CloudWatch is away")

    client = Flaky()
    publisher = InstanceMetrics("dev", "i-1", client, lambda: next(samples), clock)
    assert publisher.tick()
    assert not publisher.tick(), "not a minute yet"
    clock.now += 60
    assert publisher.tick()
    finished = [
        d["Value"]
        for d in client.calls[1]["MetricData"]
        if d["MetricName"] == WORKER_BATCHES_METRIC
    ]
    assert finished == [5.0, 5.0], "the 3 batches of the failed minute and the 2 of this one"
