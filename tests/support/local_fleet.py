"""`fleet local` as a process a test starts, with everything it starts in turn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.support.paths import CACHE_HOME, FLEET_BIN, ROOT

FLEET = str(FLEET_BIN)


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LocalFleetProcess:
    """A `fleet local` command run by a test, with everything it starts."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir(exist_ok=True)
        (tmp_path / "tmp").mkdir(exist_ok=True)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FLEET_", "CELERY_")) and k != "XDG_STATE_HOME"
        }
        # TMPDIR: the fleet's private directory lands in tmp_path, to check it is removed.
        self.env.update(
            FLEET_STATE_DIR=str(self.state_dir),
            TMPDIR=str(tmp_path / "tmp"),
            XDG_CACHE_HOME=str(CACHE_HOME),
        )
        self.log_path = tmp_path / "fleet-local.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in cleanup
        self.proc = subprocess.Popen(
            [FLEET, "local", *args],
            env=self.env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started: list[psutil.Process] = []

    @property
    def state_file(self) -> Path:
        return self.state_dir / "local.json"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self, timeout: float = 120) -> dict:
        """Wait for the state file and the 'local fleet up' line; the state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"fleet local exited with {self.proc.returncode}:\n{self.output()}")
            if self.state_file.exists() and "local fleet up" in self.output():
                return json.loads(self.state_file.read_text())
            time.sleep(0.2)
        pytest.fail(f"fleet local did not come up in {timeout} s:\n{self.output()}")

    def snapshot(self) -> list[psutil.Process]:
        """Every process `fleet local` has started, directly or not (taken before stopping)."""
        self.started = psutil.Process(self.proc.pid).children(recursive=True)
        return self.started

    def cmd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Another `fleet` command in the same environment (no URLs given)."""
        return subprocess.run(
            [FLEET, *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def stop(self, sig: int, timeout: float = 90) -> int:
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"fleet local did not exit within {timeout} s of signal {sig}:\n{self.output()}"
            )

    def cleanup(self) -> None:
        """After a failed test: stop what this test started, by PID."""
        if self.proc.poll() is None:
            with_children = self.started or psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.started = with_children
        for p in self.started:
            if alive(p):
                p.kill()
        self.log.close()
