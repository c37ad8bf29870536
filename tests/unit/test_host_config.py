"""How a host reads its settings and writes its environment file (app/host/), without a worker."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from app.host.boot import main
from app.host.configure import stack_from_prefix
from app.host.envfile import parse_env, render_env
from app.host.paths import HostPaths
from app.names import WORKER_UNIT
from app.settings import ConfigError


def test_environment_file_round_trips_awkward_values(tmp_path):
    env = {
        "FLEET_BROKER_URL": 'amqps://u:p%40ss"w$rd`\\x #1@h:5671//',
        "PLAIN": "redis://:tok@127.0.0.1:6379/0",
        "EMPTY": "",
        "SPACE": "a b",
    }
    text = render_env(env)
    assert parse_env(text) == env
    with pytest.raises(ConfigError):
        render_env({"BAD": "two\nlines"})


def test_settings_and_secret_from_ssm(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    for name in ("FLEET_APP_DIR", "FLEET_ENV_FILE", "FLEET_SYSTEMD_DIR", "FLEET_RUN_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    with mock_aws():
        ssm = boto3.client("ssm")
        prefix = "/celery-fleet/t/"
        for key, value in {
            "broker_url": "amqps://fleet@b-1.mq.amazonaws.com:5671//",
            "result_url": "s3://bucket/results",
            "queue": "celery-fleet-t",
            "max_batch_seconds": "600",
            "broker_password_parameter": f"{prefix}broker_password",
        }.items():
            ssm.put_parameter(Name=prefix + key, Value=value, Type="String")
        ssm.put_parameter(Name=prefix + "broker_password", Value="S3cret/Pw", Type="SecureString")
        monkeypatch.setenv("FLEET_SSM_PREFIX", prefix)  # as the user-data's boot.env sets it
        assert main(["--systemd", "no", "--no-start", "--agent", "no"]) == 0
    layout = HostPaths.from_env()
    assert layout.env_file.stat().st_mode & 0o777 == 0o600
    env = parse_env(layout.env_file.read_text())
    assert env["FLEET_BROKER_URL"] == "amqps://fleet:S3cret%2FPw@b-1.mq.amazonaws.com:5671//"
    assert env["FLEET_QUEUE"] == "celery-fleet-t"
    assert env["AWS_DEFAULT_REGION"] == env["FLEET_AWS_REGION"] == "eu-west-1"
    unit = (layout.systemd_dir / WORKER_UNIT).read_text()
    assert "TimeoutStopSec=660" in unit.splitlines()


def test_a_stack_without_parameters_stops_the_boot_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("FLEET_ENV_FILE", str(tmp_path / "env"))
    monkeypatch.setenv("FLEET_SYSTEMD_DIR", str(tmp_path / "units"))
    with mock_aws(), pytest.raises(ConfigError, match="nothing under /celery-fleet/gone/"):
        main(["--stack", "gone", "--systemd", "no"])
    assert not (tmp_path / "env").exists() and not (tmp_path / "units").exists()


def test_a_wrong_ssm_prefix_is_refused():
    with pytest.raises(ConfigError):
        stack_from_prefix("/elsewhere/t/")
    assert stack_from_prefix("/celery-fleet/dev/") == "dev"
