r"""Check AWS API requests against AWS's own service models (botocore) and a few grammars.

`violations(request)` returns every reason AWS would refuse a `Request`
(aws_requests.py), each as "<resource> <operation> <path>: <why>":

- botocore's `ParamValidator`: member types, required members, unknown members;
- a walk of the input shape for what that validator skips: enums (map keys too),
  string min/max length, string `pattern`, integer/long/float ranges, list and map
  lengths, and the values a member's documentation lists as the only ones possible
  ("Possible values are: 1, 3, 5, ...", CloudWatch Logs retention);
- grammars the models cannot carry: IAM policy documents (version, effects,
  elements, condition operators, every action a real action of its service),
  metric math (ids, one ReturnData, every identifier an id of the same list),
  dashboard bodies, user data (base64, 16 KB), SSM Standard-tier values (4 KB),
  SQS attribute ranges, redrive policies, instance refresh preferences, Amazon MQ
  names, users and RabbitMQ configuration text, ElastiCache ids and auth tokens;
- `run_violations(requests)`: what one request allows only given another
  (instance refresh rollback and the launch template's image).

AWS patterns are Java regexes, and the services match them whole (Java's
`Pattern.matches`: IAM's RoleName pattern `[\w+=,.@-]+` refuses "fleet role"), so
each is compiled with Python `re` and full-matched; Java's surrogate-pair range
is translated, Unicode classes (\p{L}) use the `regex` module when installed, and
a pattern that compiles in neither is recorded in `UNCHECKED_PATTERNS` instead of
failing. Models are loaded once per process.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import importlib
import json
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import botocore.session
from botocore.model import ListShape, MapShape, OperationModel, Shape, StructureShape
from botocore.validate import ParamValidator

# pytest imports this folder's modules by their own names (conftest.py puts it on
# sys.path); mypy checks them as tests.infra.*.
if TYPE_CHECKING:
    from tests.infra.aws_requests import Request
else:
    from aws_requests import Request

# Pattern (as written in the model) -> why it is not checked.
UNCHECKED_PATTERNS: dict[str, str] = {}


@functools.cache
def _session() -> botocore.session.Session:
    return botocore.session.get_session()


@functools.cache
def service_model(service: str) -> Any:
    return _session().get_service_model(service)


@functools.cache
def operation_model(service: str, operation: str) -> OperationModel:
    return service_model(service).operation_model(operation)


@functools.cache
def operation_names(service: str) -> frozenset[str]:
    return frozenset(service_model(service).operation_names)


# Java writes the supplementary planes as a surrogate-pair range; Python as code points.
_SURROGATE_RANGE = "\\uD800\\uDC00-\\uDBFF\\uDFFF"
_SUPPLEMENTARY = "\\U00010000-\\U0010FFFF"


@functools.cache
def _pattern(pattern: str) -> Any:
    """The compiled pattern, or None (and the reason in UNCHECKED_PATTERNS)."""
    translated = pattern.replace(_SURROGATE_RANGE, _SUPPLEMENTARY)
    try:
        return re.compile(translated)
    except re.error as exc:
        reason = f"does not compile in Python re: {exc}"
    # Unicode classes (\p{L}, ...) need the third-party `regex` module, when it is there.
    try:
        third_party = importlib.import_module("regex")
        return third_party.compile(translated)
    except ImportError:
        pass
    except Exception as exc:
        reason += f"; nor with the regex module: {exc}"
    UNCHECKED_PATTERNS[pattern] = reason
    return None


# Enums the service (and the provider, which validates them ignoring case and sends them as
# written) accept in any case: Terraform's and Pulumi's own examples write "RabbitMQ".
CASE_INSENSITIVE_ENUMS = {("mq", "EngineType")}


_POSSIBLE = re.compile(r"Possible values are:?\s*((?:\d+,?\s*(?:and\s+)?)+)")


@functools.cache
def _documented_values(shape_doc: str) -> frozenset[int] | None:
    match = _POSSIBLE.search(re.sub(r"<[^>]+>", "", shape_doc))
    if not match:
        return None
    return frozenset(int(n) for n in re.findall(r"\d+", match[1]))


_RANGE = re.compile(r"The range is from (\d+) to (\d+)")


@functools.cache
def _documented_range(shape_doc: str) -> tuple[int, int] | None:
    """A range the documentation states ("The range is from 30 to 7200 seconds")."""
    match = _RANGE.search(re.sub(r"<[^>]+>", "", shape_doc))
    return (int(match[1]), int(match[2])) if match else None


def _show(value: Any, shape: Shape) -> str:
    if shape.metadata.get("sensitive"):
        return "<sensitive>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- the shapes -----------------------------------------------------------------------------------


# Members the Auto Scaling model types as free strings whose values its documentation
# lists (the API reference's "Valid values"): (service, member name) -> the values.
DOCUMENTED_ENUMS: dict[tuple[str, str], frozenset[str]] = {
    ("autoscaling", "SpotAllocationStrategy"): frozenset(
        {
            "lowest-price",
            "capacity-optimized",
            "capacity-optimized-prioritized",
            "price-capacity-optimized",
        }
    ),
    ("autoscaling", "OnDemandAllocationStrategy"): frozenset({"prioritized", "lowest-price"}),
    ("autoscaling", "HealthCheckType"): frozenset({"EC2", "ELB", "EBS", "VPC_LATTICE"}),
    ("autoscaling", "PolicyType"): frozenset(
        {"SimpleScaling", "StepScaling", "TargetTrackingScaling", "PredictiveScaling"}
    ),
    ("autoscaling", "AdjustmentType"): frozenset(
        {"ChangeInCapacity", "ExactCapacity", "PercentChangeInCapacity"}
    ),
    ("autoscaling", "MetricAggregationType"): frozenset({"Minimum", "Maximum", "Average"}),
    ("autoscaling", "LifecycleTransition"): frozenset(
        {"autoscaling:EC2_INSTANCE_LAUNCHING", "autoscaling:EC2_INSTANCE_TERMINATING"}
    ),
    ("autoscaling", "DefaultResult"): frozenset({"CONTINUE", "ABANDON"}),
    ("autoscaling", "Granularity"): frozenset({"1Minute"}),
    # EnableMetricsCollection's Metrics (a list of strings).
    ("autoscaling", "Metrics"): frozenset(
        {
            f"Group{m}"
            for m in (
                "MinSize",
                "MaxSize",
                "DesiredCapacity",
                "InServiceInstances",
                "PendingInstances",
                "StandbyInstances",
                "TerminatingInstances",
                "TotalInstances",
                "InServiceCapacity",
                "PendingCapacity",
                "StandbyCapacity",
                "TerminatingCapacity",
                "TotalCapacity",
                "AndWarmPoolDesiredCapacity",
                "AndWarmPoolTotalCapacity",
            )
        }
        | {
            f"WarmPool{m}"
            for m in (
                "DesiredCapacity",
                "WarmedCapacity",
                "PendingCapacity",
                "TerminatingCapacity",
                "TotalCapacity",
                "MinSize",
            )
        }
    ),
}


def shape_violations(
    value: Any, shape: Shape, path: str, service: str = "", doc: str = "", member: str = ""
) -> Iterator[str]:
    """What botocore's ParamValidator leaves out, for `value` against `shape`."""
    if isinstance(shape, StructureShape):
        yield from _structure(value, shape, path, service)
    elif isinstance(shape, ListShape):
        yield from _list(value, shape, path, service, member)
    elif isinstance(shape, MapShape):
        yield from _map(value, shape, path, service)
    elif shape.type_name == "string" and isinstance(value, str):
        where = path or "<input>"
        yield from _string(value, shape, where, service)
        documented = DOCUMENTED_ENUMS.get((service, member))
        if documented and value not in documented:
            yield f"{where}: {value!r} not in enum {sorted(documented)} (documented values)"
    elif shape.type_name in NUMBERS and isinstance(value, (int, float)):
        yield from _number(value, shape, path or "<input>", doc)


