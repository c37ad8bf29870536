"""The stack, wired from its components; `build` is the whole program.

`__main__.py` calls `build(load_config())`; the tests call it with a
StackConfig per combination and a fake artifact builder, under Pulumi mocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from app.names import DUALSTACK_VARIABLE, STACK_TAG
from infra.artifact import REPO_ROOT, Artifact, ArtifactArgs, Builder, build_wheelhouse
from infra.broker import RabbitBroker, RabbitBrokerArgs, SqsBroker, SqsBrokerArgs

# Re-exported: tests/infra/test_cost.py checks `fleet cost` counts the same endpoints.
from infra.config import WORKER_SERVICES as WORKER_SERVICES
from infra.config import InstanceFacts, StackConfig, StackConfigError, instance_facts
from infra.dashboard import Dashboard, DashboardArgs
from infra.documents import AwsContext, allow
from infra.fleet import WARMUP_SECONDS, WorkerFleet, WorkerFleetArgs
from infra.network import Network, NetworkArgs
from infra.parameters import SsmParameters, SsmParametersArgs
from infra.result_store import (
    RedisResultStore,
    RedisResultStoreArgs,
    S3ResultStore,
    S3ResultStoreArgs,
)
from infra.scaling import QueueScaling, QueueScalingArgs
from infra.userdata import render_user_data


@dataclass
class Stack:
    """What `build` made: the stack outputs, and the components for tests to inspect."""

    outputs: dict[str, pulumi.Input[str]]
    network: Network
    broker: SqsBroker | RabbitBroker
    results: S3ResultStore | RedisResultStore
    artifact: Artifact
    parameters: SsmParameters
    fleet: WorkerFleet
    scaling: QueueScaling
    user_data: pulumi.Output[str]


def build(cfg: StackConfig, builder: Builder = build_wheelhouse) -> Stack:
    # One explicit provider, so every resource carries the stack tag without
    # each component repeating it.
    provider = aws.Provider(
        "aws",
        region=aws.config.region,
        default_tags={"tags": {STACK_TAG: cfg.stack, **cfg.tags}},
    )
    opts = pulumi.ResourceOptions(providers={"aws": provider})

    # Plain values, read now: the number of zones decides how many subnets
    # exist. These synchronous lookups use the default provider (the same
    # aws:region), so they never wait on the explicit provider's registration.
    region = aws.get_region().region
    ctx = AwsContext(
        partition=aws.get_partition().partition,
        region=region,
        account=aws.get_caller_identity().account_id,
    )
    zones = aws.get_availability_zones(
        state="available",
        # Regular zones only: Local and Wavelength zones lack most instance types.
        filters=[{"name": "opt-in-status", "values": ["opt-in-not-required"]}],
    ).names
    if len(zones) < cfg.az_count:
        raise pulumi.RunError(
            f"celery-fleet:azCount={cfg.az_count} but {region} offers {len(zones)} zones."
        )

    # The instance types' vCPUs (the scaling target) and architecture (the AMI,
    # the wheels) as EC2 describes them, not as their names suggest.
    cfg = cfg.with_instance_facts(describe_instance_types(cfg.instance_types, region))

    network = Network(
        "network",
        NetworkArgs(
            cidr=cfg.vpc_cidr,
            availability_zones=sorted(zones)[: cfg.az_count],
            nat=cfg.nat,
            region=region,
            endpoint_services=cfg.endpoint_services,
        ),
        opts=opts,
    )
    subnets = network.private_subnet_ids

    # Built now, while the program runs, so the version is a plain string. The project
    # directories are relative to Pulumi.yaml, which is in REPO_ROOT.
    wheelhouse = builder([REPO_ROOT / path for path in cfg.code], cfg.arch)
    artifact = Artifact("artifacts", ArtifactArgs(wheelhouse=wheelhouse), opts)

    queue_name = cfg.resource_prefix
    broker: SqsBroker | RabbitBroker
    if cfg.broker == "sqs":
        broker = SqsBroker(
            "broker",
            SqsBrokerArgs(
                queue_name=queue_name,
                visibility_timeout=cfg.visibility_timeout,
                max_receive_count=cfg.max_receive_count,
            ),
            opts,
        )
    else:
        broker = RabbitBroker(
            "broker",
            RabbitBrokerArgs(
                broker_name=cfg.resource_prefix,
                queue_name=queue_name,
                deployment_mode=cfg.broker_deployment_mode,
                instance_type=cfg.resolved_broker_instance_type,
                vpc_id=network.vpc_id,
                subnet_ids=subnets,
                worker_sg_id=network.worker_sg_id,
                consumer_timeout_ms=cfg.consumer_timeout_ms,
            ),
            opts,
        )

    results: S3ResultStore | RedisResultStore
    if cfg.resolved_result_store == "s3":
        results = S3ResultStore("results", S3ResultStoreArgs(ttl_days=cfg.result_ttl_days), opts)
    else:
        results = RedisResultStore(
            "results",
            RedisResultStoreArgs(
                node_type=cfg.redis_node_type,
                vpc_id=network.vpc_id,
                subnet_ids=subnets,
                worker_sg_id=network.worker_sg_id,
            ),
            opts,
        )

    parameters = SsmParameters(
        "connection",
        SsmParametersArgs(
            prefix=cfg.ssm_prefix,
            queue_name=broker.queue_name,
            max_batch_seconds=cfg.max_batch_seconds,
            result_ttl_seconds=cfg.result_ttl_seconds,
            code_version=artifact.version,
            broker=broker.service,
            results=results.service,
            sink_password=cfg.sink_password,
        ),
        opts,
    )

    user_data = artifact.uri.apply(
        lambda uri: render_user_data(
            {
                "FLEET_SSM_PREFIX": cfg.ssm_prefix,
                "FLEET_ARTIFACT": uri,
                "AWS_DEFAULT_REGION": region,
                # nat: ipv6: the aws CLI, boto3 and the CloudWatch agent call AWS at its
                # dual-stack endpoints (app.boot hands it on to the worker and agent).
                **({DUALSTACK_VARIABLE: "true"} if cfg.dualstack else {}),
            }
        )
    )
    fleet = WorkerFleet(
        "fleet",
        WorkerFleetArgs(
            stack=cfg.stack,
            aws=ctx,
            image_id=cfg.image_id,
            instance_types=list(cfg.instance_types),
            spot=cfg.spot,
            on_demand_base_capacity=cfg.on_demand_base_capacity,
            max_instances=cfg.max_instances,
            root_volume_gb=cfg.root_volume_gb,
            subnet_ids=subnets,
            worker_sg_id=network.worker_sg_id,
            user_data=user_data,
            statements=[
                *artifact.worker_statements,
                *broker.service.worker_statements,
                *results.service.worker_statements,
                *output_statements(cfg, ctx),
            ],
            ssm_prefix=cfg.ssm_prefix,
            log_retention_days=cfg.log_retention_days,
            lifecycle_heartbeat=cfg.lifecycle_heartbeat,
        ),
        # The first instance must find its settings in Parameter Store.
        pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(depends_on=[parameters])),
    )

    scaling = QueueScaling(
        "scaling",
        QueueScalingArgs(
            group_name=fleet.group_name,
            depth=broker.depth.with_held_batches(cfg.stack),
            target_backlog_per_instance=cfg.target_backlog_per_instance,
            idle_minutes=cfg.idle_minutes,
            warmup_seconds=WARMUP_SECONDS,
        ),
        opts,
    )
    dashboard = Dashboard(
        "dashboard",
        DashboardArgs(
            dashboard_name=cfg.resource_prefix,
            region=region,
            stack=cfg.stack,
            group_name=fleet.group_name,
            depth=broker.depth,
        ),
        opts,
    )

    outputs: dict[str, pulumi.Input[str]] = {
        "region": region,
        "vpcId": network.vpc_id,
        "asgName": fleet.group_name,
        "artifactBucket": artifact.bucket.name,
        "artifactPrefix": artifact.prefix,
        "codeVersion": artifact.version,
        "ssmPrefix": cfg.ssm_prefix,
        "dashboardName": dashboard.name,
        "logGroup": fleet.log_group.name,
        **broker.service.outputs,
        **results.service.outputs,
    }
    return Stack(
        outputs=outputs,
        network=network,
        broker=broker,
        results=results,
        artifact=artifact,
        parameters=parameters,
        fleet=fleet,
        scaling=scaling,
        user_data=user_data,
    )


def output_statements(cfg: StackConfig, ctx: AwsContext) -> list[dict[str, Any]]:
    """The S3 sink's grant (app/sinks/s3.py): each worker writes its batches' parts, with a
    conditional put, into the buckets of celery-fleet:outputBuckets and nowhere else. The
    manifest and the write check are the launcher's, with its user's own credentials. And
    the ID sources' (celery-fleet:inputBuckets): GetObject, for a submitted job's driver."""
    statements = []
    if cfg.output_buckets:
        parts = [f"arn:{ctx.partition}:s3:::{bucket}/*" for bucket in cfg.output_buckets]
        statements.append(allow(["s3:PutObject"], parts, "WriteOutputs"))
    if cfg.input_buckets:
        # A submitted job's driver runs on a worker and reads `--ids s3://...` itself.
        objects = [f"arn:{ctx.partition}:s3:::{bucket}/*" for bucket in cfg.input_buckets]
        statements.append(allow(["s3:GetObject"], objects, "ReadInputs"))
    return statements


def describe_instance_types(instance_types: tuple[str, ...], region: str) -> InstanceFacts:
    """The one vCPU count and architecture of `instance_types`, from EC2 (a plain value now)."""
    described: dict[str, tuple[int, list[str]]] = {}
    for instance_type in instance_types:
        try:
            found = aws.ec2.get_instance_type(instance_type=instance_type)
        except Exception as exc:
            raise pulumi.RunError(
                f"celery-fleet:instanceTypes: EC2 in {region} does not describe "
                f"{instance_type!r} ({exc}); list instance types this region offers, "
                "e.g. c7i.xlarge."
            ) from None
        described[instance_type] = (found.default_vcpus, list(found.supported_architectures))
    try:
        return instance_facts(described)
    except StackConfigError as exc:
        # pulumi prints a RunError as the message alone, without a traceback.
        raise pulumi.RunError(str(exc)) from None
