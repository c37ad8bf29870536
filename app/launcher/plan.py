"""How a job is cut into batches and how many go out at once: pure, no I/O.

The launcher uses it for every job, and the simulator (scripts/simulate.py)
for the jobs it models, so both cut work the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
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
# A job's batches grow with the fleet (BatchPlan.grow) once the rule for the slots online
# asks for at least this many times the size they have: a plan changes a few times in a
# job that scales out, not at every slot that comes up.
GROWTH = 1.5


@dataclass
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

    A job calibrated on a few slots and run on many (a fleet that scaled out from
    zero) would keep its first batches' size, and ask one launcher for slots /
    target batches a second. `grow` makes the batches cut from then on larger:
    `steps` says from which batch each size holds, and is kept with the job like the
    rest, so that a resumed job, or a driver that takes it over, cuts it the same
    (neither grows it: only a job's first run knows every batch sent). The last
    wave, once begun, is not changed.
    """

    probe: tuple[int, ...]
    size: int
    total: int | None = None
    tail: int = 0
    share: int = 1
    floor: int | None = None  # None: size // 16
    # (first batch, size): every batch from there on, before the last wave, is of size.
    steps: list[tuple[int, int]] = field(default_factory=list)
    # IDs a batch may hold at most whatever the fleet (its message's size), None: no limit.
    most: int | None = None
    # Where sizes() is: batches cut so far, and whether the last wave has begun.
    cut: int = field(default=0, compare=False)
    in_tail: bool = field(default=False, compare=False)

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
            [(int(b), int(n)) for b, n in layout.get("steps", [])],
            layout.get("most"),
        )

    def as_meta(self) -> dict[str, Any]:
        meta = {
            "probe": list(self.probe),
            "size": self.size,
            "tail": self.tail,
            "share": self.share,
            "floor": self._floor(),
        }
        if self.steps:
            meta["steps"] = [list(step) for step in self.steps]
        if self.most is not None:
            meta["most"] = self.most
        return meta

    def _floor(self) -> int:
        return max(1, self.size // 16 if self.floor is None else self.floor)

    def size_at(self, batch: int) -> int:
        """The size of batch number `batch` outside the probes and the last wave."""
        size = self.size
        for first, n in self.steps:
            if batch >= first:
                size = n
        return size

    def grow(self, size: int) -> bool:
        """Cut the batches not cut yet `size` IDs each; False (nothing changes) once the
        last wave has begun, or for a size no larger than the present one."""
        if self.in_tail or size <= self.size_at(self.cut):
            return False
        self.steps.append((self.cut, size))
        return True

    def sizes(self) -> Iterator[int]:
        """The size of each batch in turn, read as they are cut: a step added by `grow`
        holds from the next one."""
        self.cut, self.in_tail = 0, False
        for n in self.probe:
            self.cut += 1
            yield n
        if self.total is not None and self.tail:
            left = max(0, self.total - sum(self.probe))
            while left >= (self.tail + 1) * (n := self.size_at(self.cut)):
                left -= n
                self.cut += 1
                yield n
            self.in_tail = True
            for n in self._tail(left, self.size_at(self.cut)):
                self.cut += 1
                yield n
        self.in_tail = True
        while True:  # streams of unknown length, and past the end
            self.cut += 1
            yield self.size_at(self.cut - 1)

    def count(self) -> int | None:
        """How many batches the total is cut into, with the steps so far (None when the
        total is unknown)."""
        if self.total is None:
            return None
        count, left = 0, self.total
        for size in self.probe:
            if left <= 0:
                return count
            count, left = count + 1, left - size
        left = max(0, left)
        for first, end, size in self._segments():
            room = max(0, end - max(first, count))
            if self.tail:  # the body runs while a last wave's worth and a batch are left
                if left < (self.tail + 1) * size:
                    break
                n = min(room, (left - (self.tail + 1) * size) // size + 1)
            else:
                if left <= 0:
                    break
                n = min(room, math.ceil(left / size))
            count, left = count + n, max(0, left - n * size)
        if not self.tail:
            return count
        return count + sum(1 for _ in self._tail(left, self.size_at(count)))

    def _segments(self) -> Iterator[tuple[int, int, int]]:
        """(first batch, first batch after, size) of each stretch of one size."""
        starts = [0, *(first for first, _ in self.steps)]
        sizes = [self.size, *(n for _, n in self.steps)]
        return zip(starts, [*starts[1:], 2**62], sizes, strict=True)

    def _tail(self, left: int, size: int) -> Iterator[int]:
        floor, parts = self._floor(), self.share * self.tail
        while left > 0:
            n = min(left, size, max(floor, math.ceil(left / parts)))
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
    time limit, at least BATCHES_PER_SLOT batches per slot (the tail stays short) unless
    that would ask for more than DRIVER_RATE batches a second (a job small for its
    fleet: 1 M IDs of 50 ms on 10,000 slots would get 8,000 a second, and wait on its
    launcher), and (with `message_limit`: IDs that travel one by one, not as a range)
    well under the broker's message size limit at `id_bytes` an ID.
    """
    target = max(target, slots / MAX_BATCH_RATE)
    most = min(MAX_BATCH_ITEMS, max_batch_seconds / 4 / per_item)  # workers refuse more
    size = min(target / per_item, most)
    if total:
        size = min(size, math.ceil(total / (max(1, slots) * BATCHES_PER_SLOT)))
        size = max(size, min(slots / DRIVER_RATE / per_item, most))
    if message_limit is not None:
        size = min(size, message_cap(message_limit, id_bytes))
    return max(1, int(size))


def message_cap(message_limit: int, id_bytes: int) -> int:
    """IDs a batch message holds at most: well under the broker's limit."""
    return max(1, message_limit // 2 // id_bytes)


def grown_size(
    plan: BatchPlan, per_item: float, target: float, slots: int, *, max_batch_seconds: float
) -> int | None:
    """What batch_size gives the `slots` online now, if it is at least GROWTH times the
    size the plan cuts (never past its message cap); None otherwise."""
    size = batch_size(per_item, target, plan.total, slots, max_batch_seconds=max_batch_seconds)
    if plan.most is not None:
        size = min(size, plan.most)
    return size if size >= GROWTH * plan.size_at(plan.cut) else None


def in_flight_limit(slots: int) -> int:
    """Batches on the broker at once by default: twice the worker slots, at least four."""
    return max(4, 2 * slots)
