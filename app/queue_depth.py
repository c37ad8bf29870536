"""Ready messages on the broker: what no consumer holds yet.

Read by the worker's liveness watchdog (app/worker/watchdog.py), the local
autoscaler (scripts/local/autoscaler.py) and `fleet status` (scripts/status.py).
Redis: LLEN of the queue's lists (kombu moves a delivered message out of
them into its unacked hash). RabbitMQ: the message_count of a passive queue
declare (ready messages, the unacknowledged ones apart). SQS:
ApproximateNumberOfMessages (visible messages, in-flight ones apart). Every
read has a timeout: a broker that stops answering must not hang the thread that asks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol
from urllib.parse import urlsplit

from app.settings import Settings


class ReadyCount(Protocol):
    def ready(self) -> int:
        """Messages on the queue that no consumer holds."""

    def close(self) -> None: ...


class RedisReady:
    # kombu keeps one list per priority step: "fleet", "fleet\x06\x163", ...
    PRIORITY_STEPS = (0, 3, 6, 9)
    SEP = "\x06\x16"

    def __init__(self, url: str, queue: str, tls_ca_file: str | None = None) -> None:
        import redis

        from app.settings import redis_tls_options

        self.r = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=5, **redis_tls_options(url, tls_ca_file)
        )
        self.keys = [queue if p == 0 else f"{queue}{self.SEP}{p}" for p in self.PRIORITY_STEPS]

    def ready(self) -> int:
        pipe = self.r.pipeline(transaction=False)
        for key in self.keys:
            pipe.llen(key)
        return sum(pipe.execute())

    def close(self) -> None:
        self.r.close()


class AmqpReady:
    """message_count of a passive queue declare: ready messages, unacknowledged ones apart."""

    def __init__(self, url: str, queue: str, ssl: dict[str, Any] | bool = False) -> None:
        from kombu.connection import Connection  # where it is defined: kombu re-exports it lazily

        self.queue = queue
        # Timeouts on every read and write: a broker that stops answering
        # must not hang the watchdog's thread.
        self.conn = Connection(
            url,
            connect_timeout=5,
            ssl=ssl,
            transport_options={"read_timeout": 5, "write_timeout": 5},
        )
        self.channel: Any = None  # an amqp Channel, untyped

    def ready(self) -> int:
        from amqp.exceptions import NotFound

        if self.channel is None:
            self.conn.ensure_connection(max_retries=1)
            self.channel = self.conn.channel()
        try:
            return int(self.channel.queue_declare(self.queue, passive=True).message_count)
        except NotFound:
            self.channel = None  # the broker closed the channel over it
            return 0
        except Exception:
            self.channel = None
            with contextlib.suppress(Exception):
                self.conn.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.release()


class SqsReady:
    """ApproximateNumberOfMessages: visible messages, in-flight (received) ones apart."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        url = settings.sqs_queue_url
        endpoint = None
        if url:
            parts = urlsplit(url)
            if parts.hostname and not parts.hostname.endswith("amazonaws.com"):
                endpoint = f"{parts.scheme}://{parts.netloc}"  # a local SQS (tests)
        self.sqs = boto3.client(
            "sqs",
            region_name=settings.aws_region,
            endpoint_url=endpoint,
            config=Config(connect_timeout=5, read_timeout=5, retries={"max_attempts": 2}),
        )
        self.url = url or self.sqs.get_queue_url(QueueName=settings.queue)["QueueUrl"]

    def ready(self) -> int:
        return self.counts()[0]

    def counts(self) -> tuple[int, int]:
        """(visible, in flight): messages waiting, and messages received and not yet deleted."""
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=self.url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return (
            int(attrs["ApproximateNumberOfMessages"]),
            int(attrs["ApproximateNumberOfMessagesNotVisible"]),
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sqs.close()


def ready_count(settings: Settings) -> ReadyCount:
    """The reader of ready messages for the settings' broker and queue."""
    scheme = settings.broker_scheme
    if scheme in ("redis", "rediss"):
        return RedisReady(settings.broker_url, settings.queue, settings.tls_ca_file)
    if scheme in ("amqp", "amqps"):
        from app.celery_config import broker_ssl

        return AmqpReady(settings.broker_url, settings.queue, broker_ssl(settings))
    return SqsReady(settings)
