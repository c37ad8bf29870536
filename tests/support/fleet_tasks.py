"""Tasks the test fleets load with --include tests.fleet_tasks.

Behaviour is steered by the ID itself, so a test needs no shared state with
the workers: a poison ID always raises, a slow ID burns CPU for a while.
"""

import os
import tempfile
import time

from celery import shared_task

from app.registry import fleet_task


@fleet_task
def echo(item):
    return item


@fleet_task
def double(item):
    return int(item) * 2


@fleet_task
def poison(item):
    """Fails for every ID divisible by 7."""
    if int(item) % 7 == 0:
        raise ValueError(f"poison id {item}")
    return int(item) + 1


@fleet_task
def flaky(item):
    """For IDs "TOKEN:N": fails the first time it meets an N divisible by 7, then succeeds
    (a marker file per ID in the temporary directory remembers): a retry mends them."""
    token, _, n = str(item).partition(":")
    if int(n) % 7 == 0:
        marker = os.path.join(tempfile.gettempdir(), "fleet-flaky", f"{token}-{n}")
        if not os.path.exists(marker):
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "w").close()
            raise ValueError(f"flaky id {item}")
    return int(n) + 1


@fleet_task
def slow(item):
    """Busy for FLEET_TEST_ITEM_MS milliseconds of CPU (default 20), then the ID doubled."""
    end = time.perf_counter() + float(os.environ.get("FLEET_TEST_ITEM_MS", "20")) / 1000
    while time.perf_counter() < end:
        pass
    return int(item) * 2


@fleet_task
def paced(item):
    """Fails for every ID divisible by 7 (as poison does); every 500th ID naps 50 ms, so a
    job of many IDs lasts long enough to kill a worker in the middle of it."""
    n = int(item)
    if n % 500 == 0:
        time.sleep(0.05)
    if n % 7 == 0:
        raise ValueError(f"poison id {item}")
    return n + 1


def add(a, b):
    """A reducer (`--reduce tests.support.fleet_tasks:add`): associative, not commutative-
    dependent for numbers, and it fails on a string so a test can see a reducer raise."""
    return a + b


def defined_here(item):
    """Not registered: reachable only as tests.support.fleet_tasks:defined_here."""
    return f"plain-{item}"


# Imported, not defined here: must never resolve as tests.support.fleet_tasks:system.
from os import system  # noqa: E402,F401


# Plain Celery tasks, for group / chunks / chord on the fleet.
@shared_task(name="tests.square")
def square(x):
    return x * x


@shared_task(name="tests.total")
def total(values):
    return sum(values)


# Plain module-level functions (not registered): the Python API names them module:function.
class Odd(Exception):
    """An exception of the test's own, raised on the workers, rebuilt in the caller."""


def squared(x):
    return x * x


def plus(a, b=0):
    return a + b


def odd_fails(x):
    if x % 2:
        raise Odd(f"odd item {x}")
    return x


def noop(x):
    return x
