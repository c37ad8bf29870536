"""The result store on S3: one object per batch, keyed by job and batch.

The stack's default (with the SQS broker): nothing to pay while idle, IAM
authentication, no server inside the VPC. Same contract as the Redis store:

- commit is first-writer-wins through a conditional put (If-None-Match: *),
  so a batch that runs twice is stored once;
- results stay until the bucket's lifecycle rule expires them, so a worker
  can tell a redelivered, finished batch by the object alone;
- leases and worker registrations are small objects whose LastModified is
  the heartbeat (S3's clock, compared with a margin for clock skew).

Where S3 is slower than Redis (a listing per poll instead of a blocking pop),
batches take seconds, so one request a second is plenty.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

from app.settings import query_options, redact
from app.store.base import BatchResult, Done, Journal, StoreUnavailable, bit_is_set, set_bit

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder().decode
CLOCK_SLACK = 2.0  # seconds of disagreement tolerated between S3's clock and ours
POLL = 0.5
# Results a look at a job reads at most: what the launcher holds in memory at once. At
# 64 a look, and a look or two a second on S3, a few hundred batches a second.
NEW_PER_LOOK = 64
# Results fetched at once: one GET after another, at tens of milliseconds each, would hold
# a launcher to a few dozen batches a second, whatever the fleet (docs/scale.md).
FETCHERS = 16
# What S3 says when IAM or the bucket policy refuses a request (a HEAD has no body: "403").
FORBIDDEN = ("AccessDenied", "Forbidden", "403")
# What S3 says when a conditional put (If-None-Match: *) finds the key written already.
CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict")


def s3_location(url: str, region: str | None = None) -> tuple[Any, str, str]:
    """(boto3 client, bucket, prefix: "" or ending in /) of s3://BUCKET/PREFIX, whose query
    may name `region` (else the one given) and `endpoint_url`; the result store's and the
    S3 sink's."""
    import boto3
    import botocore.config

    parts = urlsplit(url)
    opts = query_options(url)
    prefix = parts.path.strip("/")
    client = boto3.client(
        "s3",
        region_name=opts.get("region") or region,
        endpoint_url=opts.get("endpoint_url"),
        config=botocore.config.Config(
            retries={"max_attempts": 10, "mode": "adaptive"},
            # The launcher fetches a look's new results FETCHERS at a time.
            max_pool_connections=FETCHERS,
        ),
    )
    return client, parts.hostname or "", f"{prefix}/" if prefix else ""


def no_answer() -> tuple[type[BaseException], ...]:
    """What a client raises once botocore's retries found no answer from S3."""
    import botocore.exceptions

    return (
        botocore.exceptions.ConnectionError,  # no route, refused, connect timeout
        botocore.exceptions.HTTPClientError,  # read timeout, connection closed
    )


