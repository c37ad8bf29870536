"""A worker host on this machine, for the boot, Ansible and ops tests.

The code a host installs is a wheelhouse built by app/wheelhouse.py, as `fleet
local --code` builds it: this checkout's wheel, any projects' wheels and every
dependency wheel, for this machine (scripts/local/code.py local_target), kept
in a cache under the temp directory between runs (a build is named by its
sources, so an edit makes a new one). Paths a host uses are redirected with
the FLEET_* variables app/host/ and scripts/fleet-boot.sh read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.launcher.job import JobOptions
from app.launcher.launcher import Launcher
from app.launcher.sources import Source
from app.settings import Settings
from app.store import open_store
from app.wheelhouse import WORKER_EXTRAS, Wheelhouse, build
from scripts.local.code import local_target
from tests.support.paths import CACHE_HOME, ROOT

BOOT_SCRIPT = ROOT / "scripts" / "fleet-boot.sh"
CACHE = CACHE_HOME / "celery-fleet"


def wheelhouse(*projects: Path, extras: Sequence[str] = WORKER_EXTRAS) -> Wheelhouse:
    """This checkout and `projects` packaged for this machine (built once per source digest)."""
    return build(projects, target=local_target(), extras=extras, cache=CACHE / "wheelhouses")


# pip's environment for the test hosts' installs: byte-compiling the dependencies
# (botocore alone is thousands of files) is most of an install's CPU, and only
# tests/bench/bench_boot.py measures how long a boot takes (it compiles, as hosts do).
NO_COMPILE = {"PIP_COMPILE": "false"}


def host_env(root: Path, byte_compile: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a host whose every path is under `root`; its pip does not
    byte-compile unless `byte_compile`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
    env.update(
        FLEET_APP_DIR=str(root / "opt"),
        FLEET_ENV_FILE=str(root / "etc" / "env"),
        FLEET_SYSTEMD_DIR=str(root / "systemd"),
        FLEET_RUN_DIR=str(root / "run"),
        FLEET_BOOT_ENV=str(root / "etc" / "boot.env"),
        # This interpreter, so that a machine without python3.11 installs nothing.
        FLEET_PYTHON=sys.executable,
        XDG_CACHE_HOME=str(CACHE_HOME),
    )
    if not byte_compile:
        env.update(NO_COMPILE)
    env.update(extra)
    return env


def write_settings(settings: Settings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in settings.as_env().items()))
    path.chmod(0o600)
    return path


def wait_worker(
    settings: Settings, node: str, timeout: float = 60, proc: subprocess.Popen | None = None
) -> dict[str, Any]:
    """The heartbeat of worker `node` once it is in the result store."""
    store = open_store(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [w for w in store.workers() if w.get("hostname") == node]
        if found:
            return found[0]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the worker exited with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"worker {node} did not come up within {timeout} s")


def run_job(settings: Settings, out: Path, n: int = 200, task: str = "process_id") -> Any:
    """Run `task` (by default the kit's example, app.tasks.process_id) over range:0:n."""
    opts = JobOptions(
        task=task,
        source=Source.parse(f"range:0:{n}"),
        out=out,
        batch_size=max(1, n // 8),
        progress=False,
    )
    return Launcher(settings).run(opts)