NUMBERS = ("integer", "long", "float", "double")


def _structure(value: Any, shape: StructureShape, path: str, service: str) -> Iterator[str]:
    if not isinstance(value, dict):
        return  # the ParamValidator reports the type
    for key, member_value in value.items():
        member = shape.members.get(key)
        if member is not None:
            doc = getattr(member, "documentation", "") or ""
            where = f"{path}.{key}" if path else key
            yield from shape_violations(member_value, member, where, service, doc, key)


def _list(value: Any, shape: ListShape, path: str, service: str, member: str) -> Iterator[str]:
    if isinstance(value, list):
        yield from _length(len(value), shape.metadata, path, "items")
        for i, item in enumerate(value):
            yield from shape_violations(item, shape.member, f"{path}[{i}]", service, member=member)


def _map(value: Any, shape: MapShape, path: str, service: str) -> Iterator[str]:
    if isinstance(value, dict):
        yield from _length(len(value), shape.metadata, path, "entries")
        for key, item in value.items():
            yield from shape_violations(key, shape.key, f"{path} key {key!r}", service)
            yield from shape_violations(item, shape.value, f"{path}[{key!r}]", service)


def _string(value: str, shape: Shape, where: str, service: str) -> Iterator[str]:
    enum = list(shape.enum)
    if enum and value not in enum:
        folded = (service, shape.name) in CASE_INSENSITIVE_ENUMS
        if not (folded and value.upper() in {e.upper() for e in enum}):
            yield f"{where}: {_show(value, shape)} not in enum {enum}"
    yield from _length(len(value), shape.metadata, where, "characters", value, shape)
    pattern = shape.metadata.get("pattern")
    if pattern:
        compiled = _pattern(pattern)
        if compiled is not None and not compiled.fullmatch(value):
            yield f"{where}: {_show(value, shape)} does not match pattern {pattern!r}"


def _number(value: float, shape: Shape, where: str, doc: str) -> Iterator[str]:
    meta = shape.metadata
    if "min" in meta and value < meta["min"]:
        yield f"{where}: {value} below minimum {meta['min']}"
    if "max" in meta and value > meta["max"]:
        yield f"{where}: {value} above maximum {meta['max']}"
    if doc and shape.type_name == "integer":
        yield from _documented(value, doc, where)


