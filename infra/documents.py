"""Small builders for IAM and resource policy documents.

Policy documents are plain dicts whose leaves may be Outputs; `to_json` turns
one into the JSON string a resource wants without an apply, so nothing is
created inside a callback and secrets stay marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi


@dataclass(frozen=True)
class AwsContext:
    """Where the stack runs; policies name resources by ARNs built from it."""

    partition: str
    region: str
    account: str

    def arn(self, service: str, resource: str) -> str:
        return f"arn:{self.partition}:{service}:{self.region}:{self.account}:{resource}"


def allow(
    actions: list[str], resources: Sequence[pulumi.Input[str]], sid: str, **condition: Any
) -> dict[str, Any]:
    """An Allow statement; `condition` is the IAM Condition block, e.g. StringEquals={...}."""
    stmt: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}
    if condition:
        stmt["Condition"] = condition
    return stmt


def deny_insecure_transport(action: str, resources: Sequence[pulumi.Input[str]]) -> dict[str, Any]:
    """Refuse any request that arrives over plain HTTP (S3.5 for buckets, the same idea for SQS)."""
    return {
        "Sid": "DenyInsecureTransport",
        "Effect": "Deny",
        "Principal": "*",
        "Action": action,
        "Resource": resources,
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }


def to_json(statements: list[dict[str, Any]]) -> pulumi.Output[str]:
    return pulumi.Output.json_dumps({"Version": "2012-10-17", "Statement": statements})
