"""What tests/faults/test_watchdog.py's fleets load (--include) to test the watchdog.

`fleet_test_block`, a remote-control command, runs in the worker's main
thread, the consumer's event loop, and sleeps there: the process stays up,
its heartbeat thread keeps beating, and it takes no message, acknowledges
nothing and answers no other command, as a worker blocked on a half-open
socket does. `nap` holds a pool slot for a given time whatever the load on
the machine.
"""

import logging
import time

from celery.worker.control import control_command

from app.registry import fleet_task

log = logging.getLogger(__name__)


@control_command(args=[("seconds", float)], signature="<seconds>")
def fleet_test_block(state, seconds: float = 300.0) -> dict:
    log.warning("blocking the main thread for %s s", seconds)
    time.sleep(float(seconds))
    return {"ok": "unblocked"}


@fleet_task
def nap(item):
    """Sleep `item` milliseconds, then return it."""
    time.sleep(int(item) / 1000)
    return item