def _documented(value: float, doc: str, where: str) -> Iterator[str]:
    allowed = _documented_values(doc)
    if allowed and value not in allowed:
        yield f"{where}: {value} not among the documented values {sorted(allowed)}"
    span = _documented_range(doc)
    if span and not span[0] <= value <= span[1]:
        yield f"{where}: {value} outside the documented range {span[0]} to {span[1]}"


def _length(
    n: int, meta: dict[str, Any], where: str, unit: str, value: Any = None, shape: Any = None
) -> Iterator[str]:
    shown = f"{_show(value, shape)} " if shape is not None else ""
    if "min" in meta and n < meta["min"]:
        yield f"{where}: {shown}has {n} {unit}, fewer than the minimum {meta['min']}"
    if "max" in meta and n > meta["max"]:
        yield f"{where}: {shown}has {n} {unit}, longer than the maximum {meta['max']}"


def model_violations(request: Request) -> list[str]:
    """botocore's own validation, then the shape walk."""
    try:
        op = operation_model(request.service, request.operation)
    except Exception as exc:  # an operation the service does not have
        return [f"<operation>: {request.service} has no operation {request.operation}: {exc}"]
    found: list[str] = []
    report = ParamValidator().validate(request.params, op.input_shape)
    if report.has_errors():
        # The first line is botocore's heading ("Parameter validation failed:").
        found += [line.strip() for line in report.generate_report().splitlines() if line.strip()]
    found += shape_violations(request.params, op.input_shape, "", request.service)
    return found


# --- IAM policy documents ---------------------------------------------------------------

# IAM service prefix -> botocore service, where the names differ.
IAM_SERVICES = {
    "elasticloadbalancing": "elbv2",
    "states": "stepfunctions",
    "elasticfilesystem": "efs",
    "es": "opensearch",
}

# IAM actions that are not the name of an operation of their service's model. Each is a
# permission IAM defines for one or more calls, or a permission with no call of its own.
IAM_ONLY_ACTIONS: dict[str, str] = {
    # S3 names several permissions after the resource, not the call.
    "s3:ListBucket": "ListObjects, ListObjectsV2 and HeadBucket",
    "s3:ListBucketVersions": "ListObjectVersions",
    "s3:ListAllMyBuckets": "ListBuckets",
    "s3:ListBucketMultipartUploads": "ListMultipartUploads",
    "s3:ListMultipartUploadParts": "ListParts",
    "s3:GetObjectVersion": "GetObject with a VersionId",
    "s3:DeleteObjectVersion": "DeleteObject with a VersionId",
    "s3:GetLifecycleConfiguration": "GetBucketLifecycleConfiguration",
    "s3:PutLifecycleConfiguration": "PutBucketLifecycleConfiguration",
    "s3:GetEncryptionConfiguration": "GetBucketEncryption",
    "s3:PutEncryptionConfiguration": "PutBucketEncryption",
    "s3:GetBucketPublicAccessBlock": "GetPublicAccessBlock",
    "s3:PutBucketPublicAccessBlock": "PutPublicAccessBlock",
    "s3:GetBucketObjectLockConfiguration": "GetObjectLockConfiguration",
    # Permissions checked by a service on a caller's behalf, with no API call of their own.
    "iam:PassRole": "handing a role to a service (EC2, Auto Scaling, ...)",
    "sts:TagSession": "session tags on AssumeRole*",
    "sts:SetSourceIdentity": "a source identity on AssumeRole*",
}
# Services with no botocore model: Session Manager's message channels (the
# AmazonSSMManagedInstanceCore policy grants them).
IAM_ONLY_SERVICES: dict[str, frozenset[str]] = {
    "ssmmessages": frozenset(
        {"CreateControlChannel", "CreateDataChannel", "OpenControlChannel", "OpenDataChannel"}
    ),
    "ec2messages": frozenset(
        {
            "AcknowledgeMessage",
            "DeleteMessage",
            "FailMessage",
            "GetEndpoint",
            "GetMessages",
            "SendReply",
        }
    ),
}

# IAM's condition operators (the IAM JSON policy element reference).
CONDITION_OPERATORS = frozenset(
    {
        "StringEquals",
        "StringNotEquals",
        "StringEqualsIgnoreCase",
        "StringNotEqualsIgnoreCase",
        "StringLike",
        "StringNotLike",
        "NumericEquals",
        "NumericNotEquals",
        "NumericLessThan",
        "NumericLessThanEquals",
        "NumericGreaterThan",
        "NumericGreaterThanEquals",
        "DateEquals",
        "DateNotEquals",
        "DateLessThan",
        "DateLessThanEquals",
        "DateGreaterThan",
        "DateGreaterThanEquals",
        "Bool",
        "BinaryEquals",
        "IpAddress",
        "NotIpAddress",
        "ArnEquals",
        "ArnLike",
        "ArnNotEquals",
        "ArnNotLike",
        "Null",
    }
)
STATEMENT_KEYS = frozenset(
    {
        "Sid",
        "Effect",
        "Principal",
        "NotPrincipal",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
    }
)
PRINCIPAL_KEYS = frozenset({"AWS", "Service", "Federated", "CanonicalUser"})
_ACTION = re.compile(r"^([a-z0-9-]+):([A-Za-z0-9*?]+)$")
_ARN = re.compile(r"^arn:aws[a-z-]*:[a-z0-9-]+:[a-z0-9-]*:(\d{12}|aws)?:.+$")


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def operator_known(operator: str) -> bool:
    base = operator.removeprefix("ForAllValues:").removeprefix("ForAnyValue:")
    if base != "Null":
        base = base.removesuffix("IfExists")
    return base in CONDITION_OPERATORS


