"""Pulumi mocks that record every resource the program creates.

Fake outputs are keyed by type token (names, ARNs, endpoints AWS would
compute); invokes return a fixed account, region and zones. Secrets arrive
wrapped; `reveal` unwraps them, `plain_strings` yields only what is not secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pulumi

if TYPE_CHECKING:
    from infra.config import StackConfig

ACCOUNT = "123456789012"
REGION = "us-east-1"
ZONES = ["us-east-1a", "us-east-1b", "us-east-1c"]
# How the SDK marks a secret value on the wire (pulumi.runtime.rpc).
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
SIG_KEY = "4dabf18193072939515e22adb298388d"


def _fake_outputs(typ: str, name: str, inputs: dict) -> dict:
    """What AWS would compute for a resource: names, ARNs, endpoints."""
    arn = f"arn:aws:{typ.split(':')[1].split('/')[0]}:{REGION}:{ACCOUNT}:{name}"
    by_type: dict[str, Callable[[], dict]] = {
        "aws:s3/bucket:Bucket": lambda: {
            "bucket": f"{inputs['bucketPrefix']}20250101",
            "arn": f"arn:aws:s3:::{inputs['bucketPrefix']}20250101",
        },
        "aws:sqs/queue:Queue": lambda: {
            "url": f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{inputs['name']}",
            "arn": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{inputs['name']}",
        },
        "aws:mq/broker:Broker": lambda: {
            "instances": [{"endpoints": [f"amqps://b-1234.mq.{REGION}.amazonaws.com:5671"]}]
        },
        "aws:elasticache/replicationGroup:ReplicationGroup": lambda: {
            "primaryEndpointAddress": f"master.{name}.abc123.use1.cache.amazonaws.com"
        },
        "aws:ec2/launchTemplate:LaunchTemplate": lambda: {"latestVersion": 7},
        # The /56 Amazon assigns a VPC that asks for one.
        "aws:ec2/vpc:Vpc": lambda: (
            {"ipv6CidrBlock": "2600:1f18:4a3:6a00::/56"}
            if inputs.get("assignGeneratedIpv6CidrBlock")
            else {}
        ),
        "aws:autoscaling/group:Group": lambda: {
            "name": f"{name}-0123",
            "arn": f"arn:aws:autoscaling:{REGION}:{ACCOUNT}:autoScalingGroup:uuid:"
            f"autoScalingGroupName/{name}-0123",
        },
        "aws:cloudwatch/logGroup:LogGroup": lambda: {
            "arn": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{inputs['name']}"
        },
        # A distinct value per password, so a leak can be traced to its source.
        "random:index/randomPassword:RandomPassword": lambda: {"result": f"Pw{name}X9z8Y7"},
    }
    # Computed names and ARNs unless the program chose them.
    return {"arn": arn, "name": name, **inputs, **by_type.get(typ, dict)()}


CALLS = {
    "aws:index/getRegion:getRegion": {"region": REGION, "name": REGION, "id": REGION},
    "aws:index/getPartition:getPartition": {"partition": "aws", "dnsSuffix": "amazonaws.com"},
    "aws:index/getCallerIdentity:getCallerIdentity": {"accountId": ACCOUNT},
    "aws:index/getAvailabilityZones:getAvailabilityZones": {"names": ZONES},
}

# What EC2 DescribeInstanceTypes says of the types the tests use: (vCPUs, architectures).
INSTANCE_TYPES = {
    **{f"{family}.xlarge": (4, ["x86_64"]) for family in ("c7i", "c6i", "c6a", "c5", "m7i")},
    **{f"{family}.xlarge": (4, ["arm64"]) for family in ("c7g", "m7g")},
    "c5.large": (2, ["x86_64"]),
    "t3.medium": (2, ["x86_64"]),
    "a1.large": (2, ["arm64"]),
}


def _instance_type(args: dict) -> dict | tuple[dict, list[tuple[str, str]]]:
    """The aws:ec2/getInstanceType invoke; an unknown type fails as the provider's does."""
    name = args.get("instanceType", "")
    if name not in INSTANCE_TYPES:
        reason = (
            f"reading EC2 Instance Type ({name}): operation error EC2: DescribeInstanceTypes, "
            f"api error InvalidInstanceType: The following supplied instance types do not "
            f"exist: [{name}]"
        )
        return {}, [("instanceType", reason)]
    vcpus, architectures = INSTANCE_TYPES[name]
    return {
        "id": name,
        "instanceType": name,
        "defaultVcpus": vcpus,
        "supportedArchitectures": architectures,
    }


def reveal(value):
    """`value` with every secret wrapper replaced by its plain value."""
    if isinstance(value, dict):
        if value.get(SIG_KEY) == SECRET_SIG:
            return reveal(value["value"])
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v) for v in value]
    return value


def plain_strings(value) -> Iterator[str]:
    """Every string in `value` that is not inside a secret wrapper."""
    if isinstance(value, dict):
        if value.get(SIG_KEY) == SECRET_SIG:
            return
        for v in value.values():
            yield from plain_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from plain_strings(v)
    elif isinstance(value, str):
        yield value


@dataclass
class Recorded:
    typ: str
    name: str
    raw: dict  # inputs as sent, secrets still wrapped

    @property
    def props(self) -> dict:
        return reveal(self.raw)

    # The attributes a pulumi_policy rule reads (ResourceValidationArgs).
    @property
    def resource_type(self) -> str:
        return self.typ


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[Recorded] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.resources.append(Recorded(args.typ, args.name, dict(args.inputs)))
        return [f"{args.name}-id", _fake_outputs(args.typ, args.name, args.inputs)]

    def call(self, args: pulumi.runtime.MockCallArgs):
        if args.token == "aws:ec2/getInstanceType:getInstanceType":
            return _instance_type(args.args)
        return CALLS.get(args.token, {})


@dataclass
class StackRun:
    cfg: StackConfig
    resources: list[Recorded]
    outputs: dict
    user_data: str
    # Generated secret -> whether its Output is marked secret.
    secrets: dict[str, bool] = field(default_factory=dict)

    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str) -> Recorded:
        (found,) = self.of_type(typ)
        return found

    def named(self, name: str) -> Recorded:
        (found,) = [r for r in self.resources if r.name == name]
        return found
