"""The message broker: SQS (default) or RabbitMQ on Amazon MQ.

SQS costs nothing while idle and needs no network path or password: the
workers' IAM role is the credential. RabbitMQ is there for users who want
AMQP semantics; it runs inside the private subnets and only the workers'
security group may reach it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from app.settings import parameter_name
from infra.documents import allow, deny_insecure_transport, to_json
from infra.endpoint import Endpoint, MetricSpec, QueueDepth
from infra.network import allow_tcp

# Messages that fail this long are kept for inspection in the dead-letter queue.
DEAD_LETTER_RETENTION = 14 * 24 * 3600
AMQPS_PORT = 5671
BROKER_USER = "fleet"
# 3.13 is only offered with automatic minor upgrades, which also keeps the
# broker patched (MQ.3). The broker and its configuration name the same version.
RABBITMQ_VERSION = "3.13"


@dataclass
class SqsBrokerArgs:
    # Celery's queue name is the SQS queue name; kombu finds the queue by it.
    queue_name: str
    visibility_timeout: int
    max_receive_count: int


class SqsBroker(pulumi.ComponentResource):
    def __init__(self, name: str, args: SqsBrokerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("celery-fleet:infra:SqsBroker", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        dead_letters = aws.sqs.Queue(
            f"{name}-dlq",
            name=f"{args.queue_name}-dlq",
            sqs_managed_sse_enabled=True,
            message_retention_seconds=DEAD_LETTER_RETENTION,
            opts=child,
        )
        self.queue = aws.sqs.Queue(
            f"{name}-queue",
            name=args.queue_name,
            sqs_managed_sse_enabled=True,
            # A batch that is still running must not be handed to a second worker.
            visibility_timeout_seconds=args.visibility_timeout,
            # Long polling: idle workers make one request per 20 s, not a stream of empty ones.
            receive_wait_time_seconds=20,
            # A batch whose worker dies this many times is poison; park it
            # rather than let it kill worker after worker.
            redrive_policy=pulumi.Output.json_dumps(
                {"deadLetterTargetArn": dead_letters.arn, "maxReceiveCount": args.max_receive_count}
            ),
            opts=child,
        )
        for suffix, queue in (("queue", self.queue), ("dlq", dead_letters)):
            aws.sqs.QueuePolicy(
                f"{name}-{suffix}-policy",
                queue_url=queue.url,
                policy=to_json([deny_insecure_transport("sqs:*", [queue.arn])]),
                opts=child,
            )

        self.queue_name = self.queue.name
        # Without the `predefined_queues` transport option kombu calls
        # sqs:ListQueues (on "*") and may create queues. The queue's URL is
        # published (queue_url; FLEET_SQS_QUEUE_URL for app/settings.py, which
        # sets predefined_queues from it), so the workers get neither permission.
        self.service = Endpoint(
            url=pulumi.Output.from_input("sqs://"),
            worker_statements=[
                allow(
                    [
                        "sqs:ReceiveMessage",
                        "sqs:DeleteMessage",
                        "sqs:SendMessage",
                        "sqs:ChangeMessageVisibility",
                        "sqs:GetQueueAttributes",
                        "sqs:GetQueueUrl",
                    ],
                    [self.queue.arn],
                    "UseWorkQueue",
                )
            ],
            parameters={parameter_name("sqs_queue_url"): self.queue.url},
            outputs={"queueName": self.queue.name, "queueUrl": self.queue.url},
        )
        # Waiting and in-flight messages: a running batch is still work for the fleet.
        self.depth = QueueDepth(
            metrics=[
                MetricSpec(metric_id, "AWS/SQS", metric, {"QueueName": self.queue.name}, "Maximum")
                for metric_id, metric in (
                    ("visible", "ApproximateNumberOfMessagesVisible"),
                    ("inflight", "ApproximateNumberOfMessagesNotVisible"),
                )
            ],
            expression="visible + inflight",
        )
        self.register_outputs({"queue_name": self.queue.name, "queue_url": self.queue.url})


@dataclass
class RabbitBrokerArgs:
    broker_name: str
    queue_name: str
    deployment_mode: str
    instance_type: str
    vpc_id: pulumi.Input[str]
    subnet_ids: Sequence[pulumi.Input[str]]
    worker_sg_id: pulumi.Input[str]
    # Longest a consumer may hold a message unacked (StackConfig.consumer_timeout_ms).
    consumer_timeout_ms: int


class RabbitBroker(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: RabbitBrokerArgs, opts: pulumi.ResourceOptions | None = None
    ):
        super().__init__("celery-fleet:infra:RabbitBroker", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        # Generated once and kept in the (encrypted) stack state, so it is the
        # same on every run without anyone choosing or storing it. Letters and
        # digits only: Amazon MQ refuses ",:=" and the URL needs no escaping.
        password = random.RandomPassword(f"{name}-password", length=32, special=False, opts=child)
        self.password: pulumi.Output[str] = pulumi.Output.secret(password.result)

        sg = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=args.vpc_id,
            description="RabbitMQ broker: AMQPS from the workers only",
            tags={"Name": f"{name}-broker"},
            opts=child,
        )
        allow_tcp(f"{name}-amqps", sg.id, args.worker_sg_id, AMQPS_PORT, child)

        # Amazon MQ's default consumer_timeout is 30 minutes: RabbitMQ would close
        # the channel of a worker still running (or still holding, prefetched) a
        # longer batch, and redeliver it to another worker.
        self.configuration = aws.mq.Configuration(
            f"{name}-config",
            name=args.broker_name,
            description="Celery fleet broker: consumer_timeout above the longest batch",
            engine_type="RabbitMQ",
            engine_version=RABBITMQ_VERSION,
            data=f"consumer_timeout = {args.consumer_timeout_ms}\n",
            opts=child,
        )

        single = args.deployment_mode == "SINGLE_INSTANCE"
        self.broker = aws.mq.Broker(
            name,
            broker_name=args.broker_name,
            engine_type="RabbitMQ",
            engine_version=RABBITMQ_VERSION,
            configuration={
                "id": self.configuration.id,
                "revision": self.configuration.latest_revision,
            },
            auto_minor_version_upgrade=True,
            host_instance_type=args.instance_type,
            deployment_mode=args.deployment_mode,
            publicly_accessible=False,
            # A single broker takes one subnet; a cluster spreads over them all.
            subnet_ids=args.subnet_ids[:1] if single else args.subnet_ids,
            security_groups=[sg.id],
            # Amazon MQ always encrypts at rest; say so, with the AWS owned key.
            encryption_options={"use_aws_owned_key": True},
            users=[{"username": BROKER_USER, "password": self.password}],
            opts=child,
        )

        # The SDK types `endpoints` optional; a created broker always has them (the
        # callback does not run while the broker is still unknown, in a preview).
        endpoint = self.broker.instances.apply(
            lambda instances: instances[0].endpoints[0]  # type: ignore[index]
        )
        self.service = Endpoint(
            # vhost "/" is the trailing "//"; the boot script puts the password after "fleet".
            url=endpoint.apply(lambda e: f"amqps://{BROKER_USER}@{urlsplit(e).netloc}//"),
            secret=self.password,
            outputs={"brokerEndpoint": endpoint, "queueName": args.queue_name},
        )
        # MessageCount counts ready and unacknowledged messages, like SQS's two.
        self.depth = QueueDepth(
            metrics=[
                MetricSpec(
                    "messages",
                    "AWS/AmazonMQ",
                    "MessageCount",
                    {"Broker": args.broker_name, "VirtualHost": "/", "Queue": args.queue_name},
                    "Maximum",
                )
            ],
            expression="messages",
        )
        self.queue_name = pulumi.Output.from_input(args.queue_name)
        self.register_outputs({"endpoint": endpoint})