def action_violation(action: Any) -> str | None:
    if action == "*":
        return None
    if not isinstance(action, str) or not (match := _ACTION.match(action)):
        return f"{action!r} is not service:Action"
    prefix, name = match[1], match[2]
    if action in IAM_ONLY_ACTIONS:
        return None
    if prefix in IAM_ONLY_SERVICES:
        names: frozenset[str] = IAM_ONLY_SERVICES[prefix]
    else:
        try:
            names = operation_names(IAM_SERVICES.get(prefix, prefix))
        except Exception:
            return f"{action}: no AWS service {prefix!r} in botocore's models"
        names = names | {a.split(":", 1)[1] for a in IAM_ONLY_ACTIONS if a.startswith(f"{prefix}:")}
    if any(fnmatch.fnmatchcase(n, name) for n in names):
        return None
    return f"{action}: {prefix} has no action {name!r} (no such operation in its model)"


def policy_violations(text: Any, kind: str) -> Iterator[str]:
    """`kind`: "identity" (Resource, no Principal), "trust" or "resource" (a Principal)."""
    try:
        doc = json.loads(text) if isinstance(text, str) else text
    except ValueError as exc:
        yield f"not JSON: {exc}"
        return
    if not isinstance(doc, dict):
        yield "a policy is a JSON object"
        return
    if doc.get("Version") != "2012-10-17":
        yield f"Version {doc.get('Version')!r}, not '2012-10-17'"
    unknown = set(doc) - {"Version", "Id", "Statement"}
    if unknown:
        yield f"unknown policy elements {sorted(unknown)}"
    statements = _listed(doc.get("Statement"))
    if not statements or statements == [None]:
        yield "no Statement"
        return
    sids = [s.get("Sid") for s in statements if isinstance(s, dict) and "Sid" in s]
    if len(sids) != len(set(sids)):
        yield f"Sids repeat: {sids}"
    for i, stmt in enumerate(statements):
        yield from (f"Statement[{i}]: {v}" for v in _statement(stmt, kind))


def _statement(stmt: Any, kind: str) -> Iterator[str]:
    if not isinstance(stmt, dict):
        yield "not an object"
        return
    if set(stmt) - STATEMENT_KEYS:
        yield f"unknown elements {sorted(set(stmt) - STATEMENT_KEYS)}"
    if stmt.get("Effect") not in ("Allow", "Deny"):
        yield f"Effect {stmt.get('Effect')!r} is neither Allow nor Deny"
    yield from _actions(stmt)
    yield from _resources(stmt, kind)
    yield from _principal(stmt, kind)
    yield from _conditions(stmt.get("Condition", {}))


def _actions(stmt: dict[str, Any]) -> Iterator[str]:
    if ("Action" in stmt) == ("NotAction" in stmt):
        yield "needs exactly one of Action and NotAction"
    for action in _listed(stmt.get("Action", stmt.get("NotAction", []))):
        problem = action_violation(action)
        if problem:
            yield problem


def _resources(stmt: dict[str, Any], kind: str) -> Iterator[str]:
    has_resource = "Resource" in stmt or "NotResource" in stmt
    if "Resource" in stmt and "NotResource" in stmt:
        yield "both Resource and NotResource"
    if kind == "identity" and not has_resource:
        yield "an identity policy statement needs Resource or NotResource"
    if kind == "trust" and has_resource:
        yield "a trust policy names no Resource"
    for resource in _listed(stmt.get("Resource", stmt.get("NotResource", []))):
        if resource != "*" and not (isinstance(resource, str) and _ARN.match(resource)):
            yield f"resource {resource!r} is neither '*' nor an ARN"


def _principal(stmt: dict[str, Any], kind: str) -> Iterator[str]:
    principal = stmt.get("Principal", stmt.get("NotPrincipal"))
    if kind == "identity" and principal is not None:
        yield "an identity policy names no Principal"
    if kind != "identity" and principal is None:
        yield f"a {kind} policy statement needs a Principal"
    if isinstance(principal, dict) and set(principal) - PRINCIPAL_KEYS:
        yield f"unknown principal kinds {sorted(set(principal) - PRINCIPAL_KEYS)}"
    elif principal is not None and not isinstance(principal, dict) and principal != "*":
        yield f"Principal {principal!r} is neither '*' nor an object"


_CONDITION_KEY = re.compile(r"^[A-Za-z0-9-]+:[A-Za-z0-9_:/*.-]+$")


def _conditions(condition: Any) -> Iterator[str]:
    if not isinstance(condition, dict):
        yield "Condition is not an object"
        return
    for operator, tests in condition.items():
        if not operator_known(operator):
            yield f"unknown condition operator {operator!r}"
        if not isinstance(tests, dict) or not tests:
            yield f"condition {operator} has no key: value tests"
            continue
        for key in tests:
            if not _CONDITION_KEY.match(key):
                yield f"condition key {key!r} is not service:key"


