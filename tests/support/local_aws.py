"""The nearest thing to `pulumi up` this machine allows: the recorded stack created on moto.

`record(workdir)` runs the Pulumi program under the recording mocks in a
process of its own (tests/support/record_stack.py), with the real artifact
build. `Replay(endpoint).apply(recorded)` then creates, through boto3 and from
the recorded inputs, what a worker and a launcher use: the buckets with their
settings, the artifact objects (the wheel files the program
uploads), the SQS queues with their attributes and policies, the SSM
parameters, the worker role and its policy, the log group, and the
autoscaling group with its launch template and termination hook. A value the
mocks made up for another resource's output (a queue URL, a bucket name) is
replaced by what moto answered, as the engine passes real outputs on.

What it does not create, each with the reason, is in `SKIPPED`: the network
(the test's namespaces are the network here), the scaling policies, alarms
and dashboard (no metric flows in moto to drive them; tests/infra checks
their requests against AWS's API models).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from tests.support.paths import CACHE_HOME, ROOT
from tests.support.worker_host import CACHE

# Resource types not created on moto, and why.
SKIPPED = {
    "pulumi:providers:aws": "the provider itself: no AWS request",
    "aws:ec2/vpc:Vpc": "the network is the test's network namespaces",
    "aws:ec2/subnet:Subnet": "the network is the test's network namespaces",
    "aws:ec2/routeTable:RouteTable": "the network is the test's network namespaces",
    "aws:ec2/routeTableAssociation:RouteTableAssociation": "the network is the namespaces",
    "aws:ec2/route:Route": "the network is the test's network namespaces",
    "aws:ec2/eip:Eip": "the network is the test's network namespaces",
    "aws:ec2/natGateway:NatGateway": "the network is the test's network namespaces",
    "aws:ec2/internetGateway:InternetGateway": "the network is the test's network namespaces",
    "aws:ec2/egressOnlyInternetGateway:EgressOnlyInternetGateway": "the network is the namespaces",
    "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup": "the network is the namespaces",
    "aws:ec2/securityGroup:SecurityGroup": "the network is the test's network namespaces",
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": "the network is the namespaces",
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": "the network is the namespaces",
    "aws:ec2/vpcEndpoint:VpcEndpoint": "the workers reach the emulator directly",
    "aws:autoscaling/policy:Policy": "no metric flows in moto to drive it",
    "aws:cloudwatch/metricAlarm:MetricAlarm": "no metric flows in moto to drive it",
    "aws:cloudwatch/dashboard:Dashboard": "nothing in the job's path reads it",
    "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration": (
        "expiry takes days; nothing in the job's path depends on it"
    ),
    # moto applies a bucket policy's Deny without its Condition (moto/s3/models.py
    # get_permission): the stack's TLS-only policy would refuse every request, HTTPS too.
    "aws:s3/bucketPolicy:BucketPolicy": (
        "TLS only; moto would apply its Deny without the aws:SecureTransport condition"
    ),
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": (
        "an AWS managed policy (Session Manager); moto enforces no IAM"
    ),
    "aws:iam/instanceProfile:InstanceProfile": "moto enforces no IAM; the host is a namespace",
}
# The AWS CLI fleet-boot uses for `aws s3 sync`, in a virtualenv of its own (awscli pins
# botocore exactly, to a release other than the project's).
AWS_CLI = "awscli==1.46.3"
# moto's stand-in for the Amazon Linux AMI that `resolve:ssm:` names on AWS.
MOTO_AMI = "ami-12c6146b"


def record(workdir: Path, stack: str, code: tuple[str, ...] = ()) -> dict[str, Any]:
    """The program's resources, user-data and outputs, as record_stack.py writes them, with
    `celery-fleet:code` set to `code` (the wheelhouse built for real, in the tests' cache)."""
    out = workdir / "stack.json"
    argv = [sys.executable, "-m", "tests.support.record_stack", str(out), "--stack", stack]
    subprocess.run(
        [*argv, *(arg for path in code for arg in ("--code", path))],
        check=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "XDG_CACHE_HOME": str(CACHE_HOME)},
    )
    recorded: dict[str, Any] = json.loads(out.read_text())
    return recorded


def aws_cli() -> Path:
    """The AWS CLI, in a virtualenv of its own (its botocore pin is not the project's)."""
    target = CACHE / AWS_CLI.replace("==", "-")
    aws = target / "bin" / "aws"
    if not aws.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        venv.create(target, with_pip=True)
        subprocess.run(
            [str(target / "bin" / "python"), "-m", "pip", "install", "-q", AWS_CLI],
            check=True,
            timeout=600,
        )
    return aws


