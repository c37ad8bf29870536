"""The workers' user-data, boot script and unit, checked by the tools that run them.

cloud-init, shellcheck and systemd-analyze come from Debian packages
(cloud-init, shellcheck, systemd); a test skips only when its tool is absent.
The boot script's functions run for real in bash, with a stand-in `aws` CLI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from infra.config import FleetConfig
from infra.userdata import BOOT_SCRIPT, MAX_USER_DATA, WORKER_UNIT, render_user_data


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package in the CI setup)")
    return path


def run_bash(script: str, env: dict[str, str] | None = None, prefix: list[str] | None = None):
    """Run `script` in bash after sourcing the boot script."""
    return subprocess.run(
        [*(prefix or []), "bash", "-c", f'source "{BOOT_SCRIPT}"\n{script}'],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )


def bash(script: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> str:
    """stdout of `script`, which must succeed."""
    result = run_bash(script, env, prefix)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def user_data(run_stack) -> str:
    return run_stack(FleetConfig(stack="test", broker="rabbitmq", result_store="redis")).user_data


def test_user_data_is_valid_cloud_config(user_data, tmp_path):
    cloud_init = need("cloud-init")
    path = tmp_path / "user-data"
    path.write_text(user_data)
    result = subprocess.run(
        [cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_user_data_installs_the_repository_files(user_data):
    assert len(user_data.encode()) < MAX_USER_DATA
    document = yaml.safe_load(user_data)
    files = {f["path"]: f for f in document["write_files"]}
    assert files["/usr/local/sbin/fleet-boot"]["content"] == BOOT_SCRIPT.read_text()
    assert files["/usr/local/sbin/fleet-boot"]["permissions"] == "0755"
    unit = files["/etc/systemd/system/celery-fleet-worker.service"]
    assert unit["content"] == WORKER_UNIT.read_text()
    assert document["runcmd"] == [["/usr/local/sbin/fleet-boot"]]


def test_boot_env_values_are_quoted():
    rendered = render_user_data(
        {"FLEET_ARTIFACT": "s3://b/a b/", "AWS_DEFAULT_REGION": "eu-west-1"}
    )
    content = yaml.safe_load(rendered)["write_files"][0]["content"]
    assert content == "AWS_DEFAULT_REGION=eu-west-1\nFLEET_ARTIFACT='s3://b/a b/'\n"


def test_boot_script_passes_shellcheck():
    shellcheck = need("shellcheck")
    result = subprocess.run([shellcheck, str(BOOT_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_worker_unit_verifies(tmp_path):
    systemd_analyze = need("systemd-analyze")
    celery = tmp_path / "celery"
    celery.write_text("#!/bin/sh\n")
    celery.chmod(0o755)
    (tmp_path / "env").write_text("FLEET_QUEUE=celery-fleet-test\nFLEET_CONCURRENCY=4\n")
    # The unit with this machine's paths, so verify can check the binary and files exist.
    unit = (
        WORKER_UNIT.read_text()
        .replace("/opt/celery-fleet/venv/bin/celery", str(celery))
        .replace("/etc/celery-fleet/env", str(tmp_path / "env"))
        .replace("WorkingDirectory=/opt/celery-fleet", f"WorkingDirectory={tmp_path}")
    )
    path = tmp_path / "celery-fleet-worker.service"
    path.write_text(unit)
    result = subprocess.run(
        [systemd_analyze, "verify", str(path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("KillSignal=SIGTERM", "KillMode=mixed", "Restart=always", "TimeoutStopSec=960"):
        assert line in unit.splitlines()
    assert "worker -O fair -Q ${FLEET_QUEUE} -c ${FLEET_CONCURRENCY} --loglevel INFO" in unit


def test_with_secret_puts_the_password_after_the_user():
    out = bash(
        'with_secret "amqps://fleet@b-1.mq.amazonaws.com:5671//" "Pw1"\n'
        'with_secret "rediss://@master.cache.amazonaws.com:6379/0?ssl_cert_reqs=required" "T&k"'
    )
    assert out.splitlines() == [
        "amqps://fleet:Pw1@b-1.mq.amazonaws.com:5671//",
        "rediss://:T&k@master.cache.amazonaws.com:6379/0?ssl_cert_reqs=required",
    ]


def test_usable_cpus_honours_affinity():
    assert int(bash("usable_cpus")) == len(os.sched_getaffinity(0))
    taskset = need("taskset")
    assert bash("usable_cpus", prefix=[taskset, "-c", "0"]).strip() == "1"


@pytest.fixture
def fake_aws(tmp_path) -> dict[str, str]:
    """An `aws` CLI that answers the two SSM calls fleet-boot makes, and logs them."""
    (tmp_path / "bin").mkdir()
    aws = tmp_path / "bin" / "aws"
    aws.write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            echo "$*" >>"${0%/*}/calls"
            [[ -z "${FAKE_AWS_FAIL:-}" ]] || exit 255
            case "$2" in
            get-parameters-by-path)
                printf '%s\\t%s\\n' \\
                    /celery-fleet/t/broker_url 'amqps://fleet@b-1.mq.amazonaws.com:5671//' \\
                    /celery-fleet/t/broker_password_parameter /celery-fleet/t/broker_password \\
                    /celery-fleet/t/result_url 's3://bucket/results' \\
                    /celery-fleet/t/queue celery-fleet-t \\
                    /celery-fleet/t/max_batch_seconds 600 \\
                    /celery-fleet/t/queue_url https://sqs.eu-west-1.amazonaws.com/1/q \\
                    /celery-fleet/t/unknown_key ignored ;;
            get-parameter) echo 'S3cretPw' ;;
            *) exit 2 ;;
            esac
            """
        )
    )
    aws.chmod(0o755)
    return {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "FLEET_SSM_PREFIX": "/celery-fleet/t/",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "FLEET_ENV_FILE": str(tmp_path / "etc" / "env"),
        "FLEET_SYSTEMD_DIR": str(tmp_path / "systemd"),
    }


