"""The FLEET_* variables are described once (app/settings.py VARIABLES): Settings, its
environment, the stack's SSM parameters and the README's table all follow that description."""

from __future__ import annotations

import dataclasses

from app.settings import VARIABLES, Settings, parameter_name, settings_table
from app.stack import env_from_parameters
from tests.support.paths import ROOT


def readme_table() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| variable | default | meaning |")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end]) + "\n"


def test_the_readme_table_is_the_description():
    assert readme_table() == settings_table(), (
        "README.md's settings table differs from app/settings.py's VARIABLES; the table "
        f"they describe is:\n{settings_table()}"
    )


def test_every_settings_field_has_its_variable_and_its_default():
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    described = {v.attr: v for v in VARIABLES if v.attr}
    assert set(described) == set(fields)
    for attr, var in described.items():
        if var.attr not in ("broker_url", "result_url"):  # required: no default
            assert fields[attr].default == var.default, attr


def test_as_env_and_from_env_carry_every_field():
    full = Settings(
        "amqp://u:p@h:5672//",
        "redis://:p@h:6379/1",
        queue="q",
        include=("a", "b"),
        concurrency=3,
        max_batch_seconds=120,
        result_ttl=600,
        lease_seconds=2.5,
        aws_region="eu-west-1",
        sqs_queue_url="https://sqs.eu-west-1.amazonaws.com/1/q",
        stack="dev",
        code_version="0123456789abcdef",
        tls_ca_file="/etc/ssl/certs/ca-certificates.crt",
        sink_password="pg-secret",
    )
    assert "pg-secret" not in repr(full)
    env = full.as_env()
    assert set(env) == {v.name for v in VARIABLES if v.attr}
    assert Settings.from_env(env) == full


def test_the_stacks_parameters_are_named_by_the_description():
    names = {v.ssm: v.name for v in VARIABLES if v.ssm}
    assert parameter_name("sqs_queue_url") == "queue_url"
    params = {ssm: f"value-of-{name}" for ssm, name in names.items()}
    env = env_from_parameters(params, "eu-west-1")
    assert {k: env[k] for k in names.values()} == {n: f"value-of-{n}" for n in names.values()}
    assert env["FLEET_AWS_REGION"] == "eu-west-1"
