"""`python -m tests.support.map_million N [--ordered]`: fleet.map over a generator of N
items in a process of its own, for its peak memory; prints what a test checks, as JSON.

The fleet is found as a user's script finds it (FLEET_* variables here)."""

from __future__ import annotations

import json
import sys
import time

from app import fleet
from tests.support.fleet_tasks import noop


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not getrusage's ru_maxrss: that
    keeps the high-water mark of the process it was forked from (a pytest worker)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    n = int(sys.argv[1])
    ordered = "--ordered" in sys.argv
    seen = bytearray(n)
    in_order = True
    count = last = 0
    started = time.perf_counter()
    with fleet.map(noop, (i for i in range(n)), ordered=ordered) as results:
        for item, result in results:
            if item != result:
                raise SystemExit(f"item {item} came back as {result}")
            seen[item] += 1
            in_order = in_order and item == last
            last = item + 1
            count += 1
    print(
        json.dumps(
            {
                "count": count,
                "once": seen.count(1) == n,
                "in_order": in_order,
                "seconds": time.perf_counter() - started,
                "rss_mb": peak_rss_mb(),
            }
        )
    )


if __name__ == "__main__":
    main()
