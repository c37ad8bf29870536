"""Broker options that keep a worker alive through network faults, as configured (no broker).

The options at work against real servers: tests/integration/test_broker_options.py and
tests/faults/test_partitions.py."""

from __future__ import annotations

import pytest
from kombu.transport.redis import Channel

from app.celery_config import celery_config, make_app
from app.settings import Settings

STORE = "redis://127.0.0.1:6379/1"


def test_redis_broker_options_are_kombu_options_with_a_socket_timeout():
    options = celery_config(Settings("redis://127.0.0.1:6379/0", STORE))["broker_transport_options"]
    assert set(options) <= set(Channel.from_transport_options)  # a typo would be ignored
    # Above kombu's 1 s BRPOP, or every idle poll would time out.
    assert options["socket_timeout"] > 1
    assert options["health_check_interval"] > 0


@pytest.mark.parametrize("broker", ["amqp://u:p@127.0.0.1:5672//", "sqs://"])
def test_other_brokers_get_no_redis_options(broker):
    assert "socket_timeout" not in Settings(broker, STORE).transport_options


def test_the_worker_mailbox_queue_is_not_exclusive():
    """An old connection the broker has not dropped yet must not lock out the new one."""
    app = make_app(Settings("amqp://u:p@127.0.0.1:5672//", STORE))
    queue = app.control.mailbox.get_queue("w0@host")
    assert not queue.exclusive
    assert queue.auto_delete and queue.expires  # still removed when its worker is gone


def test_a_busy_sqs_consumer_looks_for_its_next_batch_often():
    """kombu's SQS consumer with every slot busy asks SQS nothing and looks again after
    polling_interval: kombu's 1 s would leave a freed slot idle half a second a batch."""
    from app.settings import SQS_POLLING_INTERVAL

    app = make_app(Settings("sqs://", "s3://bucket", aws_region="us-east-1"))
    with app.connection_for_read() as conn:
        assert conn.transport.polling_interval == SQS_POLLING_INTERVAL <= 0.1
    assert app.conf.broker_transport_options["wait_time_seconds"] == 1
