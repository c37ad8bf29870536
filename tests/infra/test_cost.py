"""`fleet cost`: the pure estimate, the CLI, and agreement with what the program builds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from infra.config import StackConfig
from infra.program import WORKER_SERVICES
from scripts import cost as cost_module
from scripts.cli.cost import cost
from scripts.cost import StackSettings, estimate, render

PRICES = cost_module.load_prices()
US = PRICES["regions"]["us-east-1"]


def test_price_table_is_dated_and_covers_the_defaults():
    assert PRICES["date"]
    for region, table in PRICES["regions"].items():
        for instance_type in StackConfig(stack="x").instance_types:
            assert instance_type in table["ec2"], f"{region} lacks {instance_type}"
        assert {"mq.t3.micro", "mq.m5.large"} <= table["mq"].keys()
        assert "cache.t4g.micro" in table["valkey"]


def test_defaults_match_the_program():
    cfg, settings = StackConfig(stack="x"), StackSettings(region="us-east-1")
    assert settings.broker == cfg.broker and settings.nat == cfg.nat
    assert settings.az_count == cfg.az_count and settings.instance_types == cfg.instance_types
    assert settings.root_volume_gb == cfg.root_volume_gb
    assert settings.redis_node_type == cfg.redis_node_type
    assert settings.resolved_result_store == cfg.resolved_result_store
    for mode in ("SINGLE_INSTANCE", "CLUSTER_MULTI_AZ"):
        assert (
            StackSettings(region="x", broker_deployment_mode=mode).resolved_broker_instance_type
            == StackConfig(stack="x", broker_deployment_mode=mode).resolved_broker_instance_type
        )
    assert len(WORKER_SERVICES) == cost_module.ENDPOINT_SERVICES


def test_default_stack_idles_on_one_nat_gateway():
    report = estimate(StackSettings(region="us-east-1"), PRICES)
    expected = US["nat_gateway_hour"] + US["public_ipv4_hour"] + (3.0 + 16 * 0.1) / 730
    assert report.idle_hourly == pytest.approx(expected, abs=1e-4)
    assert [i.item for i in report.idle] == [
        "NAT gateway",
        "CloudWatch dashboard",
        "CloudWatch alarm metric",
    ]
    c7i = report.instances[0]
    root = 16 * US["gp3_gb_month"] / 730
    assert c7i.instance_type == "c7i.xlarge"
    assert c7i.on_demand == pytest.approx(US["ec2"]["c7i.xlarge"]["on_demand"] + root, abs=1e-5)
    assert c7i.spot == pytest.approx(US["ec2"]["c7i.xlarge"]["spot"] + root, abs=1e-5)


def test_idle_cost_of_each_network_option_side_by_side():
    settings = StackSettings(region="us-east-1")
    report = estimate(settings, PRICES)
    assert list(report.idle_by_network) == ["single", "per-az", "none", "ipv6"]
    for nat, hourly in report.idle_by_network.items():
        alone = estimate(replace(settings, nat=nat), PRICES)
        assert hourly == pytest.approx(alone.idle_hourly, abs=1e-5)
    assert report.idle_by_network["single"] == pytest.approx(report.idle_hourly, abs=1e-5)
    nat = US["nat_gateway_hour"] + US["public_ipv4_hour"]
    assert report.idle_by_network["per-az"] - report.idle_by_network["single"] == pytest.approx(
        nat, abs=1e-5
    )
    # ipv6: no NAT gateway, no interface endpoint; what idles is the dashboard and alarms.
    ipv6 = {i.item for i in estimate(replace(settings, nat="ipv6"), PRICES).idle}
    assert ipv6 == {"CloudWatch dashboard", "CloudWatch alarm metric"}
    assert report.idle_by_network["single"] - report.idle_by_network["ipv6"] == pytest.approx(
        nat, abs=1e-5
    )
    text = render(report)
    assert "Idle total with each network option" in text
    assert all(f"  {nat:<46} $" in text for nat in report.idle_by_network)


def test_rabbitmq_cluster_without_nat():
    settings = StackSettings(
        region="eu-west-1", broker="rabbitmq", nat="none", broker_deployment_mode="CLUSTER_MULTI_AZ"
    )
    items = {i.item: i for i in estimate(settings, PRICES).idle}
    eu = PRICES["regions"]["eu-west-1"]
    assert items["Amazon MQ mq.m5.large"].count == 3
    assert items["Amazon MQ mq.m5.large"].hourly == pytest.approx(3 * eu["mq"]["mq.m5.large"])
    assert items["VPC interface endpoint (per zone)"].count == 6 * 2
    assert "ElastiCache Valkey cache.t4g.micro" in items and "NAT gateway" not in items


@pytest.mark.parametrize(
    "cfg",
    [
        # The same configurations test_program.py builds, so the runs are shared.
        StackConfig(stack="test", broker="sqs", result_store="s3", nat="single"),
        StackConfig(stack="test", broker="sqs", result_store="s3", nat="none"),
        StackConfig(stack="test", broker="rabbitmq", result_store="redis", nat="none"),
        StackConfig(stack="test", nat="per-az", az_count=3),
        StackConfig(stack="test", nat="ipv6"),
    ],
    ids=["sqs-single", "sqs-none", "rabbitmq-none", "per-az", "ipv6"],
)
def test_counts_match_the_resources_the_program_creates(run_stack, cfg):
    run = run_stack(cfg)
    settings = StackSettings(
        region="us-east-1", broker=cfg.broker, nat=cfg.nat, az_count=cfg.az_count
    )
    items = {i.item: i.count for i in estimate(settings, PRICES).idle}
    assert items.get("NAT gateway", 0) == len(run.of_type("aws:ec2/natGateway:NatGateway"))
    interface = [
        e
        for e in run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
        if e.props["vpcEndpointType"] == "Interface"
    ]
    assert items.get("VPC interface endpoint (per zone)", 0) == len(interface) * run.cfg.az_count
    alarm_metrics = sum(
        1
        for a in run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
        for q in a.props["metricQueries"]
        if "metric" in q
    )
    (tracking,) = [
        p
        for p in run.of_type("aws:autoscaling/policy:Policy")
        if p.props["policyType"] == "TargetTrackingScaling"
    ]
    tracked = tracking.props["targetTrackingConfiguration"]["customizedMetricSpecification"][
        "metrics"
    ]
    # AWS makes two alarms (high and low) for a target-tracking policy.
    alarm_metrics += 2 * sum(1 for m in tracked if "metricStat" in m)
    assert items["CloudWatch alarm metric"] == alarm_metrics


def test_cli_reads_the_stack_file(tmp_path, monkeypatch):
    (tmp_path / "Pulumi.yaml").write_text("name: celery-fleet\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Pulumi.dev.yaml").write_text(
        "config:\n"
        "  aws:region: us-west-2\n"
        "  celery-fleet:broker: rabbitmq\n"
        "  celery-fleet:azCount: '3'\n"
        '  celery-fleet:instanceTypes: \'["c7g.xlarge", "m7g.xlarge"]\'\n'
    )
    result = CliRunner().invoke(cost, ["--stack", "dev", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["region"] == "us-west-2" and report["price_date"] == PRICES["date"]
    assert [i["instance_type"] for i in report["instances"]] == ["c7g.xlarge", "m7g.xlarge"]
    assert {i["item"] for i in report["idle"]} >= {
        "Amazon MQ mq.t3.micro",
        "ElastiCache Valkey cache.t4g.micro",
    }
    text = CliRunner().invoke(cost, ["--config", str(tmp_path / "Pulumi.dev.yaml")])
    assert text.exit_code == 0 and "Idle stack in us-west-2" in text.output


def test_cli_explains_a_missing_stack_file(tmp_path, monkeypatch):
    (tmp_path / "Pulumi.yaml").write_text("name: celery-fleet\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cost, ["--stack", "nope"])
    assert result.exit_code == 2 and "pulumi stack init nope" in result.output
    result = CliRunner().invoke(cost, [])
    assert result.exit_code == 2 and "--stack NAME" in result.output


def test_unknown_region_is_a_clear_error(tmp_path):
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text("config:\n  aws:region: ap-south-2\n")
    result = CliRunner().invoke(cost, ["--config", str(path)])
    assert result.exit_code == 2 and "no prices for ap-south-2" in result.output