def test_environment_file_has_settings_and_secret(fake_aws, tmp_path):
    bash("write_environment && write_stop_timeout", env=fake_aws)
    env_file = Path(fake_aws["FLEET_ENV_FILE"])
    assert env_file.stat().st_mode & 0o777 == 0o600, "the file holds the broker password"
    lines = set(env_file.read_text().splitlines())
    assert lines == {
        "FLEET_BROKER_URL=amqps://fleet:S3cretPw@b-1.mq.amazonaws.com:5671//",
        "FLEET_RESULT_URL=s3://bucket/results",
        "FLEET_QUEUE=celery-fleet-t",
        "FLEET_MAX_BATCH_SECONDS=600",
        "FLEET_SQS_QUEUE_URL=https://sqs.eu-west-1.amazonaws.com/1/q",
        f"FLEET_CONCURRENCY={len(os.sched_getaffinity(0))}",
        "FLEET_AWS_REGION=eu-west-1",
        "AWS_DEFAULT_REGION=eu-west-1",
    }
    calls = (tmp_path / "bin" / "calls").read_text()
    assert "--with-decryption --name /celery-fleet/t/broker_password" in calls
    assert "Key=Type,Values=String" in calls, "SecureStrings are fetched one by one, decrypted"
    drop_in = Path(fake_aws["FLEET_SYSTEMD_DIR"]) / "celery-fleet-worker.service.d"
    assert (drop_in / "stop-timeout.conf").read_text() == "[Service]\nTimeoutStopSec=660\n"


def test_a_failing_aws_call_stops_the_boot(fake_aws):
    result = run_bash("write_environment", env={**fake_aws, "FAKE_AWS_FAIL": "1"})
    assert result.returncode != 0
    assert not Path(fake_aws["FLEET_ENV_FILE"]).exists(), "no half-written settings"
