"""Your tasks. Write a plain function of one ID and register it with @fleet_task.

    fleet run process_id --ids ids.txt

Keep the function pure CPU work on its ID: it runs millions of times, on
every core of the fleet, in any order and possibly more than once.
"""

import hashlib

from app.registry import fleet_task

ROUNDS = 40


@fleet_task
def process_id(item: object) -> str:
    """Example CPU-heavy work: a chain of BLAKE2b hashes seeded by the ID (~20 us)."""
    digest = str(item).encode()
    for _ in range(ROUNDS):
        digest = hashlib.blake2b(digest, digest_size=32).digest()
    return digest[:8].hex()