# Where each operation carries a policy document, and which kind.
POLICY_MEMBERS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("iam", "CreateRole"): (("AssumeRolePolicyDocument",), "trust"),
    ("iam", "PutRolePolicy"): (("PolicyDocument",), "identity"),
    ("iam", "CreatePolicy"): (("PolicyDocument",), "identity"),
    ("s3", "PutBucketPolicy"): (("Policy",), "resource"),
    ("sqs", "SetQueueAttributes"): (("Attributes", "Policy"), "resource"),
    ("sqs", "CreateQueue"): (("Attributes", "Policy"), "resource"),
    ("ec2", "CreateVpcEndpoint"): (("PolicyDocument",), "resource"),
}


def _get(params: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = params
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


# --- metric math --------------------------------------------------------------------------------

_ID = re.compile(r"^[a-z][a-zA-Z0-9_]*$")
# CloudWatch metric math functions and words (Using math expressions, the function list).
MATH_FUNCTIONS = frozenset(
    {
        "ABS",
        "ANOMALY_DETECTION_BAND",
        "AVG",
        "CEIL",
        "DATAPOINT_COUNT",
        "DB_PERF_INSIGHTS",
        "DIFF",
        "DIFF_TIME",
        "EXP",
        "FILL",
        "FIRST",
        "FLOOR",
        "IF",
        "INSIGHT_RULE_METRIC",
        "LAST",
        "LOG",
        "LOG10",
        "MAX",
        "METRIC_COUNT",
        "METRICS",
        "MIN",
        "MINUTE",
        "HOUR",
        "DAY",
        "DATE",
        "MONTH",
        "YEAR",
        "EPOCH",
        "PERIOD",
        "RATE",
        "REMOVE_EMPTY",
        "RUNNING_SUM",
        "SEARCH",
        "SERVICE_QUOTA",
        "SLICE",
        "SORT",
        "STDDEV",
        "SUM",
        "TIME_SERIES",
        "CONCAT",
        "LAMBDA",
    }
)
MATH_WORDS = frozenset({"AND", "OR", "NOT", "REPEAT", "LINEAR", "ASC", "DESC", "TRUE", "FALSE"})
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\s*\()?")


def expression_references(expression: str) -> tuple[set[str], set[str]]:
    """(ids referenced, unknown functions) of a metric math expression."""
    text = _STRING.sub("''", expression)
    refs: set[str] = set()
    unknown: set[str] = set()
    for match in _TOKEN.finditer(text):
        word = match[0].rstrip("( \t")
        if word in MATH_WORDS:
            continue
        if match[1]:
            if word not in MATH_FUNCTIONS:
                unknown.add(word)
        else:
            refs.add(word)
    return refs, unknown


def math_violations(queries: list[dict[str, Any]], where: str, returns: str) -> Iterator[str]:
    """`returns`: "one" (alarms, scaling: exactly one ReturnData true) or "any" (dashboards)."""
    ids = [q.get("Id", q.get("id")) for q in queries]
    for i, qid in enumerate(ids):
        if not isinstance(qid, str) or not _ID.match(qid):
            yield f"{where}[{i}].Id: {qid!r} does not match {_ID.pattern}"
    repeated = sorted({i for i in ids if isinstance(i, str) and ids.count(i) > 1})
    if repeated:
        yield f"{where}: ids repeat: {repeated}"
    if returns == "one":
        returned = [q.get("Id") for q in queries if q.get("ReturnData") is True]
        if len(returned) != 1:
            yield f"{where}: exactly one query must have ReturnData true, not {returned}"
    defined = {i for i in ids if isinstance(i, str)}
    for i, q in enumerate(queries):
        yield from _query(q, f"{where}[{i}]", defined, strict=returns == "one")


def _query(q: dict[str, Any], where: str, defined: set[str], strict: bool) -> Iterator[str]:
    expression = q.get("Expression", q.get("expression"))
    has_stat = "MetricStat" in q or "metric" in q
    if strict and (expression is None) == (not has_stat):
        yield f"{where}: needs exactly one of Expression and MetricStat"
    if not isinstance(expression, str):
        return
    refs, unknown = expression_references(expression)
    for name in sorted(unknown):
        yield f"{where}.Expression: unknown function {name}() in {expression!r}"
    for name in sorted(refs - defined):
        yield f"{where}.Expression: {name!r} is not an id of this query list in {expression!r}"
    own = q.get("Id", q.get("id"))
    if own in refs:
        yield f"{where}.Expression: refers to its own id {own!r}"


def _period_violations(queries: list[dict[str, Any]], where: str) -> Iterator[str]:
    for i, q in enumerate(queries):
        period = _get(q, ("MetricStat", "Period"))
        if isinstance(period, int) and period not in (10, 20, 30) and period % 60:
            yield f"{where}[{i}].MetricStat.Period: {period} is not 10, 20, 30 or a multiple of 60"


# --- dashboards ---------------------------------------------------------------------------------

WIDGET_TYPES = frozenset({"metric", "text", "log", "alarm", "explorer", "custom"})


def dashboard_violations(body: Any) -> Iterator[str]:
    try:
        doc = json.loads(body)
    except (TypeError, ValueError) as exc:
        yield f"DashboardBody: not JSON: {exc}"
        return
    widgets = doc.get("widgets") if isinstance(doc, dict) else None
    if not isinstance(widgets, list) or not widgets:
        yield "DashboardBody: needs a non-empty widgets list"
        return
    for i, widget in enumerate(widgets):
        yield from _widget(widget, f"DashboardBody.widgets[{i}]")


# Widget grid: 24 columns; (minimum, maximum or None).
WIDGET_GRID = {"x": (0, 23), "y": (0, None), "width": (1, 24), "height": (1, 1000)}


def _widget(widget: Any, where: str) -> Iterator[str]:
    if not isinstance(widget, dict):
        yield f"{where}: not an object"
        return
    if widget.get("type") not in WIDGET_TYPES:
        yield f"{where}.type: {widget.get('type')!r} not in {sorted(WIDGET_TYPES)}"
    props = widget.get("properties")
    if not isinstance(props, dict):
        yield f"{where}.properties: missing or not an object"
        return
    for key, (low, high) in WIDGET_GRID.items():
        value = widget.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or value < low or (high is not None and value > high):
            yield f"{where}.{key}: {value!r} outside {low}..{high if high else ''}"
    if widget.get("type") == "metric":
        yield from _metric_widget(props, where)


def _metric_widget(props: dict[str, Any], where: str) -> Iterator[str]:
    metrics = props.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        yield f"{where}.properties.metrics: a metric widget needs a non-empty metrics list"
        return
    queries: list[dict[str, Any]] = []
    for j, row in enumerate(metrics):
        here = f"{where}.properties.metrics[{j}]"
        if not isinstance(row, list) or not row:
            yield f"{here}: not a non-empty array"
            continue
        options = row[-1] if isinstance(row[-1], dict) else None
        strings = row[:-1] if options is not None else row
        if any(not isinstance(s, str) for s in strings):
            yield f"{here}: only strings may precede the options object"
            continue
        if strings:
            # namespace, metric name, then dimension name/value pairs ("." repeats the row above)
            if len(strings) < 2 or len(strings) % 2:
                yield f"{here}: {strings} is not namespace, metric name and name/value pairs"
        elif options is None or "expression" not in options:
            yield f"{here}: an options-only row needs an expression"
        queries.append(
            {
                "id": (options or {}).get("id", f"m{j}"),
                "expression": (options or {}).get("expression"),
            }
        )
        if options and "stat" in options and not isinstance(options["stat"], str):
            yield f"{here}: stat must be a string"
    explicit = [q for q in queries if q["id"] is not None]
    yield from math_violations(explicit, f"{where}.properties.metrics", "any")
    period = props.get("period")
    if period is not None and (
        not isinstance(period, int) or (period % 60 and period not in (1, 5, 10, 20, 30))
    ):
        yield f"{where}.properties.period: {period!r} is not 1, 5, 10, 20, 30 or a multiple of 60"


# --- the rest -----------------------------------------------------------------------------------

USER_DATA_LIMIT = 16 * 1024  # bytes, before base64
STANDARD_PARAMETER_LIMIT = 4096  # characters, Standard tier


def _policy_documents(request: Request) -> Iterator[str]:
    path, kind = POLICY_MEMBERS[(request.service, request.operation)]
    document = _get(request.params, path)
    if document is not None:
        yield from (f"{'.'.join(path)}: {v}" for v in policy_violations(document, kind))


def _attach_role_policy(request: Request) -> Iterator[str]:
    arn = request.params.get("PolicyArn", "")
    if not re.match(r"^arn:aws[a-z-]*:iam::(aws|\d{12}):policy/.+$", str(arn)):
        yield f"PolicyArn: {arn!r} is not an IAM policy ARN"


def _scaling_policy(request: Request) -> Iterator[str]:
    params = request.params
    where = "TargetTrackingConfiguration.CustomizedMetricSpecification.Metrics"
    metrics = _get(params, tuple(where.split(".")))
    if metrics is not None:
        yield from math_violations(metrics, where, "one")
        yield from _period_violations(metrics, where)
    if params.get("PolicyType") == "StepScaling" and not params.get("StepAdjustments"):
        yield "StepAdjustments: a StepScaling policy needs at least one"


def _metric_alarm(request: Request) -> Iterator[str]:
    params = request.params
    if params.get("Metrics") is not None:
        yield from math_violations(params["Metrics"], "Metrics", "one")
        yield from _period_violations(params["Metrics"], "Metrics")
        mixed = sorted(set(params) & ALARM_SINGLE_METRIC)
        if mixed:
            yield f"Metrics: with a Metrics array, {mixed} may not be given"
    yield from _alarm_span(params)
    datapoints, periods = params.get("DatapointsToAlarm"), params.get("EvaluationPeriods")
    if isinstance(datapoints, int) and isinstance(periods, int) and datapoints > periods:
        yield f"DatapointsToAlarm: {datapoints} exceeds EvaluationPeriods {periods}"


ALARM_SINGLE_METRIC = frozenset(
    {"Namespace", "MetricName", "Dimensions", "Period", "Unit", "Statistic", "ExtendedStatistic"}
)
# CloudWatch User Guide (alarm evaluation): EvaluationPeriods x Period may span at most one
# day when the period is under an hour, seven days otherwise.
ONE_DAY, SEVEN_DAYS = 86400, 7 * 86400


def _alarm_span(params: dict[str, Any]) -> Iterator[str]:
    periods = params.get("EvaluationPeriods")
    lengths = [params.get("Period")] + [
        _get(q, ("MetricStat", "Period")) or q.get("Period") for q in params.get("Metrics") or []
    ]
    known = [p for p in lengths if isinstance(p, int)]
    if not isinstance(periods, int) or not known:
        return
    period = max(known)
    limit = ONE_DAY if period < 3600 else SEVEN_DAYS
    if periods * period > limit:
        yield (
            f"EvaluationPeriods: {periods} x {period} s = {periods * period} s, "
            f"over the {limit} s an alarm may evaluate"
        )


def _dashboard(request: Request) -> Iterator[str]:
    yield from dashboard_violations(request.params.get("DashboardBody"))


def _launch_template(request: Request) -> Iterator[str]:
    user_data = _get(request.params, ("LaunchTemplateData", "UserData"))
    if user_data is None:
        return
    try:
        raw = base64.b64decode(user_data, validate=True)
    except (binascii.Error, ValueError) as exc:
        yield f"LaunchTemplateData.UserData: not base64: {exc}"
        return
    if len(raw) > USER_DATA_LIMIT:
        yield f"LaunchTemplateData.UserData: {len(raw)} bytes, over EC2's 16 KB"


def _parameter(request: Request) -> Iterator[str]:
    value = request.params.get("Value")
    standard = request.params.get("Tier", "Standard") == "Standard"
    if standard and isinstance(value, str) and len(value) > STANDARD_PARAMETER_LIMIT:
        yield f"Value: {len(value)} characters, over the Standard tier's 4096"


def _queue(request: Request) -> Iterator[str]:
    attributes = request.params.get("Attributes") or {}
    yield from _queue_attribute_violations(attributes)
    redrive = attributes.get("RedrivePolicy")
    if redrive is None:
        return
    try:
        policy = json.loads(redrive)
        count = int(policy["maxReceiveCount"])
        target = str(policy["deadLetterTargetArn"])
    except (ValueError, KeyError, TypeError) as exc:
        yield f"Attributes.RedrivePolicy: {redrive!r} is not a redrive policy: {exc}"
        return
    if not 1 <= count <= 1000 or not _ARN.match(target):
        yield f"Attributes.RedrivePolicy: {redrive!r}: maxReceiveCount 1..1000 and an ARN"


# Constraints the models state only in their documentation (the member's doc string).
_BROKER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,50}$")
_RABBIT_USER = re.compile(r"^[A-Za-z0-9._-]{2,100}$")
_AUTH_TOKEN = re.compile(r"^[A-Za-z0-9!&#$^<>-]{16,128}$")
# ElastiCache ids: 1-40 letters, digits or hyphens, a letter first, no "--", no hyphen last.
_CACHE_ID = re.compile(r"^(?!.*--)[a-zA-Z][a-zA-Z0-9-]{0,39}(?<!-)$")


