"""The project's own tests: left out of its wheel (only sieve* is packaged)."""

from sieve.primes import primes_below


def test_small_counts():
    assert [primes_below(n) for n in (0, 1, 2, 3, 10, 100)] == [0, 0, 0, 1, 4, 25]
