"""Run one per-item function over one batch of IDs: the hot loop of the fleet.

Plain Python with no Celery in it, so it can be tested and profiled alone.
Each ID yields exactly one JSON line, `{"id": ..., "result": ...}` or
`{"id": ..., "error": {...}}`; a failing item never stops the batch. The
lines are encoded here, on the workers, so the launcher only copies bytes.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from app.registry import FleetTask

_encoder = msgspec.json.Encoder()
_encode_into = _encoder.encode_into
_encode_lines = _encoder.encode_lines


# gc=False: a batch makes one record per ID, and tracking them made the
# garbage collector a fifth of a no-op batch's time. A record cannot be part
# of a reference cycle: it is made after the ID and the result it holds.
class _Ok(msgspec.Struct, gc=False):
    id: Any
    result: Any


class _Err(msgspec.Struct, gc=False):
    id: Any
    error: dict[str, Any]


@dataclass(frozen=True)
class BatchOutcome:
    lines: bytes  # JSON lines, one per ID, each ending in "\n"
    items: int
    errors: int
    seconds: float  # time spent in the user's function and encoding


def pack(ids: list[Any] | dict[str, Any]) -> list[Any] | dict[str, Any]:
    """The compact wire form of a batch's IDs.

    String IDs travel as one newline-joined string: decoding it on the worker
    (JSON, then the hop to the pool process) costs one copy instead of an
    object per ID. Ranges already travel as {"range": [start, stop]}.
    """
    if isinstance(ids, dict) or not ids:
        return ids
    try:
        joined = "\n".join(ids)  # raises for any ID that is not a string
    except TypeError:
        return ids
    if joined.count("\n") != len(ids) - 1:  # an ID holds a newline itself
        return ids
    return {"lines": joined}


def expand(payload: list[Any] | dict[str, Any]) -> Iterable[Any]:
    """The IDs of a batch payload: a list, {"lines": "id\\nid..."} or {"range": [start, stop]}."""
    if isinstance(payload, dict):
        if "lines" in payload:
            lines: str = payload["lines"]
            return lines.split("\n")
        start, stop = payload["range"]
        return range(int(start), int(stop))
    return payload


# The most IDs a worker takes in one batch: every ID's record is held until
# the batch is encoded (about 100 bytes each), so this bounds a batch's memory
# to about a gigabyte. The launcher's batches are far smaller.
MAX_BATCH_ITEMS = 10_000_000
# Batch numbers are bit offsets in the result store's bitmaps (Redis: < 2**32).
MAX_BATCH_NUMBER = 2**32 - 1


class BadPayload(ValueError):
    """A batch message the workers refuse to run: not what the launcher builds, or too big."""


def short_repr(value: Any) -> str:
    """repr(value), cut to about 80 characters: for error messages about untrusted input."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def check_address(job: Any, batch: Any, task_name: Any) -> None:
    """Refuse a batch message whose job, batch number or task name has the wrong shape."""
    if not isinstance(job, str) or not job or len(job) > 200:
        raise BadPayload(f"the job ID must be a non-empty string, not {short_repr(job)}")
    if type(batch) is not int or not 0 <= batch <= MAX_BATCH_NUMBER:
        raise BadPayload(
            f"the batch number must be a whole number from 0 to "
            f"{MAX_BATCH_NUMBER}, not {short_repr(batch)}"
        )
    if not isinstance(task_name, str) or not task_name or len(task_name) > 500:
        raise BadPayload(f"the task name must be a non-empty string, not {short_repr(task_name)}")


def check_payload(payload: Any, max_bytes: int) -> int:
    """How many IDs `payload` holds; BadPayload if it is malformed or too big.

    A payload is what the launcher builds (pack()): a list of IDs,
    {"lines": "id\\nid..."} or {"range": [start, stop]}, of at most
    MAX_BATCH_ITEMS IDs and `max_bytes` bytes (Settings.message_limit: the
    launcher keeps whole messages under it).
    """
    size = 0
    if isinstance(payload, list):
        items = len(payload)
        if items <= MAX_BATCH_ITEMS:
            try:
                size = len(_encoder.encode(payload))
            except (TypeError, ValueError, RecursionError) as exc:  # not from JSON
                raise BadPayload(f"the IDs cannot be encoded as JSON ({exc})") from None
    elif isinstance(payload, dict) and payload.keys() == {"lines"}:
        lines = payload["lines"]
        if not isinstance(lines, str):
            raise BadPayload(f'"lines" must be a string of IDs, not {short_repr(lines)}')
        items = lines.count("\n") + 1
        size = len(lines) if lines.isascii() else len(lines.encode("utf-8", "replace"))
    elif isinstance(payload, dict) and payload.keys() == {"range"}:
        bounds = payload["range"]
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or any(type(b) is not int for b in bounds)
        ):
            raise BadPayload(
                f'"range" must be [start, stop] in whole numbers, not {short_repr(bounds)}'
            )
        items = max(0, bounds[1] - bounds[0])
    else:
        raise BadPayload(
            'a batch payload is a list of IDs, {"lines": "..."} or '
            f'{{"range": [start, stop]}}, not {short_repr(payload)}'
        )
    if items > MAX_BATCH_ITEMS:
        raise BadPayload(
            f"the batch holds {items:,} IDs, more than the {MAX_BATCH_ITEMS:,} a "
            "batch may hold; use a smaller --batch-size or --target-seconds"
        )
    if size > max_bytes:
        raise BadPayload(
            f"the batch's IDs take {size:,} bytes, more than the {max_bytes:,} a "
            "batch message may hold; use a smaller --batch-size"
        )
    return items


