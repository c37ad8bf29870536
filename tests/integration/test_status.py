"""`fleet status` and Flower against real fleets; the stack's AWS side from moto.

A stack's status mixes two sources, both real here: instances from the
autoscaling and EC2 APIs (moto), and workers, queue depth and batches in
flight from the broker and result store its SSM parameters point at (a local
fleet running a slow job, so the numbers are known while it runs).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from app.launcher.job import JobOptions
from app.launcher.launcher import Launcher
from app.launcher.sources import Source
from app.names import STACK_TAG
from scripts.cli import cli
from scripts.status import queue_depth, render
from tests.support.aws import sqs_settings
from tests.support.fleets import TASKS, settle
from tests.support.paths import FLEET_BIN, ROOT

pytestmark = pytest.mark.timeout(180)


def test_queue_depth_on_sqs_counts_waiting_and_received_messages(aws):
    settings = sqs_settings(aws, "fleet-status")
    sqs = boto3.client("sqs", endpoint_url=aws[1])
    for i in range(3):
        sqs.send_message(QueueUrl=settings.sqs_queue_url, MessageBody=str(i))
    sqs.receive_message(QueueUrl=settings.sqs_queue_url, MaxNumberOfMessages=1)
    assert queue_depth(settings) == {"queue": settings.queue, "waiting": 2, "received": 1}


def make_stack(settings, stack: str = "dev") -> None:
    """SSM parameters pointing at `settings`' servers, and the stack's autoscaling group."""
    ssm = boto3.client("ssm")
    prefix = f"/celery-fleet/{stack}/"
    broker = urlsplit(settings.broker_url)
    params = {
        "broker_url": broker._replace(netloc=f"@{broker.hostname}:{broker.port}").geturl(),
        "result_url": settings.result_url,
        "queue": settings.queue,
        "broker_password_parameter": f"{prefix}broker_password",
    }
    for key, value in params.items():
        ssm.put_parameter(Name=prefix + key, Value=value, Type="String")
    ssm.put_parameter(Name=f"{prefix}broker_password", Value=broker.password, Type="SecureString")
    ec2, autoscaling = boto3.client("ec2"), boto3.client("autoscaling")
    template = ec2.create_launch_template(
        LaunchTemplateName="workers",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "c7i.xlarge"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    for name, size in ((stack, 2), ("other", 1)):
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=f"{name}-asg",
            MinSize=0,
            MaxSize=5,
            DesiredCapacity=size,
            AvailabilityZones=["eu-west-1a"],
            LaunchTemplate={"LaunchTemplateId": template},
            Tags=[{"Key": STACK_TAG, "Value": name, "PropagateAtLaunch": True}],
        )
    spot = ec2.run_instances(
        ImageId="ami-12c6146b",
        InstanceType="m7i.xlarge",
        MinCount=1,
        MaxCount=1,
        InstanceMarketOptions={"MarketType": "spot"},
        Placement={"AvailabilityZone": "eu-west-1b"},
    )
    autoscaling.attach_instances(
        InstanceIds=[spot["Instances"][0]["InstanceId"]], AutoScalingGroupName=f"{stack}-asg"
    )


def test_stack_status_counts_instances_workers_queue_and_batches(make_fleet, tmp_path, monkeypatch):
    for key, value in {
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(key, value)
    # One worker with a slot per CPU; each batch (one item) busy for 6 s, so the state
    # looked for lasts long enough for a few status calls on a loaded machine. Short
    # leases: the worker's heartbeat (with its running batches) comes every second.
    fleet = make_fleet(instances=1, env={"FLEET_TEST_ITEM_MS": "6000"}, lease_seconds=3)
    slots = len(fleet.cpus)
    batches, in_flight = slots + 2, slots + 1
    summary: list = []
    job = threading.Thread(
        target=lambda: summary.append(
            Launcher(fleet.settings).run(
                JobOptions(
                    task="slow",
                    source=Source.parse(f"range:0:{batches}"),
                    out=tmp_path / "out.jsonl",
                    batch_size=1,
                    max_in_flight=in_flight,
                    progress=False,
                )
            )
        )
    )
    runner = CliRunner()
    with mock_aws():
        make_stack(fleet.settings)
        job.start()
        seen, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            result = runner.invoke(cli, ["status", "--stack", "dev", "--json"])
            assert result.exit_code == 0, result.output
            status = json.loads(result.stdout)
            seen.append(
                (
                    status["running_batches"],
                    status["queue"]["waiting"],
                    status["held_back"],
                    [w["active"] for w in status["workers"]],
                )
            )
            # Every slot busy, the rest of what is in flight waiting, the rest held back.
            if seen[-1] == (slots, in_flight - slots, batches - in_flight, [slots]):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"never saw the expected counts; saw {seen}")
        plain = runner.invoke(cli, ["status", "--stack", "dev"])
    assert plain.exit_code == 0 and "instances: 3" in plain.stdout, plain.output
    job.join(60)
    # A copy the launcher sent again (a lease renewed late on a loaded machine) would still
    # run as the fleet stops, and hold its worker's exit for a minute.
    settle(fleet)
    instances = status["instances"]
    assert len(instances) == 3, "the other stack's instance is not counted"
    assert sorted(i["market"] for i in instances) == ["on-demand", "on-demand", "spot"]
    assert sorted(i["type"] for i in instances) == ["c7i.xlarge", "c7i.xlarge", "m7i.xlarge"]
    assert {i["state"] for i in instances} == {"InService"}
    assert sorted(i["zone"] for i in instances) == ["eu-west-1a", "eu-west-1a", "eu-west-1b"]
    (worker,) = status["workers"]
    assert worker["concurrency"] == slots and worker["version"] == "0.1.0"
    assert status["slots"] == slots
    assert status["jobs_in_flight"] == [summary[0].job]
    assert summary[0].status == "ok" and summary[0].items == batches
    text = render(status)
    assert f"workers online: 1 ({slots} slots)" in text and "spot" in text
    assert f"queue fleet: {in_flight - slots} waiting" in text
    assert f"{slots} batches running in 1 job(s): {summary[0].job}" in text


@pytest.fixture
def fleet_local(tmp_path):
    """`fleet local --flower` as a user runs it; stopped with SIGTERM as Ctrl-C would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
    env.update(FLEET_STATE_DIR=str(tmp_path / "state"))
    log = open(tmp_path / "fleet.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(FLEET_BIN), "local", "-n", "1", "--flower", "--include", TASKS[0]],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
    )
    try:
        yield proc, env, tmp_path / "fleet.log"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_local_fleet_with_flower_and_status(fleet_local):
    proc, env, log = fleet_local
    deadline, url = time.monotonic() + 90, None
    while time.monotonic() < deadline and url is None:
        assert proc.poll() is None, log.read_text()
        match = re.search(r"flower: (http://127\.0\.0\.1:\d+/)", log.read_text())
        url = match and match.group(1)
        time.sleep(0.2)
    assert url, log.read_text()
    # Flower's own dashboard data: the worker appears once its events reach Flower.
    workers: dict = {}
    while time.monotonic() < deadline and not workers:
        workers = get_json(url + "workers?json=1").get("data") or {}
        workers = {w["hostname"]: w for w in workers} if isinstance(workers, list) else workers
        time.sleep(0.5)
    assert len(workers) == 1 and next(iter(workers)).startswith("instance0-"), workers
    status = subprocess.run(
        [str(FLEET_BIN), "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["source"] == "the local fleet"
    assert [i["state"] for i in report["instances"]] == ["running"]
    assert [w["node"] for w in report["workers"]] == list(workers)
    assert report["queue"]["waiting"] == 0 and report["running_batches"] == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    with pytest.raises(OSError):  # Flower stopped with the fleet
        urllib.request.urlopen(url, timeout=2)


# -- instance refreshes ---------------------------------------------------------
#
# moto (5.2.5) does not implement DescribeInstanceRefreshes: it raises
# NotImplementedError. This stub answers that call, and only that one, for every
# boto3 session made while a test runs (botocore's before-call event, which
# short-circuits the request); everything else is moto.


@pytest.fixture(autouse=True)
def instance_refreshes(monkeypatch) -> dict[str, list[dict]]:
    """Group name -> the InstanceRefreshes DescribeInstanceRefreshes answers (none by default)."""
    import botocore.handlers
    from botocore.awsrequest import AWSResponse

    answers: dict[str, list[dict]] = {}

    def describe(params, **_):
        group = params["body"]["AutoScalingGroupName"]
        parsed = {"InstanceRefreshes": answers.get(group, []), "ResponseMetadata": {}}
        return AWSResponse("https://autoscaling.amazonaws.com/", 200, {}, None), parsed

    monkeypatch.setattr(
        botocore.handlers,
        "BUILTIN_HANDLERS",
        [
            *botocore.handlers.BUILTIN_HANDLERS,
            ("before-call.auto-scaling.DescribeInstanceRefreshes", describe),
        ],
    )
    return answers


def make_sqs_stack(stack: str = "dev") -> None:
    """A stack on moto: SQS broker, S3 result store, SSM parameters, and its group."""
    queue = boto3.client("sqs").create_queue(QueueName=f"celery-fleet-{stack}")["QueueUrl"]
    boto3.client("s3").create_bucket(
        Bucket="fleet-results", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    ssm = boto3.client("ssm")
    for key, value in {
        "broker_url": "sqs://",
        "result_url": "s3://fleet-results/results",
        "queue": f"celery-fleet-{stack}",
        "queue_url": queue,
    }.items():
        ssm.put_parameter(Name=f"/celery-fleet/{stack}/{key}", Value=value, Type="String")
    template = boto3.client("ec2").create_launch_template(
        LaunchTemplateName="workers",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "c7i.xlarge"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    for name in (stack, "other"):
        boto3.client("autoscaling").create_auto_scaling_group(
            AutoScalingGroupName=f"{name}-asg",
            MinSize=0,
            MaxSize=5,
            DesiredCapacity=0,
            AvailabilityZones=["eu-west-1a"],
            LaunchTemplate={"LaunchTemplateId": template},
            Tags=[{"Key": STACK_TAG, "Value": name, "PropagateAtLaunch": True}],
        )


def refresh(status: str, **fields) -> dict:
    from datetime import UTC, datetime

    return {
        "InstanceRefreshId": f"refresh-{status.lower()}",
        "AutoScalingGroupName": "dev-asg",
        "Status": status,
        "StartTime": datetime(2026, 12, 2, 15, 0, tzinfo=UTC),
        **fields,
    }


def test_stack_status_shows_an_instance_refresh_running_or_failed(instance_refreshes, monkeypatch):
    for key, value in {
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    with mock_aws():
        make_sqs_stack()
        # No refresh yet: nothing shown, nothing wrong.
        quiet = runner.invoke(cli, ["status", "--stack", "dev", "--json"])
        assert quiet.exit_code == 0, quiet.output
        assert json.loads(quiet.stdout)["refreshes"] == []

        instance_refreshes["dev-asg"] = [
            refresh("Successful", PercentageComplete=100),
            refresh("InProgress", PercentageComplete=40, InstancesToUpdate=3)
            | {"StartTime": refresh("x")["StartTime"].replace(hour=16)},
        ]
        instance_refreshes["other-asg"] = [refresh("Failed", StatusReason="not ours")]
        running = runner.invoke(cli, ["status", "--stack", "dev", "--json"])
        assert running.exit_code == 0, running.output
        (shown,) = json.loads(running.stdout)["refreshes"]
        assert shown["group"] == "dev-asg" and shown["status"] == "InProgress"
        assert shown["percent"] == 40 and shown["to_update"] == 3
        text = runner.invoke(cli, ["status", "--stack", "dev"]).stdout
        assert "instance refresh InProgress on dev-asg: 40% done, 3 instance(s) to replace" in text
        assert "not ours" not in text

        reason = (
            "Waiting for 1 instance protected from scale in timed out; the instance refresh failed."
        )
        instance_refreshes["dev-asg"] = [
            refresh("Failed", StatusReason=reason, EndTime=refresh("x")["StartTime"])
        ]
        failed = runner.invoke(cli, ["status", "--stack", "dev"])
    assert failed.exit_code == 0, failed.output
    assert "instance refresh FAILED on dev-asg" in failed.stdout
    assert reason in failed.stdout and "run the previous code" in failed.stdout
    assert '"ScaleInProtectedInstances": "Refresh"' in failed.stdout
