"""The task of the partition tests (tests/faults/test_partitions.py), loaded with FLEET_INCLUDE.

Its result is a function of the ID alone, so the checker can tell a wrong
result from a right one without the worker. Every execution is appended to
a per-process file in FLEET_NETNS_EXEC_DIR (`ID\\n`, one write each), so the
checker can count how often each ID ran, including runs whose result was
lost with a killed worker.
"""

from __future__ import annotations

import hashlib
import os
import time

from app.registry import fleet_task

_log: tuple[int, int] | None = None  # (pid, fd): pool processes are forked


def expected(item: str) -> str:
    """The right result for an ID: 12 hex digits of its BLAKE2b hash."""
    return hashlib.blake2b(str(item).encode(), digest_size=6).hexdigest()


def _record(item: str) -> None:
    global _log
    directory = os.environ.get("FLEET_NETNS_EXEC_DIR")
    if not directory:
        return
    pid = os.getpid()
    if _log is None or _log[0] != pid:
        host = os.environ.get("FLEET_NETNS_HOST", "host")
        path = os.path.join(directory, f"{host}-{pid}.log")
        _log = (pid, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    os.write(_log[1], f"{item}\n".encode())


@fleet_task
def netns_hash(item):
    """Busy for FLEET_NETNS_ITEM_MS milliseconds (default 0.2), then the ID's hash."""
    end = time.perf_counter() + float(os.environ.get("FLEET_NETNS_ITEM_MS", "0.2")) / 1000
    while time.perf_counter() < end:
        pass
    result = expected(item)
    _record(item)
    return result
