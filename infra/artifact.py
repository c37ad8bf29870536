"""The code the workers run: the stack's wheelhouse, in a private bucket, named by its version.

`celery-fleet:code` names the user's project directories (paths relative to
Pulumi.yaml). Their wheelhouse with this kit's wheel and every dependency wheel
for the workers' platform (app/wheelhouse.py: exactly what `fleet package`
writes) is built while the Pulumi program runs (never inside an apply) and
uploaded under `artifacts/<version>/`, where the version is the content hash
of the code: an unchanged project gives the same key and no diff; a changed
file that ships, or a new dependency version, gives a new key, a new launch
template version, and an instance refresh. A dependency with no wheel for the
workers' platform stops the program, naming it. The hosts install the
wheelhouse offline (scripts/fleet-boot.sh), so every instance runs the same
versions whenever it boots, with or without a way to PyPI.

A new version's upload keeps the previous versions' objects (retain_on_delete):
until the instance refresh has replaced every instance, and whenever the group
launches from its previous template version (a scale-out while `pulumi up`
runs, a refresh that failed or was rolled back), an instance syncs the prefix
its user-data names, the old one. The workers may read any version under
artifacts/ for the same reason. No lifecycle rule expires old prefixes: S3
counts expiry from an object's upload, not from the day it stopped being
current, so a rule would also delete the current wheels of a stack whose code
has not changed for that long. Old prefixes stay until `pulumi destroy` (or an
operator removes them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_aws as aws

from app.wheelhouse import PackageError, Wheelhouse, build
from infra.documents import allow
from infra.storage import PrivateBucket, PrivateBucketArgs

# The kit's checkout, which holds Pulumi.yaml: `celery-fleet:code` paths are relative to it.
REPO_ROOT = Path(__file__).resolve().parent.parent
# Where the wheelhouses go in the artifact bucket: ARTIFACTS/<version>/.
ARTIFACTS = "artifacts"
CONTENT_TYPES = {".whl": "application/zip", ".json": "application/json", ".txt": "text/plain"}

# What the program calls to get the wheelhouse of (project directories, architecture);
# tests pass a fake that writes stub wheels.
Builder = Callable[[Sequence[Path], str], Wheelhouse]


def build_wheelhouse(projects: Sequence[Path], arch: str) -> Wheelhouse:
    """The wheelhouse of `projects` and this kit for the workers on `arch` (from the cache
    when nothing changed); a project that cannot be packaged stops the program."""
    try:
        return build(projects, arch, kit=REPO_ROOT, say=pulumi.log.info)
    except PackageError as exc:
        # pulumi prints a RunError as the message alone, without a traceback.
        raise pulumi.RunError(f"celery-fleet:code: {exc}") from None


@dataclass
class ArtifactArgs:
    wheelhouse: Wheelhouse


class Artifact(pulumi.ComponentResource):
    def __init__(self, name: str, args: ArtifactArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("celery-fleet:infra:Artifact", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        self.bucket = PrivateBucket(name, PrivateBucketArgs(), opts=child)
        self.version = args.wheelhouse.version
        self.prefix = f"{ARTIFACTS}/{self.version}"
        # A new version replaces each object (its key changes); retained, the
        # previous version's object stays in S3 (see the module docstring).
        keep = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(retain_on_delete=True))
        self.objects = [
            aws.s3.BucketObjectv2(
                f"{name}-{path.name}",
                bucket=self.bucket.name,
                key=f"{self.prefix}/{path.name}",
                source=pulumi.FileAsset(str(path)),
                content_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
                opts=keep,
            )
            for path in args.wheelhouse.files
        ]

        # Through the objects' keys, so what uses the URI (the user-data, the
        # launch template, the group and its refresh) waits for the upload.
        self.uri = pulumi.Output.all(self.bucket.name, *(o.key for o in self.objects)).apply(
            lambda names: f"s3://{names[0]}/{self.prefix}/"
        )
        # `aws s3 sync` lists the prefix, then reads each object it listed (it
        # never asks for a key that is not there, nor for the bucket itself).
        # Any version, not only this one: an instance launched from the previous
        # template version reads the previous prefix.
        self.worker_statements = [
            allow(
                ["s3:ListBucket"],
                [self.bucket.arn],
                "ListArtifact",
                StringLike={"s3:prefix": [f"{ARTIFACTS}/*"]},
            ),
            allow(
                ["s3:GetObject"],
                [pulumi.Output.concat(self.bucket.arn, f"/{ARTIFACTS}/*")],
                "ReadArtifact",
            ),
        ]
        self.register_outputs(
            {
                "bucket": self.bucket.name,
                "prefix": self.prefix,
                "uri": self.uri,
                "version": self.version,
            }
        )
