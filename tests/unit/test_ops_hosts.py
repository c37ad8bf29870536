"""Which hosts `fleet ops` reaches: a stack's in-service instances, found by tag (moto)."""

from __future__ import annotations

import boto3
from moto import mock_aws

from scripts.ops.hosts import discover


def test_hosts_are_discovered_from_the_autoscaling_group(monkeypatch):
    for key, value in {
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        ec2 = boto3.client("ec2")
        template = ec2.create_launch_template(
            LaunchTemplateName="workers",
            LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "c7i.xlarge"},
        )
        autoscaling = boto3.client("autoscaling")
        for stack, size in (("dev", 2), ("other", 1)):
            autoscaling.create_auto_scaling_group(
                AutoScalingGroupName=f"{stack}-asg",
                MinSize=size,
                MaxSize=size,
                DesiredCapacity=size,
                AvailabilityZones=["eu-west-1a"],
                LaunchTemplate={"LaunchTemplateId": template["LaunchTemplate"]["LaunchTemplateId"]},
                Tags=[{"Key": "celery-fleet:stack", "Value": stack, "PropagateAtLaunch": True}],
            )
        members = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["dev-asg"])[
            "AutoScalingGroups"
        ][0]["Instances"]
        ids = sorted(i["InstanceId"] for i in members)
        ips = {
            i["InstanceId"]: i["PrivateIpAddress"]
            for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
            for i in r["Instances"]
        }
        assert sorted(h.address for h in discover("dev")) == sorted(ips.values())
        assert [
            h.address for h in sorted(discover("dev", ssm=True), key=lambda h: h.address)
        ] == ids
        # One leaves service: a host being terminated is not deployed to.
        autoscaling.enter_standby(
            InstanceIds=[ids[0]],
            AutoScalingGroupName="dev-asg",
            ShouldDecrementDesiredCapacity=True,
        )
        assert [h.instance_id for h in discover("dev")] == [ids[1]]
        assert discover("nothing") == []
