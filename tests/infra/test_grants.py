"""What the worker role lets a worker do, decided by evaluating the recorded policies.

moto enforces no IAM, so this file carries a small evaluator of identity
policies, written for the statements the program records and no more: Allow
and Deny (an explicit Deny wins, nothing allowed is an implicit deny), Action
and NotAction with wildcards (case-insensitive), Resource and NotResource with
ARN wildcards (`*` spans `:` and `/`, as in IAM), and the condition operators
the program uses: StringEquals, StringLike, their IfExists forms, and the
ForAllValues: / ForAnyValue: qualifiers (a missing key satisfies ForAllValues,
as in IAM). Anything else (another operator, a policy variable, a Principal)
raises, so a new kind of statement cannot be waved through.

A request is the action IAM authorizes, the resource ARN and the condition
keys the request carries: S3's HeadBucket is authorized as s3:ListBucket with
no s3:prefix key; ListObjectsV2 carries s3:prefix; HeadObject is s3:GetObject;
and S3 answers 404 for a missing key only when s3:ListBucket is allowed (with
no prefix) on the bucket, 403 otherwise.

The role also has AWS's AmazonSSMManagedInstanceCore, which is not recorded
here; it grants ssm, ssmmessages and ec2messages calls only, none of S3, EC2
tags or autoscaling, so what is denied below is denied with it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from pulumi_mocks import ACCOUNT, REGION, StackRun, _fake_outputs

from app.names import BOOT_ERROR_TAG, STACK_TAG
from infra.config import StackConfig

STATEMENT_KEYS = {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition"}


class Unsupported(ValueError):
    """A statement this evaluator does not know how to judge."""


@dataclass(frozen=True)
class Request:
    action: str
    resource: str
    # Condition keys the request carries: a string, or a list for multivalued keys.
    context: Mapping[str, str | Sequence[str]] = field(default_factory=dict)


def _listed(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def glob(pattern: str, value: str, *, case_sensitive: bool = True) -> bool:
    """IAM's wildcards: `*` any run of characters (`:` and `/` too), `?` any one."""
    if "${" in pattern:
        raise Unsupported(f"policy variable in {pattern!r}")
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case_sensitive else re.IGNORECASE) is not None


OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "StringEquals": lambda wanted, got: wanted == got,
    "StringLike": glob,
}


def _lookup(context: Mapping[str, Any], key: str) -> Any:
    """The request's value of condition key `key`, None if it carries none."""
    # Condition key names are case-insensitive; tag values are not.
    for name, value in context.items():
        if name.lower() == key.lower():
            return value
    return None


def _key_holds(
    qualifier: str, if_exists: bool, match: Callable[[str, str], bool], values: list[str], got: Any
) -> bool:
    """One key of one operator; `got` is None when the request does not carry the key."""
    if qualifier == "ForAllValues":
        # Every value the request carries is one of those named; none carried: true.
        return all(any(match(w, g) for w in values) for g in _listed(got or []))
    if qualifier == "ForAnyValue":
        return any(match(w, g) for w in values for g in _listed(got or []))
    if got is None:
        return if_exists
    if not isinstance(got, str):
        raise Unsupported(f"a single-valued operator on the multivalued value {got!r}")
    return any(match(w, got) for w in values)


def conditions_hold(block: Mapping[str, Mapping[str, Any]], context: Mapping[str, Any]) -> bool:
    """Every operator and every key must hold (AND); any value of a key may match (OR)."""
    for operator, tests in block.items():
        qualifier, _, base = operator.rpartition(":")
        if_exists = base.endswith("IfExists")
        base = base.removesuffix("IfExists")
        if base not in OPERATORS or qualifier not in ("", "ForAllValues", "ForAnyValue"):
            raise Unsupported(f"condition operator {operator!r}")
        for key, wanted in tests.items():
            got = _lookup(context, key)
            if not _key_holds(qualifier, if_exists, OPERATORS[base], _listed(wanted), got):
                return False
    return True