def _broker(request: Request) -> Iterator[str]:
    params = request.params
    name = params.get("BrokerName", "")
    if not _BROKER_NAME.match(str(name)):
        yield f"BrokerName: {name!r}: 1-50 letters, digits, dashes and underscores"
    rabbit = str(params.get("EngineType", "")).upper() == "RABBITMQ"
    for i, user in enumerate(params.get("Users") or []):
        password = str(user.get("Password", ""))
        if len(password) < 12 or len(set(password)) < 4 or set(password) & set(",:="):
            yield (
                f"Users[{i}].Password: <sensitive> must be 12+ characters, 4+ unique, without , : ="
            )
        username = str(user.get("Username", ""))
        if rabbit and (not _RABBIT_USER.match(username) or username == "guest"):
            yield f"Users[{i}].Username: {username!r} is not a RabbitMQ broker user name"


def _replication_group(request: Request) -> Iterator[str]:
    params = request.params
    group = str(params.get("ReplicationGroupId", ""))
    if not _CACHE_ID.match(group):
        yield f"ReplicationGroupId: {group!r}: 1-40 letters, digits, hyphens, a letter first"
    token = params.get("AuthToken")
    if token is not None:
        if not _AUTH_TOKEN.match(str(token)):
            yield "AuthToken: <sensitive> must be 16-128 letters, digits or !&#$^<>-"
        if params.get("TransitEncryptionEnabled") is not True:
            yield "AuthToken: only with TransitEncryptionEnabled true"