def _text(value: Any) -> str:
    """An attribute value as AWS's query APIs take it (the engine sends numbers as floats)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _camel_to_pascal(key: str) -> str:
    return key[:1].upper() + key[1:]


# SQS queue inputs (the provider's names) -> CreateQueue attributes.
QUEUE_ATTRIBUTES = {
    "visibilityTimeoutSeconds": "VisibilityTimeout",
    "messageRetentionSeconds": "MessageRetentionPeriod",
    "receiveWaitTimeSeconds": "ReceiveMessageWaitTimeSeconds",
    "delaySeconds": "DelaySeconds",
    "maxMessageSize": "MaximumMessageSize",
    "redrivePolicy": "RedrivePolicy",
    "sqsManagedSseEnabled": "SqsManagedSseEnabled",
}


@dataclass
class Replay:
    """Creates recorded resources on the emulator at `endpoint`."""

    endpoint: str
    region: str = "us-east-1"
    # Made-up output value -> what moto answered.
    real: dict[str, str] = field(default_factory=dict)
    created: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def sub(self, value: Any) -> Any:
        """`value` with every made-up output replaced by the real one."""
        if isinstance(value, str):
            for fake in sorted(self.real, key=len, reverse=True):
                value = value.replace(fake, self.real[fake])
            return value
        if isinstance(value, dict):
            return {k: self.sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.sub(v) for v in value]
        return value

    def apply(self, recorded: dict[str, Any]) -> None:
        handlers: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
            "aws:s3/bucket:Bucket": self._bucket,
            "aws:s3/bucketOwnershipControls:BucketOwnershipControls": self._ownership,
            "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock": self._public_access,
            "aws:s3/bucketServerSideEncryptionConfiguration:"
            "BucketServerSideEncryptionConfiguration": self._encryption,
            "aws:s3/bucketVersioning:BucketVersioning": self._versioning,
            "aws:s3/bucketObjectv2:BucketObjectv2": self._object,
            "aws:sqs/queue:Queue": self._queue,
            "aws:sqs/queuePolicy:QueuePolicy": self._queue_policy,
            "aws:ssm/parameter:Parameter": self._parameter,
            "aws:iam/role:Role": self._role,
            "aws:iam/rolePolicy:RolePolicy": self._role_policy,
            "aws:cloudwatch/logGroup:LogGroup": self._log_group,
            "aws:ec2/launchTemplate:LaunchTemplate": self._launch_template,
            "aws:autoscaling/group:Group": self._group,
            "aws:autoscaling/lifecycleHook:LifecycleHook": self._hook,
        }
        unknown = []
        for resource in recorded["resources"]:
            typ, name = resource["type"], resource["name"]
            if typ.startswith("celery-fleet:"):
                continue  # a component: no request of its own
            if typ in SKIPPED:
                self.skipped.append((typ, name, SKIPPED[typ]))
                continue
            handler = handlers.get(typ)
            if handler is None:
                unknown.append(typ)
                continue
            handler(self.sub(resource["inputs"]), resource["outputs"])
            self.created.append((typ, name))
        if unknown:
            raise AssertionError(
                f"resource types neither replayed nor listed in SKIPPED: {sorted(set(unknown))}"
            )

    # -- S3 --------------------------------------------------------------------------

    def _bucket(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.client("s3").create_bucket(Bucket=outputs["bucket"])
        self.real[f"{outputs['name']}-id"] = outputs["bucket"]  # the mocks' id of the bucket

    def _ownership(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        rule = inputs["rule"]
        self.client("s3").put_bucket_ownership_controls(
            Bucket=inputs["bucket"],
            OwnershipControls={"Rules": [{"ObjectOwnership": rule["objectOwnership"]}]},
        )

    def _public_access(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        keys = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
        self.client("s3").put_public_access_block(
            Bucket=inputs["bucket"],
            PublicAccessBlockConfiguration={_camel_to_pascal(k): bool(inputs.get(k)) for k in keys},
        )

    def _encryption(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        rules = []
        for rule in inputs["rules"]:
            default = rule["applyServerSideEncryptionByDefault"]
            by_default = {"SSEAlgorithm": default["sseAlgorithm"]}
            if default.get("kmsMasterKeyId"):
                by_default["KMSMasterKeyID"] = default["kmsMasterKeyId"]
            entry: dict[str, Any] = {"ApplyServerSideEncryptionByDefault": by_default}
            if "bucketKeyEnabled" in rule:
                entry["BucketKeyEnabled"] = bool(rule["bucketKeyEnabled"])
            rules.append(entry)
        self.client("s3").put_bucket_encryption(
            Bucket=inputs["bucket"], ServerSideEncryptionConfiguration={"Rules": rules}
        )

    def _versioning(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        status = inputs["versioningConfiguration"]["status"]
        self.client("s3").put_bucket_versioning(
            Bucket=inputs["bucket"], VersioningConfiguration={"Status": status}
        )

    def _object(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        body = Path(inputs["source"]["file_asset"]).read_bytes()
        self.client("s3").put_object(
            Bucket=inputs["bucket"],
            Key=inputs["key"],
            Body=body,
            ContentType=inputs.get("contentType", "binary/octet-stream"),
        )

    # -- SQS -------------------------------------------------------------------------

    def _queue(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        attributes = {
            attr: _text(inputs[key])
            for key, attr in QUEUE_ATTRIBUTES.items()
            if inputs.get(key) is not None
        }
        url = self.client("sqs").create_queue(QueueName=inputs["name"], Attributes=attributes)[
            "QueueUrl"
        ]
        self.real[outputs["url"]] = url
        self.real[f"{outputs['name']}-id"] = url  # the provider's id of a queue is its URL

    def _queue_policy(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.client("sqs").set_queue_attributes(
            QueueUrl=inputs["queueUrl"], Attributes={"Policy": inputs["policy"]}
        )

    # -- SSM, IAM, logs ----------------------------------------------------------------

    def _parameter(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.client("ssm").put_parameter(
            Name=inputs["name"],
            Value=inputs["value"],
            Type=inputs["type"],
            Overwrite=True,
            **({"Description": inputs["description"]} if inputs.get("description") else {}),
        )

    def _role(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.client("iam").create_role(
            RoleName=outputs["name"], AssumeRolePolicyDocument=inputs["assumeRolePolicy"]
        )
        self.real[f"{outputs['name']}-id"] = outputs["name"]

    def _role_policy(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.client("iam").put_role_policy(
            RoleName=inputs["role"], PolicyName=outputs["name"], PolicyDocument=inputs["policy"]
        )

    def _log_group(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        logs = self.client("logs")
        logs.create_log_group(logGroupName=inputs["name"])
        if inputs.get("retentionInDays"):
            logs.put_retention_policy(
                logGroupName=inputs["name"], retentionInDays=int(inputs["retentionInDays"])
            )

    # -- the group -----------------------------------------------------------------------

    def _launch_template(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        image = inputs.get("imageId", MOTO_AMI)
        created = self.client("ec2").create_launch_template(
            LaunchTemplateName=outputs["name"],
            LaunchTemplateData={
                "ImageId": MOTO_AMI if image.startswith("resolve:ssm:") else image,
                "UserData": inputs.get("userData", ""),
                "MetadataOptions": {
                    "HttpTokens": inputs["metadataOptions"]["httpTokens"],
                    "HttpEndpoint": inputs["metadataOptions"]["httpEndpoint"],
                },
            },
        )["LaunchTemplate"]
        self.real[f"{outputs['name']}-id"] = created["LaunchTemplateId"]

    def _group(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        spec = inputs["mixedInstancesPolicy"]["launchTemplate"]
        template = spec["launchTemplateSpecification"]
        self.client("autoscaling").create_auto_scaling_group(
            AutoScalingGroupName=outputs["name"],
            MinSize=int(inputs["minSize"]),
            MaxSize=int(inputs["maxSize"]),
            DesiredCapacity=0,
            AvailabilityZones=[f"{self.region}a"],
            MixedInstancesPolicy={
                "LaunchTemplate": {
                    "LaunchTemplateSpecification": {
                        "LaunchTemplateId": template["launchTemplateId"],
                        "Version": "$Latest",
                    },
                    "Overrides": [
                        {"InstanceType": o["instanceType"]} for o in spec.get("overrides", [])
                    ],
                }
            },
            Tags=[
                {
                    "Key": t["key"],
                    "Value": t["value"],
                    "PropagateAtLaunch": bool(t.get("propagateAtLaunch")),
                    "ResourceId": outputs["name"],
                    "ResourceType": "auto-scaling-group",
                }
                for t in inputs.get("tags", [])
            ],
        )
        self.real[outputs["name"]] = outputs["name"]

    def _hook(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.client("autoscaling").put_lifecycle_hook(
            LifecycleHookName=outputs["name"],
            AutoScalingGroupName=inputs["autoscalingGroupName"],
            LifecycleTransition=inputs["lifecycleTransition"],
            HeartbeatTimeout=int(inputs["heartbeatTimeout"]),
            DefaultResult=inputs["defaultResult"],
        )
