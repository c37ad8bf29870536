"""A job's batches grow with the fleet (BatchPlan.grow), and the plan still cuts the same.

Calibrated on the slots of an empty fleet's first instance, a job would keep its first
size however far the fleet grows, and ask one launcher for slots / target batches a
second. `grow` makes the batches cut from then on larger; the steps are kept with the
job, so a resumed job (or a driver that takes it over) cuts its IDs the same way, and
`count` knows the new number of batches.
"""

from __future__ import annotations

import itertools
import random

import pytest

from app.launcher.plan import GROWTH, MAX_BATCH_RATE, BatchPlan, grown_size


def cut(plan: BatchPlan, total: int, grow_at: dict[int, int] | None = None) -> list[int]:
    """The batch sizes of a job of `total` IDs; at batch k (a key of grow_at), grow."""
    out: list[int] = []
    left = total
    sizes = plan.sizes()
    while left > 0:
        if grow_at and len(out) in grow_at:
            plan.grow(grow_at[len(out)])
        n = min(next(sizes), left)
        out.append(n)
        left -= n
    return out


@pytest.mark.parametrize("seed", range(40))
def test_the_sizes_cover_the_total_and_count_counts_them(seed):
    rng = random.Random(seed)
    total = rng.randint(1, 200_000)
    probe = tuple(1 for _ in range(rng.randint(0, 5)))
    plan = BatchPlan(probe, rng.randint(1, 500), total, tail=rng.choice([0, 1, 4, 64]))
    grows = {}
    k, size = len(probe) + rng.randint(0, 50), plan.size
    for _ in range(rng.randint(0, 3)):
        size = int(size * rng.uniform(GROWTH, 4)) + 1
        grows[k] = size
        k += rng.randint(1, 200)
    sizes = cut(plan, total, grows)
    assert sum(sizes) == total
    assert plan.count() == len(sizes)
    # The same plan read back from the job's record cuts the same, without growing.
    again = BatchPlan.from_meta(plan.as_meta(), total)
    assert cut(again, total) == sizes
    assert again.count() == len(sizes)


def test_growth_holds_from_the_next_batch_and_never_in_the_last_wave():
    plan = BatchPlan((1, 1), 10, 1_000, tail=4)
    sizes = plan.sizes()
    first = [next(sizes) for _ in range(5)]  # probes, then three of 10
    assert first == [1, 1, 10, 10, 10]
    assert plan.grow(40)
    assert plan.steps == [(5, 40)]
    assert next(sizes) == 40
    assert not plan.grow(40)  # no larger
    rest = list(itertools.takewhile(lambda n: n > 0, (next(sizes) for _ in range(100))))
    assert plan.in_tail
    assert not plan.grow(400)  # the last wave is cut finer, as it began
    assert sum(first) + 40 + sum(rest[: plan.count() - 6]) == 1_000


def test_a_fixed_size_or_a_stream_does_not_grow():
    fixed = BatchPlan((), 100, 10_000)  # --batch-size 100: no last wave, the user's size
    sizes = fixed.sizes()
    next(sizes)
    assert not fixed.grow(1_000)
    stream = BatchPlan((1,), 100, None)
    sizes = stream.sizes()
    next(sizes), next(sizes)
    assert not stream.grow(1_000)


def test_the_grown_size_follows_the_rate_rule_for_the_slots_online():
    plan = BatchPlan((1,), 40, 10**9, tail=16, most=1_000)  # 2 s at 50 ms an item
    per_item, target = 0.05, 2.0
    # 400 slots at 2 s a batch are MAX_BATCH_RATE a second: nothing to do.
    assert grown_size(plan, per_item, target, 400, max_batch_seconds=900) is None
    # 4,000 slots: batches of 4,000 / 200 = 20 s, 400 IDs.
    size = grown_size(plan, per_item, target, 4_000, max_batch_seconds=900)
    assert size == pytest.approx(4_000 / MAX_BATCH_RATE / per_item, rel=0.01)
    # Never past the message's limit (2,000 by the rate rule at 20,000 slots).
    assert grown_size(plan, per_item, target, 20_000, max_batch_seconds=900) == 1_000
    # A little more is not worth a change.
    assert grown_size(plan, per_item, target, int(400 * GROWTH) - 10, max_batch_seconds=900) is None
