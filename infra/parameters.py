"""The stack's connection settings in SSM Parameter Store, under /celery-fleet/<stack>/.

The workers' boot script and the launcher (`fleet run --stack NAME`) read the
same parameters, so neither needs the stack's outputs or secrets in plain
text. The names come from app/settings.py's VARIABLES (their `ssm`):

    broker_url, result_url, queue, max_batch_seconds, result_ttl   (String)
    code_version       (String: the content hash of the wheelhouse the workers install)
    queue_url                                   (String, SQS broker only)
    broker_password, result_password            (SecureString, RabbitMQ / Redis only)
    sink_password      (SecureString: celery-fleet:sinkPassword, a PostgreSQL sink's password)
    broker_password_parameter, result_password_parameter
                                                (String: the SecureString's name)

The URLs never hold the secret: where it belongs they hold "user@" and the
reader puts ":<secret>" before the "@" (see scripts/fleet-boot.sh).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from app.settings import parameter_name
from infra.endpoint import Endpoint


@dataclass
class SsmParametersArgs:
    prefix: str
    queue_name: pulumi.Input[str]
    max_batch_seconds: int
    result_ttl_seconds: int
    code_version: str
    broker: Endpoint
    results: Endpoint
    # The password of the jobs' PostgreSQL sinks (celery-fleet:sinkPassword), or None.
    sink_password: pulumi.Input[str] | None = None


class SsmParameters(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: SsmParametersArgs, opts: pulumi.ResourceOptions | None = None
    ):
        # Stacks made before the rename know this component as infra:Connection; the
        # alias keeps their parameters instead of replacing them.
        renamed = pulumi.Alias(type_="celery-fleet:infra:Connection")
        super().__init__(
            "celery-fleet:infra:SsmParameters",
            name,
            None,
            pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(aliases=[renamed])),
        )
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        # Named as app/settings.py's VARIABLES say, which is where the readers look.
        plain: dict[str, pulumi.Input[str]] = {
            parameter_name("broker_url"): args.broker.url,
            parameter_name("result_url"): args.results.url,
            parameter_name("queue"): args.queue_name,
            parameter_name("max_batch_seconds"): str(args.max_batch_seconds),
            parameter_name("result_ttl"): str(args.result_ttl_seconds),
            parameter_name("code_version"): args.code_version,
            **args.broker.parameters,
            **args.results.parameters,
        }
        for role, service in (("broker", args.broker), ("result", args.results)):
            if service.secret is None:
                continue
            secret = aws.ssm.Parameter(
                f"{name}-{role}-password",
                name=f"{args.prefix}{role}_password",
                type="SecureString",
                # Encrypted with the account's aws/ssm key; the value is a
                # Pulumi secret, so it is encrypted in the state file too.
                value=service.secret,
                opts=child,
            )
            plain[f"{role}_password_parameter"] = secret.name
        if args.sink_password is not None:
            # Read by the workers and `fleet run --stack` as FLEET_SINK_PASSWORD.
            aws.ssm.Parameter(
                f"{name}-sink-password",
                name=f"{args.prefix}{parameter_name('sink_password')}",
                type="SecureString",
                value=pulumi.Output.secret(args.sink_password),
                opts=child,
            )

        self.parameters = {
            key: aws.ssm.Parameter(
                f"{name}-{key.replace('_', '-')}",
                name=f"{args.prefix}{key}",
                type="String",
                value=value,
                opts=child,
            )
            for key, value in plain.items()
        }
        self.prefix = args.prefix
        self.register_outputs({"prefix": self.prefix})
