"""A private, encrypted, versioned S3 bucket; the artifact and result buckets are both one."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.documents import deny_insecure_transport, to_json


@dataclass
class PrivateBucketArgs:
    # Objects under `expire_prefix` are deleted this many days after they were
    # written; None keeps them until the stack is destroyed.
    expire_prefix: str | None = None
    expire_days: pulumi.Input[int] | None = None
    # Overwritten or deleted objects stay recoverable this long.
    noncurrent_days: pulumi.Input[int] = 30


class PrivateBucket(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: PrivateBucketArgs, opts: pulumi.ResourceOptions | None = None
    ):
        super().__init__("celery-fleet:infra:PrivateBucket", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        self.bucket = aws.s3.Bucket(
            name,
            # Bucket names are lowercase and this prefix may be at most 37 characters.
            bucket_prefix=f"{name.lower()[:36]}-",
            # The contents are rebuilt (artifacts) or short-lived (results), so a
            # `pulumi destroy` should not stop at a non-empty bucket.
            force_destroy=True,
            opts=child,
        )
        # ACLs off: only IAM and the bucket policy decide who reads.
        aws.s3.BucketOwnershipControls(
            f"{name}-ownership",
            bucket=self.bucket.id,
            rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"),
            opts=child,
        )
        public_access = aws.s3.BucketPublicAccessBlock(
            f"{name}-public-access",
            bucket=self.bucket.id,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            opts=child,
        )
        # SSE-KMS with the AWS managed key: its key policy already lets this
        # account's principals use it through S3, so no key to manage and no
        # kms:* grant in the worker role; the bucket key keeps KMS calls rare.
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-encryption",
            bucket=self.bucket.id,
            rules=[
                {
                    "apply_server_side_encryption_by_default": {"sse_algorithm": "aws:kms"},
                    "bucket_key_enabled": True,
                }
            ],
            opts=child,
        )
        versioning = aws.s3.BucketVersioning(
            f"{name}-versioning",
            bucket=self.bucket.id,
            versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(
                status="Enabled"
            ),
            opts=child,
        )
        rules = [
            aws.s3.BucketLifecycleConfigurationRuleArgs(
                id="tidy",
                status="Enabled",
                filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(),
                abort_incomplete_multipart_upload=(
                    aws.s3.BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
                        days_after_initiation=1
                    )
                ),
                # Versioning keeps every overwrite; without this the old
                # versions would be stored (and billed) for ever.
                noncurrent_version_expiration=(
                    aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
                        noncurrent_days=args.noncurrent_days
                    )
                ),
            )
        ]
        if args.expire_prefix is not None:
            rules.append(
                aws.s3.BucketLifecycleConfigurationRuleArgs(
                    id="expire",
                    status="Enabled",
                    filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(
                        prefix=args.expire_prefix
                    ),
                    expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(
                        days=args.expire_days
                    ),
                )
            )
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-lifecycle",
            bucket=self.bucket.id,
            rules=rules,
            # S3 applies lifecycle rules to versions only once versioning is on.
            opts=pulumi.ResourceOptions.merge(
                child, pulumi.ResourceOptions(depends_on=[versioning])
            ),
        )
        aws.s3.BucketPolicy(
            f"{name}-policy",
            bucket=self.bucket.id,
            policy=to_json(
                [
                    deny_insecure_transport(
                        "s3:*", [self.bucket.arn, pulumi.Output.concat(self.bucket.arn, "/*")]
                    )
                ]
            ),
            # S3 refuses a bucket policy while the public access block is being changed.
            opts=pulumi.ResourceOptions.merge(
                child, pulumi.ResourceOptions(depends_on=[public_access])
            ),
        )

        self.name = self.bucket.bucket
        self.arn = self.bucket.arn
        self.register_outputs({"name": self.name, "arn": self.arn})
