"""What every result store does: the contract the workers and the launcher rely on.

Job state and batch results are keyed by (job, batch). Workers commit a
batch's JSON lines and the launcher streams them to the output. The commit is
first-writer-wins: a batch that runs twice (redelivered after a crash, or
re-sent by the launcher) is stored and announced once, so the output never
holds an ID twice. One module per backend implements `Store`: redis.py, s3.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class StoreUnavailable(ConnectionError):
    """The result store cannot be reached."""


@dataclass(frozen=True)
class Done:
    """A worker's announcement that a batch is committed."""

    batch: int
    items: int
    errors: int
    seconds: float
    worker: str = ""
    refused: str = ""  # non-empty: the batch was not run, and why
    # With `refused`: the sink refused the write for now (SinkRefused): the job pauses and
    # sends the batch again later, instead of stopping.
    later: bool = False
    # The batch's results folded by the job's reducer (`--reduce`), kept with the commit.
    partial: Any = None


# (items, errors, JSON lines) of a committed batch, as `Store.results` returns it.
BatchResult = tuple[int, int, memoryview]
# Committed and written bitmaps, output offset, items and errors written (`Store.journal`).
Journal = tuple[bytes, bytes, int | None, int, int]


class Store(Protocol):
    """What the launcher and the workers need of a result store."""

    # What a call raises once the store's own retries have given up on reaching it.
    connection_errors: tuple[type[BaseException], ...]

    def ping(self) -> None: ...
    def put_meta(self, job: str, meta: dict[str, Any]) -> None: ...
    def get_meta(self, job: str) -> dict[str, Any] | None: ...
    def cancel(self, job: str) -> None: ...
    def is_cancelled(self, job: str) -> bool: ...

    # worker side
    def is_committed(self, job: str, batch: int) -> bool: ...
    # A batch about to run: False if it is committed already or its job cancelled; else
    # its lease is taken (for `seconds`), in as few round trips as the store allows.
    def begin(self, job: str, batch: int, seconds: float) -> bool: ...
    def commit(self, job: str, done: Done, lines: bytes) -> bool: ...
    def announce(self, job: str, done: Done) -> None: ...
    # Every running batch of a worker process at once: one call per renewal, not one per batch.
    def renew_leases(self, leases: Sequence[tuple[str, int]], seconds: float) -> None: ...
    def register_worker(self, name: str, info: dict[str, Any], seconds: float) -> None: ...
    def unregister_worker(self, name: str) -> None: ...
    # A counting semaphore across the fleet: at most `limit` holders of `name` at once,
    # each slot a lease that lapses after `seconds` unless taken again (app/sinks).
    def acquire_slot(self, name: str, holder: str, limit: int, seconds: float) -> bool: ...
    def release_slot(self, name: str, holder: str) -> None: ...

    # launcher side
    def workers(self) -> list[dict[str, Any]]: ...
    def busy_slots(self) -> set[str]: ...
    def advertise_backlog(self, queue: str, job: str, batches: int, seconds: float) -> None: ...
    def backlog(self, queue: str) -> int: ...
    def wait_done(self, job: str, timeout: float) -> list[Done]: ...
    def results(self, job: str, batches: list[int]) -> list[BatchResult | None]: ...
    # keep: the batches' results stay in the store (a job whose output is the store).
    def mark_written(
        self,
        job: str,
        batches: list[int],
        offset: int | None,
        items: int,
        errors: int,
        keep: bool = False,
    ) -> None: ...
    def journal(self, job: str) -> Journal: ...
    # The partial of every committed batch of a job with a reducer, by batch.
    def partials(self, job: str) -> dict[int, Any]: ...
    def slot_holders(self, name: str, seconds: float) -> list[str]: ...

    # jobs that live in the fleet (`fleet submit`, app/launcher/driver.py)
    def jobs(self) -> list[str]: ...  # every job with metadata, oldest first
    def put_input(self, job: str, data: bytes) -> None: ...
    def get_input(self, job: str) -> bytes | None: ...
    def add_driven(self, queue: str, job: str) -> None: ...
    def driven(self, queue: str) -> list[str]: ...
    def remove_driven(self, queue: str, job: str) -> None: ...


def bit_is_set(bitmap: bytes, index: int) -> bool:
    """Redis bitmaps number bits from the most significant bit of byte 0."""
    byte = index >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (0x80 >> (index & 7)))


def set_bit(bitmap: bytearray, index: int) -> None:
    """Set bit `index` (numbered as Redis does), growing the bitmap as needed."""
    byte = index >> 3
    if len(bitmap) <= byte:
        bitmap.extend(bytes(byte + 1 - len(bitmap)))
    bitmap[byte] |= 0x80 >> (index & 7)
