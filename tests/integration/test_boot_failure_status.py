"""`fleet status --stack` shows why an instance's boot failed, from the tag the boot put on it.

scripts/fleet-boot.sh's fail_boot tags a failing instance celery-fleet:boot-error
and reports it Unhealthy (tests/integration/test_boot.py); here the stack is moto's
and the tag is put as that call puts it.
"""

from __future__ import annotations

import json

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from app.names import BOOT_ERROR_TAG, STACK_TAG
from scripts.cli import cli
from scripts.status import render, stack_instances

REASON = "aws s3 sync --only-show-errors --delete s3://b/artifacts/x/ /opt/wheels/ failed 5 times"


@pytest.fixture
def stack(monkeypatch):
    for key, value in {
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        ssm = boto3.client("ssm")
        # Nothing listens there: the stack's AWS side is what this test reads.
        for key, value in {
            "broker_url": "redis://127.0.0.1:1/0",
            "result_url": "redis://127.0.0.1:1/1",
        }.items():
            ssm.put_parameter(Name=f"/celery-fleet/dev/{key}", Value=value, Type="String")
        ec2, autoscaling = boto3.client("ec2"), boto3.client("autoscaling")
        template = ec2.create_launch_template(
            LaunchTemplateName="workers",
            LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "c7i.xlarge"},
        )["LaunchTemplate"]["LaunchTemplateId"]
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName="dev-asg",
            MinSize=0,
            MaxSize=5,
            DesiredCapacity=2,
            AvailabilityZones=["eu-west-1a"],
            LaunchTemplate={"LaunchTemplateId": template},
            Tags=[{"Key": STACK_TAG, "Value": "dev", "PropagateAtLaunch": True}],
        )
        (group,) = autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"]
        failed, healthy = sorted(i["InstanceId"] for i in group["Instances"])
        # What fail_boot runs on the instance (`aws ec2 create-tags`, `set-instance-health`).
        ec2.create_tags(Resources=[failed], Tags=[{"Key": BOOT_ERROR_TAG, "Value": REASON}])
        autoscaling.set_instance_health(
            InstanceId=failed, HealthStatus="Unhealthy", ShouldRespectGracePeriod=False
        )
        yield failed, healthy


def test_stack_instances_carry_the_boot_error_tag(stack):
    failed, healthy = stack
    instances = {i["id"]: i for i in stack_instances("dev")}
    assert instances[failed]["boot_error"] == REASON
    assert instances[failed]["health"] == "Unhealthy"
    assert instances[healthy]["boot_error"] is None
    text = render(
        {
            "source": "stack dev",
            "instances": list(instances.values()),
            "workers": [],
            "slots": 0,
            "queue": None,
            "running_batches": None,
            "errors": [],
        }
    )
    (line,) = [line for line in text.splitlines() if failed in line]
    assert line.endswith(f"boot failed: {REASON}")
    (other,) = [line for line in text.splitlines() if healthy in line]
    assert "boot failed" not in other


def test_fleet_status_stack_prints_the_reason(stack):
    failed, _ = stack
    runner = CliRunner()
    plain = runner.invoke(cli, ["status", "--stack", "dev"])
    (line,) = [line for line in plain.stdout.splitlines() if failed in line]
    assert f"boot failed: {REASON}" in line, plain.output
    as_json = runner.invoke(cli, ["status", "--stack", "dev", "--json"])
    instances = {i["id"]: i for i in json.loads(as_json.stdout)["instances"]}
    assert instances[failed]["boot_error"] == REASON
