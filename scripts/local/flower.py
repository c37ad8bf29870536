"""Flower, Celery's web monitor, against a fleet's broker.

`fleet local --flower` starts it beside the local fleet, on a free loopback
port. Flower learns about workers from Celery's events and remote control,
which need a broker with broadcast (RabbitMQ or Redis): the `rabbitmq` and
`redis` stacks, reached from a laptop through the same Session Manager port
forward as the launcher (infra/README.md). SQS has no broadcast, so Flower
sees nothing there; `fleet status` works with every broker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from app.settings import Settings
from scripts.local.processes import free_port, wait_port


def start_flower(
    settings: Settings, workdir: Path, port: int | None = None, address: str = "127.0.0.1"
) -> tuple[subprocess.Popen, str]:
    """Start Flower in its own process group; (process, its URL). Stop it with stop_process."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(settings.as_env())
    log = open(workdir / "flower.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        # Loopback only and no authentication: it can shut workers down, so it
        # is for this machine (or the end of an SSM tunnel), never a public port.
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "app",
            "flower",
            f"--address={address}",
            f"--port={port}",
        ],
        env=env,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    wait_port(port, proc, "flower")
    return proc, f"http://{address}:{port}/"
