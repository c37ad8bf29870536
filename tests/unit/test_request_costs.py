"""SQS and S3 requests per batch and their cost (scripts/request_costs.py)."""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

import pytest
from kombu.transport.SQS import Channel
from kombu.utils.uuid import uuid

from app.celery_config import make_app
from app.launcher.job import new_job_id
from app.launcher.launcher import Launcher
from app.launcher.plan import BATCHES_PER_SLOT, DRIVER_RATE, MAX_BATCH_RATE
from app.settings import Settings
from scripts import request_costs as rc
from scripts.cost import load_prices
from scripts.request_costs import Job, bill, planned_job, totals

PRICES = load_prices()
US = PRICES["regions"]["us-east-1"]
CHUNK = US["sqs_request_kb"] * 1024


def per_batch(job: Job) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in rc.per_batch(job, CHUNK):
        out[c.request] = out.get(c.request, 0.0) + c.n
    return out


def test_request_prices_are_in_the_dated_table():
    assert PRICES["date"]
    assert US["sqs_request_million"] == 0.4 and US["sqs_request_kb"] == 64
    assert (US["s3_put_list_thousand"], US["s3_get_thousand"]) == (0.005, 0.0004)
    assert US["s3_delete_thousand"] == 0.0
    with pytest.raises(KeyError, match="no request prices for eu-west-1"):
        bill(planned_job(1000), PRICES, "eu-west-1")


def test_the_message_size_is_what_kombu_sends():
    """The launcher's body, through Celery and kombu's SQS channel, as SendMessage gets it."""
    settings = Settings(
        broker_url="sqs://",
        result_url="s3://bucket",
        sqs_queue_url="https://sqs.us-east-1.amazonaws.com/123456789012/fleet",
        aws_region="us-east-1",
    )
    app = make_app(settings)
    sqs = mock.Mock()
    sqs.get_queue_attributes.return_value = {"Attributes": {"ApproximateNumberOfMessages": "0"}}
    job = new_job_id()
    with mock.patch.object(Channel, "sqs", lambda self, queue=None: sqs):
        for ids in (1, 100, 10_000):
            body = Launcher.encode(mock.Mock(), job, 123456, "process_id", ["12345678"] * ids)
            message = app.amqp.create_task_message(
                uuid(), "fleet.batch", (), {}, argsrepr=f"[{job!r}, 123456, ...]"
            )._replace(body=body)
            with app.producer_or_acquire() as producer:
                app.amqp.send_task_message(
                    producer,
                    "fleet.batch",
                    message,
                    queue=settings.queue,
                    content_type="application/json",
                    content_encoding="utf-8",
                )
            sent = sqs.send_message.call_args.kwargs["MessageBody"]
            assert len(sent) == pytest.approx(Job(1, ids).message_bytes, abs=8), ids


def test_a_batch_costs_a_send_a_delete_and_a_share_of_a_receive():
    job = planned_job(1000)
    counts = per_batch(job)
    assert counts["sqs:SendMessage"] == 1 and counts["sqs:DeleteMessage"] == 1
    assert counts["sqs:ChangeMessageVisibility"] == 0
    # A host's slots come free cores x polling_interval / batch seconds at a time.
    freed = job.cores * rc.POLLING_INTERVAL / job.batch_seconds
    assert counts["sqs:ReceiveMessage"] == pytest.approx(1 / min(max(1, freed), 10))
    # Long batches: one slot at a time, one receive per batch.
    assert per_batch(replace(job, batch_ids=2_000))["sqs:ReceiveMessage"] == 1
    # Short ones: ten messages a receive at the most.
    assert per_batch(replace(job, batch_ids=1))["sqs:ReceiveMessage"] == pytest.approx(0.1)


def test_a_message_over_64_kb_costs_a_request_per_chunk():
    big = Job(1000, 10_000)  # 10,000 IDs: about 180 KB once kombu has encoded them
    assert 2 * CHUNK < big.message_bytes <= 3 * CHUNK
    counts = per_batch(big)
    assert counts["sqs:SendMessage"] == 3
    assert counts["sqs:ReceiveMessage"] == 3  # one message a receive, three chunks


