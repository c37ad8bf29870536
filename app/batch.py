"""Run one per-item function over one batch of IDs: the hot loop of the fleet.

Plain Python with no Celery in it, so it can be tested and profiled alone.
Each ID yields exactly one JSON line, `{"id": ..., "result": ...}` or
`{"id": ..., "error": {...}}`; a failing item never stops the batch. The
lines are encoded here, on the workers, so the launcher only copies bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from app.registry import FleetTask

_encoder = msgspec.json.Encoder()
_encode_into = _encoder.encode_into


@dataclass(frozen=True)
class BatchOutcome:
    lines: bytes  # JSON lines, one per ID, each ending in "\n"
    items: int
    errors: int
    seconds: float  # time spent in the user's function and encoding


def expand(payload: list[Any] | dict[str, Any]) -> Iterable[Any]:
    """The IDs of a batch payload: a list, or {"range": [start, stop]} for integer ranges."""
    if isinstance(payload, dict):
        start, stop = payload["range"]
        return range(int(start), int(stop))
    return payload


def _append_error(buf: bytearray, item: Any, exc: BaseException, attempts: int = 1) -> None:
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)[:1000]}
    if attempts > 1:
        error["attempts"] = attempts
    mark = len(buf)
    try:
        _encode_into({"id": item, "error": error}, buf, -1)
    except TypeError:  # an ID that is not JSON (only possible from Python callers)
        del buf[mark:]
        _encode_into({"id": repr(item), "error": error}, buf, -1)
    buf.append(10)


def _retry_transient(task: FleetTask, item: Any) -> tuple[Any, BaseException | None, int]:
    """Call the function again for a transient failure; (result, final error, attempts)."""
    retrying = Retrying(
        retry=retry_if_exception_type(task.transient),
        stop=stop_after_attempt(task.retries),
        wait=wait_exponential(multiplier=0.05, max=2.0),
        reraise=True,
    )
    try:
        result = retrying(task.fn, item)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record
        return None, exc, retrying.statistics.get("attempt_number", 1) + 1
    return result, None, retrying.statistics.get("attempt_number", 1) + 1


def run_batch(task: FleetTask, payload: list[Any] | dict[str, Any]) -> BatchOutcome:
    fn = task.fn
    transient = task.transient
    # One growing buffer for the whole batch: a bytes object per line costs
    # far more in allocation than the encoding itself.
    buf = bytearray()
    items = errors = 0
    start = time.perf_counter()
    for item in expand(payload):
        items += 1
        try:
            result = fn(item)
        except Exception as exc:  # noqa: BLE001 - one bad item must not sink the batch
            if transient and isinstance(exc, transient) and task.retries > 0:
                result, final, attempts = _retry_transient(task, item)
                if final is not None:
                    _append_error(buf, item, final, attempts)
                    errors += 1
                    continue
            else:
                _append_error(buf, item, exc)
                errors += 1
                continue
        mark = len(buf)
        try:
            _encode_into({"id": item, "result": result}, buf, -1)
        except (TypeError, ValueError) as exc:
            del buf[mark:]
            _append_error(buf, item, TypeError(f"result is not JSON-serialisable: {exc}"))
            errors += 1
            continue
        buf.append(10)
    return BatchOutcome(bytes(buf), items, errors, time.perf_counter() - start)
