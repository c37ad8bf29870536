"""The AWS API requests the Terraform-based AWS provider sends for each recorded resource.

`requests_for(run)` turns every resource a `StackRun` recorded (type token, name,
camelCase inputs) into the `Request`s (service, operation, params) the provider
would send on create, with params in botocore's shape (PascalCase members, or
whatever the service model names them), ready for `aws_models.validate`.

The field names follow the pulumi_aws input types (pulumi_aws/<module>/_inputs.py)
and the provider's own transformations: the launch template's tri-state strings
("true"/"false") become booleans, step bounds given as strings become numbers,
the group's subnets become one comma-separated VPCZoneIdentifier, map tags become
Key/Value lists, the provider's `defaultTags` are merged into every taggable
resource's tags (not the autoscaling group's: the provider does not apply default
tags to it), and a name the program left out is the provider's autoname
(`<logical name>-<7 hex>`). Values the mocks made up (IDs, ARNs, bucket names)
are used as given.

A type that sends no request of its own is in `NO_REQUEST`, with the reason; a
type in neither table raises `UnmappedType`, so a new resource cannot slip by.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# The 7 hex digits the provider appends to a name the program leaves out.
AUTONAME_SUFFIX = "-1a2b3c4"
# What a bucket prefix gets (resource.PrefixedUniqueId: a 26-character id).
BUCKET_SUFFIX = "20250101000000000000000001"
# The provider's description when a resource requires one and none is given.
MANAGED_BY = "Managed by Pulumi"

# Types that make no AWS API request of their own, and why.
NO_REQUEST: dict[str, str] = {
    "pulumi:providers:aws": "the provider instance: configuration only (its defaultTags are "
    "merged into the other resources' requests)",
    "random:index/randomPassword:RandomPassword": "generated on this machine by pulumi-random; "
    "the value reaches AWS only inside other requests (CreateBroker, CreateReplicationGroup, "
    "PutParameter)",
}
# Every type of the program's own package is a ComponentResource: a node in the
# engine's tree that groups children and never reaches a provider.
COMPONENT_PREFIX = "celery-fleet:"
COMPONENT_REASON = "a ComponentResource (a group of children in the engine); no provider call"


class UnmappedType(LookupError):
    """A resource type with no mapping and no entry in NO_REQUEST."""


@dataclass(frozen=True)
class Request:
    service: str
    operation: str
    params: dict[str, Any]
    # The resource it was made for: "name (type)".
    resource: str = ""
    # Free-form facts a grammar check needs (e.g. which member holds a policy).
    notes: dict[str, Any] = field(default_factory=dict)

    def where(self) -> str:
        return f"{self.resource} {self.operation}"


@dataclass(frozen=True)
class Context:
    """What a mapper may need beyond the resource itself."""

    default_tags: dict[str, str]


Mapper = Callable[[str, dict[str, Any], Context], Iterator[tuple[str, str, dict[str, Any]]]]
MAPPERS: dict[str, Mapper] = {}


def maps(*types: str) -> Callable[[Mapper], Mapper]:
    def register(fn: Mapper) -> Mapper:
        for typ in types:
            MAPPERS[typ] = fn
        return fn

    return register


# --- helpers -----------------------------------------------------------------------------------


def num(value: Any) -> Any:
    """Engine numbers arrive as floats; an integral float becomes an int (as the provider's
    schema types it). Anything else is left for the validator to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def tf_bool(value: Any) -> Any:
    """The launch template's tri-state strings ("true"/"false") as the provider parses them."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def tf_float(value: Any) -> Any:
    """A number the provider's schema keeps as a string (step bounds) and parses."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def autoname(name: str, props: dict[str, Any], key: str = "name", lower: bool = False) -> str:
    given = props.get(key)
    if isinstance(given, str) and given:
        return given
    generated = f"{name}{AUTONAME_SUFFIX}"
    return generated.lower() if lower else generated


def all_tags(props: dict[str, Any], ctx: Context) -> dict[str, str]:
    return {**ctx.default_tags, **(props.get("tags") or {})}


def tag_list(props: dict[str, Any], ctx: Context) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in all_tags(props, ctx).items()]


def tag_spec(resource_type: str, props: dict[str, Any], ctx: Context) -> dict[str, Any]:
    tags = tag_list(props, ctx)
    return {"TagSpecifications": [{"ResourceType": resource_type, "Tags": tags}]} if tags else {}


