"""The code the workers run: this repository's wheel, in a private bucket, named by content.

The wheel is built while the Pulumi program runs (never inside an apply) and
uploaded under `artifacts/<digest>/`. The digest covers the package's source
files, not the wheel's bytes, so an unchanged app/ gives the same key and no
diff; a changed one gives a new key, a new launch template version, and an
instance refresh. Wheels are built with a fixed SOURCE_DATE_EPOCH and the
operator's own setuptools so that their bytes repeat too.

A new digest's upload keeps the previous digests' objects (retain_on_delete):
until the instance refresh has replaced every instance, and whenever the group
launches from its previous template version (a scale-out while `pulumi up`
runs, a refresh that failed or was rolled back), an instance syncs the prefix
its user-data names, the old one. The workers may read any digest under
artifacts/ for the same reason. No lifecycle rule expires old prefixes: S3
counts expiry from an object's upload, not from the day it stopped being
current, so a rule would also delete the current wheels of a stack whose code
has not changed for that long. Old prefixes stay until `pulumi destroy` (or an
operator removes them); each is one wheel, or the wheel set of an offline
install.

Without a NAT gateway the workers cannot reach PyPI, so the prefix also holds
every dependency wheel for the workers' platform, and their names (which carry
the versions) go into the digest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_aws as aws

from infra.documents import allow
from infra.storage import PrivateBucket, PrivateBucketArgs

REPO_ROOT = Path(__file__).resolve().parent.parent
# What setuptools packs (see pyproject.toml); nothing else changes the wheel.
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "app", "scripts")
# The wheel of pyproject.toml's project "celery-fleet" (fleet-boot.sh installs the same).
APP_WHEELS = "celery_fleet-*.whl"
# Where the wheels go in the artifact bucket: ARTIFACTS/<digest>/.
ARTIFACTS = "artifacts"
# 1980-01-01, the earliest time a zip entry can hold.
SOURCE_DATE_EPOCH = "315532800"
# The workers run Amazon Linux 2023: glibc 2.34 and the python3.11 package.
WORKER_PYTHON = "3.11"
WORKER_GLIBC_MINOR = 34


@dataclass(frozen=True)
class BuiltArtifact:
    digest: str
    # The app wheel first, then (offline installs) its dependencies.
    wheels: tuple[Path, ...]


# What build() accepts as a builder; tests pass a fake that writes a stub wheel.
Builder = Callable[[Path, bool, str], BuiltArtifact]


def source_files(repo_root: Path) -> list[Path]:
    files: list[Path] = []
    for entry in PACKAGE_SOURCES:
        path = repo_root / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
    return sorted(files)


def digest_of(repo_root: Path, *extra: str) -> str:
    """sha256 over the package sources (path and bytes) and `extra` strings, 16 hex digits."""
    h = hashlib.sha256()
    for path in source_files(repo_root):
        h.update(path.relative_to(repo_root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


def build_artifact(repo_root: Path, offline: bool, arch: str) -> BuiltArtifact:
    """Build the wheel (and, offline, download its dependencies) once per source digest."""
    target = (f"offline={offline}", f"arch={arch}")
    cache = Path(tempfile.gettempdir()) / "celery-fleet-artifacts" / digest_of(repo_root, *target)
    if not cache.is_dir():
        _build_into(repo_root, cache, offline, arch)
    app_wheels = sorted(cache.glob(APP_WHEELS))
    dependencies = sorted(p for p in cache.glob("*.whl") if p not in app_wheels)
    digest = digest_of(repo_root, *target, *(p.name for p in dependencies))
    return BuiltArtifact(digest=digest, wheels=(*app_wheels, *dependencies))


def _build_into(repo_root: Path, cache: Path, offline: bool, arch: str) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        source, wheels = Path(tmp, "src"), Path(tmp, "wheels")
        # Build from a copy: an in-tree build would leave build/ and *.egg-info in the repo.
        for path in source_files(repo_root):
            copy = source / path.relative_to(repo_root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
        # The operator's setuptools (no build isolation) and a fixed timestamp
        # make the same sources give the same bytes, so Pulumi sees no change.
        _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(source))
        if offline:
            (app_wheel,) = wheels.glob("*.whl")
            machine = "x86_64" if arch == "x86_64" else "aarch64"
            # pip does not widen --platform to older glibc tags, so name them
            # all: manylinux2014 (2.17) up to the workers' own glibc.
            platforms = [
                arg
                for minor in range(17, WORKER_GLIBC_MINOR + 1)
                for arg in ("--platform", f"manylinux_2_{minor}_{machine}")
            ]
            workers = ["--python-version", WORKER_PYTHON, "--implementation", "cp", *platforms]
            # By path, not by name: a same-named project on PyPI must never be picked.
            _pip(
                "download",
                "--only-binary=:all:",
                *workers,
                "--dest",
                str(wheels),
                f"{app_wheel}[aws]",
            )
        # A finished directory appears at once, so an interrupted build is never reused.
        os.replace(wheels, cache)


def _pip(*args: str) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--quiet"], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise pulumi.RunError(
            f"building the worker artifact failed: pip {args[0]}\n{result.stderr}"
        )


@dataclass
class ArtifactArgs:
    built: BuiltArtifact


class Artifact(pulumi.ComponentResource):
    def __init__(self, name: str, args: ArtifactArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("celery-fleet:infra:Artifact", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        self.bucket = PrivateBucket(name, PrivateBucketArgs(), opts=child)
        self.prefix = f"{ARTIFACTS}/{args.built.digest}"
        # A new digest replaces each object (its key changes); retained, the
        # previous digest's object stays in S3 (see the module docstring).
        keep = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(retain_on_delete=True))
        self.objects = [
            aws.s3.BucketObjectv2(
                f"{name}-{wheel.name}",
                bucket=self.bucket.name,
                key=f"{self.prefix}/{wheel.name}",
                source=pulumi.FileAsset(str(wheel)),
                content_type="application/zip",
                opts=keep,
            )
            for wheel in args.built.wheels
        ]

        # Through the objects' keys, so what uses the URI (the user-data, the
        # launch template, the group and its refresh) waits for the upload.
        self.uri = pulumi.Output.all(self.bucket.name, *(o.key for o in self.objects)).apply(
            lambda names: f"s3://{names[0]}/{self.prefix}/"
        )
        # `aws s3 sync` lists the prefix, then reads each object it listed (it
        # never asks for a key that is not there, nor for the bucket itself).
        # Any digest, not only this one: an instance launched from the previous
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
        self.register_outputs({"bucket": self.bucket.name, "prefix": self.prefix, "uri": self.uri})
