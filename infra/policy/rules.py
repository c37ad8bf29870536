"""The security rules of the celery-fleet policy pack, as plain functions.

Each check takes a resource's properties (camelCase, as the engine passes them)
and returns the problems it finds; `POLICIES` wraps them as mandatory
ResourceValidationPolicy objects. Tests call `policy.validate(args, report)`
with any object that has `.resource_type` and `.props`.

Control IDs are AWS Security Hub's Foundational Security Best Practices where
one exists; MQ has no FSBP control for public access, so that rule names the
AWS Config rule instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
)

Props = Mapping[str, Any]
Check = Callable[[Props], Iterable[str]]

LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
BUCKET_ENCRYPTION = (
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
)
OPEN_CIDRS = {"0.0.0.0/0", "::/0"}
SSH_PORT = 22
READ_VERBS = ("Get", "List", "Describe", "BatchGet", "Head", "Search", "Select", "Lookup", "View")
# Actions AWS cannot scope to a resource, allowed on "*" when this condition key fences them.
FENCED_WILDCARD_ACTIONS = {"cloudwatch:PutMetricData": "cloudwatch:namespace"}


def _true(value: Any) -> bool:
    # Launch templates carry booleans as the strings "true"/"false".
    return value is True or value == "true"


def imdsv2_required(props: Props) -> Iterable[str]:
    tokens = (props.get("metadataOptions") or {}).get("httpTokens")
    if tokens != "required":
        yield f"metadataOptions.httpTokens is {tokens!r}, not 'required' (IMDSv1 allowed)"


def no_public_ip(props: Props) -> Iterable[str]:
    for i, interface in enumerate(props.get("networkInterfaces") or []):
        if _true(interface.get("associatePublicIpAddress")):
            yield f"networkInterfaces[{i}] associates a public IP address"


def ebs_encrypted(props: Props) -> Iterable[str]:
    mappings = [m for m in props.get("blockDeviceMappings") or [] if m.get("ebs")]
    if not mappings:
        yield "no EBS block device mapping: the root volume's encryption is left to the AMI"
    for mapping in mappings:
        if not _true(mapping["ebs"].get("encrypted")):
            yield f"EBS volume {mapping.get('deviceName')} is not encrypted"


def _ingress_rules(resource_type: str, props: Props) -> Iterable[tuple[set[str], int, int, str]]:
    """(source CIDRs, from port, to port, protocol) of each ingress rule, whatever the resource."""
    if resource_type == "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule":
        cidrs = {c for c in (props.get("cidrIpv4"), props.get("cidrIpv6")) if c is not None}
        yield (
            cidrs,
            props.get("fromPort", 0),
            props.get("toPort", 65535),
            props.get("ipProtocol", ""),
        )
        return
    if resource_type == "aws:ec2/securityGroupRule:SecurityGroupRule":
        rules = [props] if props.get("type") == "ingress" else []
    else:
        rules = props.get("ingress") or []
    for rule in rules:
        cidrs = set(rule.get("cidrBlocks") or []) | set(rule.get("ipv6CidrBlocks") or [])
        yield cidrs, rule.get("fromPort", 0), rule.get("toPort", 65535), rule.get("protocol", "")


def _security_group_check(resource_type: str) -> Check:
    def check(props: Props) -> Iterable[str]:
        for cidrs, low, high, protocol in _ingress_rules(resource_type, props):
            for cidr in sorted(cidrs & OPEN_CIDRS):
                yield f"ingress from {cidr} (ports {low}-{high})"
            if str(protocol) in ("-1", "all") or low <= SSH_PORT <= high:
                yield f"ingress reaches SSH port {SSH_PORT}; use Session Manager"

    return check


def public_access_blocked(props: Props) -> Iterable[str]:
    for flag in (
        "blockPublicAcls",
        "blockPublicPolicy",
        "ignorePublicAcls",
        "restrictPublicBuckets",
    ):
        if props.get(flag) is not True:
            yield f"{flag} is not true"


def bucket_encrypted_with_kms(props: Props) -> Iterable[str]:
    rules = props.get("rules") or []
    algorithms = [
        (r.get("applyServerSideEncryptionByDefault") or {}).get("sseAlgorithm") for r in rules
    ]
    if not any(a in ("aws:kms", "aws:kms:dsse") for a in algorithms):
        yield f"default encryption is {algorithms or 'missing'}, not SSE-KMS"


def queue_encrypted(props: Props) -> Iterable[str]:
    if props.get("sqsManagedSseEnabled") is not True and not props.get("kmsMasterKeyId"):
        yield "neither SQS-managed SSE nor a KMS key encrypts the queue"


def broker_private(props: Props) -> Iterable[str]:
    if props.get("publiclyAccessible") is True:
        yield "the broker is reachable from the internet"


def _flag_on(flag: str, what: str) -> Check:
    def check(props: Props) -> Iterable[str]:
        if props.get(flag) is not True:
            yield f"{what} is off ({flag})"

    return check


def _is_write(action: str) -> bool:
    verb = action.partition(":")[2].rstrip("*")
    return not verb.startswith(READ_VERBS) or action in ("*", "")


def iam_resources_named(props: Props) -> Iterable[str]:
    document = props.get("policy")
    if isinstance(document, str):
        document = json.loads(document)
    if not isinstance(document, Mapping):
        return  # unknown until apply (preview): checked on `pulumi up`
    statements = document.get("Statement") or []
    for stmt in [statements] if isinstance(statements, Mapping) else statements:
        if stmt.get("Effect") != "Allow":
            continue
        resources = stmt.get("Resource", [])
        resources = [resources] if isinstance(resources, str) else resources
        if "*" not in resources and "NotResource" not in stmt:
            continue
        actions = stmt.get("Action", [])
        conditions = {key for block in (stmt.get("Condition") or {}).values() for key in block}
        for action in [actions] if isinstance(actions, str) else actions:
            fence = FENCED_WILDCARD_ACTIONS.get(action)
            if _is_write(action) and (fence is None or fence not in conditions):
                yield f"statement {stmt.get('Sid', '')!r} allows {action} on every resource"


def _policy(
    name: str, description: str, control: str, checks: Mapping[str, Check]
) -> ResourceValidationPolicy:
    """A mandatory rule that runs `checks[resource_type]` and reports each problem."""

    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        check = checks.get(args.resource_type)
        if check is None:
            return
        for problem in check(args.props):
            report_violation(f"{problem} [{control}]", None)

    return ResourceValidationPolicy(
        name=name,
        description=f"{description} [{control}]",
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
    )


_SG_TYPES = (
    "aws:ec2/securityGroup:SecurityGroup",
    "aws:ec2/securityGroupRule:SecurityGroupRule",
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
)
_IAM_POLICY_TYPES = (
    "aws:iam/rolePolicy:RolePolicy",
    "aws:iam/policy:Policy",
    "aws:iam/userPolicy:UserPolicy",
    "aws:iam/groupPolicy:GroupPolicy",
)

POLICIES = [
    _policy(
        "launch-template-imdsv2",
        "Launch templates require IMDSv2",
        "EC2.170",
        {LAUNCH_TEMPLATE: imdsv2_required},
    ),
    _policy(
        "launch-template-no-public-ip",
        "Launch templates assign no public IP",
        "EC2.25",
        {LAUNCH_TEMPLATE: no_public_ip},
    ),
    _policy(
        "launch-template-ebs-encrypted",
        "Instance volumes are encrypted",
        "EC2.3",
        {LAUNCH_TEMPLATE: ebs_encrypted},
    ),
    _policy(
        "no-open-or-ssh-ingress",
        "No ingress from 0.0.0.0/0 or ::/0, none to SSH",
        "EC2.13, EC2.18, EC2.19",
        {t: _security_group_check(t) for t in _SG_TYPES},
    ),
    _policy(
        "s3-public-access-blocked",
        "Buckets block all public access",
        "S3.8",
        {"aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock": public_access_blocked},
    ),
    _policy(
        "s3-encrypted-with-kms",
        "Buckets encrypt by default with KMS",
        "S3.17",
        {BUCKET_ENCRYPTION: bucket_encrypted_with_kms},
    ),
    _policy(
        "sqs-encrypted",
        "SQS queues are encrypted at rest",
        "SQS.1",
        {"aws:sqs/queue:Queue": queue_encrypted},
    ),
    _policy(
        "mq-not-public",
        "Amazon MQ brokers are not publicly accessible",
        "AWS Config mq-no-public-access",
        {"aws:mq/broker:Broker": broker_private},
    ),
    _policy(
        "elasticache-transit-encryption",
        "ElastiCache replication groups encrypt in transit",
        "ElastiCache.5",
        {
            "aws:elasticache/replicationGroup:ReplicationGroup": _flag_on(
                "transitEncryptionEnabled", "TLS"
            )
        },
    ),
    _policy(
        "elasticache-at-rest-encryption",
        "ElastiCache replication groups encrypt at rest",
        "ElastiCache.4",
        {
            "aws:elasticache/replicationGroup:ReplicationGroup": _flag_on(
                "atRestEncryptionEnabled", "encryption at rest"
            )
        },
    ),
    _policy(
        "iam-no-wildcard-write",
        "IAM policies name the resources they let anyone change",
        "least privilege, cf. IAM.1 and IAM.21",
        {t: iam_resources_named for t in _IAM_POLICY_TYPES},
    ),
]
