"""The typed stack config: defaults that work, and clear refusals."""

from __future__ import annotations

import pulumi
import pytest

from app.settings import Settings
from infra.config import (
    MAX_IDLE_MINUTES,
    InstanceFacts,
    StackConfig,
    StackConfigError,
    instance_facts,
    load_config,
)

XLARGE_X86 = InstanceFacts(vcpus=4, arch="x86_64")


def test_defaults_give_a_working_stack():
    cfg = StackConfig(stack="dev").with_instance_facts(XLARGE_X86)
    assert (cfg.broker, cfg.resolved_result_store, cfg.nat) == ("sqs", "s3", "single")
    assert cfg.az_count == 2 and cfg.spot and cfg.max_instances == 10
    assert cfg.vcpus_per_instance == 4 and cfg.target_backlog_per_instance == 4.0
    assert cfg.lifecycle_heartbeat == 900
    assert cfg.image_id.endswith("al2023-ami-kernel-default-x86_64")
    assert cfg.ssm_prefix == "/celery-fleet/dev/" and cfg.resource_prefix == "celery-fleet-dev"


def test_visibility_timeout_is_the_apps_formula():
    for seconds in (60, 900, 3600):
        cfg = StackConfig(stack="dev", max_batch_seconds=seconds)
        settings = Settings(broker_url="sqs://", result_url="s3://b/r", max_batch_seconds=seconds)
        assert cfg.visibility_timeout == settings.visibility_timeout


def test_rabbitmq_defaults_to_redis_results_and_a_small_broker():
    cfg = StackConfig(stack="dev", broker="rabbitmq")
    assert cfg.resolved_result_store == "redis"
    assert cfg.resolved_broker_instance_type == "mq.t3.micro"
    cluster = StackConfig(stack="dev", broker="rabbitmq", broker_deployment_mode="CLUSTER_MULTI_AZ")
    assert cluster.resolved_broker_instance_type == "mq.m5.large"


def test_heartbeat_is_capped_at_two_hours():
    assert StackConfig(stack="dev", max_batch_seconds=10_000).lifecycle_heartbeat == 7200


def test_resource_prefix_is_safe_for_aws_names():
    assert StackConfig(stack="My_Stack.eu").resource_prefix == "celery-fleet-my-stack-eu"
    assert len(StackConfig(stack="x" * 80).resource_prefix) <= 46


@pytest.mark.parametrize(
    ("described", "facts"),
    [
        ({"c7i.xlarge": (4, ["x86_64"]), "c6a.xlarge": (4, ["x86_64"])}, XLARGE_X86),
        ({"t3.medium": (2, ["x86_64"]), "c5.large": (2, ["x86_64"])}, InstanceFacts(2, "x86_64")),
        ({"a1.large": (2, ["arm64"])}, InstanceFacts(2, "arm64")),
        ({"t2.medium": (2, ["i386", "x86_64"])}, InstanceFacts(2, "x86_64")),
    ],
)
def test_instance_facts_are_what_ec2_describes(described, facts):
    assert instance_facts(described) == facts


@pytest.mark.parametrize(
    ("described", "message"),
    [
        ({"c7i.xlarge": (4, ["x86_64"]), "c7g.xlarge": (4, ["arm64"])}, "mixes Graviton"),
        ({"c7i.xlarge": (4, ["x86_64"]), "c7i.2xlarge": (8, ["x86_64"])}, "differ in vCPU count"),
        ({"mac2.metal": (12, ["arm64_mac"])}, "needs x86_64 or arm64"),
    ],
)
def test_instance_facts_refuse_types_one_template_cannot_serve(described, message):
    with pytest.raises(StackConfigError, match="celery-fleet:instanceTypes") as caught:
        instance_facts(described)
    assert message in str(caught.value)


def test_graviton_facts_boot_the_arm_ami():
    cfg = StackConfig(stack="dev", instance_types=("c7g.xlarge", "c6g.xlarge"))
    cfg = cfg.with_instance_facts(InstanceFacts(vcpus=4, arch="arm64"))
    assert cfg.arch == "arm64" and cfg.image_id.endswith("-arm64")
    assert cfg.target_backlog_per_instance == 4.0


