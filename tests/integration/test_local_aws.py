"""A deploy onto a local AWS, end to end: the nearest thing to `pulumi up` this machine allows.

The Pulumi program runs under the recording mocks with the real artifact build;
what it records is created on moto (server mode, in a network namespace of its
own) through boto3 from the recorded inputs (tests/support/local_aws.py). A
worker host in another namespace then boots by the real path: the rendered
user-data's files written as cloud-init would, `fleet-boot` fetching the
artifact with the AWS CLI and installing it, `python -m app.boot` reading the
stack's SSM parameters, with the instance metadata served by a stand-in on
169.254.169.254 in that namespace. `fleet run --stack NAME` from a third
namespace finds the fleet from SSM alone and completes a job with every ID once.

What it does not cover: IAM (moto enforces none), the network resources, the
scaling policies and alarms (see SKIPPED), systemd (the host is a namespace,
so the boot runs the worker in the foreground), and AWS's own behaviour
wherever moto differs from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from tests.support.checker import exactly_once
from tests.support.local_aws import SKIPPED, Replay, aws_cli, record
from tests.support.netns import Net, NsServer, NsThread, netns_unavailable
from tests.support.paths import FLEET_BIN
from tests.support.worker_host import host_env

_why = netns_unavailable()
pytestmark = [
    pytest.mark.skipif(_why is not None, reason=_why or ""),
    pytest.mark.timeout(420),
]

STACK = "e2e"
MOTO_PORT = 5000
IMDS = "169.254.169.254"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class _Metadata(BaseHTTPRequestHandler):
    """IMDSv2 as EC2 serves it: a token first (PUT), then the paths with the token."""

    values: ClassVar[dict[str, str]] = {}
    token = "test-imds-token"

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token":
            self._answer(200, self.token)
        else:
            self._answer(404, "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self._answer(401, "")
            return
        value = self.values.get(self.path.removeprefix("/latest/meta-data/"))
        self._answer(200 if value is not None else 404, value or "")

    def _answer(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def write_user_data(user_data: str, root: Path) -> tuple[Path, Path]:
    """The cloud-config's files under `root`, as cloud-init writes them: (boot.env, script)."""
    assert user_data.startswith("#cloud-config\n")
    document = yaml.safe_load(user_data)
    written = {}
    for entry in document["write_files"]:
        path = root / entry["path"].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(entry["content"])
        path.chmod(int(entry["permissions"], 8))
        written[entry["path"]] = path
    assert document["runcmd"] == [["/usr/local/sbin/fleet-boot"]]
    return written["/etc/celery-fleet/boot.env"], written["/usr/local/sbin/fleet-boot"]


@pytest.fixture
def local_aws(tmp_path):
    """Namespaces srv (moto), w0 (the worker host) and launcher; everything removed after."""
    net = Net(["srv", "launcher", "w0"])
    view = None
    moto = None
    imds = None
    try:
        net.up()
        srv, addr = net.ns("srv"), net.addr("srv")
        view = NsThread(srv)
        # Plain HTTP: kombu's SQS client trusts certifi's CA bundle only (it asks
        # botocore's get_cert_path), so it cannot be given a private CA for the
        # emulator. The stack's TLS-only policies are not applied (see SKIPPED).
        moto_bin = str(Path(sys.executable).parent / "moto_server")
        moto = NsServer(
            "moto",
            srv,
            addr,
            MOTO_PORT,
            [moto_bin, "-H", addr, "-p", str(MOTO_PORT)],
            {**os.environ, **CREDENTIALS},
            tmp_path,
        )
        moto.start(view)
        # The metadata address on the worker host's own loopback, as EC2's link-local one.
        subprocess.run(
            ["ip", "-n", net.ns("w0"), "addr", "add", f"{IMDS}/32", "dev", "lo"], check=True
        )
        w0 = NsThread(net.ns("w0"))
        imds = w0.call(lambda: ThreadingHTTPServer((IMDS, 80), _Metadata))
        threading.Thread(target=imds.serve_forever, daemon=True).start()
        yield net, view, f"http://{addr}:{MOTO_PORT}"
    finally:
        if imds is not None:
            imds.shutdown()
            imds.server_close()
        if moto is not None:
            moto.close()
        if view is not None:
            view.close()
        net.down()


