"""SQS and S3 requests of a job on the stack's default broker and store, and their price.

Pure arithmetic, counted from the code (docs/scale.md): the launcher's dispatch loop
(app/launcher/dispatch.py), the batch task (app/worker/task.py), the heartbeat and the
drivers' poll (app/worker/heartbeat.py, drivers.py), the S3 store (app/store/s3.py), and
kombu 5.7's SQS transport with this kit's options: long polls of `wait_time_seconds`
(app/settings.py), kombu's `polling_interval` between polls, one message reserved per
pool process and acknowledged after its batch (app/celery_config.py). One worker per
host consumes, in its main process: the pool processes never call SQS. Nothing here
was measured against AWS. Prices come from scripts/prices.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kombu.transport import SQS

from app.celery_config import celery_config
from app.launcher.job import JobOptions
from app.launcher.plan import batch_size, in_flight_limit
from app.settings import LEASE_SECONDS, MESSAGE_LIMITS, Settings
from app.store.s3 import NEW_PER_LOOK, POLL
from app.worker.drivers import POLL_SECONDS
from scripts.cost import PRICES

_SETTINGS = Settings(broker_url="sqs://", result_url="s3://bucket")
WAIT_SECONDS: float = _SETTINGS.transport_options["wait_time_seconds"]  # type: ignore[assignment]
POLLING_INTERVAL: float = _SETTINGS.transport_options["polling_interval"]  # type: ignore[assignment]
RECEIVE_MOST = SQS.SQS_MAX_MESSAGES  # messages one ReceiveMessage asks for at most
PREFETCH = celery_config(_SETTINGS)["worker_prefetch_multiplier"]
# The heartbeat, the lease renewals and the watchdog's look all tick every lease / 3.
TICK = LEASE_SECONDS / 3
# AWS's quota of messages received and not deleted, per standard queue ("approximately").
SQS_IN_FLIGHT_LIMIT = 120_000
# kombu base64-encodes the body inside its JSON envelope, then the whole envelope again
# (sqs_base64_encoding): 4/3 x 4/3. Measured with this kit's Celery message and kombu 5.7
# (tests/unit/test_request_costs.py): the envelope adds 1,102 bytes, and a batch body is
# 124 bytes (a launcher's job ID, batch 123456, task process_id) plus each ID and its
# escaped newline.
SQS_GROWTH = 16 / 9
SQS_ENVELOPE_BYTES = 1_102
BODY_BYTES = 124
LIST_PAGE = 1_000  # keys per ListObjectsV2 page
# Seconds per ListObjectsV2 page of 1,000 keys: an estimate (tens of milliseconds within a
# region), not measured.
LIST_PAGE_SECONDS = 0.05


@dataclass(frozen=True)
class Job:
    """A job of `ids` IDs on `slots` worker slots, `cores` per host, in batches of `batch_ids`.

    `idle_seconds`: how long the fleet waits per job with nothing to run (boot, the
    scale-in delay, gaps between jobs), each host polling an empty queue meanwhile.
    """

    slots: int
    batch_ids: int
    ids: int = 1_000_000
    seconds_per_item: float = 0.05
    cores: int = 16
    idle_seconds: float = 0.0
    id_bytes: int = 8

    @property
    def batches(self) -> int:
        return math.ceil(self.ids / self.batch_ids)

    @property
    def batch_seconds(self) -> float:
        return self.batch_ids * self.seconds_per_item

    @property
    def job_seconds(self) -> float:
        """The job's busy time: its work over the slots."""
        return self.ids * self.seconds_per_item / self.slots

    @property
    def hosts(self) -> int:
        return math.ceil(self.slots / self.cores)

    @property
    def message_bytes(self) -> int:
        """The SQS MessageBody of one batch (its IDs sent as lines)."""
        body = BODY_BYTES + self.batch_ids * (self.id_bytes + 2)
        return math.ceil(body * SQS_GROWTH) + SQS_ENVELOPE_BYTES


