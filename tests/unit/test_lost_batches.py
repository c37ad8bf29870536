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

    def send(self, job: str, batch: int, body: bytes) -> None:
        self.sent.append(batch)


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