def drop_none(params: dict[str, Any]) -> dict[str, Any]:
    """The provider sends only what is set."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = drop_none(value)
        elif isinstance(value, list):
            value = [drop_none(v) if isinstance(v, dict) else v for v in value]
        out[key] = value
    return out


def ref(name: str) -> str:
    """The ID the mocks give a resource (`<name>-id`)."""
    return f"{name}-id"


# --- EC2: network --------------------------------------------------------------------------------


@maps("aws:ec2/vpc:Vpc")
def _vpc(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "CreateVpc",
        {
            "CidrBlock": p.get("cidrBlock"),
            "InstanceTenancy": p.get("instanceTenancy"),
            "AmazonProvidedIpv6CidrBlock": p.get("assignGeneratedIpv6CidrBlock"),
            **tag_spec("vpc", p, ctx),
        },
    )
    # ModifyVpcAttribute takes one attribute per call.
    for key, member in (
        ("enableDnsSupport", "EnableDnsSupport"),
        ("enableDnsHostnames", "EnableDnsHostnames"),
    ):
        if key in p:
            yield "ec2", "ModifyVpcAttribute", {"VpcId": ref(name), member: {"Value": p[key]}}


@maps("aws:ec2/subnet:Subnet")
def _subnet(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "CreateSubnet",
        {
            "VpcId": p.get("vpcId"),
            "CidrBlock": p.get("cidrBlock"),
            "AvailabilityZone": p.get("availabilityZone"),
            "AvailabilityZoneId": p.get("availabilityZoneId"),
            "Ipv6CidrBlock": p.get("ipv6CidrBlock"),
            **tag_spec("subnet", p, ctx),
        },
    )
    # The provider modifies an attribute only to turn it on, one per call.
    for key, member in (
        ("mapPublicIpOnLaunch", "MapPublicIpOnLaunch"),
        ("assignIpv6AddressOnCreation", "AssignIpv6AddressOnCreation"),
    ):
        if p.get(key):
            yield "ec2", "ModifySubnetAttribute", {"SubnetId": ref(name), member: {"Value": True}}


@maps("aws:ec2/internetGateway:InternetGateway")
def _igw(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield "ec2", "CreateInternetGateway", tag_spec("internet-gateway", p, ctx)
    if p.get("vpcId"):
        yield (
            "ec2",
            "AttachInternetGateway",
            {"InternetGatewayId": ref(name), "VpcId": p["vpcId"]},
        )


@maps("aws:ec2/egressOnlyInternetGateway:EgressOnlyInternetGateway")
def _eigw(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "CreateEgressOnlyInternetGateway",
        {"VpcId": p.get("vpcId"), **tag_spec("egress-only-internet-gateway", p, ctx)},
    )


@maps("aws:ec2/eip:Eip")
def _eip(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "AllocateAddress",
        {
            "Domain": p.get("domain"),
            "NetworkBorderGroup": p.get("networkBorderGroup"),
            "PublicIpv4Pool": p.get("publicIpv4Pool"),
            **tag_spec("elastic-ip", p, ctx),
        },
    )


@maps("aws:ec2/natGateway:NatGateway")
def _nat(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "CreateNatGateway",
        {
            "SubnetId": p.get("subnetId"),
            "AllocationId": p.get("allocationId"),
            "ConnectivityType": p.get("connectivityType"),
            "PrivateIpAddress": p.get("privateIp"),
            **tag_spec("natgateway", p, ctx),
        },
    )


ROUTE_TARGETS = {
    "gatewayId": "GatewayId",
    "natGatewayId": "NatGatewayId",
    "transitGatewayId": "TransitGatewayId",
    "vpcEndpointId": "VpcEndpointId",
    "vpcPeeringConnectionId": "VpcPeeringConnectionId",
    "networkInterfaceId": "NetworkInterfaceId",
    "egressOnlyGatewayId": "EgressOnlyInternetGatewayId",
    "carrierGatewayId": "CarrierGatewayId",
    "localGatewayId": "LocalGatewayId",
    "coreNetworkArn": "CoreNetworkArn",
}
ROUTE_DESTINATIONS = {
    "cidrBlock": "DestinationCidrBlock",
    "destinationCidrBlock": "DestinationCidrBlock",
    "ipv6CidrBlock": "DestinationIpv6CidrBlock",
    "destinationIpv6CidrBlock": "DestinationIpv6CidrBlock",
    "destinationPrefixListId": "DestinationPrefixListId",
}


def _route(table: str, route: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {"RouteTableId": table}
    for key, value in route.items():
        member = ROUTE_TARGETS.get(key) or ROUTE_DESTINATIONS.get(key)
        # An unknown field goes through as is, so the validator names it.
        params[member or key] = value
    params.pop("routeTableId", None)
    return params


@maps("aws:ec2/routeTable:RouteTable")
def _rt(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield "ec2", "CreateRouteTable", {"VpcId": p.get("vpcId"), **tag_spec("route-table", p, ctx)}
    for route in p.get("routes") or []:
        yield "ec2", "CreateRoute", _route(ref(name), route)


@maps("aws:ec2/route:Route")
def _route_resource(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield "ec2", "CreateRoute", _route(p.get("routeTableId", ""), p)


@maps("aws:ec2/routeTableAssociation:RouteTableAssociation")
def _rta(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "AssociateRouteTable",
        {
            "RouteTableId": p.get("routeTableId"),
            "SubnetId": p.get("subnetId"),
            "GatewayId": p.get("gatewayId"),
        },
    )


def _permission(rule: dict[str, Any]) -> dict[str, Any]:
    """An inline or aws:vpc rule as one IpPermission."""
    description = rule.get("description")
    permission: dict[str, Any] = {
        "IpProtocol": str(rule.get("ipProtocol", rule.get("protocol", ""))),
        "FromPort": num(rule.get("fromPort")),
        "ToPort": num(rule.get("toPort")),
    }
    ranges = [rule["cidrIpv4"]] if rule.get("cidrIpv4") else rule.get("cidrBlocks") or []
    if ranges:
        permission["IpRanges"] = [{"CidrIp": c, "Description": description} for c in ranges]
    ranges6 = [rule["cidrIpv6"]] if rule.get("cidrIpv6") else rule.get("ipv6CidrBlocks") or []
    if ranges6:
        permission["Ipv6Ranges"] = [{"CidrIpv6": c, "Description": description} for c in ranges6]
    groups = (
        [rule["referencedSecurityGroupId"]]
        if rule.get("referencedSecurityGroupId")
        else rule.get("securityGroups") or []
    )
    if groups:
        permission["UserIdGroupPairs"] = [
            {"GroupId": g, "Description": description} for g in groups
        ]
    lists = [rule["prefixListId"]] if rule.get("prefixListId") else rule.get("prefixListIds") or []
    if lists:
        permission["PrefixListIds"] = [
            {"PrefixListId": pl, "Description": description} for pl in lists
        ]
    return permission


@maps("aws:ec2/securityGroup:SecurityGroup")
def _sg(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "CreateSecurityGroup",
        {
            "GroupName": autoname(name, p),
            "Description": p.get("description", MANAGED_BY),
            "VpcId": p.get("vpcId"),
            **tag_spec("security-group", p, ctx),
        },
    )
    # The provider always removes the allow-all egress rule AWS adds to a new group.
    yield (
        "ec2",
        "RevokeSecurityGroupEgress",
        {
            "GroupId": ref(name),
            "IpPermissions": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
        },
    )
    for key, operation in (
        ("ingress", "AuthorizeSecurityGroupIngress"),
        ("egress", "AuthorizeSecurityGroupEgress"),
    ):
        rules = p.get(key) or []
        if rules:
            yield (
                "ec2",
                operation,
                {"GroupId": ref(name), "IpPermissions": [_permission(r) for r in rules]},
            )


@maps("aws:ec2/defaultSecurityGroup:DefaultSecurityGroup")
def _default_sg(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    # Adopted, not created: the provider finds the VPC's default group, revokes the rules
    # it finds there (state-dependent, so not modelled), authorizes the given ones and tags it.
    yield (
        "ec2",
        "DescribeSecurityGroups",
        {
            "Filters": [
                {"Name": "vpc-id", "Values": [p.get("vpcId")]},
                {"Name": "group-name", "Values": ["default"]},
            ]
        },
    )
    for key, operation in (
        ("ingress", "AuthorizeSecurityGroupIngress"),
        ("egress", "AuthorizeSecurityGroupEgress"),
    ):
        rules = p.get(key) or []
        if rules:
            yield (
                "ec2",
                operation,
                {"GroupId": ref(name), "IpPermissions": [_permission(r) for r in rules]},
            )
    tags = tag_list(p, ctx)
    if tags:
        yield "ec2", "CreateTags", {"Resources": [ref(name)], "Tags": tags}


@maps("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
def _ingress(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "AuthorizeSecurityGroupIngress",
        {
            "GroupId": p.get("securityGroupId"),
            "IpPermissions": [_permission(p)],
            **tag_spec("security-group-rule", p, ctx),
        },
    )


@maps("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
def _egress(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "AuthorizeSecurityGroupEgress",
        {
            "GroupId": p.get("securityGroupId"),
            "IpPermissions": [_permission(p)],
            **tag_spec("security-group-rule", p, ctx),
        },
    )


@maps("aws:ec2/securityGroupRule:SecurityGroupRule")
def _sg_rule(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    rule = (
        {**p, "securityGroups": [p["sourceSecurityGroupId"]]}
        if p.get("sourceSecurityGroupId")
        else p
    )
    operation = (
        "AuthorizeSecurityGroupIngress"
        if p.get("type") == "ingress"
        else "AuthorizeSecurityGroupEgress"
    )
    yield (
        "ec2",
        operation,
        {"GroupId": p.get("securityGroupId"), "IpPermissions": [_permission(rule)]},
    )


@maps("aws:ec2/vpcEndpoint:VpcEndpoint")
def _endpoint(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ec2",
        "CreateVpcEndpoint",
        {
            "VpcId": p.get("vpcId"),
            "ServiceName": p.get("serviceName"),
            "VpcEndpointType": p.get("vpcEndpointType"),
            "RouteTableIds": p.get("routeTableIds"),
            "SubnetIds": p.get("subnetIds"),
            "SecurityGroupIds": p.get("securityGroupIds"),
            "PrivateDnsEnabled": p.get("privateDnsEnabled"),
            "PolicyDocument": p.get("policy"),
            "IpAddressType": p.get("ipAddressType"),
            **tag_spec("vpc-endpoint", p, ctx),
        },
    )


# --- EC2: launch template ------------------------------------------------------------------------

EBS = {
    "volumeType": ("VolumeType", None),
    "volumeSize": ("VolumeSize", num),
    "encrypted": ("Encrypted", tf_bool),
    "deleteOnTermination": ("DeleteOnTermination", tf_bool),
    "iops": ("Iops", num),
    "throughput": ("Throughput", num),
    "kmsKeyId": ("KmsKeyId", None),
    "snapshotId": ("SnapshotId", None),
}
NETWORK_INTERFACE = {
    "deviceIndex": ("DeviceIndex", num),
    "securityGroups": ("Groups", None),
    "associatePublicIpAddress": ("AssociatePublicIpAddress", tf_bool),
    "deleteOnTermination": ("DeleteOnTermination", tf_bool),
    "subnetId": ("SubnetId", None),
    "description": ("Description", None),
    "networkCardIndex": ("NetworkCardIndex", num),
    "interfaceType": ("InterfaceType", None),
}
METADATA = {
    "httpEndpoint": ("HttpEndpoint", None),
    "httpTokens": ("HttpTokens", None),
    "httpPutResponseHopLimit": ("HttpPutResponseHopLimit", num),
    "httpProtocolIpv6": ("HttpProtocolIpv6", None),
    "instanceMetadataTags": ("InstanceMetadataTags", None),
}


def _fields(source: dict[str, Any], table: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in source.items():
        member, convert = table.get(key, (key, None))  # unknown: passed on, then refused
        out[member] = convert(value) if convert else value
    return out


@maps("aws:ec2/launchTemplate:LaunchTemplate")
def _lt(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    data: dict[str, Any] = {
        "ImageId": p.get("imageId"),
        "InstanceType": p.get("instanceType"),
        "KeyName": p.get("keyName"),
        "UserData": p.get("userData"),
        "EbsOptimized": tf_bool(p.get("ebsOptimized")),
        "VpcSecurityGroupIds": p.get("vpcSecurityGroupIds"),
        "DisableApiTermination": p.get("disableApiTermination"),
        "InstanceInitiatedShutdownBehavior": p.get("instanceInitiatedShutdownBehavior"),
    }
    if "iamInstanceProfile" in p:
        data["IamInstanceProfile"] = _fields(
            p["iamInstanceProfile"], {"arn": ("Arn", None), "name": ("Name", None)}
        )
    if "metadataOptions" in p:
        data["MetadataOptions"] = _fields(p["metadataOptions"], METADATA)
    if "monitoring" in p:
        data["Monitoring"] = {"Enabled": p["monitoring"].get("enabled")}
    if "blockDeviceMappings" in p:
        data["BlockDeviceMappings"] = [
            {
                "DeviceName": m.get("deviceName"),
                "NoDevice": m.get("noDevice"),
                "VirtualName": m.get("virtualName"),
                **({"Ebs": _fields(m["ebs"], EBS)} if "ebs" in m else {}),
            }
            for m in p["blockDeviceMappings"]
        ]
    if "networkInterfaces" in p:
        data["NetworkInterfaces"] = [_fields(n, NETWORK_INTERFACE) for n in p["networkInterfaces"]]
    if "tagSpecifications" in p:
        data["TagSpecifications"] = [
            {
                "ResourceType": s.get("resourceType"),
                "Tags": [{"Key": k, "Value": v} for k, v in (s.get("tags") or {}).items()],
            }
            for s in p["tagSpecifications"]
        ]
    yield (
        "ec2",
        "CreateLaunchTemplate",
        {
            "LaunchTemplateName": autoname(name, p),
            # The provider's `description` is the version's description.
            "VersionDescription": p.get("description"),
            "LaunchTemplateData": data,
            **tag_spec("launch-template", p, ctx),
        },
    )


# --- Auto Scaling --------------------------------------------------------------------------------

DISTRIBUTION = {
    "onDemandAllocationStrategy": ("OnDemandAllocationStrategy", None),
    "onDemandBaseCapacity": ("OnDemandBaseCapacity", num),
    "onDemandPercentageAboveBaseCapacity": ("OnDemandPercentageAboveBaseCapacity", num),
    "spotAllocationStrategy": ("SpotAllocationStrategy", None),
    "spotInstancePools": ("SpotInstancePools", num),
    "spotMaxPrice": ("SpotMaxPrice", None),
}
LT_SPEC = {
    "launchTemplateId": ("LaunchTemplateId", None),
    "launchTemplateName": ("LaunchTemplateName", None),
    "version": ("Version", None),
}
REFRESH_PREFERENCES = {
    "minHealthyPercentage": ("MinHealthyPercentage", num),
    "maxHealthyPercentage": ("MaxHealthyPercentage", num),
    "skipMatching": ("SkipMatching", None),
    "autoRollback": ("AutoRollback", None),
    # Strings in the provider's schema, parsed to integers.
    "instanceWarmup": ("InstanceWarmup", lambda v: int(v) if str(v).isdigit() else v),
    "checkpointDelay": ("CheckpointDelay", lambda v: int(v) if str(v).isdigit() else v),
    "checkpointPercentages": ("CheckpointPercentages", lambda v: [num(x) for x in v]),
    "scaleInProtectedInstances": ("ScaleInProtectedInstances", None),
    "standbyInstances": ("StandbyInstances", None),
    "alarmSpecification": (
        "AlarmSpecification",
        lambda v: {"Alarms": v.get("alarms")} if isinstance(v, dict) else v,
    ),
}


# With a preferences block the provider sends its schema defaults for what is left out
# (expandRefreshPreferences; the defaults are in pulumi_aws's GroupInstanceRefreshPreferences).
REFRESH_DEFAULTS: dict[str, Any] = {
    "MinHealthyPercentage": 90,
    "MaxHealthyPercentage": 100,
    "SkipMatching": False,
    "AutoRollback": False,
    "ScaleInProtectedInstances": "Ignore",
    "StandbyInstances": "Ignore",
}


def _override(o: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in o.items():
        if key == "instanceType":
            out["InstanceType"] = value
        elif key == "weightedCapacity":
            out["WeightedCapacity"] = str(value)
        elif key == "launchTemplateSpecification":
            out["LaunchTemplateSpecification"] = _fields(value, LT_SPEC)
        else:
            out[key] = value
    return out


@maps("aws:autoscaling/group:Group")
def _asg(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    group = autoname(name, p)
    params: dict[str, Any] = {
        "AutoScalingGroupName": group,
        "MinSize": num(p.get("minSize")),
        "MaxSize": num(p.get("maxSize")),
        "DesiredCapacity": num(p.get("desiredCapacity")),
        "DefaultCooldown": num(p.get("defaultCooldown")),
        "DefaultInstanceWarmup": num(p.get("defaultInstanceWarmup")),
        "HealthCheckType": p.get("healthCheckType"),
        "HealthCheckGracePeriod": num(p.get("healthCheckGracePeriod")),
        "CapacityRebalance": p.get("capacityRebalance"),
        "MaxInstanceLifetime": num(p.get("maxInstanceLifetime")),
        "NewInstancesProtectedFromScaleIn": p.get("protectFromScaleIn"),
        "TerminationPolicies": p.get("terminationPolicies"),
        "TargetGroupARNs": p.get("targetGroupArns"),
        "ServiceLinkedRoleARN": p.get("serviceLinkedRoleArn"),
        "PlacementGroup": p.get("placementGroup"),
        "AvailabilityZones": p.get("availabilityZones"),
    }
    if p.get("vpcZoneIdentifiers"):
        params["VPCZoneIdentifier"] = ",".join(p["vpcZoneIdentifiers"])
    if "launchTemplate" in p:
        params["LaunchTemplate"] = _fields(
            p["launchTemplate"],
            {"id": ("LaunchTemplateId", None), "name": ("LaunchTemplateName", None), **LT_SPEC},
        )
    if "mixedInstancesPolicy" in p:
        mixed = p["mixedInstancesPolicy"]
        policy: dict[str, Any] = {}
        if "instancesDistribution" in mixed:
            policy["InstancesDistribution"] = _fields(mixed["instancesDistribution"], DISTRIBUTION)
        if "launchTemplate" in mixed:
            lt = mixed["launchTemplate"]
            policy["LaunchTemplate"] = {
                "LaunchTemplateSpecification": _fields(
                    lt.get("launchTemplateSpecification", {}), LT_SPEC
                ),
                **(
                    {"Overrides": [_override(o) for o in lt["overrides"]]}
                    if "overrides" in lt
                    else {}
                ),
            }
        params["MixedInstancesPolicy"] = policy
    # The provider sends the group's own tags, not the default ones.
    if p.get("tags"):
        params["Tags"] = [
            {
                "ResourceId": group,
                "ResourceType": "auto-scaling-group",
                "Key": t.get("key"),
                "Value": t.get("value"),
                "PropagateAtLaunch": t.get("propagateAtLaunch"),
            }
            for t in p["tags"]
        ]
    if p.get("initialLifecycleHooks"):
        params["LifecycleHookSpecificationList"] = [
            _hook_fields(h) for h in p["initialLifecycleHooks"]
        ]
    yield "autoscaling", "CreateAutoScalingGroup", params
    if p.get("enabledMetrics"):
        yield (
            "autoscaling",
            "EnableMetricsCollection",
            {
                "AutoScalingGroupName": group,
                "Granularity": p.get("metricsGranularity", "1Minute"),
                "Metrics": list(p["enabledMetrics"]),
            },
        )
    # Sent when the launch template changes (an update); checked here for its shape.
    if "instanceRefresh" in p:
        refresh = p["instanceRefresh"]
        yield (
            "autoscaling",
            "StartInstanceRefresh",
            {
                "AutoScalingGroupName": group,
                "Strategy": refresh.get("strategy"),
                **(
                    {
                        "Preferences": {
                            **REFRESH_DEFAULTS,
                            **_fields(refresh["preferences"], REFRESH_PREFERENCES),
                        }
                    }
                    if refresh.get("preferences")
                    else {}
                ),
            },
        )


def _hook_fields(h: dict[str, Any]) -> dict[str, Any]:
    return {
        "LifecycleHookName": h.get("name"),
        "LifecycleTransition": h.get("lifecycleTransition"),
        "HeartbeatTimeout": num(h.get("heartbeatTimeout")),
        "DefaultResult": h.get("defaultResult"),
        "NotificationMetadata": h.get("notificationMetadata"),
        "NotificationTargetARN": h.get("notificationTargetArn"),
        "RoleARN": h.get("roleArn"),
    }


@maps("aws:autoscaling/lifecycleHook:LifecycleHook")
def _hook(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "autoscaling",
        "PutLifecycleHook",
        {
            **_hook_fields({**p, "name": autoname(name, p)}),
            "AutoScalingGroupName": p.get("autoscalingGroupName"),
        },
    )


def _dimensions(dims: Any) -> Any:
    """A map (alarm) or a list of name/value (scaling) as a Name/Value list."""
    if isinstance(dims, dict):
        return [{"Name": k, "Value": v} for k, v in dims.items()]
    return [{"Name": d.get("name"), "Value": d.get("value")} for d in dims or []]


def _scaling_query(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "Id": m.get("id"),
        "Expression": m.get("expression"),
        "Label": m.get("label"),
        "ReturnData": m.get("returnData"),
    }
    if "metricStat" in m:
        stat = m["metricStat"]
        metric = stat.get("metric", {})
        out["MetricStat"] = {
            "Metric": {
                "MetricName": metric.get("metricName"),
                "Namespace": metric.get("namespace"),
                "Dimensions": _dimensions(metric.get("dimensions")),
            },
            "Stat": stat.get("stat"),
            "Unit": stat.get("unit"),
            "Period": num(stat.get("period")),
        }
    extra = set(m) - {"id", "expression", "label", "returnData", "metricStat"}
    out.update({k: m[k] for k in extra})
    return out


def _target_tracking(t: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "TargetValue": t.get("targetValue"),
        "DisableScaleIn": t.get("disableScaleIn"),
    }
    if "predefinedMetricSpecification" in t:
        spec = t["predefinedMetricSpecification"]
        out["PredefinedMetricSpecification"] = {
            "PredefinedMetricType": spec.get("predefinedMetricType"),
            "ResourceLabel": spec.get("resourceLabel"),
        }
    if "customizedMetricSpecification" in t:
        spec = t["customizedMetricSpecification"]
        custom: dict[str, Any] = {
            "MetricName": spec.get("metricName"),
            "Namespace": spec.get("namespace"),
            "Statistic": spec.get("statistic"),
            "Unit": spec.get("unit"),
        }
        if spec.get("metricDimensions"):
            custom["Dimensions"] = _dimensions(spec["metricDimensions"])
        if spec.get("metrics"):
            custom["Metrics"] = [_scaling_query(m) for m in spec["metrics"]]
        out["CustomizedMetricSpecification"] = custom
    return out


@maps("aws:autoscaling/policy:Policy")
def _policy(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    params: dict[str, Any] = {
        "AutoScalingGroupName": p.get("autoscalingGroupName"),
        "PolicyName": autoname(name, p),
        "PolicyType": p.get("policyType"),
        "AdjustmentType": p.get("adjustmentType"),
        "Cooldown": num(p.get("cooldown")),
        "EstimatedInstanceWarmup": num(p.get("estimatedInstanceWarmup")),
        "MetricAggregationType": p.get("metricAggregationType"),
        "MinAdjustmentMagnitude": num(p.get("minAdjustmentMagnitude")),
        "ScalingAdjustment": num(p.get("scalingAdjustment")),
        "Enabled": p.get("enabled"),
    }
    if p.get("stepAdjustments"):
        params["StepAdjustments"] = [
            {
                "MetricIntervalLowerBound": tf_float(s.get("metricIntervalLowerBound")),
                "MetricIntervalUpperBound": tf_float(s.get("metricIntervalUpperBound")),
                "ScalingAdjustment": num(s.get("scalingAdjustment")),
            }
            for s in p["stepAdjustments"]
        ]
    if "targetTrackingConfiguration" in p:
        params["TargetTrackingConfiguration"] = _target_tracking(p["targetTrackingConfiguration"])
    yield "autoscaling", "PutScalingPolicy", params


# --- CloudWatch and Logs -------------------------------------------------------------------------


def _alarm_query(q: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "Id": q.get("id"),
        "Expression": q.get("expression"),
        "Label": q.get("label"),
        "ReturnData": q.get("returnData"),
        "Period": num(q.get("period")),
        "AccountId": q.get("accountId"),
    }
    if "metric" in q:
        metric = q["metric"]
        out["MetricStat"] = {
            "Metric": {
                "MetricName": metric.get("metricName"),
                "Namespace": metric.get("namespace"),
                "Dimensions": _dimensions(metric.get("dimensions")),
            },
            "Period": num(metric.get("period")),
            "Stat": metric.get("stat"),
            "Unit": metric.get("unit"),
        }
    return out


@maps("aws:cloudwatch/metricAlarm:MetricAlarm")
def _alarm(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    params: dict[str, Any] = {
        "AlarmName": autoname(name, p),
        "AlarmDescription": p.get("alarmDescription"),
        "ActionsEnabled": p.get("actionsEnabled"),
        "AlarmActions": p.get("alarmActions"),
        "OKActions": p.get("okActions"),
        "InsufficientDataActions": p.get("insufficientDataActions"),
        "ComparisonOperator": p.get("comparisonOperator"),
        "EvaluationPeriods": num(p.get("evaluationPeriods")),
        "DatapointsToAlarm": num(p.get("datapointsToAlarm")),
        "Threshold": p.get("threshold"),
        "ThresholdMetricId": p.get("thresholdMetricId"),
        "TreatMissingData": p.get("treatMissingData"),
        "EvaluateLowSampleCountPercentile": p.get("evaluateLowSampleCountPercentile"),
        "MetricName": p.get("metricName"),
        "Namespace": p.get("namespace"),
        "Period": num(p.get("period")),
        "Statistic": p.get("statistic"),
        "ExtendedStatistic": p.get("extendedStatistic"),
        "Unit": p.get("unit"),
        "Tags": tag_list(p, ctx) or None,
    }
    if p.get("dimensions"):
        params["Dimensions"] = _dimensions(p["dimensions"])
    if p.get("metricQueries"):
        params["Metrics"] = [_alarm_query(q) for q in p["metricQueries"]]
    yield "cloudwatch", "PutMetricAlarm", params


@maps("aws:cloudwatch/dashboard:Dashboard")
def _dashboard(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "cloudwatch",
        "PutDashboard",
        {"DashboardName": p.get("dashboardName"), "DashboardBody": p.get("dashboardBody")},
    )


@maps("aws:cloudwatch/logGroup:LogGroup")
def _logs(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    group = autoname(name, p)
    yield (
        "logs",
        "CreateLogGroup",
        {
            "logGroupName": group,
            "kmsKeyId": p.get("kmsKeyId"),
            "logGroupClass": p.get("logGroupClass"),
            "tags": all_tags(p, ctx) or None,
        },
    )
    if p.get("retentionInDays"):
        yield (
            "logs",
            "PutRetentionPolicy",
            {"logGroupName": group, "retentionInDays": num(p["retentionInDays"])},
        )


# --- SQS -----------------------------------------------------------------------------------------

QUEUE_ATTRIBUTES = {
    "visibilityTimeoutSeconds": "VisibilityTimeout",
    "messageRetentionSeconds": "MessageRetentionPeriod",
    "maxMessageSize": "MaximumMessageSize",
    "delaySeconds": "DelaySeconds",
    "receiveWaitTimeSeconds": "ReceiveMessageWaitTimeSeconds",
    "redrivePolicy": "RedrivePolicy",
    "redriveAllowPolicy": "RedriveAllowPolicy",
    "policy": "Policy",
    "sqsManagedSseEnabled": "SqsManagedSseEnabled",
    "kmsMasterKeyId": "KmsMasterKeyId",
    "kmsDataKeyReusePeriodSeconds": "KmsDataKeyReusePeriodSeconds",
    "fifoQueue": "FifoQueue",
    "contentBasedDeduplication": "ContentBasedDeduplication",
    "deduplicationScope": "DeduplicationScope",
    "fifoThroughputLimit": "FifoThroughputLimit",
}


def _attribute(value: Any) -> str:
    """SQS attributes are strings: numbers as integers, booleans lower case."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(num(value))


