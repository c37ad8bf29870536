"""CPUs this process may use: the affinity mask and the cgroup v2 quota, not the host's count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import cpus
from app.cpus import available_cpus, cgroup_quota_cpus, worker_concurrency


def fake_cgroup(tmp_path: Path, rel: str, quotas: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup naming `rel`, and a cgroup tree whose cpu.max files are `quotas`."""
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{rel}\n")
    root = tmp_path / "sys-fs-cgroup"
    (root / rel.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for where, content in quotas.items():
        d = root / where.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(content)
    return proc, root


# -- the affinity mask (a real one: tests/integration/test_cpus_taskset.py) -----


def test_available_cpus_never_exceeds_the_affinity_mask():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


# -- cgroup v2 quota parsing ---------------------------------------------------


def test_quota_of_this_cgroup(tmp_path):
    proc, root = fake_cgroup(tmp_path, "/job", {"/job": "150000 100000\n"})
    assert cgroup_quota_cpus(proc, root) == 1.5


def test_max_means_unlimited(tmp_path):
    proc, root = fake_cgroup(tmp_path, "/a/b", {"/a/b": "max 100000\n", "/a": "max 100000\n"})
    assert cgroup_quota_cpus(proc, root) is None


def test_no_cpu_max_files_means_unlimited(tmp_path):
    proc, root = fake_cgroup(tmp_path, "/a/b", {})
    assert cgroup_quota_cpus(proc, root) is None


@pytest.mark.parametrize(
    "quotas, expected",
    [
        # The tightest quota on the way up applies, wherever it sits.
        ({"/a/b/c": "400000 100000", "/a/b": "200000 100000", "/a": "300000 100000"}, 2.0),
        ({"/a/b/c": "max 100000", "/a/b": "max 100000", "/a": "50000 100000"}, 0.5),
        ({"/a/b/c": "25000 50000", "/a": "max 100000"}, 0.5),
        ({"/": "100000 100000", "/a/b/c": "max 100000"}, 1.0),
    ],
)
def test_nested_quotas_take_the_tightest(tmp_path, quotas, expected):
    proc, root = fake_cgroup(tmp_path, "/a/b/c", quotas)
    assert cgroup_quota_cpus(proc, root) == expected


def test_quota_above_the_root_is_not_read(tmp_path):
    # A cpu.max beside the cgroup root (outside the tree) must not count.
    proc, root = fake_cgroup(tmp_path, "/a", {"/a": "max 100000"})
    (root.parent / "cpu.max").write_text("10000 100000")
    assert cgroup_quota_cpus(proc, root) is None


def test_root_cgroup(tmp_path):
    proc, root = fake_cgroup(tmp_path, "/", {"/": "200000 100000"})
    assert cgroup_quota_cpus(proc, root) == 2.0


def test_cgroup_v1_only_or_missing_file_is_unlimited(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/x\n1:cpu:/\n")
    assert cgroup_quota_cpus(proc, tmp_path) is None
    assert cgroup_quota_cpus(tmp_path / "missing", tmp_path) is None


def test_hybrid_cgroup_file_uses_the_v2_line(tmp_path):
    proc, root = fake_cgroup(tmp_path, "/svc", {"/svc": "300000 100000"})
    proc.write_text("9:name=systemd:/\n1:cpu:/\n0::/svc\n")
    assert cgroup_quota_cpus(proc, root) == 3.0


def test_unreadable_cpu_max_is_skipped(tmp_path):
    proc, root = fake_cgroup(tmp_path, "/a/b", {"/a/b": "garbage\n", "/a": "100000 100000"})
    assert cgroup_quota_cpus(proc, root) == 1.0


# -- combining affinity and quota ---------------------------------------------


@pytest.mark.parametrize(
    "affinity, quota, expected",
    [
        (8, None, 8),
        (8, 2.0, 2),
        (8, 1.5, 2),  # rounded up: a 1.5-CPU quota keeps two processes busy
        (8, 0.25, 1),  # at least one
        (2, 6.0, 2),  # the mask caps a generous quota
    ],
)
def test_available_cpus_combines_mask_and_quota(monkeypatch, affinity, quota, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(cpus, "cgroup_quota_cpus", lambda: quota)
    assert available_cpus() == expected


def test_worker_concurrency_override(monkeypatch):
    monkeypatch.setattr(cpus, "available_cpus", lambda: 3)
    assert worker_concurrency() == 3
    assert worker_concurrency(None) == 3
    assert worker_concurrency(7) == 7
