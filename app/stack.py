"""Connection settings of a deployed stack, from SSM Parameter Store.

The stack writes them under /celery-fleet/<stack>/ (infra/parameters.py), so
the launcher and the workers' boot need AWS credentials and nothing else: no
Pulumi CLI, no secrets in stack outputs or user-data. A URL that needs a
password holds "user@"; the password is in a SecureString parameter and goes
in here, in memory only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from app.names import ssm_prefix
from app.settings import VARIABLES, ConfigError, Settings

# Same vCPU count on purpose: the scaling target is "backlog per instance", so
# every instance the group may launch must offer the same number of worker slots.
DEFAULT_INSTANCE_TYPES = ("c7i.xlarge", "c6i.xlarge", "c6a.xlarge", "c5.xlarge", "m7i.xlarge")


@dataclass(frozen=True, kw_only=True)
class StackChoices:
    """The stack settings that decide what it builds and so what it costs, with their
    defaults (a working stack with only aws:region set). Shared by the Pulumi program
    (infra/config.py StackConfig, which checks them) and `fleet cost` (scripts/cost.py),
    which is installed without the program."""

    broker: str = "sqs"
    # None: S3 with SQS (both are pay-per-request, nothing idles), Redis with RabbitMQ.
    result_store: str | None = None
    nat: str = "single"
    az_count: int = 2
    instance_types: tuple[str, ...] = DEFAULT_INSTANCE_TYPES
    root_volume_gb: int = 16
    broker_deployment_mode: str = "SINGLE_INSTANCE"
    # None: mq.t3.micro for a single instance, mq.m5.large for a cluster.
    broker_instance_type: str | None = None
    redis_node_type: str = "cache.t4g.micro"

    @property
    def resolved_result_store(self) -> str:
        if self.result_store is not None:
            return self.result_store
        return "s3" if self.broker == "sqs" else "redis"

    @property
    def resolved_broker_instance_type(self) -> str:
        if self.broker_instance_type is not None:
            return self.broker_instance_type
        return "mq.t3.micro" if self.broker_deployment_mode == "SINGLE_INSTANCE" else "mq.m5.large"


# Stack config key (celery-fleet:<key>) -> (StackChoices field, its kind: str, int,
# float, bool, list or object). infra/config.py adds the program's other keys.
CHOICE_KEYS: dict[str, tuple[str, str]] = {
    "broker": ("broker", "str"),
    "resultStore": ("result_store", "str"),
    "nat": ("nat", "str"),
    "azCount": ("az_count", "int"),
    "instanceTypes": ("instance_types", "list"),
    "rootVolumeGb": ("root_volume_gb", "int"),
    "brokerDeploymentMode": ("broker_deployment_mode", "str"),
    "brokerInstanceType": ("broker_instance_type", "str"),
    "redisNodeType": ("redis_node_type", "str"),
}


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def read_parameters(stack: str, ssm: Any) -> dict[str, str]:
    prefix = ssm_prefix(stack)
    params: dict[str, str] = {}
    for page in ssm.get_paginator("get_parameters_by_path").paginate(
        Path=prefix, WithDecryption=True
    ):
        for p in page["Parameters"]:
            params[p["Name"][len(prefix) :]] = p["Value"]
    return params


def env_from_parameters(params: dict[str, str], region: str | None) -> dict[str, str]:
    """FLEET_* variables from the stack's parameters (secrets put into the URLs)."""
    env = {v.name: params.get(v.ssm, "") for v in VARIABLES if v.ssm}
    env["FLEET_AWS_REGION"] = region or ""
    for role, key in (("broker", "FLEET_BROKER_URL"), ("result", "FLEET_RESULT_URL")):
        if f"{role}_password" in params:
            env[key] = with_password(env[key], params[f"{role}_password"])
    return {k: v for k, v in env.items() if v}


def settings_from_stack(stack: str, session: Any = None, **overrides: object) -> Settings:
    """Settings of stack `stack` in the session's region (boto3's default session if None)."""
    import boto3
    import botocore.exceptions

    session = session or boto3.session.Session()
    ssm = session.client("ssm")
    try:
        params = read_parameters(stack, ssm)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise ConfigError(f"cannot read stack {stack!r} from SSM Parameter Store: {exc}") from None
    if "broker_url" not in params or "result_url" not in params:
        raise ConfigError(
            f"no stack {stack!r} in region {session.region_name or '(none set)'}: nothing under "
            f"{ssm_prefix(stack)} in SSM Parameter Store. Check the stack name (`pulumi stack "
            f"ls`), AWS_REGION and your credentials."
        )
    env = dict(env_from_parameters(params, session.region_name), FLEET_STACK=stack)
    return Settings.from_env(env, **overrides)
