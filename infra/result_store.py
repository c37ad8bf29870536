"""Where batch results go: an S3 prefix (default with SQS) or Valkey on ElastiCache.

S3 costs nothing while idle and its lifecycle rule deletes results after the
configured TTL, the same TTL the app applies in Redis. Valkey (Redis-compatible)
is faster for many small results and is the default next to RabbitMQ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from infra.documents import allow
from infra.endpoint import Endpoint
from infra.network import allow_tcp
from infra.storage import PrivateBucket, PrivateBucketArgs

RESULT_PREFIX = "results"
REDIS_PORT = 6379


@dataclass
class S3ResultStoreArgs:
    ttl_days: int


class S3ResultStore(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: S3ResultStoreArgs, opts: pulumi.ResourceOptions | None = None
    ):
        super().__init__("celery-fleet:infra:S3ResultStore", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        bucket = PrivateBucket(
            name,
            PrivateBucketArgs(
                expire_prefix=f"{RESULT_PREFIX}/",
                expire_days=args.ttl_days,
                # A redelivered batch overwrites its result; the old copy is no use.
                noncurrent_days=1,
            ),
            opts=child,
        )
        objects = pulumi.Output.concat(bucket.arn, f"/{RESULT_PREFIX}/*")
        self.service = Endpoint(
            url=pulumi.Output.concat("s3://", bucket.name, f"/{RESULT_PREFIX}"),
            worker_statements=[
                allow(
                    ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                    [objects],
                    "ReadWriteResults",
                ),
                # Without ListBucket a missing result reads as 403, not 404,
                # and every batch's first HEAD (is the batch committed?) fails.
                # No s3:prefix condition: HeadBucket (the store's ping) and the
                # 404-for-a-missing-key check carry no prefix, so StringLike
                # on it can never match; and StringLikeIfExists would let a
                # listing without a prefix through, fencing nothing. The
                # bucket holds only results, so the bucket itself is the fence.
                allow(["s3:ListBucket"], [bucket.arn], "ListResults"),
            ],
            outputs={"resultBucket": bucket.name},
        )
        self.register_outputs({"bucket": bucket.name})


@dataclass
class RedisResultStoreArgs:
    node_type: str
    vpc_id: pulumi.Input[str]
    subnet_ids: Sequence[pulumi.Input[str]]
    worker_sg_id: pulumi.Input[str]


class RedisResultStore(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: RedisResultStoreArgs, opts: pulumi.ResourceOptions | None = None
    ):
        super().__init__("celery-fleet:infra:RedisResultStore", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        # Kept in the stack state like the broker password; ElastiCache takes
        # 16-128 printable characters, letters and digits avoid URL escaping.
        token = random.RandomPassword(f"{name}-token", length=48, special=False, opts=child)
        self.auth_token: pulumi.Output[str] = pulumi.Output.secret(token.result)

        sg = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=args.vpc_id,
            description="Valkey result store: TLS from the workers only",
            tags={"Name": f"{name}-redis"},
            opts=child,
        )
        allow_tcp(f"{name}-redis", sg.id, args.worker_sg_id, REDIS_PORT, child)
        subnets = aws.elasticache.SubnetGroup(
            f"{name}-subnets",
            description="Private subnets of the Celery fleet",
            subnet_ids=args.subnet_ids,
            opts=child,
        )
        self.group = aws.elasticache.ReplicationGroup(
            name,
            description="Celery fleet batch results",
            engine="valkey",
            engine_version="8.0",
            node_type=args.node_type,
            # One node: results are re-creatable (a lost batch result is
            # re-sent by the launcher's resume), so a replica is not worth its price.
            num_cache_clusters=1,
            port=REDIS_PORT,
            subnet_group_name=subnets.name,
            security_group_ids=[sg.id],
            at_rest_encryption_enabled=True,
            transit_encryption_enabled=True,
            auth_token=self.auth_token,
            auto_minor_version_upgrade=True,
            opts=child,
        )
        self.service = Endpoint(
            # Empty user before "@": the boot script inserts ":<token>" there.
            # ssl_cert_reqs is required by Celery for rediss:// result URLs.
            url=pulumi.Output.concat(
                "rediss://@",
                self.group.primary_endpoint_address,
                f":{REDIS_PORT}/0?ssl_cert_reqs=required",
            ),
            secret=self.auth_token,
            outputs={"redisEndpoint": self.group.primary_endpoint_address},
        )
        self.register_outputs({"endpoint": self.group.primary_endpoint_address})
