"""The whole program under mocks, for every broker x result store x spot x nat combination."""

from __future__ import annotations

import base64
import itertools
import json
import runpy

import pulumi
import pytest
import yaml
from pulumi_mocks import ACCOUNT, REGION, RecordingMocks, StackRun, plain_strings

from app.settings import Settings
from app.stack import env_from_parameters
from infra.artifact import REPO_ROOT
from infra.config import StackConfig
from infra.policy.rules import POLICIES

COMBINATIONS = list(
    itertools.product(["sqs", "rabbitmq"], ["s3", "redis"], [True, False], ["none", "single"])
)


@pytest.fixture(
    params=COMBINATIONS, ids=lambda c: f"{c[0]}-{c[1]}-{'spot' if c[2] else 'ondemand'}-nat_{c[3]}"
)
def run(request, run_stack) -> StackRun:
    broker, store, spot, nat = request.param
    return run_stack(
        StackConfig(stack="test", broker=broker, result_store=store, spot=spot, nat=nat)
    )


def ingress_rules(run: StackRun) -> list[dict]:
    return [
        r.props for r in run.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
    ]


def policy_statements(run: StackRun) -> list[dict]:
    # The worker role's inline policies: the grants made before the group, and
    # the statements naming the group's ARN, made after it (infra/fleet.py).
    return [
        stmt
        for policy in run.of_type("aws:iam/rolePolicy:RolePolicy")
        for stmt in json.loads(policy.props["policy"])["Statement"]
    ]


def test_launch_template_requires_imdsv2(run):
    metadata = run.one("aws:ec2/launchTemplate:LaunchTemplate").props["metadataOptions"]
    assert metadata["httpTokens"] == "required", "fleet-lt must require IMDSv2 tokens"
    assert metadata["httpPutResponseHopLimit"] == 1, "fleet-lt hop limit keeps containers out"


def test_workers_get_no_public_address(run):
    template = run.one("aws:ec2/launchTemplate:LaunchTemplate").props
    assert [n["associatePublicIpAddress"] for n in template["networkInterfaces"]] == ["false"]
    assert "keyName" not in template, "fleet-lt must not carry an SSH key pair"
    private = {
        f"{s.name}-id" for s in run.of_type("aws:ec2/subnet:Subnet") if "-private-" in s.name
    }
    zones = run.one("aws:autoscaling/group:Group").props["vpcZoneIdentifiers"]
    assert set(zones) <= private and len(zones) >= 2, "fleet-asg must span >= 2 private subnets"
    assert all(not s.props["mapPublicIpOnLaunch"] for s in run.of_type("aws:ec2/subnet:Subnet"))


def test_no_ingress_from_anywhere_or_on_ssh(run):
    for rule in ingress_rules(run):
        assert "cidrIpv4" not in rule and "cidrIpv6" not in rule, f"CIDR ingress: {rule}"
        assert not rule["fromPort"] <= 22 <= rule["toPort"], f"port 22 open: {rule}"
    for group in run.of_type("aws:ec2/securityGroup:SecurityGroup"):
        assert not group.props.get("ingress"), f"{group.name} has inline ingress rules"
    default = run.one("aws:ec2/defaultSecurityGroup:DefaultSecurityGroup").props
    assert default["ingress"] == [] and default["egress"] == [], "default SG must deny all"


def test_broker_and_result_store_accept_only_the_workers(run):
    worker_sg = "network-worker-sg-id"
    service_groups = {
        f"{g.name}-id"
        for g in run.of_type("aws:ec2/securityGroup:SecurityGroup")
        if g.name != "network-worker-sg"
    }
    expected_ports = {5671} if run.cfg.broker == "rabbitmq" else set()
    expected_ports |= {6379} if run.cfg.resolved_result_store == "redis" else set()
    if run.cfg.nat == "none":
        expected_ports |= {443}  # interface endpoints
    rules = [r for r in ingress_rules(run) if r["securityGroupId"] in service_groups]
    assert {r["fromPort"] for r in rules} == expected_ports
    for rule in rules:
        assert rule["referencedSecurityGroupId"] == worker_sg, f"{rule} is open beyond the workers"
        assert rule["fromPort"] == rule["toPort"], f"{rule} opens a port range"