def applies(stmt: Mapping[str, Any], request: Request) -> bool:
    unknown = set(stmt) - STATEMENT_KEYS
    if unknown or stmt.get("Effect") not in ("Allow", "Deny"):
        raise Unsupported(f"statement {stmt.get('Sid')!r}: {sorted(unknown) or stmt['Effect']}")
    if "Action" in stmt:
        actions = _listed(stmt["Action"])
        if not any(glob(a, request.action, case_sensitive=False) for a in actions):
            return False
    elif any(glob(a, request.action, case_sensitive=False) for a in _listed(stmt["NotAction"])):
        return False
    if "Resource" in stmt:
        if not any(glob(r, request.resource) for r in _listed(stmt["Resource"])):
            return False
    elif any(glob(r, request.resource) for r in _listed(stmt["NotResource"])):
        return False
    return conditions_hold(stmt.get("Condition") or {}, request.context)


def decide(statements: Sequence[Mapping[str, Any]], request: Request) -> str:
    """Allow, Deny (an explicit Deny applies) or ImplicitDeny (nothing allows it)."""
    effects = {stmt["Effect"] for stmt in statements if applies(stmt, request)}
    if "Deny" in effects:
        return "Deny"
    return "Allow" if "Allow" in effects else "ImplicitDeny"


# -- the evaluator itself -----------------------------------------------------


def test_evaluator_follows_iam_on_the_cases_that_matter_here():
    bucket = "arn:aws:s3:::b"
    fenced = {
        "Effect": "Allow",
        "Action": "s3:ListBucket",
        "Resource": bucket,
        "Condition": {"StringLike": {"s3:prefix": ["results/*"]}},
    }
    head_bucket = Request("s3:ListBucket", bucket)
    listing = Request("s3:ListBucket", bucket, {"s3:prefix": "results/jobs/"})
    # The old grant: no prefix on the request, so StringLike cannot match.
    assert decide([fenced], head_bucket) == "ImplicitDeny"
    assert decide([fenced], listing) == "Allow"
    if_exists = dict(fenced, Condition={"StringLikeIfExists": {"s3:prefix": ["results/*"]}})
    assert decide([if_exists], head_bucket) == "Allow"
    assert decide([if_exists], Request("s3:ListBucket", bucket, {"s3:prefix": "x/"})) != "Allow"
    # Wildcards: actions ignore case, ARNs do not; `*` spans `/`.
    wide = {"Effect": "Allow", "Action": "S3:Get*", "Resource": f"{bucket}/results/*"}
    assert decide([wide], Request("s3:GetObject", f"{bucket}/results/a/b")) == "Allow"
    assert decide([wide], Request("s3:GetObject", f"{bucket}/Results/a")) == "ImplicitDeny"
    # An explicit Deny wins, NotResource fences by exclusion.
    deny = {"Effect": "Deny", "Action": "s3:*", "NotResource": f"{bucket}/results/*"}
    assert decide([wide, deny], Request("s3:GetObject", f"{bucket}/other")) == "Deny"
    # ForAllValues: every key the request sets must be named; none set passes.
    tags = {
        "Effect": "Allow",
        "Action": "ec2:CreateTags",
        "Resource": "*",
        "Condition": {"ForAllValues:StringEquals": {"aws:TagKeys": ["a"]}},
    }
    assert decide([tags], Request("ec2:CreateTags", "i", {"aws:TagKeys": ["a"]})) == "Allow"
    assert decide([tags], Request("ec2:CreateTags", "i", {"aws:TagKeys": ["a", "b"]})) != "Allow"
    assert decide([tags], Request("ec2:CreateTags", "i")) == "Allow"
    with pytest.raises(Unsupported):
        decide(
            [dict(tags, Condition={"NumericLessThan": {"x": "1"}})], Request("ec2:CreateTags", "i")
        )


# -- the stack's worker role ---------------------------------------------------


@dataclass
class WorkerRole:
    run: StackRun
    statements: list[dict[str, Any]]
    group_arn: str

    def decide(self, action: str, resource: str, **context: str | list[str]) -> str:
        return decide(self.statements, Request(action, resource, context))

    def allows(self, action: str, resource: str, **context: str | list[str]) -> bool:
        return self.decide(action, resource, **context) == "Allow"


