"""The worker as a service: systemd's unit where systemd runs, else a pidfile.

The commands (`start`, `restart`, `drain`, `logs`) are the same either way;
only the service manager differs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from app.host.command import host_argv, worker_environ
from app.host.envfile import read_env, write_if_changed
from app.host.paths import HostPaths
from app.host.units import systemd_running
from app.names import WORKER_UNIT
from app.settings import stop_seconds


class WorkerService(Protocol):
    """The worker as a service: systemd's unit, or a background process with a pidfile."""

    name: str

    def running(self) -> bool: ...
    def pid(self) -> int | None: ...
    def start(self) -> None: ...
    def restart(self) -> None: ...
    def drain(self) -> None: ...
    def logs_argv(self, lines: int, follow: bool) -> list[str]: ...


def run_command(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise BootError(
            f"`{' '.join(argv)}` failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result


class BootError(RuntimeError):
    pass


class Systemd:
    name = "systemd"

    def __init__(self, unit: str = WORKER_UNIT, logfile: Path | None = None) -> None:
        self.unit = unit
        # Where the unit appends its output when the CloudWatch agent ships it (else the journal).
        self.logfile = logfile

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_command(["systemctl", *args], check)

    def running(self, unit: str | None = None) -> bool:
        return self.ctl("is-active", "--quiet", unit or self.unit, check=False).returncode == 0

    def pid(self) -> int | None:
        out = self.ctl("show", "--property=MainPID", "--value", self.unit, check=False).stdout
        return int(out.strip()) if out.strip().isdigit() and int(out.strip()) > 0 else None

    def start(self) -> None:
        self.ctl("start", self.unit)

    def restart(self) -> None:
        # A stop is SIGTERM (warm) and waits up to TimeoutStopSec for running batches.
        self.ctl("restart", self.unit)

    def drain(self) -> None:
        # Returns once the worker has finished its batches and exited; a
        # stopped unit stays stopped (Restart= applies to its own exits only).
        self.ctl("stop", self.unit)

    def logs_argv(self, lines: int, follow: bool) -> list[str]:
        if self.logfile is not None and self.logfile.is_file():
            return ["tail", "-n", str(lines), *(["-F"] if follow else []), str(self.logfile)]
        return [
            "journalctl",
            "--unit",
            self.unit,
            "--lines",
            str(lines),
            "--no-pager",
            "--output",
            "short-iso",
            *(["--follow"] if follow else []),
        ]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False


class Pidfile:
    """The worker as a detached process with a pidfile: hosts without systemd."""

    name = "pidfile"

    def __init__(self, paths: HostPaths, poll: float = 0.2) -> None:
        self.paths = paths
        self.poll = poll

    def pid(self) -> int | None:
        try:
            pid = int(self.paths.pidfile.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if not pid_alive(pid):
            return None
        # Never signal a process that merely inherited a stale pid.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        node = read_env(self.paths.env_file).get("FLEET_NODE_NAME", "").encode()
        return pid if b"celery" in b" ".join(cmdline) and node in cmdline else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> None:
        if self.running():
            return
        env = read_env(self.paths.env_file)
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.paths.logfile, "ab") as log:
            proc = subprocess.Popen(
                host_argv(env),
                env=worker_environ(env),
                cwd=self.paths.app_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: it outlives this command and the SSH session that ran it.
                start_new_session=True,
            )
        write_if_changed(self.paths.pidfile, f"{proc.pid}\n", 0o644)

    def drain(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        env = read_env(self.paths.env_file)
        timeout = stop_seconds(env)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # warm shutdown
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(self.poll)
        if pid_alive(pid):  # as systemd does after TimeoutStopSec
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.paths.pidfile.unlink()

    def restart(self) -> None:
        self.drain()
        self.start()

    def logs_argv(self, lines: int, follow: bool) -> list[str]:
        return ["tail", "-n", str(lines), *(["-F"] if follow else []), str(self.paths.logfile)]


def service_for(paths: HostPaths, use_systemd: bool) -> WorkerService:
    return Systemd(logfile=paths.log_dir / "worker.log") if use_systemd else Pidfile(paths)


def want_systemd(choice: str) -> bool:
    return systemd_running() if choice == "auto" else choice == "yes"