def _cache_subnet_group(request: Request) -> Iterator[str]:
    group = str(request.params.get("CacheSubnetGroupName", ""))
    if not re.match(r"^[a-z0-9-]{1,255}$", group):
        yield f"CacheSubnetGroupName: {group!r}: lower-case letters, digits and hyphens"


def _instance_refresh(request: Request) -> Iterator[str]:
    prefs = request.params.get("Preferences") or {}
    low, high = prefs.get("MinHealthyPercentage"), prefs.get("MaxHealthyPercentage")
    if high is not None and low is None:
        yield "Preferences.MaxHealthyPercentage: needs MinHealthyPercentage too"
    if isinstance(low, int) and isinstance(high, int) and high - low > 100:
        yield f"Preferences: MaxHealthyPercentage {high} - MinHealthyPercentage {low} > 100"
    checkpoints = prefs.get("CheckpointPercentages")
    if checkpoints and (checkpoints != sorted(checkpoints) or checkpoints[-1] != 100):
        yield f"Preferences.CheckpointPercentages: {checkpoints} must rise to 100"


# A RabbitMQ configuration is cuttlefish text (`key = value` lines); Amazon MQ takes
# consumer_timeout in milliseconds as a 32-bit integer.
_CUTTLEFISH = re.compile(r"^\s*([a-z0-9_.]+)\s*=\s*(\S.*?)\s*$")


