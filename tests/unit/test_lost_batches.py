"""Which batches the dispatch loop sends again: a batch waiting its turn never is."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from app.launcher.dispatch import Dispatch, InFlight
from app.launcher.job import JobOptions
from app.launcher.output import Progress

JOB = "j1"


class FakeLauncher:
    """Two worker slots; the store's leases and the workers' heartbeats as the test sets them."""

    def __init__(self, running: set[int], active: list[int]) -> None:
        self.settings = SimpleNamespace(lease_seconds=10.0)
        self.store = SimpleNamespace(busy_slots=lambda: {f"{JOB}/{b}" for b in running})
        self.active = active
        self.sent: list[int] = []

    def slots(self) -> int:
        return len(self.active)

    def idle_slots(self) -> int:
        return sum(1 - a for a in self.active)

    def send_many(self, job: str, batches: list[tuple[int, bytes]]) -> None:
        self.sent.extend(batch for batch, _ in batches)


def dispatch(launcher: FakeLauncher) -> Dispatch:
    run = Dispatch(launcher, JOB, "t", JobOptions(), io.BytesIO(), None, Progress(0, 0))  # type: ignore[arg-type]
    # Batch 1 runs; 2 and 3 wait on the broker behind it.
    run.inflight = {b: InFlight(b"x", 0.0) for b in (1, 2, 3)}
    return run


@pytest.mark.parametrize(
    ("active", "resent"),
    [
        # Both workers say they run a batch; the leases show one, as they do just after the
        # other announced a batch done and before it started the next: nothing is lost.
        ([1, 1], []),
        # A worker says it runs nothing while batches wait: one is sent again.
        ([1, 0], [2]),
    ],
)
def test_unstarted_batches_are_sent_again_only_beside_a_slot_that_is_really_idle(active, resent):
    launcher = FakeLauncher(running={1}, active=active)
    run = dispatch(launcher)
    for now in (1.0, 6.0, 11.5, 12.0):  # longer than a lease, one look a few seconds
        run.find_lost(now)
    assert launcher.sent == resent
    assert run.resent == len(resent)


def test_a_batch_sent_less_than_a_lease_ago_is_not_sent_again_beside_idle_slots():
    """Slots idle for a lease (a worker's main loop that falls behind, on a loaded host),
    but 2 and 3 were sent only a moment ago: waiting their turn, not lost."""
    launcher = FakeLauncher(running={1}, active=[1, 0])
    run = dispatch(launcher)
    for b in (2, 3):
        run.inflight[b].sent_at = 10.0
    for now in (1.0, 6.0, 11.5, 12.0):
        run.find_lost(now)
    assert launcher.sent == []
    # Still unstarted a lease after they were sent, beside a slot still idle: one goes again.
    for now in (16.0, 21.0, 22.5):
        run.find_lost(now)
    assert launcher.sent == [2]


def test_lost_batches_are_sent_again_a_few_at_a_time():
    """Ten batches whose leases all lapsed at once (a burst: a host gone): a quarter of the
    slots' worth, at least two, per check, not all ten on the broker in one go."""
    launcher = FakeLauncher(running=set(range(10)), active=[1, 1, 1, 1])
    run = dispatch(launcher)
    run.inflight = {b: InFlight(b"x", 0.0) for b in range(10)}
    run.find_lost(1.0)  # all seen running
    launcher.store.busy_slots = lambda: set()
    run.find_lost(12.0)  # a lease later: all lapsed
    assert launcher.sent == [0, 1]
    run.find_lost(13.0)
    assert launcher.sent == [0, 1, 2, 3]


def test_no_batch_is_called_lost_while_the_store_falls_behind():
    """A store call came back late: its workers' renewals were held up too, so leases that
    look lapsed are not called lost until the store has answered in time for a lease."""
    launcher = FakeLauncher(running={1, 2}, active=[1, 1])
    run = dispatch(launcher)
    run.find_lost(1.0)
    launcher.store.busy_slots = lambda: set()
    run.note_stall(late=8.0, now=11.0)  # a call that took 8 s past its due
    for now in (12.0, 20.0, 28.0):
        run.find_lost(now)
    assert launcher.sent == [] and run.stalls == 3
    run.find_lost(30.0)  # the store answered in time for a lease: now they are lost
    assert sorted(launcher.sent) == [1, 2]