def test_instance_facts_are_never_guessed():
    cfg = StackConfig(stack="dev")
    with pytest.raises(RuntimeError, match="with_instance_facts"):
        _ = cfg.arch
    assert StackConfig(stack="dev", target_backlog=3).target_backlog_per_instance == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"broker": "kafka"}, "celery-fleet:broker='kafka': use one of sqs, rabbitmq"),
        ({"nat": "two"}, "celery-fleet:nat='two': use one of none, single, per-az, ipv6"),
        ({"az_count": 1}, "celery-fleet:azCount=1: must be at least 2"),
        ({"instance_types": ()}, "instanceTypes is empty"),
        ({"vpc_cidr": "10.0.0.0/8"}, "IPv4 block from /16 to /24"),
        ({"vpc_cidr": "not-a-cidr"}, "celery-fleet:vpcCidr='not-a-cidr'"),
        ({"max_batch_seconds": 30_000}, "over the 43200s SQS allows"),
        ({"max_receive_count": 0}, "SQS accepts 1 to 1000"),
        ({"on_demand_base_capacity": 11}, "exceeds maxInstances=10"),
        ({"target_backlog": 0}, "must be above 0"),
        ({"lifecycle_heartbeat_seconds": 10}, "AWS accepts 30 to 7200"),
        (
            {
                "broker": "rabbitmq",
                "broker_deployment_mode": "CLUSTER_MULTI_AZ",
                "broker_instance_type": "mq.t3.micro",
            },
            "only runs SINGLE_INSTANCE brokers",
        ),
    ],
)
def test_bad_settings_are_refused_by_name(overrides, message):
    with pytest.raises(StackConfigError) as caught:
        StackConfig(stack="dev", **overrides)
    assert message in str(caught.value)


def test_load_config_reads_the_stack_settings():
    pulumi.runtime.set_all_config(
        {
            "celery-fleet:broker": "rabbitmq",
            "celery-fleet:spot": "false",
            "celery-fleet:onDemandBaseCapacity": "0",
            "celery-fleet:instanceTypes": '["c7g.xlarge", "m7g.xlarge"]',
            "celery-fleet:targetBacklogPerInstance": "3.5",
            "celery-fleet:tags": '{"team": "data"}',
        }
    )
    try:
        cfg = load_config()
    finally:
        pulumi.runtime.set_all_config({})
    assert cfg.broker == "rabbitmq" and cfg.resolved_result_store == "redis"
    assert cfg.spot is False and cfg.on_demand_base_capacity == 0
    assert cfg.instance_types == ("c7g.xlarge", "m7g.xlarge")
    assert cfg.instance_facts is None, "vCPUs and architecture come from EC2, in build()"
    assert cfg.target_backlog_per_instance == 3.5 and cfg.tags == {"team": "data"}
    assert cfg.max_instances == 10, "unset keys keep their defaults"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("../my-project", ("../my-project",)),
        ('["../a", "/srv/b"]', ("../a", "/srv/b")),
        # What `pulumi config set --path 'celery-fleet:code[0]' ../a` stores.
        ('["../a"]', ("../a",)),
    ],
)
def test_code_is_one_project_or_a_list(value, code):
    pulumi.runtime.set_all_config({"celery-fleet:code": value})
    try:
        assert load_config().code == code
    finally:
        pulumi.runtime.set_all_config({})


@pytest.mark.parametrize("bucket", ["s3://team-results", "Team", "a", "x" * 64, "a..b"])
def test_output_buckets_must_be_bucket_names(bucket):
    with pytest.raises(StackConfigError, match="is not an S3 bucket name"):
        StackConfig(stack="dev", output_buckets=(bucket,))


def test_code_must_be_paths():
    pulumi.runtime.set_all_config({"celery-fleet:code": '["../a", 3]'})
    try:
        with pytest.raises(pulumi.RunError, match="celery-fleet:code must be a list of strings"):
            load_config()
    finally:
        pulumi.runtime.set_all_config({})


def test_load_config_reports_a_bad_value_without_a_traceback():
    pulumi.runtime.set_all_config({"celery-fleet:maxInstances": "0"})
    try:
        with pytest.raises(
            pulumi.RunError, match="celery-fleet:maxInstances=0: must be at least 1"
        ):
            load_config()
    finally:
        pulumi.runtime.set_all_config({})


def test_every_setting_has_one_config_key():
    """`fleet cost` reads CHOICE_KEYS and the program _KEYS: each field is read under one
    key, and the kinds match what `fleet cost` can convert."""
    from dataclasses import fields

    from app.stack import CHOICE_KEYS, StackChoices
    from infra.config import _KEYS

    choice_fields = {f.name for f in fields(StackChoices)}
    assert {name for name, _ in CHOICE_KEYS.values()} == choice_fields
    assert {kind for _, kind in CHOICE_KEYS.values()} <= {"str", "int", "list"}
    program_fields = [name for name, _ in _KEYS.values()]
    assert len(program_fields) == len(set(program_fields))
    config_fields = {f.name for f in fields(StackConfig) if f.init} - {"stack"}
    assert set(program_fields) == config_fields


