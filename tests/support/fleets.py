"""A local fleet between tests: bring it back after a fault, and let it go quiet."""

from __future__ import annotations

import time

from app.queue_depth import ready_count
from app.store import open_store
from scripts.local.fleet import LocalFleet

# The tasks every test fleet loads (FLEET_INCLUDE): @fleet_task functions and shared
# Celery tasks, and plain Celery tasks on `from app import celery_app`.
TASKS = ("tests.support.fleet_tasks", "tests.support.app_tasks")


def restore(fleet: LocalFleet, timeout: float = 60) -> None:
    """The fleet's own broker running (where it has one) and every instance consuming."""
    if fleet.broker is not None and (
        fleet.broker.proc is None or fleet.broker.proc.poll() is not None
    ):
        fleet.broker.start()
    fleet.supervise()
    for inst in fleet.instances:
        if inst.proc is None:
            fleet.start_instance(inst)
    assert fleet.settings is not None
    store = open_store(fleet.settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = {w.get("pid") for w in store.workers()}
        if all(inst.proc is not None and inst.proc.pid in live for inst in fleet.instances):
            return
        time.sleep(0.1)
    raise AssertionError(f"the fleet's workers did not come back; logs in {fleet.workdir}")


def settle(fleet: LocalFleet, timeout: float = 30) -> None:
    """Every instance consuming, nothing ready on the queue, no batch running or taken.

    Copies of batches left by a test (re-sent by its launcher, or the other
    probes of a refused job) would otherwise reach the next test; and a worker
    stopped while a task's result is on its way keeps a pool process waiting
    30 s at exit (billiard).
    """
    restore(fleet)
    assert fleet.settings is not None
    store = open_store(fleet.settings)
    ready = ready_count(fleet.settings)
    deadline = time.monotonic() + timeout
    quiet = 0
    try:
        while quiet < 3:
            assert time.monotonic() < deadline, f"the fleet did not settle; logs in {fleet.workdir}"
            taken = sum(int(w.get("reserved") or 0) for w in store.workers())
            idle = not ready.ready() and not store.busy_slots() and not taken
            quiet = quiet + 1 if idle else 0
            time.sleep(0.2)
    finally:
        ready.close()
