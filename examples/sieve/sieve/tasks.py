"""The project's task module, found by every worker through its entry point (pyproject.toml).

Both kinds of task run on the fleet: a @fleet_task function for `fleet run`
(one call per ID, batched by the kit), and a plain Celery task for Celery's own
group, chunks and chord.
"""

from __future__ import annotations

from celery import shared_task

from app import fleet_task
from sieve.primes import primes_below


@fleet_task
def count_primes(item: str) -> dict[str, int]:
    """The number of primes below the integer ID `item`: `fleet run count_primes --ids ...`."""
    n = int(item)
    return {"n": n, "primes": primes_below(n)}


@shared_task(name="sieve.primes_below")
def primes_below_task(n: int) -> int:
    """The same count as a plain Celery task: `primes_below_task.chunks(...)`, a chord..."""
    return primes_below(n)
