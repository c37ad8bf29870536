"""`nat: ipv6`: no NAT gateway and no interface endpoint; the workers leave over IPv6 only.

The network under mocks (an egress-only internet gateway, dual-stack subnets, routes,
the worker's security group, the boot's environment), the services the worker role may
call checked against the ones AWS documents dual-stack endpoints for, and botocore
(the version installed with the workers) sending every such client to a dual-stack
name once the boot's variable is set.
"""

from __future__ import annotations

import ipaddress
import json

import boto3
import pytest
import yaml
from pulumi_mocks import StackRun

from app.names import DUALSTACK_VARIABLE
from infra.config import DUALSTACK_SERVICES, StackConfig

IPV6_STACKS = [
    StackConfig(stack="test", nat="ipv6"),
    StackConfig(stack="test", nat="ipv6", broker="rabbitmq", result_store="redis", az_count=3),
]


@pytest.fixture(params=IPV6_STACKS, ids=["sqs-s3", "rabbitmq-redis-3-zones"])
def run(request, run_stack) -> StackRun:
    return run_stack(request.param)


def test_no_nat_gateway_no_interface_endpoint_no_way_in(run):
    for typ in (
        "aws:ec2/natGateway:NatGateway",
        "aws:ec2/eip:Eip",
        "aws:ec2/internetGateway:InternetGateway",
    ):
        assert not run.of_type(typ), f"{typ} with nat: ipv6"
    assert not [s for s in run.of_type("aws:ec2/subnet:Subnet") if "-public-" in s.name]
    endpoints = run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
    assert [(e.props["serviceName"], e.props["vpcEndpointType"]) for e in endpoints] == [
        ("com.amazonaws.us-east-1.s3", "Gateway")
    ]
    (eigw,) = run.of_type("aws:ec2/egressOnlyInternetGateway:EgressOnlyInternetGateway")
    assert eigw.props["vpcId"] == "network-vpc-id"


def test_every_private_subnet_is_dual_stack_and_routes_ipv6_out_only(run):
    vpc = run.one("aws:ec2/vpc:Vpc").props
    assert vpc["assignGeneratedIpv6CidrBlock"] is True
    vpc_block = ipaddress.IPv6Network("2600:1f18:4a3:6a00::/56")  # what the mocks assign
    subnets = run.of_type("aws:ec2/subnet:Subnet")
    assert len(subnets) == run.cfg.az_count
    blocks = [ipaddress.IPv6Network(s.props["ipv6CidrBlock"]) for s in subnets]
    assert all(b.prefixlen == 64 and b.subnet_of(vpc_block) for b in blocks)
    assert len(set(blocks)) == len(blocks)
    assert all(s.props["assignIpv6AddressOnCreation"] is True for s in subnets)
    tables = run.of_type("aws:ec2/routeTable:RouteTable")
    assert len(tables) == run.cfg.az_count
    for table in tables:
        # No IPv4 default route at all: IPv4 reaches the VPC and, by the gateway endpoint, S3.
        assert table.props["routes"] == [
            {"ipv6CidrBlock": "::/0", "egressOnlyGatewayId": "network-eigw-id"}
        ]


def test_workers_may_send_https_out_on_both_families_and_nothing_else(run):
    worker_out = [
        r.props
        for r in run.of_type("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
        if r.props["securityGroupId"] == "network-worker-sg-id"
        and not r.props.get("referencedSecurityGroupId")
    ]
    assert sorted(
        (r.get("cidrIpv4", "-"), r.get("cidrIpv6", "-"), r["fromPort"]) for r in worker_out
    ) == [
        ("-", "::/0", 443),
        ("0.0.0.0/0", "-", 443),
    ]
    inbound = run.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
    assert not [r for r in inbound if r.props["securityGroupId"] == "network-worker-sg-id"]


def test_the_boot_calls_dual_stack_endpoints_and_installs_the_wheelhouse(run):
    boot_env = yaml.safe_load(run.user_data)["write_files"][0]["content"].splitlines()
    assert f"{DUALSTACK_VARIABLE}=true" in boot_env
    # Every wheel is in the wheelhouse (installed with no index): nothing from outside AWS.
    assert f"FLEET_ARTIFACT=s3://artifacts-20250101/{run.outputs['artifactPrefix']}/" in boot_env


def test_other_network_options_leave_the_sdks_on_their_ipv4_endpoints(run_stack):
    run = run_stack(StackConfig(stack="test"))
    assert DUALSTACK_VARIABLE not in run.user_data
    assert not run.of_type("aws:ec2/egressOnlyInternetGateway:EgressOnlyInternetGateway")
    assert "assignGeneratedIpv6CidrBlock" not in run.one("aws:ec2/vpc:Vpc").props


# IAM's service prefix -> the endpoint's, where they differ.
ENDPOINT_OF = {"cloudwatch": "monitoring"}
# Granted, never called by a worker host: SSM and S3 call KMS on its behalf.
NOT_CALLED = {"kms"}
# AmazonSSMManagedInstanceCore, attached to the role: the SSM agent's services.
SSM_AGENT = {"ssm", "ssmmessages", "ec2messages"}


def test_every_service_the_workers_may_call_has_a_documented_dual_stack_endpoint(run):
    granted = {
        action.split(":")[0]
        for policy in run.of_type("aws:iam/rolePolicy:RolePolicy")
        for statement in json.loads(policy.props["policy"])["Statement"]
        for action in (
            [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        )
    }
    called = {ENDPOINT_OF.get(p, p) for p in granted - NOT_CALLED} | SSM_AGENT
    assert called <= DUALSTACK_SERVICES.keys(), (
        f"no dual-stack endpoint on record for {sorted(called - DUALSTACK_SERVICES.keys())}: "
        "check the service's documentation and add it to infra.config.DUALSTACK_SERVICES"
    )
    assert {"s3", "ssm", "logs", "monitoring", "autoscaling", "ec2"} <= called
    assert ("sqs" in called) == (run.cfg.broker == "sqs")


# The clients boto3 (and so kombu's SQS transport, app.boot, the drain agent and the
# worker's metrics) make; ssmmessages and ec2messages are the SSM agent's own.
BOTO3_SERVICES = {"s3", "sqs", "ssm", "logs", "cloudwatch", "autoscaling", "ec2"}


def test_boto3_sends_every_client_to_its_dual_stack_name_when_the_boot_says_so(monkeypatch):
    assert {ENDPOINT_OF.get(s, s) for s in BOTO3_SERVICES} <= DUALSTACK_SERVICES.keys()
    ipv4 = {s: boto3.client(s, region_name="eu-west-1").meta.endpoint_url for s in BOTO3_SERVICES}
    monkeypatch.setenv(DUALSTACK_VARIABLE, "true")
    dual = {s: boto3.client(s, region_name="eu-west-1").meta.endpoint_url for s in BOTO3_SERVICES}
    for service in BOTO3_SERVICES:
        assert ipv4[service].endswith(".amazonaws.com"), ipv4[service]
        expected = (
            "https://s3.dualstack.eu-west-1.amazonaws.com"
            if service == "s3"
            else f"https://{ENDPOINT_OF.get(service, service)}.eu-west-1.api.aws"
        )
        assert dual[service] == expected
