"""The watchdog's stuck rule (app/worker/watchdog.py) step by step, with a hand-driven clock.

The rule on real workers is in tests/faults/test_watchdog.py.
"""

from __future__ import annotations

from app.settings import Settings
from app.worker.watchdog import ConsumerActivity, Liveness, Watchdog, grace_seconds
from tests.support.wait import FakeClock


def test_rule_counts_only_an_unbroken_stretch_of_waiting_work():
    clock, depth = FakeClock(), [5]
    dog = Watchdog(10.0, lambda: depth[0], clock)
    assert dog.check(0, 0, 2) is None  # the first check only takes the counts
    clock.now = 1.0
    assert dog.check(0, 0, 2) is None  # the clock starts here
    clock.now = 10.9
    assert dog.check(0, 0, 2) is None
    clock.now = 11.0
    assert dog.check(0, 0, 2) == 10.0  # stuck: a free slot, work waiting, nothing taken
    # A message taken restarts the clock.
    clock.now = 12.0
    assert dog.check(1, 0, 2) is None
    clock.now = 21.0
    assert dog.check(1, 0, 2) is None
    clock.now = 30.0
    assert dog.check(1, 0, 2) is None
    # All slots busy, event loop turning: not stuck, however long the queue.
    for t in range(31, 100, 3):
        clock.now = t
        assert dog.check(1, 2, 2, turns=t) is None
    # All slots busy by the count, but the loop that keeps the count is not
    # turning: it could not take a message if it had a slot, so it is stuck.
    clock.now = 100.0
    assert dog.check(1, 2, 2, turns=7) is None
    clock.now = 103.0
    assert dog.check(1, 2, 2, turns=7) is None  # stalled: the clock starts
    clock.now = 113.0
    assert dog.check(1, 2, 2, turns=7) == 10.0 and dog.loop_stalled
    # An empty queue, or one the broker will not count, is no work waiting.
    for ready in (lambda: 0, lambda: 1 // 0):
        dog = Watchdog(10.0, ready, clock)
        for t in range(200, 300, 5):
            clock.now = t
            assert dog.check(0, 0, 2) is None


def test_grace_defaults_to_three_leases_and_at_least_30_s():
    settings = Settings("redis://h:1/0", "redis://h:1/1")
    assert grace_seconds(settings, {}) == 30.0
    assert grace_seconds(Settings("redis://h:1/0", "redis://h:1/1", lease_seconds=20), {}) == 60
    assert grace_seconds(settings, {"FLEET_WATCHDOG_SECONDS": "4.5"}) == 4.5
    assert grace_seconds(settings, {"FLEET_WATCHDOG_SECONDS": "0"}) is None  # off
    assert grace_seconds(settings, {"FLEET_WATCHDOG_SECONDS": "soon"}) == 30.0


def test_a_batch_held_and_never_started_is_stuck_whatever_the_queue():
    clock = FakeClock()
    # An empty queue: the starving rule alone would never fire.
    dog = Watchdog(10.0, lambda: 0, clock)
    assert dog.holding(1, 0, 1, accepted=5) is None  # the first check only takes the counts
    clock.now = 1.0
    assert dog.holding(1, 0, 1, accepted=5) is None  # held, none started: the clock starts
    clock.now = 10.9
    assert dog.holding(1, 0, 1, accepted=5) is None
    clock.now = 11.0
    assert dog.holding(1, 0, 1, accepted=5) == 10.0
    # A batch started meanwhile restarts the clock: the pool hands batches out.
    clock.now = 12.0
    assert dog.holding(2, 1, 4, accepted=6) is None
    clock.now = 30.0
    assert dog.holding(2, 1, 4, accepted=6) is None
    # Every slot running: batches held behind them wait by design, however long.
    for t in range(31, 100, 3):
        clock.now = t
        assert dog.holding(2, 2, 2, accepted=8) is None
    # Nothing held beyond what runs: not stuck, however long the batches.
    for t in range(100, 200, 3):
        clock.now = t
        assert dog.holding(3, 3, 4, accepted=8) is None


def test_liveness_says_which_rule_fired(monkeypatch):
    settings = Settings("redis://h:1/0", "redis://h:1/1", queue="q")
    liveness = Liveness(settings, 1, None, 10.0)
    monkeypatch.setattr(liveness, "_ready", lambda: 0)
    clock = FakeClock()
    liveness.rule.clock = clock
    activity = ConsumerActivity()
    taken = {"reserved": 1, "active": 0, "accepted": 3}
    for t in (0.0, 1.0, 5.0):
        clock.now = t
        assert liveness.check(activity, taken) is None
    clock.now = 11.0
    reason = liveness.check(activity, taken)
    assert reason is not None
    assert "1 batch(es) taken but not started for 10.0 s while 1 pool slot(s) are free" in reason