def test_all_storage_is_encrypted(run):
    root = run.one("aws:ec2/launchTemplate:LaunchTemplate").props["blockDeviceMappings"]
    assert [m["ebs"]["encrypted"] for m in root] == ["true"]
    buckets = run.of_type("aws:s3/bucket:Bucket")
    encryption = run.of_type(
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    )
    assert len(encryption) == len(buckets) >= 1
    for config in encryption:
        default = config.props["rules"][0]["applyServerSideEncryptionByDefault"]
        assert default["sseAlgorithm"] == "aws:kms", f"{config.name} is not SSE-KMS"
    for queue in run.of_type("aws:sqs/queue:Queue"):
        assert queue.props["sqsManagedSseEnabled"] is True, f"{queue.name} is not encrypted"
    for group in run.of_type("aws:elasticache/replicationGroup:ReplicationGroup"):
        assert group.props["atRestEncryptionEnabled"] and group.props["transitEncryptionEnabled"]
    for broker in run.of_type("aws:mq/broker:Broker"):
        assert broker.props["encryptionOptions"] == {"useAwsOwnedKey": True}
        assert broker.props["publiclyAccessible"] is False


def test_buckets_are_private_and_tls_only(run):
    buckets = run.of_type("aws:s3/bucket:Bucket")
    blocks = run.of_type("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    assert len(blocks) == len(buckets)
    for block in blocks:
        flags = (
            "blockPublicAcls",
            "blockPublicPolicy",
            "ignorePublicAcls",
            "restrictPublicBuckets",
        )
        assert all(block.props[f] for f in flags), f"{block.name} leaves a door open"
    for policy in run.of_type("aws:s3/bucketPolicy:BucketPolicy"):
        (statement,) = json.loads(policy.props["policy"])["Statement"]
        assert statement["Effect"] == "Deny"
        assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_worker_role_names_its_resources(run):
    for stmt in policy_statements(run):
        if stmt["Effect"] != "Allow" or "*" not in stmt["Resource"]:
            continue
        # Only read-only calls, and the metric namespace fenced by a condition,
        # may go without a resource name.
        if all(a.split(":")[1].startswith(("Describe", "List", "Get")) for a in stmt["Action"]):
            continue
        assert stmt["Action"] == ["cloudwatch:PutMetricData"], f"wildcard resource: {stmt}"
        assert stmt["Condition"] == {"StringEquals": {"cloudwatch:namespace": "CeleryFleet"}}
    sids = {s["Sid"] for s in policy_statements(run)}
    assert {
        "ReadArtifact",
        "ReadStackParameters",
        "DrainOnTermination",
        "FindOwnGroupAndHook",
        "OnlyStackParameters",
    } <= sids
    if run.cfg.broker == "sqs":
        (queue,) = [s for s in policy_statements(run) if s["Sid"] == "UseWorkQueue"]
        assert queue["Resource"] == [f"arn:aws:sqs:{REGION}:{ACCOUNT}:celery-fleet-test"]
        assert "sqs:ListQueues" not in queue["Action"]


def test_group_starts_empty_and_mixes_spot_types(run):
    group = run.one("aws:autoscaling/group:Group").props
    assert group["minSize"] == 0 and group["maxSize"] == run.cfg.max_instances
    assert "desiredCapacity" not in group, "desired capacity belongs to the scaling policies"
    policy = group["mixedInstancesPolicy"]
    overrides = [o["instanceType"] for o in policy["launchTemplate"]["overrides"]]
    assert overrides == list(run.cfg.instance_types)
    distribution = policy["instancesDistribution"]
    assert distribution["onDemandPercentageAboveBaseCapacity"] == (0 if run.cfg.spot else 100)
    assert distribution["spotAllocationStrategy"] == "price-capacity-optimized"
    assert group["capacityRebalance"] is True
    assert group["instanceRefresh"]["strategy"] == "Rolling"
    assert policy["launchTemplate"]["launchTemplateSpecification"]["version"] == "7"
    assert {"key": "celery-fleet:stack", "value": "test", "propagateAtLaunch": True} in group[
        "tags"
    ]
    assert "GroupInServiceInstances" in group["enabledMetrics"]


def test_scaling_follows_queue_depth(run):
    policies = {p.name: p.props for p in run.of_type("aws:autoscaling/policy:Policy")}
    tracking = policies["scaling-backlog"]["targetTrackingConfiguration"]
    metrics = tracking["customizedMetricSpecification"]["metrics"]
    names = {m["metricStat"]["metric"]["metricName"] for m in metrics if "metricStat" in m}
    if run.cfg.broker == "sqs":
        assert {
            "ApproximateNumberOfMessagesVisible",
            "ApproximateNumberOfMessagesNotVisible",
        } <= names
    else:
        assert "MessageCount" in names
    # The batches launchers hold back count too (app/launcher/metrics.py).
    (held,) = [m for m in metrics if m["id"] == "held"]
    assert held["metricStat"]["metric"]["namespace"] == "CeleryFleet"
    assert held["metricStat"]["metric"]["dimensions"] == [{"name": "Stack", "value": "test"}]
    (backlog,) = [m for m in metrics if m.get("returnData")]
    assert "FILL(held, 0)" in backlog["expression"]
    assert backlog["expression"].endswith("/ instances")
    # 1 batch per vCPU; EC2 (the mocks) describes every default type with 4 vCPUs.
    assert tracking["targetValue"] == 4.0

    alarms = {a.name: a.props for a in run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")}
    for alarm, capacity in (("scaling-wake", 1), ("scaling-idle", 0)):
        assert alarms[alarm]["alarmActions"] == [f"arn:aws:autoscaling:{REGION}:{ACCOUNT}:{alarm}"]
        step = policies[alarm]
        assert step["adjustmentType"] == "ExactCapacity"
        assert step["stepAdjustments"][0]["scalingAdjustment"] == capacity
        assert alarms[alarm]["treatMissingData"] == "notBreaching"
    assert alarms["scaling-idle"]["evaluationPeriods"] == run.cfg.idle_minutes


def test_termination_waits_for_the_batch(run):
    hook = run.one("aws:autoscaling/lifecycleHook:LifecycleHook").props
    assert hook["lifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["heartbeatTimeout"] == 900 and hook["defaultResult"] == "CONTINUE"


def test_secrets_stay_secret(run):
    expected = (run.cfg.broker == "rabbitmq") + (run.cfg.resolved_result_store == "redis")
    assert len(run.secrets) == expected
    for secret, is_secret in run.secrets.items():
        assert is_secret, "generated passwords must be Pulumi secrets"
        assert secret not in run.user_data
        for resource in run.resources:
            leaked = [s for s in plain_strings(resource.raw) if secret in s]
            assert not leaked, f"{resource.name} holds the secret in plain text"
    secure = {
        p.props["name"]
        for p in run.of_type("aws:ssm/parameter:Parameter")
        if p.props["type"] == "SecureString"
    }
    assert len(secure) == expected


def test_connection_parameters_match_the_settings_contract(run):
    """The parameters, read as `fleet run --stack` reads them, give working Settings."""
    prefix = "/celery-fleet/test/"
    params = {
        p.props["name"].removeprefix(prefix): p.props
        for p in run.of_type("aws:ssm/parameter:Parameter")
    }
    strings = {k: p["value"] for k, p in params.items() if p["type"] == "String"}
    assert {
        "broker_url",
        "result_url",
        "queue",
        "max_batch_seconds",
        "result_ttl",
        "code_version",
    } <= strings.keys()
    for role, secret in (("broker", "broker_password"), ("result", "result_password")):
        if secret in params:
            assert params[secret]["type"] == "SecureString"
            assert strings[f"{role}_password_parameter"] == f"{prefix}{secret}"
            url = strings[f"{role}_url"]
            assert "@" in url and not any(s in url for s in run.secrets), url

    env = env_from_parameters({k: p["value"] for k, p in params.items()}, REGION)
    settings = Settings.from_env(env)
    assert settings.queue == "celery-fleet-test" and settings.max_batch_seconds == 900
    assert settings.result_ttl == 7 * 24 * 3600
    # What `fleet run --stack` compares the workers' code with: the wheelhouse uploaded.
    assert settings.code_version == run.outputs["codeVersion"]
    assert settings.broker_scheme == {"sqs": "sqs", "rabbitmq": "amqps"}[run.cfg.broker]
    for secret in run.secrets:
        assert secret in settings.broker_url + settings.result_url
    if run.cfg.broker == "sqs":
        queue = run.named("broker-queue").props
        assert queue["visibilityTimeoutSeconds"] == settings.visibility_timeout
        assert json.loads(queue["redrivePolicy"])["maxReceiveCount"] == 5
        predefined = settings.transport_options["predefined_queues"]
        assert predefined == {"celery-fleet-test": {"url": strings["queue_url"]}}


def test_user_data_carries_locations_not_settings(run):
    template = run.one("aws:ec2/launchTemplate:LaunchTemplate").props
    assert base64.b64decode(template["userData"]).decode() == run.user_data
    assert run.user_data.startswith("#cloud-config\n")
    boot_env = yaml.safe_load(run.user_data)["write_files"][0]
    assert boot_env["path"] == "/etc/celery-fleet/boot.env"
    # The wheelhouse holds every wheel, whatever the network: no index to choose.
    assert boot_env["content"].splitlines() == [
        "AWS_DEFAULT_REGION=us-east-1",
        "FLEET_ARTIFACT=s3://artifacts-20250101/artifacts/codex86_64/",
        "FLEET_SSM_PREFIX=/celery-fleet/test/",
    ]


def test_network_matches_the_nat_setting(run):
    nats = run.of_type("aws:ec2/natGateway:NatGateway")
    endpoints = {
        e.props["serviceName"].rsplit(".", 1)[1]: e.props
        for e in run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
    }
    assert endpoints["s3"]["vpcEndpointType"] == "Gateway"
    public = [s for s in run.of_type("aws:ec2/subnet:Subnet") if "-public-" in s.name]
    if run.cfg.nat == "none":
        assert (
            not nats and not public and not run.of_type("aws:ec2/internetGateway:InternetGateway")
        )
        wanted = {"ssm", "ssmmessages", "ec2messages", "logs", "monitoring", "autoscaling"}
        wanted |= {"sqs"} if run.cfg.broker == "sqs" else set()
        assert set(endpoints) - {"s3"} == wanted
        assert all(e["privateDnsEnabled"] for k, e in endpoints.items() if k != "s3")
    else:
        assert len(nats) == len(public) == 1
        assert set(endpoints) == {"s3"}


def test_every_resource_passes_the_policy_pack(run):
    for resource in run.resources:
        for policy in POLICIES:
            violations: list[str] = []
            policy.validate(resource, lambda message, urn=None, v=violations: v.append(message))
            assert not violations, f"{policy.name} on {resource.name}: {violations}"


def test_outputs(run):
    outputs = run.outputs
    assert outputs["region"] == REGION and outputs["ssmPrefix"] == "/celery-fleet/test/"
    assert outputs["asgName"] == "fleet-asg-0123"
    assert outputs["artifactPrefix"] == "artifacts/codex86_64"
    assert outputs["codeVersion"] == "codex86_64"
    assert outputs["dashboardName"] == "celery-fleet-test"
    if run.cfg.broker == "sqs":
        assert {"queueName", "queueUrl"} <= outputs.keys()
    else:
        assert outputs["brokerEndpoint"].startswith("amqps://")
    store_key = "resultBucket" if run.cfg.resolved_result_store == "s3" else "redisEndpoint"
    assert store_key in outputs


def test_per_az_nat_gives_each_zone_its_own_gateway(run_stack):
    run = run_stack(StackConfig(stack="test", nat="per-az", az_count=3))
    assert len(run.of_type("aws:ec2/natGateway:NatGateway")) == 3
    tables = [
        t.props for t in run.of_type("aws:ec2/routeTable:RouteTable") if "-private-" in t.name
    ]
    assert len({t["routes"][0]["natGatewayId"] for t in tables}) == 3


def test_rabbitmq_cluster_spans_every_private_subnet(run_stack):
    run = run_stack(
        StackConfig(stack="test", broker="rabbitmq", broker_deployment_mode="CLUSTER_MULTI_AZ")
    )
    broker = run.one("aws:mq/broker:Broker").props
    assert (
        broker["deploymentMode"] == "CLUSTER_MULTI_AZ"
        and broker["hostInstanceType"] == "mq.m5.large"
    )
    assert len(broker["subnetIds"]) == 2


def test_main_builds_from_the_stack_config_and_exports(monkeypatch, fake_builder):
    """`pulumi up` runs infra/__main__.py: config in, outputs exported."""
    import infra.program

    real_build = infra.program.build
    monkeypatch.setattr(infra.program, "build", lambda cfg: real_build(cfg, builder=fake_builder))
    exported: dict = {}
    monkeypatch.setattr(pulumi, "export", lambda name, value: exported.setdefault(name, value))
    mocks = RecordingMocks()
    pulumi.runtime.set_mocks(mocks, project="celery-fleet", stack="main", preview=False)
    pulumi.runtime.set_all_config({"celery-fleet:broker": "rabbitmq", "celery-fleet:nat": "none"})

    @pulumi.runtime.test
    def program():
        runpy.run_path(str(REPO_ROOT / "infra"), run_name="__main__")

    try:
        program()
    finally:
        pulumi.runtime.set_all_config({})
    assert {"region", "asgName", "brokerEndpoint", "redisEndpoint", "ssmPrefix"} <= exported.keys()
    assert exported["ssmPrefix"] == "/celery-fleet/main/"
    assert mocks.resources and not any(r.typ == "aws:sqs/queue:Queue" for r in mocks.resources)


def test_dashboard_shows_depth_instances_cpu_and_batches(run):
    body = json.loads(run.one("aws:cloudwatch/dashboard:Dashboard").props["dashboardBody"])
    titles = [w["properties"]["title"] for w in body["widgets"]]
    assert titles == [
        "Queue depth (waiting + running)",
        "Instances",
        "CPU utilisation (%)",
        "Batches per minute",
        "Busy slots (running batches)",
        "Batches finished per minute, by the workers",
    ]
    batches = body["widgets"][3]["properties"]["metrics"][0]
    assert batches[:4] == ["CeleryFleet", "BatchesCompleted", "Stack", "test"]
    assert all(w["properties"]["region"] == REGION for w in body["widgets"])


def test_rabbitmq_broker_gets_a_consumer_timeout_above_the_longest_hold(run_stack):
    """Amazon MQ's default consumer_timeout (30 min) would redeliver longer batches."""
    cfg = StackConfig(stack="test", broker="rabbitmq", max_batch_seconds=3600)
    run = run_stack(cfg)
    config = run.one("aws:mq/configuration:Configuration").props
    broker = run.one("aws:mq/broker:Broker").props
    assert config["engineType"] == "RabbitMQ" == broker["engineType"]
    assert config["engineVersion"] == broker["engineVersion"]
    # A worker holds a prefetched message while it runs another batch: 2 x 3600 + 60 s.
    assert config["data"].strip() == f"consumer_timeout = {(2 * 3600 + 60) * 1000}"
    (configuration,) = [r for r in run.resources if r.typ == "aws:mq/configuration:Configuration"]
    assert broker["configuration"]["id"] == f"{configuration.name}-id"


def test_sqs_stack_has_no_broker_configuration(run_stack):
    run = run_stack(StackConfig(stack="test"))
    assert not run.of_type("aws:mq/configuration:Configuration")


def test_vcpus_come_from_ec2_not_the_size_name(run_stack):
    """t3.medium has 2 vCPUs; the name-based guess said 1 and halved the target."""
    run = run_stack(StackConfig(stack="test", instance_types=("t3.medium",)))
    tracking = run.named("scaling-backlog").props["targetTrackingConfiguration"]
    assert tracking["targetValue"] == 2.0


def test_same_vcpus_under_different_size_names_are_one_size(run_stack):
    # t3.medium and c5.large both have 2 vCPUs.
    run = run_stack(StackConfig(stack="test", instance_types=("t3.medium", "c5.large")))
    tracking = run.named("scaling-backlog").props["targetTrackingConfiguration"]
    assert tracking["targetValue"] == 2.0


def test_a1_is_graviton_and_boots_the_arm_ami(run_stack):
    run = run_stack(StackConfig(stack="test", instance_types=("a1.large",)))
    template = run.one("aws:ec2/launchTemplate:LaunchTemplate").props
    assert template["imageId"].endswith("al2023-ami-kernel-default-arm64")
    assert run.outputs["artifactPrefix"].endswith("arm64")


@pytest.mark.parametrize(
    ("types", "message"),
    [
        (("c7i.xlarge", "c7g.xlarge"), "mixes Graviton"),
        (("c7i.xlarge", "t3.medium"), "differ in vCPU count"),
        (("c7i.xlarge", "banana"), "'banana'"),
    ],
)
def test_instance_types_are_checked_against_ec2(run_stack, types, message):
    with pytest.raises(Exception, match="celery-fleet:instanceTypes") as caught:
        run_stack(StackConfig(stack="test", instance_types=types))
    assert message in str(caught.value)


def test_a_sink_password_is_a_secure_string_the_workers_read(run_stack):
    """celery-fleet:sinkPassword: a SecureString parameter, read back as FLEET_SINK_PASSWORD
    by the workers and `fleet run --stack`, and in no other resource or the user-data."""
    password = "pg-sink-s3cret-7f3a"
    run = run_stack(StackConfig(stack="test", sink_password=password))
    prefix = "/celery-fleet/test/"
    params = {p.props["name"]: p for p in run.of_type("aws:ssm/parameter:Parameter")}
    secret = params[f"{prefix}sink_password"]
    assert secret.props["type"] == "SecureString"
    assert password not in run.user_data
    for resource in run.resources:
        leaked = [s for s in plain_strings(resource.raw) if password in s]
        assert not leaked, f"{resource.name} holds the sink password in plain text"
    values = {name.removeprefix(prefix): p.props["value"] for name, p in params.items()}
    settings = Settings.from_env(env_from_parameters(values, REGION))
    assert settings.sink_password == password
    assert password not in repr(settings)
    # Without the key, no such parameter.
    plain = run_stack(StackConfig(stack="test"))
    assert f"{prefix}sink_password" not in {
        p.props["name"] for p in plain.of_type("aws:ssm/parameter:Parameter")
    }