@maps("aws:sqs/queue:Queue")
def _queue(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    attributes = {
        member: _attribute(p[key]) for key, member in QUEUE_ATTRIBUTES.items() if key in p
    }
    queue_name = autoname(name, p)
    if p.get("fifoQueue") and not queue_name.endswith(".fifo"):
        queue_name += ".fifo"
    yield (
        "sqs",
        "CreateQueue",
        {
            "QueueName": queue_name,
            "Attributes": attributes or None,
            "tags": all_tags(p, ctx) or None,
        },
    )


@maps("aws:sqs/queuePolicy:QueuePolicy")
def _queue_policy(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "sqs",
        "SetQueueAttributes",
        {"QueueUrl": p.get("queueUrl"), "Attributes": {"Policy": p.get("policy")}},
    )


# --- S3 ------------------------------------------------------------------------------------------


def bucket_name(name: str, p: dict[str, Any]) -> str:
    if p.get("bucket"):
        return str(p["bucket"])
    if p.get("bucketPrefix"):
        return f"{p['bucketPrefix']}{BUCKET_SUFFIX}"
    return f"{name}{AUTONAME_SUFFIX}".lower()


@maps("aws:s3/bucket:Bucket", "aws:s3/bucketV2:BucketV2")
def _bucket(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    bucket = bucket_name(name, p)
    params: dict[str, Any] = {"Bucket": bucket}
    if p.get("objectLockEnabled"):
        params["ObjectLockEnabledForBucket"] = True
    # us-east-1 (the mocks' region) takes no CreateBucketConfiguration.
    yield "s3", "CreateBucket", params
    tags = tag_list(p, ctx)
    if tags:
        yield "s3", "PutBucketTagging", {"Bucket": bucket, "Tagging": {"TagSet": tags}}


@maps("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
def _pab(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    config = {
        member: p[key]
        for key, member in (
            ("blockPublicAcls", "BlockPublicAcls"),
            ("blockPublicPolicy", "BlockPublicPolicy"),
            ("ignorePublicAcls", "IgnorePublicAcls"),
            ("restrictPublicBuckets", "RestrictPublicBuckets"),
        )
        if key in p
    }
    yield (
        "s3",
        "PutPublicAccessBlock",
        {"Bucket": p.get("bucket"), "PublicAccessBlockConfiguration": config},
    )


@maps(
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
    "aws:s3/bucketServerSideEncryptionConfigurationV2:BucketServerSideEncryptionConfigurationV2",
)
def _sse(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    rules = []
    for rule in p.get("rules") or []:
        out: dict[str, Any] = {"BucketKeyEnabled": rule.get("bucketKeyEnabled")}
        default = rule.get("applyServerSideEncryptionByDefault")
        if default is not None:
            out["ApplyServerSideEncryptionByDefault"] = {
                "SSEAlgorithm": default.get("sseAlgorithm"),
                "KMSMasterKeyID": default.get("kmsMasterKeyId"),
            }
        rules.append(out)
    yield (
        "s3",
        "PutBucketEncryption",
        {
            "Bucket": p.get("bucket"),
            "ExpectedBucketOwner": p.get("expectedBucketOwner"),
            "ServerSideEncryptionConfiguration": {"Rules": rules},
        },
    )


@maps("aws:s3/bucketVersioning:BucketVersioning", "aws:s3/bucketVersioningV2:BucketVersioningV2")
def _versioning(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    config = p.get("versioningConfiguration") or {}
    yield (
        "s3",
        "PutBucketVersioning",
        {
            "Bucket": p.get("bucket"),
            "VersioningConfiguration": {
                "Status": config.get("status"),
                "MFADelete": config.get("mfaDelete"),
            },
        },
    )


def _lifecycle_filter(f: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in f.items():
        if key == "prefix":
            out["Prefix"] = value
        elif key == "objectSizeGreaterThan":
            out["ObjectSizeGreaterThan"] = num(value)
        elif key == "objectSizeLessThan":
            out["ObjectSizeLessThan"] = num(value)
        elif key == "tag":
            out["Tag"] = {"Key": value.get("key"), "Value": value.get("value")}
        else:
            out[key] = value
    return out


def _lifecycle_rule(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"ID": r.get("id"), "Status": r.get("status")}
    for key, value in r.items():
        if key in ("id", "status"):
            continue
        if key == "filter":
            out["Filter"] = _lifecycle_filter(value)
        elif key == "prefix":
            out["Prefix"] = value
        elif key == "expiration":
            out["Expiration"] = _fields(
                value,
                {
                    "days": ("Days", num),
                    "date": ("Date", None),
                    "expiredObjectDeleteMarker": ("ExpiredObjectDeleteMarker", None),
                },
            )
        elif key == "noncurrentVersionExpiration":
            out["NoncurrentVersionExpiration"] = _fields(
                value,
                {
                    "noncurrentDays": ("NoncurrentDays", num),
                    "newerNoncurrentVersions": ("NewerNoncurrentVersions", num),
                },
            )
        elif key == "abortIncompleteMultipartUpload":
            out["AbortIncompleteMultipartUpload"] = _fields(
                value, {"daysAfterInitiation": ("DaysAfterInitiation", num)}
            )
        elif key in ("transitions", "noncurrentVersionTransitions"):
            member = "Transitions" if key == "transitions" else "NoncurrentVersionTransitions"
            out[member] = [
                _fields(
                    t,
                    {
                        "days": ("Days", num),
                        "noncurrentDays": ("NoncurrentDays", num),
                        "storageClass": ("StorageClass", None),
                        "newerNoncurrentVersions": ("NewerNoncurrentVersions", num),
                    },
                )
                for t in value
            ]
        else:
            out[key] = value
    return out


@maps(
    "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
    "aws:s3/bucketLifecycleConfigurationV2:BucketLifecycleConfigurationV2",
)
def _lifecycle(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "s3",
        "PutBucketLifecycleConfiguration",
        {
            "Bucket": p.get("bucket"),
            "TransitionDefaultMinimumObjectSize": p.get("transitionDefaultMinimumObjectSize"),
            "LifecycleConfiguration": {"Rules": [_lifecycle_rule(r) for r in p.get("rules") or []]},
        },
    )


@maps("aws:s3/bucketPolicy:BucketPolicy")
def _bucket_policy(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield "s3", "PutBucketPolicy", {"Bucket": p.get("bucket"), "Policy": p.get("policy")}


@maps("aws:s3/bucketOwnershipControls:BucketOwnershipControls")
def _ownership(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    rule = p.get("rule") or {}
    yield (
        "s3",
        "PutBucketOwnershipControls",
        {
            "Bucket": p.get("bucket"),
            "OwnershipControls": {"Rules": [{"ObjectOwnership": rule.get("objectOwnership")}]},
        },
    )


@maps("aws:s3/bucketObjectv2:BucketObjectv2", "aws:s3/bucketObject:BucketObject")
def _object(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    tags = all_tags(p, ctx)
    # The body (source/content) is not modelled: metadata only.
    yield (
        "s3",
        "PutObject",
        {
            "Bucket": p.get("bucket"),
            "Key": p.get("key", name),
            "ContentType": p.get("contentType"),
            "CacheControl": p.get("cacheControl"),
            "ContentEncoding": p.get("contentEncoding"),
            "ServerSideEncryption": p.get("serverSideEncryption"),
            "SSEKMSKeyId": p.get("kmsKeyId"),
            "StorageClass": p.get("storageClass"),
            "ACL": p.get("acl"),
            "Metadata": p.get("metadata"),
            "Tagging": "&".join(f"{k}={v}" for k, v in tags.items()) or None,
        },
    )


# --- IAM -----------------------------------------------------------------------------------------


@maps("aws:iam/role:Role")
def _role(name: str, p: dict[str, Any], ctx: Context) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "iam",
        "CreateRole",
        {
            "RoleName": autoname(name, p),
            "Path": p.get("path"),
            "Description": p.get("description"),
            "AssumeRolePolicyDocument": p.get("assumeRolePolicy"),
            "MaxSessionDuration": num(p.get("maxSessionDuration")),
            "PermissionsBoundary": p.get("permissionsBoundary"),
            "Tags": tag_list(p, ctx) or None,
        },
    )
    for inline in p.get("inlinePolicies") or []:
        yield (
            "iam",
            "PutRolePolicy",
            {
                "RoleName": autoname(name, p),
                "PolicyName": inline.get("name"),
                "PolicyDocument": inline.get("policy"),
            },
        )


@maps("aws:iam/rolePolicy:RolePolicy")
def _role_policy(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "iam",
        "PutRolePolicy",
        {
            "RoleName": p.get("role"),
            "PolicyName": autoname(name, p),
            "PolicyDocument": p.get("policy"),
        },
    )


@maps("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
def _attachment(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield "iam", "AttachRolePolicy", {"RoleName": p.get("role"), "PolicyArn": p.get("policyArn")}


@maps("aws:iam/instanceProfile:InstanceProfile")
def _profile(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    profile = autoname(name, p)
    yield (
        "iam",
        "CreateInstanceProfile",
        {"InstanceProfileName": profile, "Path": p.get("path"), "Tags": tag_list(p, ctx) or None},
    )
    if p.get("role"):
        yield (
            "iam",
            "AddRoleToInstanceProfile",
            {"InstanceProfileName": profile, "RoleName": p["role"]},
        )


# --- SSM -----------------------------------------------------------------------------------------


@maps("aws:ssm/parameter:Parameter")
def _parameter(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "ssm",
        "PutParameter",
        {
            "Name": autoname(name, p),
            "Value": p.get("value", p.get("insecureValue")),
            "Type": p.get("type"),
            "Description": p.get("description"),
            "KeyId": p.get("keyId"),
            "Tier": p.get("tier"),
            "DataType": p.get("dataType"),
            "AllowedPattern": p.get("allowedPattern"),
            "Overwrite": p.get("overwrite"),
            "Tags": tag_list(p, ctx) or None,
        },
    )


# --- Amazon MQ -----------------------------------------------------------------------------------


@maps("aws:mq/broker:Broker")
def _broker(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    params: dict[str, Any] = {
        "BrokerName": autoname(name, p, "brokerName"),
        "EngineType": p.get("engineType"),
        "EngineVersion": p.get("engineVersion"),
        "HostInstanceType": p.get("hostInstanceType"),
        "DeploymentMode": p.get("deploymentMode"),
        "PubliclyAccessible": p.get("publiclyAccessible", False),
        "AutoMinorVersionUpgrade": p.get("autoMinorVersionUpgrade"),
        "AuthenticationStrategy": p.get("authenticationStrategy"),
        "StorageType": p.get("storageType"),
        "SecurityGroups": p.get("securityGroups"),
        "SubnetIds": p.get("subnetIds"),
        "DataReplicationMode": p.get("dataReplicationMode"),
        "Tags": all_tags(p, ctx) or None,
        "Users": [
            {
                "Username": u.get("username"),
                "Password": u.get("password"),
                "ConsoleAccess": u.get("consoleAccess"),
                "Groups": u.get("groups"),
                "ReplicationUser": u.get("replicationUser"),
            }
            for u in p.get("users") or []
        ],
    }
    if p.get("encryptionOptions"):
        enc = p["encryptionOptions"]
        params["EncryptionOptions"] = {
            "UseAwsOwnedKey": enc.get("useAwsOwnedKey"),
            "KmsKeyId": enc.get("kmsKeyId"),
        }
    if p.get("configuration"):
        conf = p["configuration"]
        params["Configuration"] = {"Id": conf.get("id"), "Revision": num(conf.get("revision"))}
    if p.get("logs"):
        logs = p["logs"]
        params["Logs"] = {"General": logs.get("general"), "Audit": logs.get("audit")}
    if p.get("maintenanceWindowStartTime"):
        window = p["maintenanceWindowStartTime"]
        params["MaintenanceWindowStartTime"] = {
            "DayOfWeek": window.get("dayOfWeek"),
            "TimeOfDay": window.get("timeOfDay"),
            "TimeZone": window.get("timeZone"),
        }
    yield "mq", "CreateBroker", params


@maps("aws:mq/configuration:Configuration")
def _mq_configuration(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "mq",
        "CreateConfiguration",
        {
            "Name": autoname(name, p),
            "EngineType": p.get("engineType"),
            "EngineVersion": p.get("engineVersion"),
            "AuthenticationStrategy": p.get("authenticationStrategy"),
            "Tags": all_tags(p, ctx) or None,
        },
    )
    if p.get("data") is not None:
        yield (
            "mq",
            "UpdateConfiguration",
            {
                "ConfigurationId": ref(name),
                "Description": p.get("description"),
                # The provider base64-encodes the configuration body.
                "Data": base64.b64encode(str(p["data"]).encode()).decode(),
            },
        )


# --- ElastiCache ---------------------------------------------------------------------------------


@maps("aws:elasticache/subnetGroup:SubnetGroup")
def _cache_subnets(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "elasticache",
        "CreateCacheSubnetGroup",
        {
            # The provider lower-cases the name (ElastiCache stores it so).
            "CacheSubnetGroupName": autoname(name, p, lower=True).lower(),
            "CacheSubnetGroupDescription": p.get("description", MANAGED_BY),
            "SubnetIds": p.get("subnetIds"),
            "Tags": tag_list(p, ctx) or None,
        },
    )


@maps("aws:elasticache/replicationGroup:ReplicationGroup")
def _replication_group(
    name: str, p: dict[str, Any], ctx: Context
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    yield (
        "elasticache",
        "CreateReplicationGroup",
        {
            "ReplicationGroupId": autoname(name, p, "replicationGroupId", lower=True).lower(),
            "ReplicationGroupDescription": p.get("description", MANAGED_BY),
            "NumCacheClusters": num(p.get("numCacheClusters")),
            "NumNodeGroups": num(p.get("numNodeGroups")),
            "ReplicasPerNodeGroup": num(p.get("replicasPerNodeGroup")),
            "CacheNodeType": p.get("nodeType"),
            "Engine": p.get("engine"),
            "EngineVersion": p.get("engineVersion"),
            "Port": num(p.get("port")),
            "CacheSubnetGroupName": p.get("subnetGroupName"),
            "CacheParameterGroupName": p.get("parameterGroupName"),
            "SecurityGroupIds": p.get("securityGroupIds"),
            "AtRestEncryptionEnabled": p.get("atRestEncryptionEnabled"),
            "TransitEncryptionEnabled": p.get("transitEncryptionEnabled"),
            "TransitEncryptionMode": p.get("transitEncryptionMode"),
            "AuthToken": p.get("authToken"),
            "KmsKeyId": p.get("kmsKeyId"),
            "AutoMinorVersionUpgrade": p.get("autoMinorVersionUpgrade"),
            "AutomaticFailoverEnabled": p.get("automaticFailoverEnabled"),
            "MultiAZEnabled": p.get("multiAzEnabled"),
            "SnapshotRetentionLimit": num(p.get("snapshotRetentionLimit")),
            "PreferredMaintenanceWindow": p.get("maintenanceWindow"),
            "NetworkType": p.get("networkType"),
            "IpDiscovery": p.get("ipDiscovery"),
            "Tags": tag_list(p, ctx) or None,
        },
    )


# --- the run -------------------------------------------------------------------------------------


def no_request_reason(typ: str) -> str | None:
    if typ.startswith(COMPONENT_PREFIX):
        return COMPONENT_REASON
    return NO_REQUEST.get(typ)


def context_of(resources: list[Any]) -> Context:
    tags: dict[str, str] = {}
    for r in resources:
        if r.typ == "pulumi:providers:aws" and r.props.get("defaultTags"):
            raw = r.props["defaultTags"]
            tags.update((json.loads(raw) if isinstance(raw, str) else raw).get("tags") or {})
    return Context(default_tags=tags)


def requests_of(resource: Any, ctx: Context) -> list[Request]:
    """The requests for one recorded resource; [] for a type in NO_REQUEST."""
    if no_request_reason(resource.typ) is not None:
        return []
    mapper = MAPPERS.get(resource.typ)
    if mapper is None:
        raise UnmappedType(
            f"{resource.name} ({resource.typ}): no AWS request mapping; add one to "
            "tests/infra/aws_requests.py, or list the type in NO_REQUEST with the reason"
        )
    label = f"{resource.name} ({resource.typ})"
    return [
        Request(service, operation, drop_none(params), resource=label)
        for service, operation, params in mapper(resource.name, resource.props, ctx)
    ]


def requests_for(resources: list[Any]) -> list[Request]:
    ctx = context_of(resources)
    return [req for r in resources for req in requests_of(r, ctx)]
