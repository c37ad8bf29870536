"""Each policy-pack rule: a compliant resource passes, a violating one is reported."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from infra.policy.rules import POLICIES

BY_NAME = {p.name: p for p in POLICIES}
LT = "aws:ec2/launchTemplate:LaunchTemplate"
SG = "aws:ec2/securityGroup:SecurityGroup"
SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
SSE = "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
REDIS = "aws:elasticache/replicationGroup:ReplicationGroup"


def violations(policy: str, resource_type: str, props: dict) -> list[str]:
    found: list[str] = []
    args = SimpleNamespace(resource_type=resource_type, props=props)
    # The engine's arguments, as far as the rules read them.
    BY_NAME[policy].validate(args, lambda message, urn=None: found.append(message))  # type: ignore[arg-type, misc]
    return found


def iam(*statements: dict) -> dict:
    return {"policy": json.dumps({"Version": "2012-10-17", "Statement": list(statements)})}


GOOD_LT = {
    "metadataOptions": {"httpTokens": "required"},
    "networkInterfaces": [{"associatePublicIpAddress": "false"}],
    "blockDeviceMappings": [{"deviceName": "/dev/xvda", "ebs": {"encrypted": "true"}}],
}

CASES = [
    # (policy, resource type, compliant props, violating props, expected text)
    (
        "launch-template-imdsv2",
        LT,
        GOOD_LT,
        {"metadataOptions": {"httpTokens": "optional"}},
        "EC2.170",
    ),
    ("launch-template-imdsv2", LT, GOOD_LT, {}, "IMDSv1 allowed"),
    (
        "launch-template-no-public-ip",
        LT,
        GOOD_LT,
        {"networkInterfaces": [{"associatePublicIpAddress": "true"}]},
        "EC2.25",
    ),
    (
        "launch-template-ebs-encrypted",
        LT,
        GOOD_LT,
        {"blockDeviceMappings": [{"deviceName": "/dev/xvda", "ebs": {"encrypted": "false"}}]},
        "EC2.3",
    ),
    ("launch-template-ebs-encrypted", LT, GOOD_LT, {}, "left to the AMI"),
    (
        "no-open-or-ssh-ingress",
        INGRESS,
        {
            "referencedSecurityGroupId": "sg-1",
            "fromPort": 5671,
            "toPort": 5671,
            "ipProtocol": "tcp",
        },
        {"cidrIpv4": "0.0.0.0/0", "fromPort": 443, "toPort": 443, "ipProtocol": "tcp"},
        "ingress from 0.0.0.0/0",
    ),
    (
        "no-open-or-ssh-ingress",
        INGRESS,
        {"cidrIpv4": "10.0.0.0/16", "fromPort": 443, "toPort": 443, "ipProtocol": "tcp"},
        {"cidrIpv4": "10.0.0.0/16", "fromPort": 0, "toPort": 1024, "ipProtocol": "tcp"},
        "SSH port 22",
    ),
    (
        "no-open-or-ssh-ingress",
        SG,
        {"ingress": [], "egress": [{"cidrBlocks": ["0.0.0.0/0"], "fromPort": 443, "toPort": 443}]},
        {
            "ingress": [
                {"ipv6CidrBlocks": ["::/0"], "fromPort": 80, "toPort": 80, "protocol": "tcp"}
            ]
        },
        "ingress from ::/0",
    ),
    (
        "no-open-or-ssh-ingress",
        SG_RULE,
        {
            "type": "egress",
            "cidrBlocks": ["0.0.0.0/0"],
            "fromPort": 0,
            "toPort": 0,
            "protocol": "-1",
        },
        {
            "type": "ingress",
            "cidrBlocks": ["10.0.0.0/8"],
            "fromPort": 0,
            "toPort": 0,
            "protocol": "-1",
        },
        "SSH port 22",
    ),
    (
        "s3-public-access-blocked",
        "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
        dict.fromkeys(
            ["blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"],
            True,
        ),
        {"blockPublicAcls": True, "blockPublicPolicy": False, "ignorePublicAcls": True},
        "S3.8",
    ),
    (
        "s3-encrypted-with-kms",
        SSE,
        {"rules": [{"applyServerSideEncryptionByDefault": {"sseAlgorithm": "aws:kms"}}]},
        {"rules": [{"applyServerSideEncryptionByDefault": {"sseAlgorithm": "AES256"}}]},
        "S3.17",
    ),
    (
        "sqs-encrypted",
        "aws:sqs/queue:Queue",
        {"sqsManagedSseEnabled": True},
        {"name": "q"},
        "SQS.1",
    ),
    ("sqs-encrypted", "aws:sqs/queue:Queue", {"kmsMasterKeyId": "alias/aws/sqs"}, {}, "SQS.1"),
    (
        "mq-not-public",
        "aws:mq/broker:Broker",
        {"publiclyAccessible": False},
        {"publiclyAccessible": True},
        "mq-no-public-access",
    ),
    (
        "elasticache-transit-encryption",
        REDIS,
        {"transitEncryptionEnabled": True},
        {"transitEncryptionEnabled": False},
        "ElastiCache.5",
    ),
    (
        "elasticache-at-rest-encryption",
        REDIS,
        {"atRestEncryptionEnabled": True},
        {},
        "ElastiCache.4",
    ),
    (
        "iam-no-wildcard-write",
        ROLE_POLICY,
        iam(
            {
                "Effect": "Allow",
                "Action": ["sqs:SendMessage"],
                "Resource": ["arn:aws:sqs:us-east-1:1:q"],
            },
            {"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"},
            {
                "Effect": "Allow",
                "Action": ["cloudwatch:PutMetricData"],
                "Resource": "*",
                "Condition": {"StringEquals": {"cloudwatch:namespace": "CeleryFleet"}},
            },
            {"Effect": "Deny", "Action": "*", "NotResource": ["arn:aws:s3:::b"]},
        ),
        iam({"Sid": "Oops", "Effect": "Allow", "Action": ["s3:PutObject"], "Resource": "*"}),
        "'Oops' allows s3:PutObject on every resource",
    ),
    (
        "iam-no-wildcard-write",
        ROLE_POLICY,
        iam({"Effect": "Allow", "Action": "s3:Get*", "Resource": "*"}),
        iam({"Effect": "Allow", "Action": ["cloudwatch:PutMetricData"], "Resource": "*"}),
        "cloudwatch:PutMetricData",
    ),
    (
        "iam-no-wildcard-write",
        "aws:iam/policy:Policy",
        iam(
            {
                "Effect": "Allow",
                "Action": "logs:PutLogEvents",
                "Resource": "arn:aws:logs:*:*:log-group:g:*",
            }
        ),
        iam({"Effect": "Allow", "Action": "s3:*", "NotResource": "arn:aws:s3:::b"}),
        "s3:*",
    ),
]


@pytest.mark.parametrize(
    ("policy", "resource_type", "good", "bad", "expected"),
    CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)],
)
def test_rule(policy, resource_type, good, bad, expected):
    assert violations(policy, resource_type, good) == []
    found = violations(policy, resource_type, bad)
    assert found and any(expected in v for v in found), found


def test_every_rule_is_covered_and_mandatory():
    assert {c[0] for c in CASES} == set(BY_NAME)
    assert all(p.enforcement_level.value == "mandatory" for p in POLICIES)


def test_rules_ignore_other_resource_types():
    assert violations("mq-not-public", "aws:sqs/queue:Queue", {"publiclyAccessible": True}) == []


def test_unknown_policy_document_is_left_for_apply_time():
    assert violations("iam-no-wildcard-write", ROLE_POLICY, {"policy": None}) == []
