"""Processes of the local fleet: free ports, waiting for a port, stopping a process group."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class LocalFleetError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalFleetError(f"{what} exited with code {proc.returncode} while starting.")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise LocalFleetError(f"{what} did not open port {port} within {timeout:.0f} s.")


def stop_process(
    proc: subprocess.Popen | None, timeout: float = 30, sig: int = signal.SIGTERM
) -> None:
    """Signal the process, then kill its whole group if it has not exited in time."""
    if proc is None or proc.poll() is not None:
        kill_group(proc)
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    kill_group(proc)


def kill_group(proc: subprocess.Popen | None) -> None:
    # Pool processes and helpers (the Erlang VM, epmd) share the group.
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def need_binary(binary: str) -> str:
    # Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user, who
    # cannot write our private directory; the script under /usr/lib runs as us.
    path = next(
        (p for p in (f"/usr/lib/rabbitmq/bin/{binary}",) if os.access(p, os.X_OK)), None
    ) or shutil.which(binary)
    if path is None:
        raise LocalFleetError(f"{binary} is not installed; run `make setup` (it installs it).")
    return path


def private_file(path: Path, text: str) -> Path:
    """Write `text` to a file only its owner can read (it holds a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path
