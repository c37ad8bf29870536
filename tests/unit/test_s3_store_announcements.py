"""The S3 result store's launcher side reads about the batches in flight per look, not the
whole job so far (moto's S3, in process).

Each look lists the job's results from the lowest batch not announced yet: a job of many
batches, collected as it goes, lists each result about once. Listing every result of the
job at every look made collection quadratic in the job's size (docs/scale.md).
"""

from __future__ import annotations

import threading
import time

import boto3
import pytest
from moto import mock_aws

from app.store.base import Done, bit_is_set
from app.store.s3 import FETCHERS, NEW_PER_LOOK, S3Store

JOB = "j-s3-announce"


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="results")
        store = S3Store("s3://results/fleet/")
        listed: list[int] = []
        store.s3.meta.events.register(
            "after-call.s3.ListObjectsV2",
            lambda parsed, **_: listed.append(int(parsed.get("KeyCount", 0))),
        )
        store.listed = listed  # type: ignore[attr-defined]
        yield store


def commit(store: S3Store, batches) -> None:
    for b in batches:
        store.commit(JOB, Done(b, 1, 0, 0.01, "w"), b'{"id": %d, "result": 0}\n' % b)


def collect(store: S3Store, want: int) -> list[int]:
    got: list[int] = []
    while len(got) < want:
        dones = store.wait_done(JOB, timeout=0.01)
        assert dones, f"{want - len(got)} committed batches were not announced"
        got.extend(d.batch for d in dones)
    return got


def test_a_growing_job_lists_each_result_about_once(store):
    rounds, per_round = 12, 20
    announced: list[int] = []
    for r in range(rounds):
        commit(store, range(r * per_round, (r + 1) * per_round))
        announced += collect(store, per_round)
    n = rounds * per_round
    assert sorted(announced) == list(range(n)), "each batch announced once"
    assert store.wait_done(JOB, timeout=0.01) == []
    # Listing the whole job at every look would read n * (rounds + 1) / 2 keys (1,560).
    assert sum(store.listed) <= 2 * n, store.listed


def test_a_batch_that_ends_late_is_announced_and_the_looks_move_on(store):
    # Batch 0 is slow (or sent again): the ones after it are announced as they come.
    commit(store, range(1, 41))
    assert sorted(collect(store, 40)) == list(range(1, 41))
    commit(store, [0])
    assert collect(store, 1) == [0]
    commit(store, range(41, 61))
    assert sorted(collect(store, 20)) == list(range(41, 61))
    # Once 0 is in, a look starts after 40: only the 20 new ones are listed.
    assert store.listed[-1] <= 20 + 1


def test_a_look_reads_at_most_new_per_look_results(store):
    commit(store, range(NEW_PER_LOOK + 10))
    first = store.wait_done(JOB, timeout=0.01)
    assert len(first) == NEW_PER_LOOK
    rest = store.wait_done(JOB, timeout=0.01)
    assert sorted(d.batch for d in first + rest) == list(range(NEW_PER_LOOK + 10))


def test_a_new_launcher_announces_only_what_commits_after_its_journal(store):
    commit(store, range(30))
    collect(store, 30)
    again = S3Store("s3://results/fleet/")  # a driver that takes the job over
    committed = again.journal(JOB)[0]
    assert all(bit_is_set(committed, b) for b in range(30))
    assert again.wait_done(JOB, timeout=0.01) == []
    commit(again, range(30, 35))
    assert sorted(collect(again, 5)) == list(range(30, 35))


def concurrent_gets(store: S3Store) -> list[int]:
    """[the most GETs in flight at once], counted from here on."""
    lock = threading.Lock()
    now, most = [0], [0]

    def before(**_):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.02)  # a GET's round trip, long enough for the others to start

    def after(**_):
        with lock:
            now[0] -= 1

    store.s3.meta.events.register("before-call.s3.GetObject", before)
    store.s3.meta.events.register("after-call.s3.GetObject", after)
    return most


def test_a_looks_results_are_fetched_side_by_side(store):
    """One GET after another would hold the launcher to 1 / (a GET's latency) batches a
    second; a look's new results are fetched FETCHERS at a time."""
    commit(store, range(40))
    most = concurrent_gets(store)
    assert sorted(collect(store, 40)) == list(range(40))
    assert 1 < most[0] <= FETCHERS


def test_heartbeats_are_read_side_by_side(store):
    for i in range(40):
        store.register_worker(f"w{i}", {"concurrency": 16}, 10.0)
    most = concurrent_gets(store)
    assert sorted(w["name"] for w in store.workers()) == sorted(f"w{i}" for i in range(40))
    assert 1 < most[0] <= FETCHERS
