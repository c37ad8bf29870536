"""What a stack costs per hour while idle, and per worker instance-hour (`fleet cost`).

Reads the stack's settings from Pulumi.<stack>.yaml (beside the Pulumi.yaml
of the project in the current directory or a parent; or --config FILE) and
the list prices in scripts/prices.json, which the wheel carries. The idle
figure is what the stack costs with no instance running: NAT gateways, VPC
endpoints, a RabbitMQ broker or a Valkey node, the dashboard and the scaling
alarms. SQS, S3, SSM and KMS cost nothing measurable while idle. Data
transfer and requests are not counted.

This module must not import the Pulumi program (infra/ is not installed with
the wheel): the stack's choices and their defaults come from
app.stack.StackChoices, which the program's StackConfig extends; tests/infra
checks that the resource counts below match what the program builds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click

from app.stack import CHOICE_KEYS, StackChoices

PRICES = Path(__file__).with_name("prices.json")


def load_prices() -> dict[str, Any]:
    """The list prices the wheel carries (scripts/prices.json)."""
    prices: dict[str, Any] = json.loads(PRICES.read_text())
    return prices


HOURS_PER_MONTH = 730

# Interface endpoints per zone without NAT (infra/program.py WORKER_SERVICES, + sqs).
ENDPOINT_SERVICES = 6
# RabbitMQ cluster deployments run three brokers.
CLUSTER_BROKERS = 3


@dataclass(frozen=True, kw_only=True)
class StackSettings(StackChoices):
    """A stack's choices, read from its Pulumi.<stack>.yaml, and its region."""

    region: str

    @classmethod
    def from_stack_file(cls, path: Path) -> StackSettings:
        import yaml  # only this command reads YAML; keep `fleet run` quick to start

        config = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
        region = config.get("aws:region")
        if not region:
            raise click.UsageError(f"{path} sets no aws:region.")

        convert: dict[str, Callable[[Any], Any]] = {"str": str, "int": int, "list": _string_list}
        values: dict[str, Any] = {}
        for key, (field_name, kind) in CHOICE_KEYS.items():
            value = config.get(f"celery-fleet:{key}")
            if value is not None:
                values[field_name] = convert[kind](value)
        return cls(region=region, **values)


def stack_file(stack: str, start: Path | None = None) -> Path:
    """Pulumi.<stack>.yaml of the Pulumi project in `start` (the current directory) or the
    nearest parent that holds a Pulumi.yaml."""
    here = (start or Path.cwd()).resolve()
    project = next((d for d in (here, *here.parents) if (d / "Pulumi.yaml").is_file()), None)
    if project is None:
        raise click.UsageError(
            f"no Pulumi.yaml in {here} or above it: run this in the project's directory, or "
            "give the stack's file with --config FILE."
        )
    path = project / f"Pulumi.{stack}.yaml"
    if not path.exists():
        raise click.UsageError(
            f"{path} does not exist; create the stack with `pulumi stack init {stack}`."
        )
    return path


def _string_list(value) -> tuple[str, ...]:
    # Pulumi writes objects set with --path as YAML, and with plain `config set` as JSON text.
    return tuple(json.loads(value) if isinstance(value, str) else value)


@dataclass(frozen=True)
class LineItem:
    item: str
    count: int
    hourly: float


@dataclass(frozen=True)
class InstancePrice:
    instance_type: str
    on_demand: float | None
    spot: float | None


@dataclass(frozen=True)
class CostReport:
    region: str
    price_date: str
    idle: list[LineItem]
    instances: list[InstancePrice]
    notes: list[str] = field(default_factory=list)
    # The idle total of the same stack with each `celery-fleet:nat` option, side by side.
    idle_by_network: dict[str, float] = field(default_factory=dict)

    @property
    def idle_hourly(self) -> float:
        return sum(item.hourly for item in self.idle)

    def as_dict(self) -> dict:
        return {**asdict(self), "idle_hourly": round(self.idle_hourly, 5)}


NETWORK_OPTIONS = ("single", "per-az", "none", "ipv6")


def estimate(settings: StackSettings, prices: dict) -> CostReport:
    """The hourly cost of the idle stack and of each worker instance type, from `prices`,
    and the idle total with each network option."""
    report = _estimate(settings, prices)
    by_network = {
        nat: round(_estimate(replace(settings, nat=nat), prices).idle_hourly, 5)
        for nat in NETWORK_OPTIONS
    }
    return replace(report, idle_by_network=by_network)


