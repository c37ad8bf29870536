"""Every stack setting, read once, typed and checked.

All `pulumi.Config` reads live here so that a newcomer finds every knob in one
file, the components receive plain typed values, and the tests can build a
`StackConfig` directly without a Pulumi engine. A bad value stops `pulumi up`
before anything is created, with a message naming the key and what to do.
The table of keys for operators is in infra/README.md.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi

from app.autoscale import Policy
from app.names import ssm_prefix
from app.settings import MAX_BATCH_SECONDS
from app.stack import CHOICE_KEYS, StackChoices

BROKERS = ("sqs", "rabbitmq")
RESULT_STORES = ("s3", "redis")
NAT_MODES = ("none", "single", "per-az", "ipv6")
BROKER_DEPLOYMENT_MODES = ("SINGLE_INSTANCE", "CLUSTER_MULTI_AZ")

# The architectures Amazon Linux 2023 is published for (its SSM parameter names).
ARCHITECTURES = ("x86_64", "arm64")

# A lifecycle hook's heartbeat may be at most two hours.
MAX_LIFECYCLE_HEARTBEAT = 7200

# CloudWatch Logs keeps a log group's events for one of these many days
# (PutRetentionPolicy, shape Days); 0 is the provider's "never expire" (it
# deletes the retention policy instead).
LOG_RETENTION_DAYS = (
    *(1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731),
    *(1096, 1827, 2192, 2557, 2922, 3288, 3653),
)
NEVER_EXPIRE = 0

# The idle alarm (infra/scaling.py) looks at one datapoint per minute (PERIOD
# 60 s), one evaluation period per idle minute; for periods under an hour
# CloudWatch evaluates at most one day (Period x EvaluationPeriods <= 86,400 s).
MAX_IDLE_MINUTES = 86_400 // 60

# Amazon MQ for RabbitMQ accepts consumer_timeout from 0 ("infinite") to 2^31 - 1 ms.
MAX_CONSUMER_TIMEOUT_MS = 2**31 - 1

# AWS APIs the workers call, reached through interface endpoints when there
# is no NAT gateway (plus sqs with the SQS broker). No "ec2": the workers never
# call the EC2 API (the Spot notice and the lifecycle state come from instance
# metadata); no "kms": SSM decrypts SecureStrings on the workers' behalf.
WORKER_SERVICES = ["ssm", "ssmmessages", "ec2messages", "logs", "monitoring", "autoscaling"]
# With `nat: ipv6` the workers reach every AWS API they call over IPv6, through an
# egress-only internet gateway, at the service's dual-stack endpoint: each service
# a worker host calls, with where AWS says it has one. botocore's endpoint rule sets
# build a dual-stack name for any service (a generic rule), so they prove nothing;
# these are the services' own pages. S3 (artifacts, results, and Amazon Linux's
# package repositories, which are S3 buckets) also stays on the gateway endpoint.
DUALSTACK_SERVICES = {
    "s3": "S3 User Guide, dual-stack endpoints (s3.dualstack.<region>.amazonaws.com)",
    "sqs": "SQS Developer Guide, dual-stack endpoints (sqs.<region>.api.aws)",
    "ssm": "SSM Agent 3.3.3270.0 (2025-10): IPv6 support, UseDualStackEndpoint",
    "ssmmessages": "SSM Agent 3.3.3270.0 (2025-10): IPv6 support, UseDualStackEndpoint",
    "ec2messages": "SSM Agent 3.3.3270.0 (2025-10): IPv6 support, UseDualStackEndpoint",
    "logs": "General Reference, CloudWatch Logs endpoints (logs.<region>.api.aws)",
    "monitoring": "General Reference, CloudWatch endpoints (monitoring.<region>.api.aws)",
    "autoscaling": "General Reference, EC2 Auto Scaling endpoints (autoscaling.<region>.api.aws)",
    "ec2": "EC2 Developer Guide, dual-stack endpoints (ec2.<region>.api.aws): the boot's "
    "create-tags on a failure",
}
# AWS keeps the first four addresses and the last of every subnet.
RESERVED_PER_SUBNET = 5
# A RabbitMQ CLUSTER_MULTI_AZ deployment runs three brokers over the subnets.
CLUSTER_BROKERS = 3


# S3's bucket naming rules (general purpose buckets).
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StackConfigError(ValueError):
    """A stack setting that cannot work; the message says which and why."""


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise StackConfigError(f"celery-fleet:{key}={value!r}: use one of {', '.join(allowed)}.")
    return value


def _at_least(key: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise StackConfigError(f"celery-fleet:{key}={value}: must be at least {minimum}.")
    return value


@dataclass(frozen=True)
class InstanceFacts:
    """What EC2 says of the instance types (aws.ec2.get_instance_type), one for them all."""

    vcpus: int
    arch: str


def instance_facts(described: Mapping[str, tuple[int, Sequence[str]]]) -> InstanceFacts:
    """The one vCPU count and architecture of the types EC2 described, or StackConfigError.

    `described` maps each instance type to its default vCPUs and supported architectures.
    """
    types = list(described)
    arches: dict[str, str] = {}
    for instance_type, (_, supported) in described.items():
        usable = [a for a in ARCHITECTURES if a in supported]
        if not usable:
            raise StackConfigError(
                f"celery-fleet:instanceTypes: {instance_type!r} runs {', '.join(supported)}; "
                "Amazon Linux 2023 needs x86_64 or arm64, so pick another type."
            )
        arches[instance_type] = usable[0]
    if len(set(arches.values())) > 1:
        raise StackConfigError(
            f"celery-fleet:instanceTypes {types} mixes Graviton (arm64) and x86_64 types "
            f"({_by_type(arches)}); one launch template boots one AMI, so pick types of one "
            "architecture."
        )
    vcpus = {instance_type: count for instance_type, (count, _) in described.items()}
    if len(set(vcpus.values())) > 1:
        raise StackConfigError(
            f"celery-fleet:instanceTypes {types} differ in vCPU count ({_by_type(vcpus)}); "
            "scaling counts backlog per instance, so list types with one vCPU count."
        )
    return InstanceFacts(vcpus=vcpus[types[0]], arch=arches[types[0]])


def _by_type(values: Mapping[str, object]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in values.items())


@dataclass(frozen=True, kw_only=True)
class StackConfig(StackChoices):
    """The stack's settings. Defaults give a working stack with only aws:region set.

    The choices that decide the bill (broker, result store, NAT, zones, instance
    types, ...) and their defaults are in app.stack.StackChoices, which `fleet
    cost` reads too.
    """

    stack: str
    vpc_cidr: str = "10.40.0.0/16"
    spot: bool = True
    on_demand_base_capacity: int = 0
    max_instances: int = 10
    # None: the latest Amazon Linux 2023 for the instance types' architecture.
    ami: str | None = None
    max_batch_seconds: int = MAX_BATCH_SECONDS
    max_receive_count: int = 5
    result_ttl_days: int = 7
    # None: the shared policy, 1 batch per vCPU (see target_backlog_per_instance).
    target_backlog: float | None = None
    idle_minutes: int = 15
    # None: maxBatchSeconds, capped at the two hours AWS allows.
    lifecycle_heartbeat_seconds: int | None = None
    log_retention_days: int = 14
    tags: dict[str, str] = field(default_factory=dict)
    # The user's project directories whose code the workers run (relative to Pulumi.yaml),
    # packaged with this kit into the stack's wheelhouse (infra/artifact.py).
    code: tuple[str, ...] = ()
    # Buckets the workers may write a job's results to (`fleet run --out s3://...`): PutObject
    # only, and on these only.
    output_buckets: tuple[str, ...] = ()
    # Buckets a submitted job's driver, on a worker, may read its IDs from (`fleet submit
    # --ids s3://BUCKET/KEY`): GetObject only, and on these only.
    input_buckets: tuple[str, ...] = ()
    # The password of a job's PostgreSQL sink (`pulumi config set --secret
    # celery-fleet:sinkPassword ...`): kept as a SecureString parameter the workers read, so
    # a sink URL needs none (FLEET_SINK_PASSWORD). A Pulumi secret: never printed.
    sink_password: Any = field(default=None, repr=False, compare=False)
    # Not a setting: what EC2 says of instance_types, looked up by infra/program.py
    # at program time and set with `with_instance_facts`.
    instance_facts: InstanceFacts | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        _one_of("broker", self.broker, BROKERS)
        _one_of("resultStore", self.resolved_result_store, RESULT_STORES)
        _one_of("nat", self.nat, NAT_MODES)
        _one_of("brokerDeploymentMode", self.broker_deployment_mode, BROKER_DEPLOYMENT_MODES)
        # Two AZs at least: one zone out of Spot capacity must not stop the fleet.
        _at_least("azCount", self.az_count, 2)
        _at_least("maxInstances", self.max_instances, 1)
        _at_least("onDemandBaseCapacity", self.on_demand_base_capacity, 0)
        _at_least("maxBatchSeconds", self.max_batch_seconds, 1)
        _at_least("resultTtlDays", self.result_ttl_days, 1)
        _at_least("rootVolumeGb", self.root_volume_gb, 8)
        if self.log_retention_days not in (NEVER_EXPIRE, *LOG_RETENTION_DAYS):
            raise StackConfigError(
                f"celery-fleet:logRetentionDays={self.log_retention_days}: CloudWatch Logs "
                f"keeps logs for {', '.join(map(str, LOG_RETENTION_DAYS))} days, or "
                f"{NEVER_EXPIRE} (never expire); use one of these."
            )
        if not 1 <= self.max_receive_count <= 1000:
            raise StackConfigError(
                f"celery-fleet:maxReceiveCount={self.max_receive_count}: SQS accepts 1 to 1000."
            )
        if self.on_demand_base_capacity > self.max_instances:
            raise StackConfigError(
                f"celery-fleet:onDemandBaseCapacity={self.on_demand_base_capacity} exceeds "
                f"maxInstances={self.max_instances}."
            )
        # SQS redelivers after the visibility timeout and caps it at 12 hours.
        if self.broker == "sqs" and self.visibility_timeout > 12 * 3600:
            raise StackConfigError(
                f"celery-fleet:maxBatchSeconds={self.max_batch_seconds} gives a visibility "
                f"timeout of {self.visibility_timeout}s, over the 43200s SQS allows; "
                "split the work into shorter batches."
            )
        # RabbitMQ closes the channel of a consumer that holds a message unacked longer.
        if self.broker == "rabbitmq" and self.consumer_timeout_ms > MAX_CONSUMER_TIMEOUT_MS:
            longest = (MAX_CONSUMER_TIMEOUT_MS // 1000 - 60) // 2
            raise StackConfigError(
                f"celery-fleet:maxBatchSeconds={self.max_batch_seconds}: the RabbitMQ "
                f"consumer_timeout would be {self.consumer_timeout_ms} ms (2 x maxBatchSeconds "
                f"+ 60 s), over the {MAX_CONSUMER_TIMEOUT_MS} ms Amazon MQ allows; use at most "
                f"{longest} and split the work into shorter batches."
            )
        for key, buckets in (
            ("outputBuckets", self.output_buckets),
            ("inputBuckets", self.input_buckets),
        ):
            for bucket in buckets:
                if not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
                    raise StackConfigError(
                        f"celery-fleet:{key}: {bucket!r} is not an S3 bucket name (3 to 63 "
                        "lowercase letters, digits, dots and hyphens); give names, not s3:// "
                        "URLs."
                    )
        self._check_network()
        self._check_addresses()
        self._check_instance_types()
        self._check_scaling()
        cluster = self.broker_deployment_mode == "CLUSTER_MULTI_AZ"
        if cluster and self.resolved_broker_instance_type == "mq.t3.micro":
            raise StackConfigError(
                "celery-fleet:brokerInstanceType=mq.t3.micro only runs SINGLE_INSTANCE brokers; "
                "use mq.m5.large or larger for CLUSTER_MULTI_AZ."
            )

    def _check_network(self) -> None:
        try:
            network = ipaddress.ip_network(self.vpc_cidr)
        except ValueError as exc:
            raise StackConfigError(f"celery-fleet:vpcCidr={self.vpc_cidr!r}: {exc}.") from None
        # Sixteen equal blocks: private subnets take the first half, public the second.
        if network.version != 4 or not 16 <= network.prefixlen <= 24:
            raise StackConfigError(
                f"celery-fleet:vpcCidr={self.vpc_cidr}: use an IPv4 block from /16 to /24."
            )
        if self.az_count > 8:
            raise StackConfigError(
                f"celery-fleet:azCount={self.az_count}: at most 8 zones are used."
            )

    def _check_addresses(self) -> None:
        """Each private subnet must have an address for everything that may run in it.

        The rule: AWS reserves 5 addresses per subnet; rebalancing may take the group
        10% (at least one instance) over maxInstances; one zone may be out of capacity
        (Spot, an outage), so the other zones together carry the whole fleet (with two
        zones, one subnet holds it all); without NAT every interface endpoint has an
        address in every subnet; and Amazon MQ and ElastiCache nodes take addresses too,
        counted in every subnet since their zone is not ours to choose.
        """
        needed = self._addresses_per_subnet()
        network = ipaddress.ip_network(self.vpc_cidr)
        have = network.num_addresses // 16
        if sum(needed.values()) <= have:
            return
        fits = [p for p in range(24, 15, -1) if 2 ** (32 - p) // 16 >= sum(needed.values())]
        what = ", ".join(f"{n} {label}" for label, n in needed.items() if n)
        todo = (
            f"use a /{fits[0]} or a larger block (a shorter prefix), or lower "
            "celery-fleet:maxInstances."
            if fits
            else "no VPC from /16 to /24 has room; lower celery-fleet:maxInstances or raise "
            "celery-fleet:azCount."
        )
        raise StackConfigError(
            f"celery-fleet:vpcCidr={self.vpc_cidr} gives private subnets of {have} addresses; "
            f"with celery-fleet:maxInstances={self.max_instances} over {self.az_count} zones "
            f"(nat={self.nat}, broker={self.broker}) each needs {sum(needed.values())} "
            f"({what}): {todo}"
        )

    def _addresses_per_subnet(self) -> dict[str, int]:
        peak = self.max_instances + max(1, math.ceil(self.max_instances / 10))
        brokers = 0
        if self.broker == "rabbitmq":
            single = self.broker_deployment_mode == "SINGLE_INSTANCE"
            brokers = 1 if single else math.ceil(CLUSTER_BROKERS / self.az_count)
        return {
            "reserved by AWS": RESERVED_PER_SUBNET,
            "instances": math.ceil(peak / (self.az_count - 1)),
            "interface endpoints": len(self.endpoint_services) if self.interface_endpoints else 0,
            "Amazon MQ": brokers,
            "ElastiCache": 1 if self.resolved_result_store == "redis" else 0,
        }

    def _check_instance_types(self) -> None:
        # Their vCPUs and architecture come from EC2 (infra/program.py, instance_facts).
        if not self.instance_types:
            raise StackConfigError("celery-fleet:instanceTypes is empty; list at least one type.")

    def _check_scaling(self) -> None:
        if not 1 <= self.idle_minutes <= MAX_IDLE_MINUTES:
            raise StackConfigError(
                f"celery-fleet:idleMinutes={self.idle_minutes}: use 1 to {MAX_IDLE_MINUTES}; "
                "the idle alarm evaluates one-minute periods and CloudWatch allows at most "
                "one day of them."
            )
        if self.target_backlog is not None and self.target_backlog <= 0:
            raise StackConfigError(
                f"celery-fleet:targetBacklogPerInstance={self.target_backlog}: must be above 0."
            )
        heartbeat = self.lifecycle_heartbeat
        if not 30 <= heartbeat <= MAX_LIFECYCLE_HEARTBEAT:
            raise StackConfigError(
                f"celery-fleet:lifecycleHeartbeatSeconds={heartbeat}: AWS accepts 30 to 7200."
            )

    @property
    def visibility_timeout(self) -> int:
        # Same formula as app.settings.Settings.visibility_timeout: the queue must
        # not redeliver a batch that is still running.
        return 2 * self.max_batch_seconds + 60

    @property
    def consumer_timeout_ms(self) -> int:
        # A worker holds a prefetched message unacked while it runs the batch before
        # it, so RabbitMQ must wait as long as SQS's visibility timeout does.
        return self.visibility_timeout * 1000

    @property
    def result_ttl_seconds(self) -> int:
        return self.result_ttl_days * 24 * 3600

    @property
    def endpoint_services(self) -> list[str]:
        """The interface endpoints the workers need when there is no NAT gateway."""
        return [*WORKER_SERVICES, *(["sqs"] if self.broker == "sqs" else [])]

    def with_instance_facts(self, facts: InstanceFacts) -> StackConfig:
        """This config, knowing what EC2 says of its instance types."""
        cfg = dataclasses.replace(self)
        object.__setattr__(cfg, "instance_facts", facts)
        return cfg

    @property
    def facts(self) -> InstanceFacts:
        if self.instance_facts is None:
            raise RuntimeError(
                "StackConfig.instance_facts is unset: the instance types' vCPUs and "
                "architecture come from EC2; call with_instance_facts() first (as build() does)."
            )
        return self.instance_facts

    @property
    def vcpus_per_instance(self) -> int:
        return self.facts.vcpus

    @property
    def arch(self) -> str:
        return self.facts.arch

    @property
    def target_backlog_per_instance(self) -> float:
        # The same policy as the local autoscaler and the simulator
        # (app/autoscale.py): the launcher keeps two batches per slot on the
        # broker, so a target of one per slot keeps growing a fleet that has
        # work held back, and holds it steady once the held batches are gone.
        if self.target_backlog is not None:
            return self.target_backlog
        return Policy().target_backlog_per_instance(self.vcpus_per_instance)

    @property
    def lifecycle_heartbeat(self) -> int:
        if self.lifecycle_heartbeat_seconds is not None:
            return self.lifecycle_heartbeat_seconds
        return max(30, min(self.max_batch_seconds, MAX_LIFECYCLE_HEARTBEAT))

    @property
    def image_id(self) -> str:
        # Resolved by EC2 at each launch, so new instances get the patched AMI
        # without a change to the launch template.
        if self.ami:
            return self.ami
        parameter = f"/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{self.arch}"
        return f"resolve:ssm:{parameter}"

    @property
    def interface_endpoints(self) -> bool:
        """Whether the workers reach the AWS APIs through interface endpoints (`nat: none`)."""
        return self.nat == "none"

    @property
    def dualstack(self) -> bool:
        """Whether the workers call AWS at dual-stack endpoints, over IPv6 (`nat: ipv6`)."""
        return self.nat == "ipv6"

    @property
    def ssm_prefix(self) -> str:
        return ssm_prefix(self.stack)

    @property
    def resource_prefix(self) -> str:
        """celery-fleet-<stack> in the characters every AWS name accepts (SQS, Amazon MQ, ...)."""
        name = re.sub(r"[^a-z0-9-]+", "-", f"celery-fleet-{self.stack}".lower())
        # Amazon MQ broker names stop at 50 characters; leave room for "-dlq".
        return name[:46].strip("-")


# Stack config key -> (StackConfig field, how to read it): the choices that decide the
# bill (app.stack.CHOICE_KEYS, which `fleet cost` reads too) and the program's others.
# Unset keys keep the dataclass default, so each default is written once.
_KEYS: dict[str, tuple[str, str]] = {
    **CHOICE_KEYS,
    "vpcCidr": ("vpc_cidr", "str"),
    "spot": ("spot", "bool"),
    "onDemandBaseCapacity": ("on_demand_base_capacity", "int"),
    "maxInstances": ("max_instances", "int"),
    "ami": ("ami", "str"),
    "maxBatchSeconds": ("max_batch_seconds", "int"),
    "maxReceiveCount": ("max_receive_count", "int"),
    "resultTtlDays": ("result_ttl_days", "int"),
    "targetBacklogPerInstance": ("target_backlog", "float"),
    "idleMinutes": ("idle_minutes", "int"),
    "lifecycleHeartbeatSeconds": ("lifecycle_heartbeat_seconds", "int"),
    "logRetentionDays": ("log_retention_days", "int"),
    "tags": ("tags", "object"),
    "code": ("code", "paths"),
    "outputBuckets": ("output_buckets", "list"),
    "inputBuckets": ("input_buckets", "list"),
    "sinkPassword": ("sink_password", "secret"),
}


def load_config() -> StackConfig:
    """Read the stack's `celery-fleet:*` settings."""
    cfg = pulumi.Config()
    readers: dict[str, Callable[[str], Any]] = {
        "str": cfg.get,
        "int": cfg.get_int,
        "float": cfg.get_float,
        "bool": cfg.get_bool,
        "list": lambda key: _as_tuple(key, cfg.get_object(key)),
        # One path (`pulumi config set celery-fleet:code ../proj`) or a list of them.
        "paths": lambda key: _as_tuple(key, _one_or_list(cfg.get(key))),
        "object": cfg.get_object,
        "secret": cfg.get_secret,
    }
    values: dict[str, Any] = {}
    for key, (field_name, kind) in _KEYS.items():
        value = readers[kind](key)
        if value is not None:
            values[field_name] = value
    try:
        return StackConfig(stack=pulumi.get_stack(), **values)
    except StackConfigError as exc:
        # pulumi prints a RunError as the message alone, without a traceback.
        raise pulumi.RunError(str(exc)) from None


def _one_or_list(raw: str | None) -> object:
    """A list (`pulumi config set --path 'celery-fleet:code[0]' ../a` stores JSON) or one
    plain value, as a list."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return [raw]
    return value if isinstance(value, list) else [raw]


def _as_tuple(key: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise pulumi.RunError(f"celery-fleet:{key} must be a list of strings.")
    return tuple(value)
