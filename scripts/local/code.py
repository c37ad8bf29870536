"""`fleet local --code`: the local fleet's workers run a user's projects from a wheelhouse.

The projects are packaged with this kit as `fleet package` does
(app/wheelhouse.py), for this machine: this interpreter's Python and this
machine's glibc, not the EC2 workers'. The wheelhouse is then installed by the
hosts' own boot script (`fleet-boot install`, offline, every wheel checked
against its sha256) into a virtualenv kept per wheelhouse version in the
user's cache, so a second start of unchanged code installs nothing. The
workers run that virtualenv's Python, and report its version as EC2 workers do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from app.wheelhouse import (
    WORKER_GLIBC_MINOR,
    PackageError,
    Target,
    Wheelhouse,
    build,
    cache_dir,
    prune,
)
from scripts.local.processes import LocalFleetError

BOOT_SCRIPT = Path(__file__).resolve().parent.parent / "fleet-boot.sh"
# Virtualenvs kept (the most recently used).
KEEP = 4


def local_target() -> Target:
    """This machine as a worker platform: its architecture, this Python, its glibc (capped at
    the EC2 workers', so that the same wheels are chosen where the machine allows)."""
    machine = platform.machine()
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine.lower()
    )
    libc, version = platform.libc_ver()
    if arch is None or libc != "glibc":
        raise LocalFleetError(
            f"--code needs a glibc Linux on x86_64 or arm64 (this is {machine}, "
            f"{libc or 'no glibc'}): the wheels are the workers' manylinux wheels."
        )
    minor = int(version.split(".")[1])
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Target(arch, python, min(minor, WORKER_GLIBC_MINOR))


def venvs_dir() -> Path:
    return cache_dir().parent / "venvs"


def install_code(
    projects: Sequence[Path], say: Callable[[str], None] = lambda _: None
) -> tuple[Wheelhouse, Path]:
    """Package `projects` for this machine and install them; (the wheelhouse, its Python)."""
    try:
        house = build(projects, target=local_target(), say=say)
    except PackageError as exc:
        raise LocalFleetError(str(exc)) from None
    app_dir = venvs_dir() / house.version
    app_dir.mkdir(parents=True, exist_ok=True)
    python = app_dir / "venv" / "bin" / "python"
    # One install at a time per version: two fleets starting together share the venv.
    with open(app_dir.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        say(f"installing wheelhouse {house.version} into {app_dir / 'venv'}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(FLEET_APP_DIR=str(app_dir), FLEET_PYTHON=sys.executable)
        result = subprocess.run(
            ["bash", str(BOOT_SCRIPT), "install", str(house.directory)],
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            cwd=app_dir,
        )
        if result.returncode != 0:
            tail = "\n".join(f"    {line}" for line in result.stderr.strip().splitlines()[-15:])
            raise LocalFleetError(
                f"installing wheelhouse {house.version} into {app_dir} failed:\n{tail}"
            )
    with contextlib.suppress(OSError):
        os.utime(app_dir)
    _prune()
    return house, python


def _prune() -> None:
    for old in prune(venvs_dir(), KEEP):
        with contextlib.suppress(OSError):
            old.with_suffix(".lock").unlink()