def _estimate(settings: StackSettings, prices: dict) -> CostReport:
    try:
        table = prices["regions"][settings.region]
    except KeyError:
        known = ", ".join(sorted(prices["regions"]))
        raise click.UsageError(
            f"no prices for {settings.region} in {PRICES.name}; it has {known}."
        ) from None
    idle: list[LineItem] = []
    notes: list[str] = []

    def add(item: str, count: int, unit_hourly: float) -> None:
        if count:
            idle.append(LineItem(item, count, round(count * unit_hourly, 5)))

    # An egress-only internet gateway (nat: ipv6) has no hourly price.
    nat_gateways = {"none": 0, "ipv6": 0, "single": 1, "per-az": settings.az_count}[settings.nat]
    # A NAT gateway's Elastic IP is a public IPv4 address, billed on its own.
    add("NAT gateway", nat_gateways, table["nat_gateway_hour"] + table["public_ipv4_hour"])
    if settings.nat == "none":
        services = ENDPOINT_SERVICES + (settings.broker == "sqs")
        add(
            "VPC interface endpoint (per zone)",
            services * settings.az_count,
            table["interface_endpoint_hour"],
        )
    if settings.broker == "rabbitmq":
        brokers = 1 if settings.broker_deployment_mode == "SINGLE_INSTANCE" else CLUSTER_BROKERS
        broker_type = settings.resolved_broker_instance_type
        add(f"Amazon MQ {broker_type}", brokers, _price(table["mq"], broker_type, notes))
    if settings.resolved_result_store == "redis":
        node_type = settings.redis_node_type
        add(f"ElastiCache Valkey {node_type}", 1, _price(table["valkey"], node_type, notes))
    add("CloudWatch dashboard", 1, table["dashboard_month"] / HOURS_PER_MONTH)
    # Scaling: two target-tracking alarms and the wake and idle alarms, each
    # billed per metric it reads: the queue depth metrics, the launchers' held
    # batches and one group metric.
    depth_metrics = 2 if settings.broker == "sqs" else 1
    add(
        "CloudWatch alarm metric",
        4 * (depth_metrics + 2),
        table["alarm_metric_month"] / HOURS_PER_MONTH,
    )

    root_volume = settings.root_volume_gb * table["gp3_gb_month"] / HOURS_PER_MONTH
    instances = []
    for instance_type in settings.instance_types:
        price = table["ec2"].get(instance_type)
        if price is None:
            notes.append(f"no price for {instance_type} in {PRICES.name}")
            instances.append(InstancePrice(instance_type, None, None))
            continue
        instances.append(
            InstancePrice(
                instance_type,
                round(price["on_demand"] + root_volume, 5),
                round(price["spot"] + root_volume, 5),
            )
        )
    return CostReport(settings.region, prices["date"], idle, instances, notes)


def _price(table: dict, key: str, notes: list[str]) -> float:
    if key not in table:
        notes.append(f"no price for {key} in {PRICES.name}; counted as 0")
    return table.get(key, 0.0)


def render(report: CostReport) -> str:
    lines = [f"Idle stack in {report.region} (list prices of {report.price_date}):"]
    lines += [f"  {i.count:>3} x {i.item:<40} ${i.hourly:>8.4f}/h" for i in report.idle]
    monthly = report.idle_hourly * HOURS_PER_MONTH
    lines.append(f"  {'total':<46} ${report.idle_hourly:>8.4f}/h  (${monthly:.2f}/month)")
    if report.idle_by_network:
        lines.append("Idle total with each network option (celery-fleet:nat):")
        lines += [
            f"  {nat:<46} ${hourly:>8.4f}/h  (${hourly * HOURS_PER_MONTH:.2f}/month)"
            for nat, hourly in report.idle_by_network.items()
        ]
    lines.append("Each worker instance-hour, with its root volume:")
    for p in report.instances:
        on_demand = "n/a" if p.on_demand is None else f"${p.on_demand:.4f}"
        spot = "n/a" if p.spot is None else f"${p.spot:.4f}"
        lines.append(f"  {p.instance_type:<16} on-demand {on_demand:>9}/h   spot ~{spot:>9}/h")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
