"""How long a batch is aimed to run, by the fleet's size (app/launcher/plan.py)."""

from __future__ import annotations

import pytest

from app.launcher.plan import DRIVER_RATE, MAX_BATCH_RATE, batch_size


def size(slots: int, per_item: float = 0.001, total: int | None = None) -> int:
    return batch_size(per_item, 2.0, total, slots, max_batch_seconds=900)


@pytest.mark.parametrize("slots", [1, 16, 100, 400])
def test_a_small_fleet_gets_the_target(slots):
    assert size(slots) == 2000  # 2 s at 1 ms an ID


@pytest.mark.parametrize("slots", [1_000, 5_000, 20_000])
def test_a_large_fleet_asks_no_more_batches_a_second_than_one_driver_sustains(slots):
    seconds = size(slots) * 0.001
    assert seconds > 2.0
    assert slots / seconds == pytest.approx(MAX_BATCH_RATE, rel=0.01)


def test_the_tail_and_the_time_limit_still_bound_it():
    # Four batches per slot at least: 100 slots over 200,000 IDs -> 500 IDs, not 2 s.
    assert size(100, total=200_000) == 500
    # Unless that asks more of one driver than it sustains: 10,000 slots over 20 M IDs
    # would get 500 IDs, 0.5 s, 20,000 batches a second; they get 10 s, DRIVER_RATE.
    seconds = size(10_000, total=20_000_000) * 0.001
    assert 10_000 / seconds == pytest.approx(DRIVER_RATE, rel=0.01)
    # A quarter of the batch's hard limit at most, however large the fleet.
    assert size(1_000_000) * 0.001 == pytest.approx(900 / 4)