# The end of an error's traceback kept in its record: the frames nearest the raise.
TRACEBACK_CHARS = 2000


def _error(item: Any, exc: BaseException, attempts: int = 1) -> _Err:
    kind = type(exc)
    error: dict[str, Any] = {"type": kind.__name__, "message": str(exc)[:1000]}
    if kind.__module__ != "builtins":  # so a Python caller can raise it as its own type
        error["module"] = kind.__module__
    if attempts > 1:
        error["attempts"] = attempts
    if exc.__traceback__ is not None:
        text = "".join(traceback.format_exception(exc))
        error["traceback"] = text[-TRACEBACK_CHARS:]
    return _Err(item, error)


# What msgspec raises for a value JSON cannot hold. A self-referencing result raises
# RecursionError: it too must become an error record, or the batch would fail (and be
# re-sent) forever. The launcher checks a Python caller's items against the same.
UNENCODABLE = (TypeError, ValueError, OverflowError, RecursionError)


def _encode(records: list[_Ok | _Err]) -> tuple[bytes, int]:
    """JSON lines for the records, and how many records had to become errors to encode."""
    try:
        return _encode_lines(records), 0
    except UNENCODABLE:
        pass
    converted = 0
    # Slow path, only when some result is not JSON: find the culprits one by one.
    for i, rec in enumerate(records):
        try:
            _encoder.encode(rec)
        except UNENCODABLE as exc:
            item = rec.id
            try:
                _encoder.encode(item)
            except UNENCODABLE:  # an ID that is not JSON (Python callers only)
                item = repr(item)
            if isinstance(rec, _Err):  # already an error (counted): keep it, with a JSON ID
                records[i] = _Err(item, rec.error)
                continue
            reason = TypeError(f"result is not JSON-serialisable: {exc}")
            records[i] = _error(item, reason)
            converted += 1
    return _encode_lines(records), converted


def _retry_transient(task: FleetTask, item: Any) -> tuple[Any, BaseException | None, int]:
    """Call the function again for a transient failure; (result, final error, attempts)."""
    # Imported on the first transient failure: the launcher imports this module
    # too, and never retries.
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

    retrying = Retrying(
        retry=retry_if_exception_type(task.transient),
        stop=stop_after_attempt(task.retries),
        wait=wait_exponential(multiplier=0.05, max=2.0),
        reraise=True,
    )
    try:
        result = retrying(task.fn, item)
    except Exception as exc:
        return None, exc, retrying.statistics.get("attempt_number", 1) + 1
    return result, None, retrying.statistics.get("attempt_number", 1) + 1


def _encode_bare(records: list[_Ok | _Err]) -> tuple[bytes, int]:
    """Bare lines: each ID's result alone (null for an error), then, if any ID failed, a
    last line {"errors": [[position, error], ...]}. For a caller that keeps its IDs in
    order (app.fleet): a fifth of the bytes, read back with no object per record."""
    converted = 0
    try:
        body = _encode_lines([r.result if type(r) is _Ok else None for r in records])
    except UNENCODABLE:
        converted = _encode(records)[1]  # the results that are not JSON become errors
        body = _encode_lines([r.result if type(r) is _Ok else None for r in records])
    errors = [[i, r.error] for i, r in enumerate(records) if type(r) is _Err]
    if errors:
        body += _encoder.encode({"errors": errors}) + b"\n"
    return body, converted


def run_batch(
    task: FleetTask, payload: list[Any] | dict[str, Any], bare: bool = False
) -> BatchOutcome:
    """Run the batch; its lines are records ({"id": ..., "result": ...} or {"id": ...,
    "error": ...}), or with `bare` the results alone (_encode_bare)."""
    fn = task.fn
    transient = task.transient
    # Records are collected and encoded in one call: per-line encoding and
    # per-line bytes objects cost more than the user's function for small items.
    records: list[_Ok | _Err] = []
    append = records.append
    errors = 0
    start = time.perf_counter()
    for item in expand(payload):
        try:
            append(_Ok(item, fn(item)))
        except Exception as exc:
            if transient and isinstance(exc, transient) and task.retries > 0:
                result, final, attempts = _retry_transient(task, item)
                if final is None:
                    append(_Ok(item, result))
                    continue
                append(_error(item, final, attempts))
            else:
                append(_error(item, exc))
            errors += 1
    lines, unencodable = _encode_bare(records) if bare else _encode(records)
    errors += unencodable
    return BatchOutcome(lines, len(records), errors, time.perf_counter() - start)
