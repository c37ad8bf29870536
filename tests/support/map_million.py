"""`python -m tests.support.map_million N [--ordered]`: fleet.map over a generator of N
items in a process of its own, for its peak memory; prints what a test checks, as JSON.

The fleet is found as a user's script finds it (FLEET_* variables here)."""

from __future__ import annotations

import json
import resource
import sys
import time

from app import fleet
from tests.support.fleet_tasks import noop


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
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