def worker_role(run: StackRun) -> WorkerRole:
    (role,) = run.of_type("aws:iam/role:Role")
    role_name = _fake_outputs(role.typ, role.name, role.props)["name"]
    policies = [p for p in run.of_type("aws:iam/rolePolicy:RolePolicy")]
    assert policies and all(p.props["role"] == role_name for p in policies)
    group = run.one("aws:autoscaling/group:Group")
    return WorkerRole(
        run=run,
        statements=[s for p in policies for s in json.loads(p.props["policy"])["Statement"]],
        # The ARN the mocks gave the group, the one the program put in the policy.
        group_arn=_fake_outputs(group.typ, group.name, group.props)["arn"],
    )


S3_STORES = [
    StackConfig(stack="test"),
    StackConfig(stack="test", broker="rabbitmq", result_store="s3", nat="single"),
]


@pytest.fixture(params=S3_STORES, ids=["sqs-s3", "rabbitmq-s3"])
def s3_role(request, run_stack) -> WorkerRole:
    return worker_role(run_stack(request.param))


@pytest.fixture
def role(run_stack) -> WorkerRole:
    return worker_role(run_stack(StackConfig(stack="test")))


def test_workers_may_use_the_default_result_store(s3_role):
    bucket = f"arn:aws:s3:::{s3_role.run.outputs['resultBucket']}"
    batch = f"{bucket}/results/jobs/j1/results/0000000003"
    # ping: HeadBucket is authorized as s3:ListBucket and carries no s3:prefix.
    assert s3_role.allows("s3:ListBucket", bucket), "HeadBucket (the store's ping) is refused"
    # The 404 for a batch not written yet needs the same, with no prefix either.
    assert s3_role.allows("s3:ListBucket", bucket), "a missing key would read as 403"
    for prefix in ("results/jobs/j1/results/", "results/leases/", "results/workers/"):
        assert s3_role.allows("s3:ListBucket", bucket, **{"s3:prefix": prefix}), prefix
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):  # HeadObject: GetObject
        assert s3_role.allows(action, batch), action
        assert s3_role.allows(action, f"{bucket}/results/leases/j1/3"), action


def test_workers_may_not_use_other_buckets_or_prefixes(s3_role):
    bucket = f"arn:aws:s3:::{s3_role.run.outputs['resultBucket']}"
    other = "arn:aws:s3:::someone-elses-bucket"
    assert not s3_role.allows("s3:ListBucket", other)
    assert not s3_role.allows("s3:ListBucket", other, **{"s3:prefix": "results/"})
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert not s3_role.allows(action, f"{other}/results/jobs/j1/results/0000000003")
        assert not s3_role.allows(action, f"{bucket}/elsewhere/key")
        assert not s3_role.allows(action, f"{bucket}/results")  # the prefix's own name
    assert not s3_role.allows("s3:DeleteBucket", bucket)
    assert not s3_role.allows("s3:PutBucketPolicy", bucket)


def test_workers_may_fetch_the_artifact_and_nothing_else_there(s3_role):
    bucket = f"arn:aws:s3:::{s3_role.run.outputs['artifactBucket']}"
    prefix = s3_role.run.outputs["artifactPrefix"]
    wheel = "celery_fleet-0.1.0-py3-none-any.whl"
    # `aws s3 sync s3://bucket/<prefix>/ dir/`: ListObjectsV2 with the prefix, GetObject each.
    assert s3_role.allows("s3:ListBucket", bucket, **{"s3:prefix": f"{prefix}/"})
    assert s3_role.allows("s3:GetObject", f"{bucket}/{prefix}/{wheel}")
    # The previous digest too: an instance from the previous template version reads it.
    assert s3_role.allows("s3:ListBucket", bucket, **{"s3:prefix": "artifacts/0123abcd/"})
    assert s3_role.allows("s3:GetObject", f"{bucket}/artifacts/0123abcd/{wheel}")
    assert not s3_role.allows("s3:ListBucket", bucket, **{"s3:prefix": "other/"})
    assert not s3_role.allows("s3:GetObject", f"{bucket}/other/{wheel}")
    for action in ("s3:PutObject", "s3:DeleteObject"):
        assert not s3_role.allows(action, f"{bucket}/{prefix}/{wheel}"), action


