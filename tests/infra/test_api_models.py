"""The stack against AWS's own API models.

Every resource the program records is turned into the requests the AWS provider
sends for it (aws_requests.py) and each request is checked against botocore's
service model and the grammars the models leave out (aws_models.py). The
negative tests below break one thing in a real request and expect exactly that
violation, so the checks cannot pass by checking nothing.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
from typing import TYPE_CHECKING, Any

import pytest
from pulumi_mocks import Recorded, StackRun

from infra.config import StackConfig, StackConfigError

# pytest imports this folder's modules by their own names (conftest.py puts it on
# sys.path); mypy checks them as tests.infra.*.
if TYPE_CHECKING:
    from tests.infra.aws_models import UNCHECKED_PATTERNS, _pattern, run_violations, violations
    from tests.infra.aws_requests import (
        MAPPERS,
        NO_REQUEST,
        Request,
        UnmappedType,
        context_of,
        no_request_reason,
        requests_for,
        requests_of,
    )
else:
    from aws_models import UNCHECKED_PATTERNS, _pattern, run_violations, violations
    from aws_requests import (
        MAPPERS,
        NO_REQUEST,
        Request,
        UnmappedType,
        context_of,
        no_request_reason,
        requests_for,
        requests_of,
    )

# The configurations of test_program.py (broker x result store x spot x nat), restated,
# and the others it runs, as StackConfig keywords (built in the test, so that a setting
# StackConfig starts refusing fails one test, not the module's collection). Configurations
# test_program.py also runs are built once for both (run_stack caches by configuration).
COMBINATIONS = list(
    itertools.product(["sqs", "rabbitmq"], ["s3", "redis"], [True, False], ["none", "single"])
)
CONFIGS: dict[str, dict[str, Any]] = {
    f"{b}-{s}-{'spot' if spot else 'ondemand'}-nat_{nat}": {
        "broker": b,
        "result_store": s,
        "spot": spot,
        "nat": nat,
    }
    for b, s, spot, nat in COMBINATIONS
}
CONFIGS |= {
    "per-az-nat-3-zones": {"nat": "per-az", "az_count": 3},
    # The same configurations test_network_ipv6.py builds.
    "ipv6-sqs-s3": {"nat": "ipv6"},
    "ipv6-rabbitmq-redis-3-zones": {
        "nat": "ipv6",
        "broker": "rabbitmq",
        "result_store": "redis",
        "az_count": 3,
    },
    "rabbitmq-cluster": {"broker": "rabbitmq", "broker_deployment_mode": "CLUSTER_MULTI_AZ"},
    "rabbitmq-hour-long-batches": {"broker": "rabbitmq", "max_batch_seconds": 3600},
    "arm64-a1": {"instance_types": ("a1.large",)},
    "two-vcpu-types": {"instance_types": ("t3.medium", "c5.large")},
    # Only here: Graviton wheels shipped offline, RabbitMQ, all on demand.
    "arm64-offline-rabbitmq-ondemand": {
        "broker": "rabbitmq",
        "nat": "none",
        "spot": False,
        "instance_types": ("c7g.xlarge", "m7g.xlarge"),
    },
    # Only here: extra tags, and every number at the largest value StackConfig accepts.
    "tags-and-limits": {
        "stack": "prod-analytics",
        "tags": {"team": "data", "cost-center": "4711", "owner:email": "ops@example.com"},
        "vpc_cidr": "10.8.0.0/20",
        "az_count": 3,
        "max_instances": 200,
        "on_demand_base_capacity": 200,
        "root_volume_gb": 200,
        "idle_minutes": 1440,
        "max_batch_seconds": 21570,  # the SQS visibility timeout's 12 hours
        "lifecycle_heartbeat_seconds": 7200,
        "result_ttl_days": 30,
        "log_retention_days": 3653,
        "max_receive_count": 1000,
        "target_backlog": 2.5,
    },
    # Pulumi stack names: up to 100 letters, digits, hyphens, underscores and periods.
    "rabbitmq-longest-stack-name": {"broker": "rabbitmq", "stack": "s" * 96 + ".e_1"},
    "sqs-longest-stack-name": {"stack": "s" * 96 + ".e_1"},
}


def config(changes: dict[str, Any]) -> StackConfig:
    return StackConfig(**{"stack": "test", **changes})


def problems_of(run: StackRun) -> list[str]:
    requests = requests_for(run.resources)
    return [v for request in requests for v in violations(request)] + run_violations(requests)


@pytest.mark.parametrize("changes", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_request_passes_the_api_models(run_stack, changes):
    run = run_stack(config(changes))
    ctx = context_of(run.resources)
    for resource in run.resources:
        requests = requests_of(resource, ctx)  # UnmappedType for a type nobody mapped
        if no_request_reason(resource.typ) is None:
            assert requests, f"{resource.name} ({resource.typ}) maps to no request"
    problems = problems_of(run)
    assert not problems, "AWS would refuse:\n" + "\n".join(problems)


def test_an_unmapped_type_fails():
    stranger = Recorded("aws:lambda/function:Function", "resize", {"runtime": "python3.12"})
    with pytest.raises(UnmappedType, match=r"resize \(aws:lambda/function:Function\)"):
        requests_for([stranger])


def test_no_type_is_both_mapped_and_requestless():
    assert not set(MAPPERS) & set(NO_REQUEST)
    assert all(reason for reason in NO_REQUEST.values())


# --- the checks catch what they claim --------------------------------------------------------


def request_of(run_stack, name: str, operation: str, cfg: StackConfig | None = None) -> Request:
    run = run_stack(cfg or config(CONFIGS["sqs-s3-spot-nat_single"]))
    (found,) = [
        r
        for r in requests_for(run.resources)
        if r.resource.startswith(f"{name} (") and r.operation == operation
    ]
    assert violations(found) == [], "the unbroken request must pass"
    return found


def broken(request: Request, path: list[Any], value: Any) -> Request:
    """`request` with the member at `path` set to `value` (None: removed)."""
    params = copy.deepcopy(request.params)
    target = params
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return Request(request.service, request.operation, params, resource=request.resource)


def with_policy(request: Request, member: str, edit) -> Request:
    document = json.loads(request.params[member])
    edit(document)
    return broken(request, [member], json.dumps(document))


def _rename_action(doc):
    doc["Statement"][1]["Action"] = ["s3:GetObjects"]


def _misspell_operator(doc):
    doc["Statement"][0]["Condition"] = {"StringEqual": {"s3:prefix": "x"}}


def _wrong_version(doc):
    doc["Version"] = "2008-10-17x"


NEGATIVE = {
    "wrong enum": (
        "fleet-asg",
        "CreateAutoScalingGroup",
        lambda r: broken(
            r, ["MixedInstancesPolicy", "InstancesDistribution", "SpotAllocationStrategy"], "cheap"
        ),
        "fleet-asg (aws:autoscaling/group:Group) CreateAutoScalingGroup "
        "MixedInstancesPolicy.InstancesDistribution.SpotAllocationStrategy: 'cheap' not in enum [",
    ),
    "over-long name": (
        "fleet-role",
        "CreateRole",
        lambda r: broken(r, ["RoleName"], "r" * 65),
        "fleet-role (aws:iam/role:Role) CreateRole RoleName: "
        f"{'r' * 65!r} has 65 characters, longer than the maximum 64",
    ),
    "name against its pattern": (
        "fleet-role",
        "CreateRole",
        lambda r: broken(r, ["RoleName"], "fleet role"),
        "CreateRole RoleName: 'fleet role' does not match pattern '[\\\\w+=,.@-]+'",
    ),
    "out-of-range integer": (
        "fleet-asg",
        "StartInstanceRefresh",
        lambda r: broken(r, ["Preferences", "MinHealthyPercentage"], 101),
        "StartInstanceRefresh Preferences.MinHealthyPercentage: 101 above maximum 100",
    ),
    "instance refresh health range over 100": (
        "fleet-asg",
        "StartInstanceRefresh",
        lambda r: broken(
            broken(r, ["Preferences", "MinHealthyPercentage"], 0),
            ["Preferences", "MaxHealthyPercentage"],
            200,
        ),
        "StartInstanceRefresh Preferences: MaxHealthyPercentage 200 - MinHealthyPercentage 0 > 100",
    ),
    "integer outside its documented range": (
        "fleet-drain",
        "PutLifecycleHook",
        lambda r: broken(r, ["HeartbeatTimeout"], 7201),
        "PutLifecycleHook HeartbeatTimeout: 7201 outside the documented range 30 to 7200",
    ),
    "integer not among the documented values": (
        "fleet-logs",
        "PutRetentionPolicy",
        lambda r: broken(r, ["retentionInDays"], 10),
        "PutRetentionPolicy retentionInDays: 10 not among the documented values [1, 3, 5,",
    ),
    "unknown member": (
        "fleet-lt",
        "CreateLaunchTemplate",
        lambda r: broken(r, ["LaunchTemplateData", "MetadataOptions", "HttpTokenz"], "required"),
        "CreateLaunchTemplate Unknown parameter in LaunchTemplateData.MetadataOptions: "
        '"HttpTokenz"',
    ),
    "missing required member": (
        "fleet-drain",
        "PutLifecycleHook",
        lambda r: broken(r, ["AutoScalingGroupName"], None),
        'PutLifecycleHook Missing required parameter in input: "AutoScalingGroupName"',
    ),
    "wrong type (a tri-state string left unparsed)": (
        "fleet-lt",
        "CreateLaunchTemplate",
        lambda r: broken(
            r, ["LaunchTemplateData", "BlockDeviceMappings", 0, "Ebs", "Encrypted"], "true"
        ),
        "Invalid type for parameter LaunchTemplateData.BlockDeviceMappings[0].Ebs.Encrypted",
    ),
    "map key not in its enum": (
        "broker-queue",
        "CreateQueue",
        lambda r: broken(r, ["Attributes", "VisibilityTimeoutSeconds"], "30"),
        "CreateQueue Attributes key 'VisibilityTimeoutSeconds': 'VisibilityTimeoutSeconds' "
        "not in enum",
    ),
    "queue attribute out of range": (
        "broker-queue",
        "CreateQueue",
        lambda r: broken(r, ["Attributes", "VisibilityTimeout"], "43201"),
        "CreateQueue Attributes['VisibilityTimeout']: '43201' is not an integer string in 0..43200",
    ),
    "unknown IAM action": (
        "fleet-policy",
        "PutRolePolicy",
        lambda r: with_policy(r, "PolicyDocument", _rename_action),
        "PutRolePolicy PolicyDocument: Statement[1]: s3:GetObjects: s3 has no action 'GetObjects'",
    ),
    "unknown condition operator": (
        "fleet-policy",
        "PutRolePolicy",
        lambda r: with_policy(r, "PolicyDocument", _misspell_operator),
        "PutRolePolicy PolicyDocument: Statement[0]: unknown condition operator 'StringEqual'",
    ),
    "policy version": (
        "results-policy",
        "PutBucketPolicy",
        lambda r: with_policy(r, "Policy", _wrong_version),
        "PutBucketPolicy Policy: Version '2008-10-17x', not '2012-10-17'",
    ),
    "metric math reference to an undefined id": (
        "scaling-backlog",
        "PutScalingPolicy",
        lambda r: broken(
            r,
            [
                "TargetTrackingConfiguration",
                "CustomizedMetricSpecification",
                "Metrics",
                4,
                "Expression",
            ],
            "(visible + inflight + FILL(held, 0)) / instance",
        ),
        "PutScalingPolicy TargetTrackingConfiguration.CustomizedMetricSpecification.Metrics[4]"
        ".Expression: 'instance' is not an id of this query list",
    ),
    "metric math with two results": (
        "scaling-wake",
        "PutMetricAlarm",
        lambda r: broken(r, ["Metrics", 0, "ReturnData"], True),
        "PutMetricAlarm Metrics: exactly one query must have ReturnData true, not ['visible', "
        "'condition']",
    ),
    "metric math id against its grammar": (
        "scaling-wake",
        "PutMetricAlarm",
        lambda r: broken(r, ["Metrics", 0, "Id"], "Visible"),
        "PutMetricAlarm Metrics[0].Id: 'Visible' does not match ^[a-z][a-zA-Z0-9_]*$",
    ),
}


@pytest.mark.parametrize(
    ("name", "operation", "breaks", "expected"), NEGATIVE.values(), ids=NEGATIVE.keys()
)
def test_the_checks_catch_a_broken_request(run_stack, name, operation, breaks, expected):
    problems = violations(breaks(request_of(run_stack, name, operation)))
    assert any(expected in p for p in problems), f"expected {expected!r} among {problems}"


def test_rollback_needs_an_ami_id_not_an_ssm_parameter(run_stack):
    run = run_stack(config(CONFIGS["sqs-s3-spot-nat_single"]))
    requests = requests_for(run.resources)
    assert run_violations(requests) == []
    (refresh,) = [r for r in requests if r.operation == "StartInstanceRefresh"]
    rollback = broken(refresh, ["Preferences", "AutoRollback"], True)
    problems = run_violations([rollback if r is refresh else r for r in requests])
    assert problems == [
        "fleet-asg (aws:autoscaling/group:Group) StartInstanceRefresh Preferences.AutoRollback: "
        "the launch template's ImageId is an SSM parameter, which rollback does not support"
    ]


def test_a_malformed_rabbitmq_configuration_is_caught(run_stack):
    cfg = config(CONFIGS["rabbitmq-hour-long-batches"])
    request = request_of(run_stack, "broker-config", "UpdateConfiguration", cfg)
    text = "consumer_timeout: 7260000\nconsumer_timeout = 99999999999\n"
    data = base64.b64encode(text.encode()).decode()
    assert violations(broken(request, ["Data"], data)) == [
        f"{request.where()} Data line 1: 'consumer_timeout: 7260000' is not `key = value`",
        f"{request.where()} Data line 2: consumer_timeout '99999999999' is not 0..2147483647 ms",
    ]


def test_a_malformed_dashboard_is_caught(run_stack):
    request = request_of(run_stack, "dashboard-dashboard", "PutDashboard")
    body = json.loads(request.params["DashboardBody"])
    body["widgets"][0]["properties"]["metrics"][0] = ["AWS/SQS", "Depth", "QueueName", {}]
    body["widgets"][1]["width"] = 25
    del body["widgets"][2]["properties"]
    problems = violations(broken(request, ["DashboardBody"], json.dumps(body)))
    prefix = "dashboard-dashboard (aws:cloudwatch/dashboard:Dashboard) PutDashboard DashboardBody"
    assert (
        f"{prefix}.widgets[0].properties.metrics[0]: ['AWS/SQS', 'Depth', 'QueueName'] is not"
        in ("\n".join(problems))
    )
    assert f"{prefix}.widgets[1].width: 25 outside 1..24" in problems
    assert f"{prefix}.widgets[2].properties: missing or not an object" in problems
    # The first widget's depth expression refers to ids the broken row no longer defines.
    assert any("'visible' is not an id" in p for p in problems)
    assert violations(broken(request, ["DashboardBody"], "{not json"))[0].startswith(
        f"{prefix}: not JSON"
    )


def test_java_patterns_compile_or_are_noted():
    # Java's surrogate-pair range for the supplementary planes becomes Python's code points.
    compiled = _pattern("[\\u0020-\\uD7FF\\uE000-\\uFFFD\\uD800\\uDC00-\\uDBFF\\uDFFF\\r\\n\\t]*")
    assert compiled is not None and compiled.fullmatch("ok \U0001f600\n")
    assert _pattern("[a-z") is None and "[a-z" in UNCHECKED_PATTERNS
    UNCHECKED_PATTERNS.pop("[a-z")


# --- past the edges of what AWS accepts ----------------------------------------------------
# Each is either refused by StackConfig (StackConfigError stops `pulumi up` before anything
# is created) or, if StackConfig lets it through, must still give requests AWS accepts.

EDGES = {
    "log retention 10 days": {"log_retention_days": 10},
    "idle for more than a day": {"idle_minutes": 1441},
    "heartbeat over two hours": {"lifecycle_heartbeat_seconds": 7201},
    "visibility timeout over 12 hours": {"max_batch_seconds": 21571},
    "receives over 1000": {"max_receive_count": 1001},
}


@pytest.mark.parametrize("changes", EDGES.values(), ids=EDGES.keys())
def test_accepted_settings_give_requests_aws_accepts(run_stack, changes):
    try:
        cfg = config(changes)
    except StackConfigError:
        return
    problems = problems_of(run_stack(cfg))
    assert not problems, "StackConfig accepts it but AWS would refuse:\n" + "\n".join(problems)
