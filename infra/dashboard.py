"""One CloudWatch dashboard: is there work, how many instances, are they busy, how fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from app.names import (
    BATCHES_COMPLETED_METRIC,
    BUSY_SLOTS_METRIC,
    INSTANCE_DIMENSION,
    METRIC_DIMENSION,
    METRIC_NAMESPACE,
    WORKER_BATCHES_METRIC,
)
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
    """A 12x6 graph; `position` fills a grid two wide, left to right, top to bottom."""
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


def per_instance(metric: str, stack: str, stat: str, qid: str) -> list[Any]:
    """One line per instance of a metric the workers publish (app/worker/heartbeat.py): a
    SEARCH, as the instances come and go; labelled by instance id."""
    search = (
        f"{{{METRIC_NAMESPACE},{INSTANCE_DIMENSION},{METRIC_DIMENSION}}} "
        f'MetricName="{metric}" {METRIC_DIMENSION}="{stack}"'
    )
    return [{"id": qid, "expression": f"SEARCH('{search}', '{stat}', {PERIOD})"}]


def fleet_total(metric: str, stack: str, qid: str) -> list[Any]:
    """The workers' metric for the whole stack (dimension Stack alone): their sum."""
    return [
        METRIC_NAMESPACE,
        metric,
        METRIC_DIMENSION,
        stack,
        {"id": qid, "stat": "Sum", "label": "all instances"},
    ]


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
            # Published by every worker each minute (FLEET_METRICS=cloudwatch), whatever the
            # broker: per instance, and for the stack.
            (
                "Busy slots (running batches)",
                [
                    fleet_total(BUSY_SLOTS_METRIC, args.stack, "busy"),
                    per_instance(BUSY_SLOTS_METRIC, args.stack, "Average", "busy_each"),
                ],
                "Sum",
            ),
            (
                "Batches finished per minute, by the workers",
                [
                    fleet_total(WORKER_BATCHES_METRIC, args.stack, "done"),
                    per_instance(WORKER_BATCHES_METRIC, args.stack, "Sum", "done_each"),
                ],
                "Sum",
            ),
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
