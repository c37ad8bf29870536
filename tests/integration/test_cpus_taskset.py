"""The CPUs a worker may use, under a real affinity mask (taskset starts the probe)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from app.cpus import cgroup_quota_cpus
from tests.support.paths import ROOT

PROBE = "from app.cpus import available_cpus; print(available_cpus())"


@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset not installed")
def test_taskset_one_cpu_gives_one():
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "1"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_taskset_two_cpus_gives_at_most_two():
    allowed = sorted(os.sched_getaffinity(0))[:2]
    cpu_list = ",".join(map(str, allowed))
    out = subprocess.run(
        ["taskset", "-c", cpu_list, sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    quota = cgroup_quota_cpus()
    expected = 2 if quota is None else min(2, max(1, -(-quota // 1)))
    assert int(out.stdout) == expected
