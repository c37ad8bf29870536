"""`--out s3://BUCKET/PREFIX/`: each batch one object, PREFIX/JOB/part-BATCH.jsonl.

Written by the batch's worker with a conditional put (If-None-Match: *): the
first write of a batch wins, and a batch that runs again cannot overwrite it,
so every ID is in exactly one part. When the job ends, the launcher writes
PREFIX/JOB/_manifest.json: the parts, the items and the errors. The URL may
name the region and an endpoint as the S3 result store's does
(`?region=R&endpoint_url=U`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from app.sinks.base import BadSink, SinkRefused, retrying
from app.store.s3 import CONDITION_FAILED, no_answer, s3_location

# What S3 says when IAM or the bucket policy refuses, or the bucket does not exist.
REFUSED = ("AccessDenied", "Forbidden", "403", "NoSuchBucket", "404", "AllAccessDisabled")


class S3Sink:
    def __init__(self, url: str, region: str | None = None) -> None:
        import botocore.exceptions

        self.s3, self.bucket, self.prefix = s3_location(url, region)
        self.label = f"s3://{self.bucket}/{self.prefix}"
        self._errors = botocore.exceptions

    def part_key(self, job: str, batch: int) -> str:
        return f"{self.prefix}{job}/part-{batch:08d}.jsonl"

    def _code(self, exc: Exception) -> str:
        if not isinstance(exc, self._errors.ClientError):
            return ""
        response: dict[str, Any] = exc.response
        code = response.get("Error", {}).get("Code") or ""
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(code or status or "")

    def _refused(self, exc: Exception, what: str, cls: type[BadSink] = BadSink) -> BadSink | None:
        code = self._code(exc)
        if code not in REFUSED:
            return None
        return cls(
            f"{self.label} refused {what} ({code}): the bucket must exist, and whoever writes "
            f"(the workers, and `fleet run` for the manifest) needs s3:PutObject on "
            f"arn:aws:s3:::{self.bucket}/{self.prefix}*; a stack grants its workers that for "
            "the buckets named in celery-fleet:outputBuckets."
        )

    def check(self) -> None:
        """Write and remove a probe object: a bucket that does not exist or refuses the
        writes stops the job before its first batch."""
        key = f"{self.prefix}.celery-fleet-write-check"
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=b"")
        except self._errors.ClientError as exc:
            refused = self._refused(exc, "a write")
            raise refused or exc from None
        # Left behind if it cannot be removed: an empty object, harmless.
        with contextlib.suppress(self._errors.ClientError):
            self.s3.delete_object(Bucket=self.bucket, Key=key)

    def write(self, job: str, batch: int, lines: bytes) -> None:
        def put() -> None:
            try:
                self.s3.put_object(
                    Bucket=self.bucket,
                    Key=self.part_key(job, batch),
                    Body=lines,
                    ContentType="application/x-ndjson",
                    IfNoneMatch="*",
                )
            except self._errors.ClientError as exc:
                if self._code(exc) in CONDITION_FAILED:
                    return  # written by an earlier run of this batch: it stays
                raise self._refused(exc, f"part {batch} of job {job}", SinkRefused) or exc from None

        retrying(put, no_answer(), f"writing part {batch} of job {job} to {self.label}")

    def read(self, job: str) -> Iterator[bytes]:
        """The job's parts written so far, in batch order (`fleet results`)."""
        base = f"{self.prefix}{job}/part-"
        keys: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base
        ):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        for key in sorted(keys):
            body: bytes = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            yield body

    def finish(self, job: str, batches: int, items: int, errors: int) -> None:
        manifest = {
            "job": job,
            "parts": [self.part_key(job, b).rsplit("/", 1)[-1] for b in range(batches)],
            "items": items,
            "errors": errors,
        }
        self.s3.put_object(
            Bucket=self.bucket,
            Key=f"{self.prefix}{job}/_manifest.json",
            Body=json.dumps(manifest, indent=1).encode(),
            ContentType="application/json",
        )
