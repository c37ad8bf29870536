"""What a --stack job tells CloudWatch, for the stack's scaling and dashboard."""

from __future__ import annotations

import time
from typing import Any

from app.launcher.output import say
from app.names import (
    BATCHES_COMPLETED_METRIC,
    HELD_BATCHES_METRIC,
    METRIC_DIMENSION,
    METRIC_NAMESPACE,
)


class StackMetrics:
    """The launcher's metrics (namespace CeleryFleet, dimension Stack).

    HeldBatches: what the launcher holds back. The stack scales on (queue
    depth + held batches) per instance (infra/scaling.py), so a long job grows
    the fleet at once instead of doubling it once per boot. BatchesCompleted:
    batches written since the last call, for the stack's dashboard.

    Published at most every PERIOD seconds, and at once when the held count
    drops to zero; a failure to publish never stops a job.
    """

    PERIOD = 20.0

    def __init__(self, stack: str, region: str | None) -> None:
        self.stack = stack
        self.region = region
        self.client: Any = None
        self.last: tuple[float, int] = (0.0, -1)
        self.completed = 0  # batches written, not published yet

    def publish(self, held: int, completed: int = 0) -> None:
        self.completed += completed
        at, value = self.last
        now = time.monotonic()
        if now - at < self.PERIOD and (held != 0 or value == 0):
            return
        dimensions = [{"Name": METRIC_DIMENSION, "Value": self.stack}]
        data = [
            {
                "MetricName": HELD_BATCHES_METRIC,
                "Value": float(held),
                "Unit": "Count",
                "Dimensions": dimensions,
            }
        ]
        if self.completed:
            data.append(
                {
                    "MetricName": BATCHES_COMPLETED_METRIC,
                    "Value": float(self.completed),
                    "Unit": "Count",
                    "Dimensions": dimensions,
                }
            )
        self.last = (now, held)
        try:
            if self.client is None:
                import boto3

                self.client = boto3.client("cloudwatch", region_name=self.region)
            self.client.put_metric_data(Namespace=METRIC_NAMESPACE, MetricData=data)
            self.completed = 0
        except Exception as exc:
            say(
                f"could not publish {HELD_BATCHES_METRIC} to CloudWatch ({exc}); the fleet "
                "scales on queue depth alone"
            )
