"""The workers: instance role, launch template, autoscaling group and termination hook.

The group starts empty (min 0) and only the queue-depth policies in
scaling.py change its desired capacity. Instances have no public address, no
SSH key and no inbound rule: operators reach them with Session Manager.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from app.names import BOOT_ERROR_TAG, METRIC_NAMESPACE, STACK_TAG, log_group
from infra.documents import AwsContext, allow, to_json

# Root device of Amazon Linux 2023 AMIs.
ROOT_DEVICE = "/dev/xvda"
# Seconds before a new instance's numbers count for scaling: boot, install, start.
WARMUP_SECONDS = 180
GROUP_METRICS = [
    aws.autoscaling.Metric.GROUP_DESIRED_CAPACITY,
    aws.autoscaling.Metric.GROUP_IN_SERVICE_INSTANCES,
    aws.autoscaling.Metric.GROUP_PENDING_INSTANCES,
    aws.autoscaling.Metric.GROUP_TERMINATING_INSTANCES,
    aws.autoscaling.Metric.GROUP_TOTAL_INSTANCES,
]


@dataclass
class WorkerFleetArgs:
    stack: str
    aws: AwsContext
    image_id: str
    instance_types: list[str]
    spot: bool
    on_demand_base_capacity: int
    max_instances: int
    root_volume_gb: int
    subnet_ids: Sequence[pulumi.Input[str]]
    worker_sg_id: pulumi.Input[str]
    # The rendered #cloud-config (plain text; base64 is done here).
    user_data: pulumi.Input[str]
    # What the workers may use: artifact, broker, result store.
    statements: list[dict[str, Any]]
    ssm_prefix: str
    log_retention_days: int
    lifecycle_heartbeat: int


class WorkerFleet(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: WorkerFleetArgs, opts: pulumi.ResourceOptions | None = None
    ):
        super().__init__("celery-fleet:infra:WorkerFleet", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))
        ctx = args.aws

        self.log_group = aws.cloudwatch.LogGroup(
            f"{name}-logs",
            name=log_group(args.stack),
            retention_in_days=args.log_retention_days,
            opts=child,
        )
        self.role = aws.iam.Role(
            f"{name}-role",
            description="Celery fleet workers",
            assume_role_policy=to_json(
                [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "ec2.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ]
            ),
            opts=child,
        )
        # Session Manager (shell and port forwarding) instead of SSH.
        aws.iam.RolePolicyAttachment(
            f"{name}-ssm-core",
            role=self.role.name,
            policy_arn=f"arn:{ctx.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore",
            opts=child,
        )
        profile = aws.iam.InstanceProfile(f"{name}-profile", role=self.role.name, opts=child)
        # What an instance needs from its first second (the artifact, broker,
        # result store, parameters, logs): granted before the launch template
        # and the group, which depend on it. On a code change the engine then
        # updates these grants before it starts the instance refresh, so a
        # new instance never meets AccessDenied on its first `aws s3 sync`.
        # The statements that name the group's ARN come after the group
        # (`{name}-policy` below), as only the group's creation makes that ARN.
        self.grants = aws.iam.RolePolicy(
            f"{name}-grants",
            role=self.role.name,
            policy=to_json([*args.statements, *self._own_statements(args)]),
            opts=child,
        )
        before_launch = pulumi.ResourceOptions.merge(
            child, pulumi.ResourceOptions(depends_on=[self.grants])
        )

        self.launch_template = aws.ec2.LaunchTemplate(
            f"{name}-lt",
            description="Celery fleet worker",
            image_id=args.image_id,
            # Instance types come from the group's overrides.
            iam_instance_profile={"arn": profile.arn},
            # IMDSv2 only, and one hop: a container on the host cannot reach the
            # instance's credentials (EC2.170).
            metadata_options={
                "http_endpoint": "enabled",
                "http_tokens": "required",
                "http_put_response_hop_limit": 1,
            },
            block_device_mappings=[
                {
                    "device_name": ROOT_DEVICE,
                    "ebs": {
                        "volume_size": args.root_volume_gb,
                        "volume_type": "gp3",
                        "encrypted": "true",
                        "delete_on_termination": "true",
                    },
                }
            ],
            # Private address only (EC2.25); no key pair: there is no SSH.
            network_interfaces=[
                {
                    "device_index": 0,
                    "associate_public_ip_address": "false",
                    "security_groups": [args.worker_sg_id],
                    "delete_on_termination": "true",
                }
            ],
            user_data=pulumi.Output.from_input(args.user_data).apply(
                lambda text: base64.b64encode(text.encode()).decode()
            ),
            tag_specifications=[{"resource_type": "volume", "tags": {STACK_TAG: args.stack}}],
            update_default_version=True,
            opts=before_launch,
        )

        self.group = aws.autoscaling.Group(
            f"{name}-asg",
            # Empty until there is work; desired capacity belongs to the scaling policies.
            min_size=0,
            max_size=args.max_instances,
            vpc_zone_identifiers=args.subnet_ids,
            mixed_instances_policy={
                "launch_template": {
                    "launch_template_specification": {
                        "launch_template_id": self.launch_template.id,
                        # The exact version, so a new template version is a
                        # change of the group and starts the instance refresh.
                        "version": self.launch_template.latest_version.apply(str),
                    },
                    "overrides": [{"instance_type": t} for t in args.instance_types],
                },
                "instances_distribution": {
                    "on_demand_base_capacity": args.on_demand_base_capacity,
                    "on_demand_percentage_above_base_capacity": 0 if args.spot else 100,
                    # Spot from the deepest pools at a low price: fewer interruptions
                    # than lowest-price, and acks_late redelivers what one interrupts.
                    "spot_allocation_strategy": "price-capacity-optimized",
                },
            },
            # Replace a Spot instance AWS warns about before it is taken away.
            capacity_rebalance=True,
            # Target tracking divides by GroupInServiceInstances; AWS publishes
            # group metrics only when asked.
            enabled_metrics=GROUP_METRICS,
            metrics_granularity="1Minute",
            default_instance_warmup=WARMUP_SECONDS,
            health_check_type="EC2",
            health_check_grace_period=WARMUP_SECONDS,
            instance_refresh={
                "strategy": "Rolling",
                "preferences": {
                    "min_healthy_percentage": 50,
                    "skip_matching": True,
                    # The drain agent protects every busy instance from scale-in;
                    # AWS's default (Wait) would wait on them until the refresh
                    # fails, leaving them on the old code. Refresh replaces them
                    # too: their termination waits on the lifecycle hook below,
                    # which the agent holds until their batches are done.
                    "scale_in_protected_instances": "Refresh",
                    # Nothing here puts an instance in Standby, but one there still
                    # runs the old worker: replace it too rather than wait (and fail).
                    "standby_instances": "Terminate",
                },
            },
            tags=[
                # Ops tools (status, drain, logs) find the stack's hosts by this tag.
                {"key": STACK_TAG, "value": args.stack, "propagate_at_launch": True},
                {"key": "Name", "value": f"celery-fleet-{args.stack}", "propagate_at_launch": True},
            ],
            opts=before_launch,
        )

        # Termination waits (up to the heartbeat) for the worker to finish its
        # batches; CONTINUE terminates anyway when nobody answers in time.
        aws.autoscaling.LifecycleHook(
            f"{name}-drain",
            autoscaling_group_name=self.group.name,
            lifecycle_transition="autoscaling:EC2_INSTANCE_TERMINATING",
            heartbeat_timeout=args.lifecycle_heartbeat,
            default_result="CONTINUE",
            opts=child,
        )

        aws.iam.RolePolicy(
            f"{name}-policy",
            role=self.role.name,
            policy=to_json(self._group_statements(args)),
            opts=child,
        )

        self.group_name = self.group.name
        self.register_outputs({"group_name": self.group.name, "log_group": self.log_group.name})

    def _own_statements(self, args: WorkerFleetArgs) -> list[dict[str, Any]]:
        """The role's own statements that need no ARN of the group (granted before it)."""
        ctx = args.aws
        path = ctx.arn("ssm", f"parameter{args.ssm_prefix.rstrip('/')}")
        parameters = [path, f"{path}/*"]
        return [
            allow(
                ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"],
                parameters,
                "ReadStackParameters",
            ),
            # AmazonSSMManagedInstanceCore grants ssm:GetParameter(s) on "*",
            # which would let a worker read every parameter (and, through the
            # aws/ssm key, every SecureString) in the account.
            {
                "Sid": "OnlyStackParameters",
                "Effect": "Deny",
                "Action": ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"],
                "NotResource": parameters,
            },
            # Not needed with the aws/ssm key (its key policy allows any principal
            # of the account through SSM); kept so a customer managed key works
            # too, limited to decrypting this stack's parameters through SSM.
            allow(
                ["kms:Decrypt"],
                [ctx.arn("kms", "key/*")],
                "DecryptStackParameters",
                StringEquals={"kms:ViaService": f"ssm.{ctx.region}.amazonaws.com"},
                StringLike={"kms:EncryptionContext:PARAMETER_ARN": f"{path}/*"},
            ),
            # PutMetricData has no resource to name; the namespace condition is the fence.
            allow(
                ["cloudwatch:PutMetricData"],
                ["*"],
                "PublishFleetMetrics",
                # The launchers' namespace (app/names.py) is the only one the role may write to.
                StringEquals={"cloudwatch:namespace": METRIC_NAMESPACE},
            ),
            allow(
                ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                [self.log_group.arn, pulumi.Output.concat(self.log_group.arn, ":log-stream:*")],
                "WriteWorkerLogs",
            ),
            # The drain agent (app/host/agent.py) finds its group and hook by asking:
            # the hook's name is Pulumi's to choose. Read-only, and these Describe
            # calls take no resource-level permissions.
            allow(
                ["autoscaling:DescribeAutoScalingInstances", "autoscaling:DescribeLifecycleHooks"],
                ["*"],
                "FindOwnGroupAndHook",
            ),
            # A failed boot says why on its own instance, and only in that one
            # tag: the instance must carry this stack's tag (propagated by the
            # group at launch), and the request may set no other tag key.
            allow(
                ["ec2:CreateTags"],
                [ctx.arn("ec2", "instance/*")],
                "TagOwnBootError",
                StringEquals={f"aws:ResourceTag/{STACK_TAG}": args.stack},
                **{"ForAllValues:StringEquals": {"aws:TagKeys": [BOOT_ERROR_TAG]}},
            ),
        ]

    def _group_statements(self, args: WorkerFleetArgs) -> list[dict[str, Any]]:
        """The statements that name the group's ARN: in a policy created after the group."""
        return [
            # The drain on termination: keep the hook alive, then let it go.
            allow(
                [
                    "autoscaling:CompleteLifecycleAction",
                    "autoscaling:RecordLifecycleActionHeartbeat",
                    "autoscaling:SetInstanceProtection",
                ],
                [self.group.arn],
                "DrainOnTermination",
            ),
            # A failed boot takes its own instance out of service at once, so the
            # group replaces it instead of keeping a worker that never runs.
            allow(["autoscaling:SetInstanceHealth"], [self.group.arn], "MarkOwnInstanceUnhealthy"),
        ]