def test_lease_renewals_are_per_second_of_work():
    """A PUT at the start and one each lease / 3 while the batch runs."""
    short, long = Job(1000, 100), Job(1000, 1000)
    extra = per_batch(long)["s3:PutObject"] - per_batch(short)["s3:PutObject"]
    assert extra == pytest.approx((long.batch_seconds - short.batch_seconds) / rc.TICK)


def test_cost_per_million_ids_falls_as_batches_grow():
    previous = None
    for size in (25, 100, 1000):
        cost = bill(Job(1000, size), PRICES)
        if previous is not None:
            assert cost.sqs < previous.sqs and cost.per_million_ids < previous.per_million_ids
        previous = cost


def test_sqs_cost_is_its_requests_at_the_list_price():
    job = planned_job(1000)
    requests = sum(n for r, n in totals(job, CHUNK).items() if r.startswith("sqs:"))
    assert bill(job, PRICES).sqs == pytest.approx(requests * US["sqs_request_million"] / 1e6)
    # Send, receive (shared by the messages one brings) and delete: 3 requests a batch at most.
    assert job.batches * 2 < requests <= job.batches * 3


def test_idle_receives_scale_with_idle_hosts_and_time():
    """One empty long poll per idle host each wait_time_seconds + polling_interval."""
    busy = Job(1024, 100)  # 64 hosts of 16 slots
    hour = replace(busy, idle_seconds=3600)
    extra = totals(hour, CHUNK)["sqs:ReceiveMessage"] - totals(busy, CHUNK)["sqs:ReceiveMessage"]
    assert extra == pytest.approx(busy.hosts * 3600 / (rc.WAIT_SECONDS + rc.POLLING_INTERVAL))
    bigger = replace(hour, slots=2 * busy.slots)
    more = (
        totals(bigger, CHUNK)["sqs:ReceiveMessage"]
        - totals(replace(bigger, idle_seconds=0), CHUNK)["sqs:ReceiveMessage"]
    )
    assert more == pytest.approx(2 * extra)
    assert bill(hour, PRICES).total > bill(busy, PRICES).total


def test_the_launchers_listing_grows_with_the_batches_not_their_square():
    one = planned_job(1000, 10_000_000)
    two = replace(one, ids=2 * one.ids)
    lists = [totals(j, CHUNK)["s3:ListObjectsV2"] for j in (one, two)]
    assert 1.8 < lists[1] / lists[0] < 2.2
    assert rc.listing_seconds(two) == pytest.approx(2 * rc.listing_seconds(one), rel=0.1)


def test_planned_batches_follow_the_plan():
    for slots in (1000, 10_000):
        long_job = planned_job(slots, 100_000_000)
        assert long_job.batch_seconds >= slots / MAX_BATCH_RATE
    # A job too small for that: more batches per slot (BATCHES_PER_SLOT) win, as long as
    # one driver sustains them.
    small = planned_job(1_000, 200_000)
    assert small.batches >= BATCHES_PER_SLOT * small.slots
    assert small.batch_seconds < small.slots / MAX_BATCH_RATE
    # 1 M IDs on 10,000 slots: not 40,000 batches at 8,000 a second, DRIVER_RATE at most.
    tiny = planned_job(10_000, 1_000_000)
    assert tiny.slots / tiny.batch_seconds <= DRIVER_RATE * 1.01


def test_in_flight_messages_are_the_reserved_ones():
    assert rc.PREFETCH == 1  # one message per pool process (app/celery_config.py)
    flight = rc.InFlight(10_000)
    assert flight.received == 10_000 and flight.window == 20_000
    assert not flight.over_limit
    at = rc.slots_at_in_flight_limit()
    assert at == rc.SQS_IN_FLIGHT_LIMIT
    assert rc.InFlight(at).over_limit and not rc.InFlight(at - 1).over_limit
