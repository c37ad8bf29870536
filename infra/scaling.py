"""Scale the worker group on queue depth: from zero, with the backlog, and back to zero.

Three pieces, because target tracking alone cannot do the whole job:

1. Target tracking on backlog per instance = queue depth / in-service
   instances (CloudWatch metric math), kept at `target`. This sizes a running
   fleet in both directions. It cannot start an empty group: with no instance
   in service the division has no value and the policy does nothing.
2. Wake: an alarm on IF(desired == 0 AND depth > 0) sets the group to one
   instance. Once that instance is in service, target tracking takes over.
   The condition reads the *desired* capacity, so the alarm never lowers a
   group that is still starting instances.
3. Idle: an alarm on IF(desired > 0 AND depth == 0) held for `idle_minutes`
   sets the group to zero. Target tracking would also shrink an idle fleet,
   but its scale-in is deliberately slow and cautious; this makes "nothing to
   do for N minutes costs nothing" a rule rather than a hope. Depth counts
   in-flight messages too, so a fleet still running its last batches is never
   idle; instances that do stop drain through the lifecycle hook.

Both alarms treat missing data as "not breaching": SQS stops publishing for a
queue idle for hours, and no data must never wake or kill the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.endpoint import MetricSpec, QueueDepth


def group_metric(metric_id: str, name: str, group_name: pulumi.Input[str]) -> MetricSpec:
    return MetricSpec(
        metric_id, "AWS/AutoScaling", name, {"AutoScalingGroupName": group_name}, "Average"
    )


@dataclass
class QueueScalingArgs:
    group_name: pulumi.Input[str]
    depth: QueueDepth
    target_backlog_per_instance: float
    idle_minutes: int
    warmup_seconds: int


class QueueScaling(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: QueueScalingArgs, opts: pulumi.ResourceOptions | None = None
    ):
        super().__init__("celery-fleet:infra:QueueScaling", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        depth = f"({args.depth.expression})"
        in_service = group_metric("instances", "GroupInServiceInstances", args.group_name)
        desired = group_metric("desired", "GroupDesiredCapacity", args.group_name)

        self.target_tracking = aws.autoscaling.Policy(
            f"{name}-backlog",
            autoscaling_group_name=args.group_name,
            policy_type="TargetTrackingScaling",
            estimated_instance_warmup=args.warmup_seconds,
            target_tracking_configuration={
                "target_value": args.target_backlog_per_instance,
                "customized_metric_specification": {
                    "metrics": [
                        *(m.for_target_tracking() for m in args.depth.metrics),
                        in_service.for_target_tracking(),
                        {
                            "id": "backlog",
                            "expression": f"{depth} / instances",
                            "label": "Messages per in-service instance",
                            "return_data": True,
                        },
                    ]
                },
            },
            opts=child,
        )

        self.wake_alarm = self._set_capacity_on_alarm(
            f"{name}-wake",
            args,
            capacity=1,
            condition=f"IF(desired == 0 AND {depth} > 0, 1, 0)",
            minutes=1,
            metrics=[*args.depth.metrics, desired],
            description="Work is queued and the fleet is empty: start one instance",
            opts=child,
        )
        self.idle_alarm = self._set_capacity_on_alarm(
            f"{name}-idle",
            args,
            capacity=0,
            condition=f"IF(desired > 0 AND {depth} == 0, 1, 0)",
            minutes=args.idle_minutes,
            metrics=[*args.depth.metrics, desired],
            description=f"No work for {args.idle_minutes} minutes: stop every instance",
            opts=child,
        )
        self.register_outputs({"target_tracking": self.target_tracking.name})

    @staticmethod
    def _set_capacity_on_alarm(
        name: str,
        args: QueueScalingArgs,
        *,
        capacity: int,
        condition: str,
        minutes: int,
        metrics: list[MetricSpec],
        description: str,
        opts: pulumi.ResourceOptions,
    ) -> aws.cloudwatch.MetricAlarm:
        """A step policy that sets the group to `capacity`, fired while `condition` is 1."""
        policy = aws.autoscaling.Policy(
            name,
            autoscaling_group_name=args.group_name,
            policy_type="StepScaling",
            adjustment_type="ExactCapacity",
            # The alarm fires only on condition == 1, so one step from 0 up covers it.
            step_adjustments=[{"scaling_adjustment": capacity, "metric_interval_lower_bound": "0"}],
            opts=opts,
        )
        return aws.cloudwatch.MetricAlarm(
            name,
            alarm_description=description,
            comparison_operator="GreaterThanOrEqualToThreshold",
            threshold=1,
            evaluation_periods=minutes,
            datapoints_to_alarm=minutes,
            treat_missing_data="notBreaching",
            metric_queries=[
                *(m.for_alarm() for m in metrics),
                {"id": "condition", "expression": condition, "return_data": True},
            ],
            alarm_actions=[policy.arn],
            opts=opts,
        )
