"""How many CPUs this process may really use.

`os.cpu_count()` reports the host's CPUs, which over-subscribes a worker
pinned with taskset/cpusets or throttled by a container's CPU quota. Celery's
default concurrency has that flaw, so the worker is sized here instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_quota_cpus(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT
) -> float | None:
    """CPUs allowed by the cgroup v2 `cpu.max` quota of this process, or None if unlimited.

    The tightest quota on the path from this cgroup up to the root applies.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    # cgroup v2 has a single line "0::/path".
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return None
    best: float | None = None
    path = (root / rel.lstrip("/")).resolve()
    while True:
        try:
            quota, period = (path / "cpu.max").read_text().split()[:2]
            if quota != "max":
                cpus = int(quota) / int(period)
                best = cpus if best is None else min(best, cpus)
        except (OSError, ValueError):
            pass
        if path == root.resolve() or path.parent == path:
            return best
        path = path.parent


def available_cpus() -> int:
    """CPUs from the affinity mask, capped by the cgroup quota (rounded up, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_quota_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def worker_concurrency(override: int | None = None) -> int:
    """The pool size for one worker: the explicit override, else every usable CPU."""
    return override if override else available_cpus()
