"""Where a job's results go when they do not flow through the launcher: the contract.

A sink is written by the workers, one batch at a time: the batch's worker writes
its records, then commits the batch in the result store (with no lines: the
sink holds them). A batch can run twice (redelivered after a crash, or sent
again by the launcher), so a sink must take a second write of a (job, batch)
without adding anything: S3 writes each batch as one object with a conditional
put, PostgreSQL inserts with a unique key, and a user's writer is told the
batch's key. One module per backend: s3.py, postgres.py, user.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar

import msgspec

_lines = msgspec.json.Decoder().decode_lines


class SinkError(Exception):
    """What a sink says when it cannot take a batch."""


class BadSink(SinkError):
    """A sink the job cannot use (an unknown scheme, no such table, no permission): the
    message says what was wrong and what to do. Stops the job."""


class SinkRefused(BadSink):
    """The sink refused a write mid-job (a privilege revoked, a full disk, a server down for
    longer than the retries): the job pauses, says why, and tries the batch again later."""


class Record(NamedTuple):
    """One ID's outcome: its result, or its error ({"type", "message", ...}) and result None."""

    id: Any
    result: Any
    error: dict[str, Any] | None


def records(lines: bytes) -> list[Record]:
    """The records of a batch's JSON lines (app/batch.py)."""
    return [Record(r["id"], r.get("result"), r.get("error")) for r in _lines(lines)]


class Sink(Protocol):
    """What the launcher and the workers need of a sink."""

    # The sink as `fleet run` shows it (no password).
    label: str

    # launcher side: before the first batch, and after the last.
    def check(self) -> None: ...
    def finish(self, job: str, batches: int, items: int, errors: int) -> None: ...

    # worker side: idempotent per (job, batch).
    def write(self, job: str, batch: int, lines: bytes) -> None: ...


T = TypeVar("T")


def retrying(attempt: Callable[[], T], transient: tuple[type[BaseException], ...], what: str) -> T:
    """`attempt()`, tried again with capped exponential backoff (about a minute in all) while
    it fails with one of `transient`; then a SinkError saying what failed."""
    import tenacity

    try:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(transient),
            wait=tenacity.wait_exponential(multiplier=0.5, max=10),
            stop=tenacity.stop_after_delay(60),
            reraise=True,
        )(attempt)
    except transient as exc:
        raise SinkError(f"{what}: {exc}") from exc
