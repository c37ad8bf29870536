"""What the rest of the stack needs to know about a broker or a result store.

Each backend (SQS, RabbitMQ, S3, Redis) is its own component; they all hand
back an `Endpoint`, so the connection parameters, the worker role and the stack
outputs are written once, whatever the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi_aws.autoscaling import (
    PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricArgsDict as TrackingMetric,
)
from pulumi_aws.cloudwatch import MetricAlarmMetricQueryArgsDict as AlarmQuery

from app.names import HELD_BATCHES_METRIC, METRIC_DIMENSION, METRIC_NAMESPACE

# Every queue and group metric used for scaling is read per minute.
PERIOD = 60


@dataclass
class Endpoint:
    # The URL the workers and the launcher use, without any secret in it: where
    # a password belongs it holds "user@" and the password is in `secret`.
    url: pulumi.Output[str]
    # Password or auth token, a Pulumi secret; None where IAM does the job.
    secret: pulumi.Output[str] | None = None
    # IAM statements the workers need to use the service.
    worker_statements: list[dict[str, Any]] = field(default_factory=list)
    # Extra plain-text connection parameters, e.g. the SQS queue URL.
    parameters: dict[str, pulumi.Input[str]] = field(default_factory=dict)
    # Stack outputs, by export name.
    outputs: dict[str, pulumi.Input[str]] = field(default_factory=dict)


@dataclass
class MetricSpec:
    """One CloudWatch metric, written once for the scaling policy, the alarms and the dashboard."""

    id: str
    namespace: str
    name: str
    dimensions: dict[str, pulumi.Input[str]]
    stat: str

    def for_target_tracking(self) -> TrackingMetric:
        # Inline, not in a variable: the dicts are then checked as the TypedDicts Pulumi expects.
        return {
            "id": self.id,
            "metric_stat": {
                "metric": {
                    "namespace": self.namespace,
                    "metric_name": self.name,
                    "dimensions": [{"name": k, "value": v} for k, v in self.dimensions.items()],
                },
                "stat": self.stat,
                "period": PERIOD,
            },
            "return_data": False,
        }

    def for_alarm(self) -> AlarmQuery:
        return {
            "id": self.id,
            "metric": {
                "namespace": self.namespace,
                "metric_name": self.name,
                "dimensions": self.dimensions,
                "stat": self.stat,
                "period": PERIOD,
            },
            "return_data": False,
        }

    def for_dashboard(self, visible: bool = False) -> list[Any]:
        dimensions = [part for item in self.dimensions.items() for part in item]
        return [
            self.namespace,
            self.name,
            *dimensions,
            {"id": self.id, "stat": self.stat, "visible": visible},
        ]


@dataclass
class QueueDepth:
    """Messages waiting or running on the work queue, as metric math over `metrics`."""

    metrics: list[MetricSpec]
    expression: str

    def with_held_batches(self, stack: str) -> QueueDepth:
        """The depth plus the batches launchers hold back (app/launcher/metrics.py).

        The launcher keeps only a couple of batches per worker slot on the
        broker, so the queue alone cannot show a long job: a fleet scaled on it
        would double once per boot. FILL: no launcher running means none held.
        """
        held = MetricSpec(
            "held", METRIC_NAMESPACE, HELD_BATCHES_METRIC, {METRIC_DIMENSION: stack}, "Maximum"
        )
        return QueueDepth([*self.metrics, held], f"{self.expression} + FILL(held, 0)")