class S3Store:
    def __init__(self, url: str, ttl: int = 7 * 24 * 3600, lease_seconds: float = 10.0) -> None:
        import botocore.exceptions

        self.url = url
        self.ttl = ttl
        self.lease_seconds = lease_seconds
        self.s3, self.bucket, self.prefix = s3_location(url)
        self._errors = botocore.exceptions
        self.connection_errors = no_answer()
        self._fetched: dict[tuple[str, int], bytes] = {}
        # Per job, the batches announced (`wait_done`) above `_low`, below which all are:
        # a look lists the results from `_low` on, not every result of the job so far.
        self._announced: dict[str, set[int]] = {}
        self._low: dict[str, int] = {}
        self._fetch: ThreadPoolExecutor | None = None  # made at the first look

    # -- plumbing ---------------------------------------------------------

    def _key(self, *parts: object) -> str:
        return self.prefix + "/".join(str(p) for p in parts)

    def _batch_key(self, job: str, batch: int) -> str:
        return self._key("jobs", job, "results", f"{batch:010d}")

    def _forbidden(self, exc: Exception, what: str) -> StoreUnavailable | None:
        """A clear StoreUnavailable for S3's 403 on `what`; None for any other error.

        S3 answers a GET or HEAD of a key that does not exist with 404 only to a
        caller allowed s3:ListBucket on the bucket, and with 403 to anyone
        else: without that permission every first look at a batch's result
        (not written yet) fails.
        """
        if not isinstance(exc, self._errors.ClientError):
            return None
        error, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
        if error.get("Code") not in FORBIDDEN and meta.get("HTTPStatusCode") != 403:
            return None
        return StoreUnavailable(
            f"the result store s3://{self.bucket}/{self.prefix} refused {what} (403 Forbidden). "
            "HeadBucket, and the 404 S3 gives for a key not written yet (a 403 otherwise), "
            f"need s3:ListBucket on arn:aws:s3:::{self.bucket} with no s3:prefix condition "
            "(neither request carries one); results need s3:GetObject, s3:PutObject and "
            f"s3:DeleteObject on arn:aws:s3:::{self.bucket}/{self.prefix}*. Grant them to "
            "this role or user; a stack's workers get them from infra/result_store.py "
            "(run `pulumi up`)."
        )

    def _get(self, key: str) -> bytes | None:
        try:
            body: bytes = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return body
        except self.s3.exceptions.NoSuchKey:
            return None
        except self._errors.ClientError as exc:
            forbidden = self._forbidden(exc, f"GetObject of {key}")
            if forbidden is not None:
                raise forbidden from exc
            raise

    def _exists(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key)
        except self._errors.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            forbidden = self._forbidden(exc, f"HeadObject of {key}")
            if forbidden is not None:
                raise forbidden from exc
            raise
        return True

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        return list(self._pages(prefix))

    def _fetcher(self) -> ThreadPoolExecutor:
        """Threads that fetch objects side by side (made at the first use)."""
        if self._fetch is None:
            self._fetch = ThreadPoolExecutor(FETCHERS, thread_name_prefix="s3-fetch")
        return self._fetch

    def _pages(self, prefix: str, start_after: str | None = None) -> Iterator[dict[str, Any]]:
        """The objects under prefix (after `start_after`), a page requested as it is needed."""
        after = {} if start_after is None else {"StartAfter": start_after}
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, **after
        ):
            yield from page.get("Contents", [])

    def _fresh(self, prefix: str, seconds: float) -> list[dict[str, Any]]:
        """Objects under prefix written less than `seconds` ago."""
        now = datetime.now(UTC).timestamp()
        return [
            o
            for o in self._list(prefix)
            if now - o["LastModified"].timestamp() <= seconds + CLOCK_SLACK
        ]

    def ping(self) -> None:
        """Reach the bucket, and check a missing key reads as missing (404, not 403).

        The second check is what every batch does first (is it committed?), so
        a role without s3:ListBucket fails here, once and clearly: the launcher
        stops before it sends anything, and a worker host never reports its
        worker online (`python -m app.boot wait` and `status` show why).
        """
        try:
            self.s3.head_bucket(Bucket=self.bucket)
            self._exists(self._key("ping", uuid.uuid4().hex))
        except StoreUnavailable:
            raise
        except Exception as exc:
            forbidden = self._forbidden(exc, "HeadBucket")
            if forbidden is not None:
                raise forbidden from None
            raise StoreUnavailable(
                f"cannot reach the result store at {redact(self.url)}: {exc}"
            ) from None

    # -- jobs -------------------------------------------------------------

    def put_meta(self, job: str, meta: dict[str, Any]) -> None:
        self.s3.put_object(
            Bucket=self.bucket, Key=self._key("jobs", job, "meta.json"), Body=_json.encode(meta)
        )

    def get_meta(self, job: str) -> dict[str, Any] | None:
        raw = self._get(self._key("jobs", job, "meta.json"))
        return None if raw is None else _decode(raw)

    def jobs(self) -> list[str]:
        """Every job with metadata, oldest first (a job's ID begins with its start time)."""
        base = self._key("jobs", "")
        names: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/"
        ):
            names.extend(
                p["Prefix"][len(base) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            )
        return [n for n in sorted(names) if self._exists(self._key("jobs", n, "meta.json"))]

    def put_input(self, job: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key("jobs", job, "input"), Body=data)

    def get_input(self, job: str) -> bytes | None:
        return self._get(self._key("jobs", job, "input"))

    def add_driven(self, queue: str, job: str) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key("driven", queue, job), Body=b"")

    def driven(self, queue: str) -> list[str]:
        base = self._key("driven", queue, "")
        return sorted(o["Key"][len(base) :] for o in self._list(base))

    def remove_driven(self, queue: str, job: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._key("driven", queue, job))

    def cancel(self, job: str) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key("jobs", job, "cancel"), Body=b"1")

    def is_cancelled(self, job: str) -> bool:
        return self._exists(self._key("jobs", job, "cancel"))

    # -- worker side ------------------------------------------------------

    def is_committed(self, job: str, batch: int) -> bool:
        return self._exists(self._batch_key(job, batch))

    def commit(self, job: str, done: Done, lines: bytes) -> bool:
        head = _json.encode(done) + b"\n"
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=self._batch_key(job, done.batch),
                Body=head + lines,
                IfNoneMatch="*",
            )
        except self._errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in CONDITION_FAILED:
                return False
            raise
        finally:
            self.drop_lease(job, done.batch)
        return True

    def announce(self, job: str, done: Done) -> None:
        self.s3.put_object(
            Bucket=self.bucket, Key=self._key("jobs", job, "refused"), Body=_json.encode(done)
        )

    def begin(self, job: str, batch: int, seconds: float) -> bool:
        if self.is_committed(job, batch) or self.is_cancelled(job):
            return False
        self.renew_leases([(job, batch)], seconds)
        return True

    def renew_leases(self, leases: Sequence[tuple[str, int]], seconds: float) -> None:
        # One PUT per lease: S3 has no request that writes several objects.
        for job, batch in leases:
            self.s3.put_object(Bucket=self.bucket, Key=self._key("leases", job, batch), Body=b"")

    def drop_lease(self, job: str, batch: int) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._key("leases", job, batch))

    def register_worker(self, name: str, info: dict[str, Any], seconds: float) -> None:
        self.s3.put_object(
            Bucket=self.bucket,
            Key=self._key("workers", name),
            Body=_json.encode(dict(info, lease=seconds)),
        )

    def unregister_worker(self, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._key("workers", name))

    def acquire_slot(self, name: str, holder: str, limit: int, seconds: float) -> bool:
        """Slot i of `name` is the object slots/<name>/<i>, made with a conditional put (the
        first maker holds it) and taken over once it is older than its lease. Two workers
        taking over the same stale slot at the same moment may both think they hold it:
        S3 offers no conditional delete here, so the bound can be passed by one, briefly."""
        for i in range(limit):
            key = self._key("slots", name, i)
            try:
                self.s3.put_object(
                    Bucket=self.bucket, Key=key, Body=holder.encode(), IfNoneMatch="*"
                )
                return True
            except self._errors.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in CONDITION_FAILED:
                    raise
            try:
                obj = self.s3.get_object(Bucket=self.bucket, Key=key)
            except self.s3.exceptions.NoSuchKey:
                continue  # released meanwhile: the next call may take it
            age = datetime.now(UTC).timestamp() - obj["LastModified"].timestamp()
            mine = obj["Body"].read() == holder.encode()
            if mine or age > seconds + CLOCK_SLACK:
                # Renewed (its own) or taken over (lapsed): its LastModified is the lease.
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=holder.encode())
                return True
        return False

    def release_slot(self, name: str, holder: str) -> None:
        for obj in self._list(self._key("slots", name, "")):
            if self._get(obj["Key"]) == holder.encode():
                self.s3.delete_object(Bucket=self.bucket, Key=obj["Key"])

    def slot_holders(self, name: str, seconds: float) -> list[str]:
        """The holders of `name`'s slots, leases of `seconds`, not lapsed (S3's clock)."""
        holders = []
        for obj in self._fresh(self._key("slots", name, ""), seconds):
            raw = self._get(obj["Key"])
            if raw is not None:
                holders.append(raw.decode())
        return holders

    # -- launcher side ----------------------------------------------------

    def _live_records(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """(key, record) of the JSON objects under prefix written within their own "lease"."""
        out = []
        objs = self._list(prefix)
        # Fetched side by side: a fleet of hundreds of hosts has as many heartbeats.
        for obj, raw in zip(
            objs, self._fetcher().map(self._get, [o["Key"] for o in objs]), strict=True
        ):
            if raw is None:
                continue
            info = _decode(raw)
            age = datetime.now(UTC).timestamp() - obj["LastModified"].timestamp()
            if age <= float(info.get("lease", 10)) + CLOCK_SLACK:
                out.append((obj["Key"], info))
        return out

    def workers(self) -> list[dict[str, Any]]:
        return [
            dict(info, name=key.rsplit("/", 1)[-1])
            for key, info in self._live_records(self._key("workers", ""))
        ]

    def busy_slots(self) -> set[str]:
        base = len(self._key("leases", ""))
        return {o["Key"][base:] for o in self._fresh(self._key("leases", ""), self.lease_seconds)}

    def advertise_backlog(self, queue: str, job: str, batches: int, seconds: float) -> None:
        key = self._key("backlog", queue, job)
        if batches > 0:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=_json.encode({"batches": batches, "lease": seconds}),
            )
        else:
            self.s3.delete_object(Bucket=self.bucket, Key=key)

    def backlog(self, queue: str) -> int:
        return sum(
            int(info.get("batches", 0))
            for _, info in self._live_records(self._key("backlog", queue, ""))
        )

    def wait_done(self, job: str, timeout: float) -> list[Done]:
        """Batches committed since the last call (fetched, so `results` costs nothing more)."""
        seen = self._announced.setdefault(job, set())
        deadline = time.monotonic() + timeout
        while True:
            refused = self._get(self._key("jobs", job, "refused"))
            if refused is not None:
                done = msgspec.convert(_decode(refused), Done)
                if done.later:
                    # Refused for now: said once. Two at once keep the later one; the other
                    # batch is found unstarted and sent again like any lost batch.
                    self.s3.delete_object(Bucket=self.bucket, Key=self._key("jobs", job, "refused"))
                return [done]
            new = self._announce(job, seen)
            if new or time.monotonic() >= deadline:
                return new
            time.sleep(POLL)

    def _announce(self, job: str, seen: set[int]) -> list[Done]:
        """Results not announced yet, at most NEW_PER_LOOK of them. Batches are sent in
        order and mostly end so: listed from the lowest one not announced, a look reads
        about the batches in flight, whatever the job's size."""
        low = self._low.get(job, 0)
        prefix = self._key("jobs", job, "results", "")
        after = self._batch_key(job, low - 1) if low else None
        keys: dict[int, str] = {}
        for obj in self._pages(prefix, start_after=after):
            batch = int(obj["Key"].rsplit("/", 1)[-1])
            if batch not in seen:
                keys[batch] = obj["Key"]
                if len(keys) >= NEW_PER_LOOK:  # bound what is held in memory
                    break
        new = []
        raws = self._fetcher().map(self._get, keys.values())
        for batch, raw in zip(keys, raws, strict=True):
            if raw is None:
                continue
            head, _, _ = raw.partition(b"\n")
            self._fetched[(job, batch)] = raw
            seen.add(batch)
            new.append(msgspec.convert(_decode(head), Done))
        self._raise_low(job, seen)
        return new

    def _raise_low(self, job: str, seen: set[int]) -> None:
        low = self._low.get(job, 0)
        while low in seen:
            seen.discard(low)
            low += 1
        self._low[job] = low

    def results(self, job: str, batches: list[int]) -> list[BatchResult | None]:
        out: list[BatchResult | None] = []
        for b in batches:
            raw = self._fetched.pop((job, b), None) or self._get(self._batch_key(job, b))
            if raw is None:
                out.append(None)
                continue
            cut = raw.index(b"\n")
            done = msgspec.convert(_decode(raw[:cut]), Done)
            out.append((done.items, done.errors, memoryview(raw)[cut + 1 :]))
        return out

    def mark_written(
        self,
        job: str,
        batches: list[int],
        offset: int | None,
        items: int,
        errors: int,
        keep: bool = False,
    ) -> None:
        """Results stay whatever `keep` says: the bucket's lifecycle rule expires them."""
        journal = self._journal(job)
        bits = bytearray(journal["written"])
        # As the Redis store's: counted only when some batch was not marked yet, so a
        # driver taken over by another counts no batch twice.
        fresh = [b for b in batches if not bit_is_set(bytes(bits), b)]
        for b in batches:
            set_bit(bits, b)
        if fresh:
            journal.update(items=journal["items"] + items, errors=journal["errors"] + errors)
        journal.update(written=bytes(bits))
        if offset is not None:
            journal["offset"] = offset
        body = dict(journal, written=base64.b64encode(journal["written"]).decode())
        self.s3.put_object(
            Bucket=self.bucket, Key=self._key("jobs", job, "journal.json"), Body=_json.encode(body)
        )

    def _journal(self, job: str) -> dict[str, Any]:
        raw = self._get(self._key("jobs", job, "journal.json"))
        if raw is None:
            return {"written": b"", "offset": None, "items": 0, "errors": 0}
        journal: dict[str, Any] = _decode(raw)
        journal["written"] = base64.b64decode(journal["written"])
        return journal

    def partials(self, job: str) -> dict[int, Any]:
        """Read from each committed batch's head (its Done): one GET per batch."""
        out: dict[int, Any] = {}
        for obj in self._list(self._key("jobs", job, "results", "")):
            raw = self._get(obj["Key"])
            if raw is None:
                continue
            done = msgspec.convert(_decode(raw.partition(b"\n")[0]), Done)
            if done.partial is not None:
                out[done.batch] = done.partial
        return out

    def journal(self, job: str) -> Journal:
        committed = bytearray()
        for obj in self._list(self._key("jobs", job, "results", "")):
            b = int(obj["Key"].rsplit("/", 1)[-1])
            set_bit(committed, b)
            # Known at the start: announced from now on are only later commits.
            self._announced.setdefault(job, set()).add(b)
        self._raise_low(job, self._announced.setdefault(job, set()))
        j = self._journal(job)
        return bytes(committed), j["written"], j["offset"], j["items"], j["errors"]
