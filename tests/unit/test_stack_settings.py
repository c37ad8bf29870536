"""`fleet run --stack NAME` finds the fleet from SSM Parameter Store alone (moto)."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from app.settings import ConfigError
from app.stack import settings_from_stack, with_password


@pytest.fixture
def ssm(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield boto3.client("ssm")


def put(ssm, stack, **params):
    for key, (value, kind) in params.items():
        ssm.put_parameter(Name=f"/celery-fleet/{stack}/{key}", Value=value, Type=kind)


def test_sqs_stack(ssm):
    put(
        ssm,
        "prod",
        broker_url=("sqs://", "String"),
        result_url=("s3://fleet-results-x/results", "String"),
        queue=("celery-fleet-prod", "String"),
        queue_url=("https://sqs.eu-west-1.amazonaws.com/1/celery-fleet-prod", "String"),
        max_batch_seconds=("600", "String"),
        result_ttl=("86400", "String"),
    )
    s = settings_from_stack("prod")
    assert (s.broker_url, s.result_url, s.queue) == (
        "sqs://",
        "s3://fleet-results-x/results",
        "celery-fleet-prod",
    )
    assert s.aws_region == "eu-west-1" and s.max_batch_seconds == 600 and s.result_ttl == 86400
    assert s.transport_options["predefined_queues"] == {
        "celery-fleet-prod": {"url": "https://sqs.eu-west-1.amazonaws.com/1/celery-fleet-prod"}
    }
    assert s.transport_options["is_secure"] is True


def test_rabbitmq_stack_password_comes_from_secure_string(ssm):
    put(
        ssm,
        "mq",
        broker_url=("amqps://fleet@b-1.mq.eu-west-1.amazonaws.com:5671//", "String"),
        broker_password=("p@ss/word", "SecureString"),
        broker_password_parameter=("/celery-fleet/mq/broker_password", "String"),
        result_url=("rediss://default@master.x.cache.amazonaws.com:6379/0", "String"),
        result_password=("tok", "SecureString"),
    )
    s = settings_from_stack("mq")
    assert s.broker_url == "amqps://fleet:p%40ss%2Fword@b-1.mq.eu-west-1.amazonaws.com:5671//"
    assert s.result_url == "rediss://default:tok@master.x.cache.amazonaws.com:6379/0"
    assert s.queue == "fleet"


def test_missing_stack_says_what_to_check(ssm):
    put(ssm, "other", broker_url=("sqs://", "String"), result_url=("s3://b", "String"))
    with pytest.raises(ConfigError) as exc:
        settings_from_stack("nope")
    assert "no stack 'nope' in region eu-west-1" in exc.value.message
    assert "/celery-fleet/nope/" in exc.value.message


def test_with_password_keeps_the_rest_of_the_url():
    assert with_password("amqps://u@h:5671/v", "a b") == "amqps://u:a%20b@h:5671/v"


def test_launcher_publishes_held_batches_for_the_stack(ssm):
    from datetime import UTC, datetime, timedelta

    from app.launcher.metrics import StackMetrics

    metric = StackMetrics("prod", "eu-west-1")
    metric.publish(120, 3)
    metric.publish(90, 4)  # within the period: not sent, the completed batches kept
    metric.publish(0, 1)  # zero goes out at once, so the fleet does not wait on a stale value
    cw = boto3.client("cloudwatch")
    now = datetime.now(UTC)
    stats = cw.get_metric_statistics(
        Namespace="CeleryFleet",
        MetricName="HeldBatches",
        Dimensions=[{"Name": "Stack", "Value": "prod"}],
        StartTime=now - timedelta(minutes=5),
        EndTime=now + timedelta(minutes=1),
        Period=60,
        Statistics=["Maximum", "SampleCount"],
    )["Datapoints"]
    assert sum(p["SampleCount"] for p in stats) == 2
    assert max(p["Maximum"] for p in stats) == 120
    completed = cw.get_metric_statistics(
        Namespace="CeleryFleet",
        MetricName="BatchesCompleted",
        Dimensions=[{"Name": "Stack", "Value": "prod"}],
        StartTime=now - timedelta(minutes=5),
        EndTime=now + timedelta(minutes=1),
        Period=60,
        Statistics=["Sum"],
    )["Datapoints"]
    # 3 with the first call, 4 + 1 with the last: every batch counted once.
    assert sum(p["Sum"] for p in completed) == 8
