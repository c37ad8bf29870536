"""Every stack setting, read once, typed and checked.

All `pulumi.Config` reads live here so that a newcomer finds every knob in one
file, the components receive plain typed values, and the tests can build a
`StackConfig` directly without a Pulumi engine. A bad value stops `pulumi up`
before anything is created, with a message naming the key and what to do.
The table of keys for operators is in infra/README.md.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pulumi

from app.autoscale import Policy
from app.names import ssm_prefix
from app.settings import MAX_BATCH_SECONDS
from app.stack import CHOICE_KEYS, StackChoices

BROKERS = ("sqs", "rabbitmq")
RESULT_STORES = ("s3", "redis")
NAT_MODES = ("none", "single", "per-az")
BROKER_DEPLOYMENT_MODES = ("SINGLE_INSTANCE", "CLUSTER_MULTI_AZ")

# vCPUs by size for the common families; "Nxlarge" is N * 4. Sizes outside
# this table (metal, u-*) have no fixed count, so they need an explicit
# targetBacklogPerInstance.
_SIZE_VCPUS = {"medium": 1, "large": 2, "xlarge": 4}
_INSTANCE_TYPE = re.compile(
    r"^(?P<family>[a-z]+)(?P<gen>\d+)(?P<attrs>[a-z-]*)\.(?P<size>[a-z0-9-]+)$"
)

# A lifecycle hook's heartbeat may be at most two hours.
MAX_LIFECYCLE_HEARTBEAT = 7200


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


def instance_vcpus(instance_type: str) -> int | None:
    """vCPUs of an instance type from its size, or None when the size does not tell."""
    match = _INSTANCE_TYPE.match(instance_type)
    if not match:
        return None
    size = match["size"]
    if size in _SIZE_VCPUS:
        return _SIZE_VCPUS[size]
    multiple = re.fullmatch(r"(\d+)xlarge", size)
    return int(multiple[1]) * 4 if multiple else None


def instance_arch(instance_type: str) -> str:
    """'arm64' for Graviton types (a 'g' among the attribute letters: c7g, m6gd), else 'x86_64'."""
    match = _INSTANCE_TYPE.match(instance_type)
    if not match:
        raise StackConfigError(
            f"celery-fleet:instanceTypes: {instance_type!r} is not an EC2 instance type "
            "(expected something like c7i.xlarge)."
        )
    return "arm64" if "g" in match["attrs"] else "x86_64"


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
        _at_least("idleMinutes", self.idle_minutes, 1)
        _at_least("rootVolumeGb", self.root_volume_gb, 8)
        _at_least("logRetentionDays", self.log_retention_days, 1)
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
        self._check_network()
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

    def _check_instance_types(self) -> None:
        if not self.instance_types:
            raise StackConfigError("celery-fleet:instanceTypes is empty; list at least one type.")
        arches = {instance_arch(t) for t in self.instance_types}
        if len(arches) > 1:
            raise StackConfigError(
                "celery-fleet:instanceTypes mixes Graviton (arm64) and x86_64 types; one launch "
                "template boots one AMI, so pick types of one architecture."
            )
        vcpus = {instance_vcpus(t) for t in self.instance_types}
        if len(vcpus) > 1:
            raise StackConfigError(
                f"celery-fleet:instanceTypes {list(self.instance_types)} differ in vCPU count; "
                "scaling counts backlog per instance, so list types of one size (e.g. all .xlarge)."
            )
        if vcpus == {None} and self.target_backlog is None:
            raise StackConfigError(
                f"celery-fleet:instanceTypes {list(self.instance_types)}: the size does not tell "
                "the vCPU count; set celery-fleet:targetBacklogPerInstance."
            )

    def _check_scaling(self) -> None:
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
    def result_ttl_seconds(self) -> int:
        return self.result_ttl_days * 24 * 3600

    @property
    def vcpus_per_instance(self) -> int | None:
        return instance_vcpus(self.instance_types[0])

    @property
    def arch(self) -> str:
        return instance_arch(self.instance_types[0])

    @property
    def target_backlog_per_instance(self) -> float:
        # The same policy as the local autoscaler and the simulator
        # (app/autoscale.py): the launcher keeps two batches per slot on the
        # broker, so a target of one per slot keeps growing a fleet that has
        # work held back, and holds it steady once the held batches are gone.
        if self.target_backlog is not None:
            return self.target_backlog
        return Policy().target_backlog_per_instance(self.vcpus_per_instance or 1)

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
    def offline_install(self) -> bool:
        # Without a NAT gateway the workers cannot reach PyPI, so the artifact
        # bucket carries every dependency wheel as well.
        return self.nat == "none"

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
        "object": cfg.get_object,
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


def _as_tuple(key: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise pulumi.RunError(f"celery-fleet:{key} must be a list of strings.")
    return tuple(value)
