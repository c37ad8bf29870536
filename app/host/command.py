"""The worker's command line, built in one place.

The systemd unit, `app.boot --foreground`, the pidfile service and the local
fleet (scripts/local) all start workers with `worker_argv`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


def worker_argv(
    python: str, queue: str, concurrency: int | None, node: str, loglevel: str = "INFO"
) -> list[str]:
    """The command that runs a fleet worker (systemd unit, foreground, background, local fleet).

    `concurrency` None lets the worker size itself (app.cpus), as a pinned
    local instance does.
    """
    sizing = ["-c", str(concurrency)] if concurrency else []
    return [
        python,
        "-m",
        "celery",
        "-A",
        "app",
        "worker",
        # fair: a free pool process gets the next batch, not one that prefetched it.
        "-O",
        "fair",
        "-Q",
        queue,
        *sizing,
        "-n",
        node,
        # Workers need not know each other: gossip is chatter and mingle
        # waits a second at every start for replies nobody uses.
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    ]


def host_argv(env: Mapping[str, str], python: str = sys.executable) -> list[str]:
    """The worker command for this host, from its environment file."""
    return worker_argv(
        python, env["FLEET_QUEUE"], int(env["FLEET_CONCURRENCY"]), env["FLEET_NODE_NAME"]
    )


def worker_environ(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with the host's FLEET_* settings in place of any others."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return {**base, **env}