# Defect 5: values the config accepted and AWS refuses.


@pytest.mark.parametrize("days", [0, 1, 14, 400, 3653])
def test_log_retention_accepts_cloudwatch_values(days):
    assert StackConfig(stack="dev", log_retention_days=days).log_retention_days == days


@pytest.mark.parametrize("days", [2, 10, 366, 4000])
def test_log_retention_must_be_a_cloudwatch_value(days):
    with pytest.raises(StackConfigError) as caught:
        StackConfig(stack="dev", log_retention_days=days)
    message = str(caught.value)
    assert message.startswith(f"celery-fleet:logRetentionDays={days}: ")
    assert "1, 3, 5, 7, 14, 30" in message and "3653" in message and "0 (never expire)" in message


def test_idle_minutes_fit_one_day_of_one_minute_periods():
    from infra.endpoint import PERIOD

    assert PERIOD * MAX_IDLE_MINUTES == 86_400, "the idle alarm's period changed"
    assert StackConfig(stack="dev", idle_minutes=1440).idle_minutes == 1440
    with pytest.raises(StackConfigError) as caught:
        StackConfig(stack="dev", idle_minutes=1441)
    assert str(caught.value).startswith("celery-fleet:idleMinutes=1441: ")
    assert "1 to 1440" in str(caught.value)


# Defect 6: RabbitMQ redelivers a message held unacked longer than consumer_timeout.


def test_rabbitmq_consumer_timeout_is_the_visibility_formula_in_ms():
    cfg = StackConfig(stack="dev", broker="rabbitmq", max_batch_seconds=3600)
    assert cfg.consumer_timeout_ms == (2 * 3600 + 60) * 1000


def test_rabbitmq_refuses_batches_beyond_the_longest_consumer_timeout():
    # Amazon MQ accepts consumer_timeout up to 2,147,483,647 ms.
    StackConfig(stack="dev", broker="rabbitmq", max_batch_seconds=1_073_711)
    with pytest.raises(StackConfigError) as caught:
        StackConfig(stack="dev", broker="rabbitmq", max_batch_seconds=1_073_712)
    message = str(caught.value)
    assert message.startswith("celery-fleet:maxBatchSeconds=1073712: ")
    assert "consumer_timeout" in message and "2147483647" in message


# Defect 7: private subnets too small for the fleet and the endpoints.


def test_a_24_without_nat_cannot_hold_ten_instances():
    with pytest.raises(StackConfigError) as caught:
        StackConfig(stack="dev", vpc_cidr="10.0.0.0/24", nat="none")
    message = str(caught.value)
    assert "celery-fleet:vpcCidr=10.0.0.0/24" in message and "maxInstances=10" in message
    # 11 instances (10 + rebalancing headroom) + 7 endpoints + 5 reserved = 23 -> /27 subnets.
    assert "/23" in message


def test_the_address_count_decides_the_smallest_vpc():
    # 10 instances + 1 rebalancing + 5 reserved = 16: a /28 subnet, a /24 VPC, just fits.
    StackConfig(stack="dev", vpc_cidr="10.0.0.0/24", nat="single")
    # Amazon MQ and ElastiCache take an address each: no longer fits.
    with pytest.raises(StackConfigError, match="/23"):
        StackConfig(stack="dev", vpc_cidr="10.0.0.0/24", broker="rabbitmq")
    # Three zones: one zone out of capacity leaves two to carry the fleet.
    StackConfig(stack="dev", vpc_cidr="10.0.0.0/23", nat="none", az_count=3, max_instances=20)
    # nat: ipv6 has no interface endpoint to take addresses: a /24 holds the fleet as with NAT.
    StackConfig(stack="dev", vpc_cidr="10.0.0.0/24", nat="ipv6")


def test_ipv6_switches_the_sdks_to_dual_stack():
    cfg = StackConfig(stack="dev", nat="ipv6")
    assert cfg.dualstack and not cfg.interface_endpoints
    assert not StackConfig(stack="dev").dualstack
    none = StackConfig(stack="dev", nat="none")
    assert none.interface_endpoints and not none.dualstack


def test_a_fleet_no_vpc_can_hold_is_refused_with_what_to_do():
    with pytest.raises(StackConfigError) as caught:
        StackConfig(stack="dev", max_instances=5000)
    message = str(caught.value)
    assert "celery-fleet:vpcCidr=10.40.0.0/16" in message and "maxInstances=5000" in message
    assert "lower celery-fleet:maxInstances" in message