def planned_job(slots: int, ids: int = 1_000_000, seconds_per_item: float = 0.05) -> Job:
    """The job with the batches the launcher would cut for it (app/launcher/plan.py)."""
    size = batch_size(
        seconds_per_item,
        JobOptions.target_seconds,
        ids,
        slots,
        max_batch_seconds=_SETTINGS.max_batch_seconds,
        message_limit=MESSAGE_LIMITS["sqs"],
    )
    return Job(slots, size, ids, seconds_per_item)


@dataclass(frozen=True)
class Count:
    request: str  # service:Action, as IAM names it
    who: str
    what: str
    n: float


def chunks(payload_bytes: float, chunk: int) -> int:
    """SQS bills each started chunk of a request's payload as one request."""
    return max(1, math.ceil(payload_bytes / chunk))


def messages_per_receive(job: Job) -> float:
    """Messages one ReceiveMessage brings, on average, while the host's slots are busy.

    With every slot busy the consumer asks nothing and looks again `polling_interval`
    later; then it asks for as many messages as slots came free meanwhile (cores x
    polling_interval / batch seconds on average), one at the least, ten at the most.
    """
    freed = job.cores * POLLING_INTERVAL / job.batch_seconds
    return min(max(1.0, freed), float(min(RECEIVE_MOST, job.cores)))


def per_batch(job: Job, chunk: int) -> list[Count]:
    """Requests each batch costs while the job runs (`chunk`: SQS's billing unit, bytes)."""
    per_receive = messages_per_receive(job)
    return [
        Count(
            "sqs:SendMessage", "launcher", "the batch's message", chunks(job.message_bytes, chunk)
        ),
        Count(
            "sqs:ReceiveMessage",
            "worker",
            f"{per_receive:.3g} messages a receive",
            chunks(per_receive * job.message_bytes, chunk) / per_receive,
        ),
        Count("sqs:DeleteMessage", "worker", "the ack, after the batch (acks_late)", 1),
        Count("sqs:ChangeMessageVisibility", "worker", "only a batch handed back", 0),
        Count("s3:HeadObject", "worker", "begin: committed? cancelled?", 2),
        Count(
            "s3:PutObject",
            "worker",
            "the lease, and its renewals every lease / 3",
            1 + job.batch_seconds / TICK,
        ),
        Count("s3:PutObject", "worker", "the commit (If-None-Match: *)", 1),
        Count("s3:DeleteObject", "worker", "the lease, after the commit", 1),
        Count("s3:GetObject", "launcher", "the committed result", 1),
        # At most one journal read and write per batch; one per dispatch.WRITE_CHUNK (8)
        # when batches arrive together.
        Count("s3:GetObject", "launcher", "the journal (mark_written)", 1),
        Count("s3:PutObject", "launcher", "the journal (mark_written)", 1),
    ]


def launcher_per_second(job: Job) -> list[Count]:
    """The launcher's requests a second of the job, whatever the batches: its checks once a
    second, and the workers' heartbeats, read every 2 s."""
    hosts = job.hosts
    return [
        Count("s3:PutObject", "launcher", "its hold on the job (conditional put, then put)", 2),
        Count("s3:GetObject", "launcher", "its hold on the job", 1),
        Count("s3:HeadObject", "launcher", "cancelled?", 1),
        Count("s3:PutObject", "launcher", "the held-back batches (advertise_backlog)", 1),
        Count("s3:ListObjectsV2", "launcher", "the leases (find_lost)", pages(job.slots)),
        Count("s3:ListObjectsV2", "launcher", "the heartbeats", pages(hosts) / 2),
        Count("s3:GetObject", "launcher", "each heartbeat", hosts / 2),
    ]


def hosts_per_second(job: Job) -> list[Count]:
    """The hosts' requests a second, busy or idle: heartbeats and the look for jobs."""
    return [
        Count("s3:PutObject", "workers", "heartbeats (every lease / 3)", job.hosts / TICK),
        Count("s3:ListObjectsV2", "workers", "jobs to drive", job.hosts / POLL_SECONDS["s3"]),
    ]


def idle_per_second(job: Job) -> list[Count]:
    """The hosts' requests a second while the fleet has nothing to run."""
    return [
        Count(
            "sqs:ReceiveMessage",
            "workers",
            "empty long polls (wait_time_seconds + polling_interval apart)",
            job.hosts / (WAIT_SECONDS + POLLING_INTERVAL),
        ),
        Count(
            "sqs:GetQueueAttributes",
            "workers",
            "the watchdog's look at the queue",
            job.hosts / TICK,
        ),
    ]