def test_recorded_stack_deployed_on_moto_boots_a_worker_that_runs_a_job(local_aws, tmp_path):
    net, view, endpoint = local_aws
    recorded = record(tmp_path, STACK)
    replay = Replay(endpoint)
    view.call(replay.apply, recorded, timeout=120)
    types = {t for t, _ in replay.created}
    assert {
        "aws:s3/bucket:Bucket",
        "aws:s3/bucketObjectv2:BucketObjectv2",
        "aws:sqs/queue:Queue",
        "aws:ssm/parameter:Parameter",
        "aws:iam/rolePolicy:RolePolicy",
        "aws:autoscaling/group:Group",
    } <= types
    assert all(reason for _, _, reason in replay.skipped) and {
        t for t, _, _ in replay.skipped
    } <= set(SKIPPED)

    # One instance of the group, whose id the metadata stand-in gives the host.
    autoscaling = replay.client("autoscaling")
    group = recorded["outputs"]["asgName"]
    view.call(
        lambda: autoscaling.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=1)
    )
    (instance,) = view.call(
        lambda: autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])[
            "AutoScalingGroups"
        ][0]["Instances"]
    )
    _Metadata.values = {
        "instance-id": instance["InstanceId"],
        "placement/region": "us-east-1",
        "placement/availability-zone": instance["AvailabilityZone"],
        "instance-type": instance["InstanceType"],
    }

    root = tmp_path / "host"
    boot_env, script = write_user_data(recorded["user_data"], root)
    env = host_env(
        root,
        FLEET_BOOT_ENV=str(boot_env),
        # Every wheel comes from the artifact prefix on the emulator's S3: no index at all.
        PIP_NO_INDEX="1",
        AWS_ENDPOINT_URL=endpoint,
        PATH=f"{aws_cli().parent}:{os.environ['PATH']}",
        **CREDENTIALS,
    )
    (root / "run").mkdir(parents=True, exist_ok=True)
    node = f"w0@{STACK}"
    log_path = tmp_path / "boot.log"
    with open(log_path, "wb") as log:
        # cloud-init runs the script with no arguments; without systemd (a namespace is
        # no machine) its foreground mode runs the worker in this process instead.
        host = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                net.ns("w0"),
                "bash",
                str(script),
                "--foreground",
                "--node",
                node,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root / "run",
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while f"{node} ready." not in log_path.read_text(errors="replace"):
            assert host.poll() is None and time.monotonic() < deadline, (
                f"the host did not boot a worker:\n{log_path.read_text(errors='replace')[-4000:]}"
            )
            time.sleep(0.5)
        out = tmp_path / "out.jsonl"
        launcher_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))
        }
        launcher_env.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
        n = 300
        job = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                net.ns("launcher"),
                str(FLEET_BIN),
                "run",
                "process_id",
                "--stack",
                STACK,
                "--ids",
                f"range:0:{n}",
                "--out",
                str(out),
            ],
            env=launcher_env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        boot_log = log_path.read_text(errors="replace")
        assert job.returncode == 0, f"{job.stderr}\n--- host ---\n{boot_log[-4000:]}"
        rows = exactly_once(out, range(n))
        assert len(rows) == n
        version = recorded["outputs"]["codeVersion"]
        assert f"installed wheelhouse {version} (celery-fleet)" in boot_log, boot_log[-4000:]
        # The worker runs what `pulumi up` keeps in SSM: `fleet run --stack` finds no mismatch.
        assert "warning" not in job.stderr, job.stderr
        assert f"settings from SSM Parameter Store (stack {STACK})" in boot_log
    finally:
        if host.poll() is None:
            os.killpg(host.pid, 15)
            try:
                host.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(host.pid, 9)
                host.wait(10)
