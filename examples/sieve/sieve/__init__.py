"""Prime counts with numpy, as a fleet task (sieve.tasks) over plain functions (sieve.primes)."""