def pages(keys: float) -> int:
    return max(1, math.ceil(keys / LIST_PAGE))


def listing(job: Job) -> list[Count]:
    """The launcher's look for new results over the whole job (S3Store.wait_done).

    Each look lists the job's results from the lowest batch not announced yet
    (ListObjectsV2 with StartAfter, 1,000 keys a page, a page requested only while fewer
    than NEW_PER_LOOK new ones were found), and a look that finds none sleeps POLL
    seconds. While collection keeps up, the keys past that batch are mostly new ones, so a
    look reads one page; a batch far behind the others (sent again) makes the looks read
    the window of in_flight_limit(slots) after it until it ends. So the looks are at least
    batches / NEW_PER_LOOK and at least one per POLL, a page each: the requests grow with
    the batches, not with their square.
    """
    rounds = max(job.batches / NEW_PER_LOOK, job.job_seconds / POLL)
    return [
        Count("s3:ListObjectsV2", "launcher", "the results past the lowest not seen", rounds),
        Count("s3:GetObject", "launcher", "the refusal marker, each look", rounds),
    ]


def listing_seconds(job: Job, page_seconds: float = LIST_PAGE_SECONDS) -> float:
    """The launcher's time spent listing results over the job, one page after another."""
    pages = next(c.n for c in listing(job) if c.request == "s3:ListObjectsV2")
    return pages * page_seconds


def totals(job: Job, chunk: int) -> dict[str, float]:
    """Every request of the job (and of its idle time), by request."""
    out: dict[str, float] = {}
    parts = (
        (per_batch(job, chunk), job.batches),
        (launcher_per_second(job), job.job_seconds),
        (hosts_per_second(job), job.job_seconds + job.idle_seconds),
        (idle_per_second(job), job.idle_seconds),
        (listing(job), 1),
    )
    for counts, times in parts:
        for c in counts:
            out[c.request] = out.get(c.request, 0.0) + c.n * times
    return out


@dataclass(frozen=True)
class Bill:
    sqs: float
    s3: float
    ids: int

    @property
    def total(self) -> float:
        return self.sqs + self.s3

    @property
    def per_million_ids(self) -> float:
        return self.total / self.ids * 1e6


def bill(job: Job, prices: dict, region: str = "us-east-1") -> Bill:
    """What the job's requests cost at the list prices of `region`."""
    table = prices["regions"][region]
    if "sqs_request_million" not in table:
        raise KeyError(f"no request prices for {region} in {PRICES.name}")
    sqs = s3 = 0.0
    for request, n in totals(job, table["sqs_request_kb"] * 1024).items():
        service, action = request.split(":")
        if service == "sqs":
            sqs += n * table["sqs_request_million"] / 1e6
        elif action == "DeleteObject":
            s3 += n * table["s3_delete_thousand"] / 1e3
        elif action in ("PutObject", "ListObjectsV2"):
            s3 += n * table["s3_put_list_thousand"] / 1e3
        else:
            s3 += n * table["s3_get_thousand"] / 1e3
    return Bill(sqs, s3, job.ids)


@dataclass(frozen=True)
class InFlight:
    """Messages of one queue at once: received and not deleted (SQS's in-flight quota) and
    sent and not collected (the launcher's window, on the broker or received)."""

    slots: int

    @property
    def received(self) -> int:
        # A worker reserves PREFETCH messages per pool process and, acks_late, deletes each
        # only once its batch ends: they stay in flight for the whole batch.
        return PREFETCH * self.slots

    @property
    def window(self) -> int:
        return in_flight_limit(self.slots)

    @property
    def over_limit(self) -> bool:
        return self.received >= SQS_IN_FLIGHT_LIMIT


def slots_at_in_flight_limit() -> int:
    """The fewest slots on one queue whose reserved messages reach SQS's in-flight quota."""
    return math.ceil(SQS_IN_FLIGHT_LIMIT / PREFETCH)
