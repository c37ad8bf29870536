"""A worker host on this machine, for the boot, Ansible and ops tests.

The app wheel is built from a copy of the sources (as infra/artifact.py does,
so the repository gets no build/ or *.egg-info) and, beside it, every
dependency wheel, downloaded once per source digest: the same offline
wheelhouse the stack ships to subnets without PyPI. Paths a host uses are
redirected with the FLEET_* variables app/host/ and scripts/fleet-boot.sh read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app.launcher.job import JobOptions
from app.launcher.launcher import Launcher
from app.launcher.sources import Source
from app.settings import Settings
from app.store import open_store
from tests.support.paths import ROOT

BOOT_SCRIPT = ROOT / "scripts" / "fleet-boot.sh"
SOURCES = ("pyproject.toml", "README.md", "app", "scripts")
CACHE = Path(tempfile.gettempdir()) / "celery-fleet-test-wheels"


def _digest(*parts: str, sources: tuple[str, ...] = SOURCES) -> str:
    h = hashlib.sha256("\0".join(parts).encode())
    for entry in sources:
        path = ROOT / entry
        files = (
            [path]
            if path.is_file()
            else sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        )
        for f in files:
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _publish(built: Path, target: Path) -> Path:
    # Atomic: a half-built directory is never seen; another run may have got there first.
    with contextlib.suppress(OSError):
        built.rename(target)
    return target


def _build_app(tmp: Path, version: str | None) -> Path:
    src, out = tmp / "src", tmp / "wheels"
    for entry in SOURCES:
        if (ROOT / entry).is_dir():
            shutil.copytree(ROOT / entry, src / entry, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / entry, src / entry)
    if version:
        pyproject = src / "pyproject.toml"
        text = pyproject.read_text()
        old = next(line for line in text.splitlines() if line.startswith("version = "))
        pyproject.write_text(text.replace(old, f'version = "{version}"', 1))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(src))
    (wheel,) = out.glob("celery_fleet-*.whl")
    return wheel


def _dependencies(app: Path) -> Path:
    """The dependency wheels of pyproject.toml (with the aws and operator extras), downloaded
    once."""
    target = CACHE / f"deps-{_digest(sources=('pyproject.toml',))}"
    if not target.is_dir():
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            out = Path(tmp, "deps")
            _pip("download", "--only-binary=:all:", "--dest", str(out), f"{app}[aws,operator]")
            (out / app.name).unlink()
            _publish(out, target)
    return target


def wheelhouse(version: str | None = None) -> Path:
    """A directory with the app wheel (`version` replaces pyproject's) and its dependencies."""
    target = CACHE / f"app-{_digest(str(version))}"
    if target.is_dir():
        os.utime(target)  # in use: kept by the pruning below
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    # Wheelhouses of sources that no longer exist: every edit makes one.
    for old in CACHE.glob("app-*"):
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        app = _build_app(Path(tmp), version)
        deps = _dependencies(app)
        for wheel in deps.glob("*.whl"):
            os.link(wheel, app.parent / wheel.name)
        _publish(app.parent, target)
    return target


def app_wheel(version: str | None = None) -> Path:
    (wheel,) = wheelhouse(version).glob("celery_fleet-*.whl")
    return wheel


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
        FLEET_OFFLINE_INSTALL="1",
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


def run_job(settings: Settings, out: Path, n: int = 200) -> Any:
    """Run the shipped example task (app.tasks.process_id) over range:0:n."""
    opts = JobOptions(
        task="process_id",
        source=Source.parse(f"range:0:{n}"),
        out=out,
        batch_size=max(1, n // 8),
        progress=False,
    )
    return Launcher(settings).run(opts)