def _mq_configuration_data(request: Request) -> Iterator[str]:
    data = request.params.get("Data")
    if data is None:
        return
    try:
        text = base64.b64decode(data, validate=True).decode()
    except (binascii.Error, ValueError) as exc:
        yield f"Data: not base64 text: {exc}"
        return
    if text.lstrip().startswith("<"):
        return  # ActiveMQ's XML: not checked
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _CUTTLEFISH.match(line)
        if not match:
            yield f"Data line {n}: {line!r} is not `key = value`"
        elif match[1] == "consumer_timeout" and not (
            match[2].isdigit() and int(match[2]) <= 2**31 - 1
        ):
            yield f"Data line {n}: consumer_timeout {match[2]!r} is not 0..2147483647 ms"


Check = Callable[[Request], Iterator[str]]
GRAMMARS: dict[tuple[str, str], list[Check]] = {key: [_policy_documents] for key in POLICY_MEMBERS}
for _key, _check in (
    (("iam", "AttachRolePolicy"), _attach_role_policy),
    (("autoscaling", "PutScalingPolicy"), _scaling_policy),
    (("cloudwatch", "PutMetricAlarm"), _metric_alarm),
    (("cloudwatch", "PutDashboard"), _dashboard),
    (("ec2", "CreateLaunchTemplate"), _launch_template),
    (("ssm", "PutParameter"), _parameter),
    (("sqs", "CreateQueue"), _queue),
    (("sqs", "SetQueueAttributes"), _queue),
    (("mq", "CreateBroker"), _broker),
    (("mq", "UpdateConfiguration"), _mq_configuration_data),
    (("autoscaling", "StartInstanceRefresh"), _instance_refresh),
    (("elasticache", "CreateReplicationGroup"), _replication_group),
    (("elasticache", "CreateCacheSubnetGroup"), _cache_subnet_group),
):
    GRAMMARS.setdefault(_key, []).append(_check)


def grammar_violations(request: Request) -> Iterator[str]:
    for check in GRAMMARS.get((request.service, request.operation), []):
        yield from check(request)


# SQS queue attributes are strings; their ranges are in the API reference (CreateQueue).
SQS_RANGES = {
    "DelaySeconds": (0, 900),
    "MaximumMessageSize": (1024, 1048576),
    "MessageRetentionPeriod": (60, 1209600),
    "ReceiveMessageWaitTimeSeconds": (0, 20),
    "VisibilityTimeout": (0, 43200),
    "KmsDataKeyReusePeriodSeconds": (60, 86400),
}
SQS_BOOLEANS = ("SqsManagedSseEnabled", "FifoQueue", "ContentBasedDeduplication")


def _queue_attribute_violations(attributes: dict[str, Any]) -> Iterator[str]:
    for name, (low, high) in SQS_RANGES.items():
        if name in attributes:
            value = attributes[name]
            if not (isinstance(value, str) and value.isdigit() and low <= int(value) <= high):
                yield f"Attributes[{name!r}]: {value!r} is not an integer string in {low}..{high}"
    for name in SQS_BOOLEANS:
        if name in attributes and attributes[name] not in ("true", "false"):
            yield f"Attributes[{name!r}]: {attributes[name]!r} is not 'true' or 'false'"


def run_violations(requests: list[Request]) -> list[str]:
    """Checks across requests: what one request allows only given another."""
    found: list[str] = []
    images = [
        _get(r.params, ("LaunchTemplateData", "ImageId"))
        for r in requests
        if r.operation == "CreateLaunchTemplate"
    ]
    versions = [
        _get(r.params, ("MixedInstancesPolicy", "LaunchTemplate", "LaunchTemplateSpecification"))
        or r.params.get("LaunchTemplate")
        or {}
        for r in requests
        if r.operation == "CreateAutoScalingGroup"
    ]
    for r in requests:
        if r.operation != "StartInstanceRefresh":
            continue
        if _get(r.params, ("Preferences", "AutoRollback")) is not True:
            continue
        # AutoRollback is refused with an SSM-parameter image or a $Latest/$Default version.
        if any(str(i).startswith("resolve:ssm:") for i in images):
            found.append(
                f"{r.where()} Preferences.AutoRollback: the launch template's ImageId "
                "is an SSM parameter, which rollback does not support"
            )
        if any(v.get("Version") in ("$Latest", "$Default") for v in versions):
            found.append(
                f"{r.where()} Preferences.AutoRollback: the group follows $Latest or "
                "$Default, which rollback does not support"
            )
    return found


def violations(request: Request) -> list[str]:
    """Every reason AWS would refuse `request`, prefixed with the resource and operation."""
    found = model_violations(request)
    found += grammar_violations(request)
    return [f"{request.where()} {v}" for v in found]
