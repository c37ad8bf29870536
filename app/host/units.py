"""The systemd units of a worker host: the worker and the drain agent."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.host.command import host_argv
from app.host.envfile import HEADER
from app.host.paths import HostPaths
from app.names import WORKER_UNIT
from app.settings import stop_seconds

SERVICE_USER = "celery-fleet"


def _unit_arg(arg: str) -> str:
    # systemd expands %specifiers and $VARIABLES in ExecStart; neither is meant here.
    arg = arg.replace("\\", "\\\\").replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in " \t\"'"):
        arg = '"' + arg.replace('"', '\\"') + '"'
    return arg


def _exec(argv: Sequence[str]) -> str:
    return " ".join(_unit_arg(a) for a in argv)


def _output(log_file: Path | None) -> str:
    """Where a unit's stdout and stderr go: the journal, or appended to `log_file` (which the
    CloudWatch agent tails: it does not read the journal, see app/host/cwagent.py)."""
    if log_file is None:
        return ""
    return (
        "# Appended to a file the CloudWatch agent ships (logrotate bounds it).\n"
        f"StandardOutput=append:{log_file}\nStandardError=append:{log_file}\n"
    )


def worker_unit(
    paths: HostPaths,
    env: Mapping[str, str],
    python: str,
    user: str,
    log_file: Path | None = None,
) -> str:
    stop_timeout = stop_seconds(env)
    return f"""\
# {HEADER}
[Unit]
Description=Celery fleet worker
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
User={user}
Group={user}
WorkingDirectory={paths.app_dir}
# FLEET_* settings; root's only (secrets inside): systemd reads it before it drops to User=.
EnvironmentFile={paths.env_file}
ExecStart={_exec(host_argv(env, python))}
{_output(log_file)}# SIGTERM is Celery's warm shutdown: take no new batch, finish the running ones.
KillSignal=SIGTERM
# SIGTERM to the main process only; the pool children would die on it mid-batch.
KillMode=mixed
# The longest batch (FLEET_MAX_BATCH_SECONDS) plus a minute to hand back and exit.
TimeoutStopSec={stop_timeout}
# Also after the worker's liveness watchdog ends it (app/worker/watchdog.py, exit code 70).
Restart=always
RestartSec=5
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def agent_unit(
    paths: HostPaths, env: Mapping[str, str], python: str, log_file: Path | None = None
) -> str:
    argv = [python, "-m", "app.agent", "--unit", WORKER_UNIT, "--node", env["FLEET_NODE_NAME"]]
    return f"""\
# {HEADER}
[Unit]
Description=Celery fleet drain agent (scale-in protection, termination hook, Spot notice)
Wants=network-online.target
After=network-online.target {WORKER_UNIT}

[Service]
Type=exec
# Root: it stops the worker's unit through systemctl.
WorkingDirectory={paths.app_dir}
EnvironmentFile={paths.env_file}
ExecStart={_exec(argv)}
{_output(log_file)}Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def on_ec2() -> bool:
    """Whether this machine is an EC2 instance (where the drain agent has metadata to read)."""
    for path, mark in (
        ("/sys/devices/virtual/dmi/id/sys_vendor", "Amazon EC2"),
        ("/sys/devices/virtual/dmi/id/board_asset_tag", "i-"),
        ("/sys/hypervisor/uuid", "ec2"),
    ):
        with contextlib.suppress(OSError):
            if Path(path).read_text().strip().startswith(mark):
                return True
    return False


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 (not merely installed, as in a container)."""
    return os.path.isdir("/run/systemd/system")
