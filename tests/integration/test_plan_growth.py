"""A job whose batches grow mid-run (the fleet grew) is written exactly once, and its record
holds the plan it was cut by (real workers, both brokers).

The rule that decides to grow needs hundreds of slots (batches of at least slots / 200
seconds); here it is replaced by one that asks for twice the size once, so the launcher's
part is tested on a fleet of two slots: the new size holds from the next batch cut, the
plan is kept with the job before any batch of that size is sent, and the count of
batches follows.
"""

from __future__ import annotations

import pytest

import app.launcher.dispatch as dispatch
from app.launcher.plan import BatchPlan
from app.store import open_store
from tests.support.checker import exactly_once
from tests.support.jobs import run_job

pytestmark = pytest.mark.timeout(120)


def test_batches_that_grow_mid_job_are_written_once(fleet, tmp_path, monkeypatch):
    asked = []

    def twice_once(plan, per_item, target, slots, *, max_batch_seconds):
        asked.append(slots)
        return 2 * plan.size_at(plan.cut) if len(asked) == 1 else None

    monkeypatch.setattr(dispatch, "grown_size", twice_once)
    out = tmp_path / "out.jsonl"
    n = 600
    # 20 ms items in batches of 0.2 s: 10 IDs, about 60 batches on two slots.
    summary = run_job(fleet, "slow", f"range:0:{n}", out, target_seconds=0.2)
    records = exactly_once(out, list(range(n)))
    assert all(r["result"] == 2 * i for i, r in records.items())
    assert (summary.status, summary.items) == ("ok", n)
    meta = open_store(fleet.settings).get_meta(summary.job)
    assert meta is not None
    # Its first run (a resume or a driver taking over does not grow: it cannot know every
    # batch an earlier run sent).
    assert meta["runs"] == 1
    plan = BatchPlan.from_meta(meta["layout"], n)
    assert len(plan.steps) == 1, meta["layout"]
    first, size = plan.steps[0]
    assert size == 2 * plan.size
    assert summary.batches == plan.count()
    # The batches cut from the step on are the new size (the last wave finer), and the
    # plan read back cuts the IDs into exactly the batches that ran.
    sizes = []
    left, cut = n, plan.sizes()
    while left > 0:
        sizes.append(min(next(cut), left))
        left -= sizes[-1]
    assert len(sizes) == summary.batches
    assert sizes[first] == size