def instance(instance_id: str, region: str = REGION, account: str = ACCOUNT) -> str:
    return f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"


def test_a_failed_boot_may_tag_its_own_instance_and_mark_it_unhealthy(role):
    own = {f"aws:ResourceTag/{STACK_TAG}": "test"}
    assert role.allows(
        "ec2:CreateTags", instance("i-0abc"), **own, **{"aws:TagKeys": [BOOT_ERROR_TAG]}
    )
    assert role.allows("autoscaling:SetInstanceHealth", role.group_arn)
    # The drain on termination still works on the same group.
    for action in ("CompleteLifecycleAction", "RecordLifecycleActionHeartbeat"):
        assert role.allows(f"autoscaling:{action}", role.group_arn), action
    assert role.allows("autoscaling:SetInstanceProtection", role.group_arn)


def test_boot_error_grants_stop_at_the_stack_and_the_one_tag(role):
    boot_error = {"aws:TagKeys": [BOOT_ERROR_TAG]}
    own = {f"aws:ResourceTag/{STACK_TAG}": "test"}
    other_stack = {f"aws:ResourceTag/{STACK_TAG}": "prod"}
    assert not role.allows("ec2:CreateTags", instance("i-0abc"), **other_stack, **boot_error)
    assert not role.allows("ec2:CreateTags", instance("i-0abc"), **boot_error)  # untagged
    # Its own instance, but another key: the stack tag itself, or a name.
    for keys in ([BOOT_ERROR_TAG, STACK_TAG], [STACK_TAG], ["Name"]):
        assert not role.allows("ec2:CreateTags", instance("i-0abc"), **own, **{"aws:TagKeys": keys})
    assert not role.allows(
        "ec2:CreateTags", instance("i-0abc", account="210987654321"), **own, **boot_error
    )
    assert not role.allows(
        "ec2:CreateTags", f"arn:aws:ec2:{REGION}:{ACCOUNT}:volume/vol-1", **own, **boot_error
    )
    assert not role.allows("ec2:DeleteTags", instance("i-0abc"), **own, **boot_error)
    other_group = re.sub(
        r"autoScalingGroupName/.*", "autoScalingGroupName/prod-asg", role.group_arn
    )
    assert other_group != role.group_arn
    for action in ("SetInstanceHealth", "SetInstanceProtection", "CompleteLifecycleAction"):
        assert not role.allows(f"autoscaling:{action}", other_group), action
    assert not role.allows("autoscaling:TerminateInstanceInAutoScalingGroup", role.group_arn)


def test_workers_may_write_results_only_into_the_output_buckets(run_stack):
    role = worker_role(run_stack(StackConfig(stack="test", output_buckets=("team-results",))))
    part = "arn:aws:s3:::team-results/runs/j1/part-00000003.jsonl"
    assert role.allows("s3:PutObject", part)
    for action in ("s3:GetObject", "s3:DeleteObject", "s3:PutBucketPolicy"):
        assert not role.allows(action, part), action
    assert not role.allows("s3:PutObject", "arn:aws:s3:::someone-elses-bucket/runs/p.jsonl")
    # Without the setting, no bucket of the user's may be written.
    default = worker_role(run_stack(StackConfig(stack="test")))
    assert not default.allows("s3:PutObject", part)


def test_a_submitted_jobs_driver_may_read_ids_only_from_the_input_buckets(run_stack):
    role = worker_role(run_stack(StackConfig(stack="test", input_buckets=("team-inputs",))))
    ids = "arn:aws:s3:::team-inputs/batches/ids.txt"
    assert role.allows("s3:GetObject", ids)
    for action in ("s3:PutObject", "s3:DeleteObject"):
        assert not role.allows(action, ids), action
    assert not role.allows("s3:GetObject", "arn:aws:s3:::someone-elses-bucket/ids.txt")
    default = worker_role(run_stack(StackConfig(stack="test")))
    assert not default.allows("s3:GetObject", ids)
