"""How a job is cut into batches and how many go out at once: pure, no I/O.

The launcher uses it for every job, and the simulator (scripts/simulate.py)
for the jobs it models, so both cut work the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from app.batch import MAX_BATCH_ITEMS

BATCHES_PER_SLOT = 4  # at least this many batches per worker slot, so the tail stays short
# Batches a second one launcher or driver, with its broker and result store, sustains:
# `make bench-scale` measured about 1 ms of control-plane CPU per batch in all (launcher
# 0.4-0.6 ms, broker 0.2-0.3 ms, Redis store 0.25-0.35 ms; 1,000 emulated slots on the
# 2-CPU development machine, docs/results.md), so one core's worth near 1,000 a second.
DRIVER_RATE = 1000.0
# What the plan asks of it at most, a fifth of that: room for the lost-batch checks,
# journal writes and a slower store. A fleet of S slots gets batches of at least
# S / MAX_BATCH_RATE seconds (10,000 slots: 50 s batches).
MAX_BATCH_RATE = 200.0
PROBE_LIMIT = 32  # calibration batches at the most


@dataclass(frozen=True)
class BatchPlan:
    """How the ID stream is cut into batches: `probe` sizes first, then `size` each.

    With the total known and `tail` slots, the last wave (about `tail` x
    `size` IDs) is cut finer, each batch a 1/(share x tail) of what is left
    and no smaller than `floor` (guided self-scheduling): the slots then
    finish within a small batch of each other, not a whole one apart. The
    plan is kept with the job, so a resumed job cuts its IDs the same way.

    Each batch costs its worker a few milliseconds (the broker's round trip,
    the store's commit), which finer cuts pay more often than they save on
    the finish: share 1 and floor size/16 are the defaults (docs/results.md).
    Jobs stored without these fields were cut with share 2 and floor size/8.
    """

    probe: tuple[int, ...]
    size: int
    total: int | None = None
    tail: int = 0
    share: int = 1
    floor: int | None = None  # None: size // 16

    @classmethod
    def from_meta(cls, layout: dict[str, Any], total: int | None) -> BatchPlan:
        """The plan kept with a job (see as_meta)."""
        size = layout["size"]
        return cls(
            tuple(layout["probe"]),
            size,
            total,
            layout.get("tail", 0),
            layout.get("share", 2),
            layout.get("floor", max(1, size // 8)),
        )

    def as_meta(self) -> dict[str, Any]:
        return {
            "probe": list(self.probe),
            "size": self.size,
            "tail": self.tail,
            "share": self.share,
            "floor": self._floor(),
        }

    def _floor(self) -> int:
        return max(1, self.size // 16 if self.floor is None else self.floor)

    def sizes(self) -> Iterator[int]:
        yield from self.probe
        if self.total is not None and self.tail:
            body, last = self._split()
            yield from itertools.repeat(self.size, body)
            yield from self._tail(last)
        while True:  # streams of unknown length, and past the end
            yield self.size

    def count(self) -> int | None:
        """How many batches the total is cut into (None when the total is unknown)."""
        if self.total is None:
            return None
        count, left = 0, self.total
        for size in self.probe:
            if left <= 0:
                return count
            count, left = count + 1, left - size
        if not self.tail:
            return count + max(0, math.ceil(left / self.size))
        body, last = self._split()
        return count + body + sum(1 for _ in self._tail(last))

    def _split(self) -> tuple[int, int]:
        """Whole batches before the last wave, and the IDs left for it."""
        assert self.total is not None
        left = max(0, self.total - sum(self.probe))
        body = max(0, left - self.tail * self.size) // self.size
        return body, left - body * self.size

    def _tail(self, left: int) -> Iterator[int]:
        floor, parts = self._floor(), self.share * self.tail
        while left > 0:
            n = min(left, self.size, max(floor, math.ceil(left / parts)))
            left -= n
            yield n


def probe_count(slots: int, total: int | None) -> int:
    """One-ID calibration batches: one per worker slot, at least one, at most PROBE_LIMIT."""
    return min(max(1, slots), PROBE_LIMIT, total or PROBE_LIMIT)


def batch_size(
    per_item: float,
    target: float,
    total: int | None,
    slots: int,
    *,
    max_batch_seconds: float,
    message_limit: int | None = None,
    id_bytes: int = 8,
) -> int:
    """IDs per batch: about `target` seconds of work at `per_item` seconds an ID.

    A large fleet gets longer batches: `slots` finishing batches of T seconds ask for
    slots / T batches a second, kept under MAX_BATCH_RATE. Never near a batch's hard
    time limit, at least BATCHES_PER_SLOT batches per slot (the tail stays short), and
    (with `message_limit`: IDs that travel one by one, not as a range) well under the
    broker's message size limit at `id_bytes` an ID.
    """
    target = max(target, slots / MAX_BATCH_RATE)
    size = min(target / per_item, MAX_BATCH_ITEMS)  # workers refuse more (app/batch.py)
    size = min(size, max_batch_seconds / 4 / per_item)
    if total:
        size = min(size, math.ceil(total / (max(1, slots) * BATCHES_PER_SLOT)))
    if message_limit is not None:
        size = min(size, message_limit // 2 // id_bytes)
    return max(1, int(size))


def in_flight_limit(slots: int) -> int:
    """Batches on the broker at once by default: twice the worker slots, at least four."""
    return max(4, 2 * slots)
