"""The typed stack config: defaults that work, and clear refusals."""

from __future__ import annotations

import pulumi
import pytest

from app.settings import Settings
from infra.config import StackConfig, StackConfigError, instance_arch, instance_vcpus, load_config


def test_defaults_give_a_working_stack():
    cfg = StackConfig(stack="dev")
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
    ("instance_type", "vcpus", "arch"),
    [
        ("c7i.xlarge", 4, "x86_64"),
        ("c6a.2xlarge", 8, "x86_64"),
        ("m7i-flex.large", 2, "x86_64"),
        ("c7g.xlarge", 4, "arm64"),
        ("m6gd.4xlarge", 16, "arm64"),
        ("g5.xlarge", 4, "x86_64"),
        ("c7i.metal-24xl", None, "x86_64"),
    ],
)
def test_instance_type_parsing(instance_type, vcpus, arch):
    assert instance_vcpus(instance_type) == vcpus
    assert instance_arch(instance_type) == arch


def test_graviton_types_boot_the_arm_ami():
    cfg = StackConfig(stack="dev", instance_types=("c7g.xlarge", "c6g.xlarge"))
    assert cfg.arch == "arm64" and cfg.image_id.endswith("-arm64")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"broker": "kafka"}, "celery-fleet:broker='kafka': use one of sqs, rabbitmq"),
        ({"nat": "two"}, "celery-fleet:nat='two'"),
        ({"az_count": 1}, "celery-fleet:azCount=1: must be at least 2"),
        ({"instance_types": ("c7i.xlarge", "c7i.2xlarge")}, "differ in vCPU count"),
        ({"instance_types": ("c7i.xlarge", "c7g.xlarge")}, "mixes Graviton"),
        ({"instance_types": ("c7i.metal-24xl",)}, "targetBacklogPerInstance"),
        ({"instance_types": ()}, "instanceTypes is empty"),
        ({"instance_types": ("banana",)}, "'banana' is not an EC2 instance type"),
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
    assert cfg.instance_types == ("c7g.xlarge", "m7g.xlarge") and cfg.arch == "arm64"
    assert cfg.target_backlog_per_instance == 3.5 and cfg.tags == {"team": "data"}
    assert cfg.max_instances == 10, "unset keys keep their defaults"


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
