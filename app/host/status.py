"""What a worker host runs, and waiting until its worker answers."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

from app.cpus import available_cpus
from app.host.envfile import read_env
from app.host.paths import HostPaths
from app.host.service import BootError, WorkerService
from app.names import app_version, code_version
from app.settings import ConfigError, Settings


def host_status(paths: HostPaths, service: WorkerService) -> dict[str, Any]:
    """What this host runs: cores, size, service state, and the worker's own heartbeat."""
    env = read_env(paths.env_file)
    pid = service.pid()
    status: dict[str, Any] = {
        "host": socket.gethostname(),
        "node": env.get("FLEET_NODE_NAME"),
        "manager": service.name,
        "running": pid is not None or service.running(),
        "pid": pid,
        "cores": available_cpus(),
        "concurrency": int(env.get("FLEET_CONCURRENCY") or 0),
        "version": app_version(),
        # The content hash of the wheelhouse installed in this venv (None: none).
        "code": code_version(),
        "online": False,
        "worker_version": None,
        "worker_code": None,
        "active": None,
        "reserved": None,
        "error": None,
    }
    try:
        from app.store import open_store

        store = open_store(Settings.from_env(env))
        store.ping()
        heartbeat = next(
            (
                w
                for w in store.workers()
                if w.get("hostname") == status["node"]
                and (pid is None or int(w.get("pid") or 0) == pid)
            ),
            None,
        )
    except (Exception, ConfigError) as exc:
        status["error"] = str(exc)
        return status
    if heartbeat is not None:
        status.update(
            online=status["running"],
            worker_version=heartbeat.get("version"),
            worker_code=heartbeat.get("code"),
            active=heartbeat.get("active"),
            reserved=heartbeat.get("reserved"),
            concurrency=heartbeat.get("concurrency", status["concurrency"]),
        )
    return status


def wait_online(
    paths: HostPaths, service: WorkerService, timeout: float, poll: float = 0.5
) -> dict[str, Any]:
    """Block until the worker's heartbeat is in the result store; BootError if it dies first."""
    deadline = time.monotonic() + timeout
    while True:
        status = host_status(paths, service)
        if status["online"]:
            return status
        if not status["running"]:
            raise BootError(
                f"the worker is not running; see `python -m app.boot logs`{tail(paths, service)}"
            )
        if time.monotonic() > deadline:
            raise BootError(
                f"the worker did not answer within {timeout:.0f} s"
                f" ({status['error'] or 'no heartbeat'}){tail(paths, service)}"
            )
        time.sleep(poll)


def tail(paths: HostPaths, service: WorkerService, lines: int = 15) -> str:
    result = subprocess.run(
        service.logs_argv(lines, False), capture_output=True, text=True, check=False
    )
    return f"\n{result.stdout.rstrip()}" if result.stdout.strip() else ""
