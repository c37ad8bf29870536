"""One CloudWatch dashboard: is there work, how many instances, are they busy, how fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from app.names import BATCHES_COMPLETED_METRIC, METRIC_DIMENSION, METRIC_NAMESPACE
from infra.endpoint import PERIOD, MetricSpec, QueueDepth
from infra.scaling import group_metric


@dataclass
class DashboardArgs:
    dashboard_name: str
    region: str
    stack: str
    group_name: pulumi.Input[str]
    depth: QueueDepth


def _widget(
    title: str, metrics: list[list[Any]], position: int, region: str, stat: str
) -> dict[str, Any]:
    """A 12x6 graph; `position` 0-3 fills a 2x2 grid left to right, top to bottom."""
    return {
        "type": "metric",
        "x": 12 * (position % 2),
        "y": 6 * (position // 2),
        "width": 12,
        "height": 6,
        "properties": {
            "title": title,
            "metrics": metrics,
            "period": PERIOD,
            "stat": stat,
            "region": region,
        },
    }


class Dashboard(pulumi.ComponentResource):
    def __init__(self, name: str, args: DashboardArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("celery-fleet:infra:Dashboard", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        in_service = group_metric("instances", "GroupInServiceInstances", args.group_name)
        desired = group_metric("desired", "GroupDesiredCapacity", args.group_name)
        cpu = MetricSpec(
            "cpu", "AWS/EC2", "CPUUtilization", {"AutoScalingGroupName": args.group_name}, "Average"
        )
        # Published by the workers, one per finished batch, dimension Stack.
        batches = MetricSpec(
            "batches",
            METRIC_NAMESPACE,
            BATCHES_COMPLETED_METRIC,
            {METRIC_DIMENSION: args.stack},
            "Sum",
        )
        depth = [
            *(m.for_dashboard() for m in args.depth.metrics),
            [{"id": "depth", "expression": args.depth.expression, "label": "Queue depth"}],
        ]
        graphs = [
            ("Queue depth (waiting + running)", depth, "Maximum"),
            ("Instances", [in_service.for_dashboard(True), desired.for_dashboard(True)], "Average"),
            ("CPU utilisation (%)", [cpu.for_dashboard(True)], "Average"),
            ("Batches per minute", [batches.for_dashboard(True)], "Sum"),
        ]
        body = {
            "widgets": [
                _widget(title, metrics, i, args.region, stat)
                for i, (title, metrics, stat) in enumerate(graphs)
            ]
        }

        self.dashboard = aws.cloudwatch.Dashboard(
            f"{name}-dashboard",
            dashboard_name=args.dashboard_name,
            dashboard_body=pulumi.Output.json_dumps(body),
            opts=child,
        )
        self.name = self.dashboard.dashboard_name
        self.register_outputs({"name": self.name})
