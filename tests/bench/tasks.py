"""Benchmark tasks: loaded by the bench fleet's workers (include=("tests.bench.tasks",)).

The same deterministic per-item function runs in every variant: a plain loop,
multiprocessing.Pool, plain Celery tasks (group / chunks / chord) and fleet jobs.
"""

from __future__ import annotations

import os
import time

from celery import shared_task

from app.registry import fleet_task

# Rounds of the busy loop: about 1-2 ms of pure-Python CPU per item on a
# typical core (the benchmark measures and prints the real figure).
CPU_ROUNDS = 9000
# bench_sleep's nap (tests/bench/bench_scale.py sets it for its workers).
SLEEP_SECONDS = float(os.environ.get("FLEET_BENCH_SLEEP_MS", "50")) / 1000


def busy(item, rounds: int = CPU_ROUNDS) -> int:
    """Pure-Python CPU work seeded by the ID; deterministic, no I/O, no allocation."""
    x = int(item) & 0x7FFFFFFF
    acc = 0
    for _ in range(rounds):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        acc ^= x
    return acc


# -- fleet tasks (run by `fleet run` / Launcher) -----------------------------


@fleet_task
def bench_cpu(item):
    return busy(item)


@fleet_task
def bench_noop(item):
    return item


# -- plain Celery tasks (the usual advice: group, chunks, chord) -------------


@shared_task(name="bench.cpu")
def cpu(item):
    """One ID per task (group / chord), or one starmap call per ID inside `chunks`."""
    return busy(item)


@shared_task(name="bench.noop")
def noop(item):
    return item


@shared_task(name="bench.cpu_many")
def cpu_many(items):
    """Chunk-friendly: a list of IDs in, a list of results out (hand-made batches)."""
    return [busy(i) for i in items]


@shared_task(name="bench.noop_many")
def noop_many(items):
    return list(items)


@shared_task(name="bench.total")
def total(values):
    """Chord callback: the sum of the header's results (lists from chunks are flattened)."""
    s = 0
    for v in values:
        s += sum(v) if isinstance(v, list) else v
    return s


@fleet_task
def bench_sleep(item):
    """An emulated slot's work (`make bench-scale`): 50 ms asleep, almost no CPU, so what
    the benchmark measures is the control plane."""
    time.sleep(SLEEP_SECONDS)
    return item
