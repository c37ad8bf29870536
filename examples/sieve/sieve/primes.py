"""The work itself: plain functions, testable without Celery or a fleet."""

from __future__ import annotations

import numpy as np


def prime_flags(n: int) -> np.ndarray:
    """flags[k] is True when k is prime, for 0 <= k < n (the sieve of Eratosthenes)."""
    flags = np.ones(max(n, 2), dtype=bool)
    flags[:2] = False
    for p in range(2, int(n**0.5) + 1):
        if flags[p]:
            flags[p * p :: p] = False
    return flags[:n]


def primes_below(n: int) -> int:
    """How many primes are smaller than n."""
    return int(prime_flags(n).sum())
