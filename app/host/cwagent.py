"""The Amazon CloudWatch agent of a worker host: it ships the host's logs to the stack's log group.

scripts/fleet-boot.sh installs the agent on Amazon Linux (dnf); `python -m app.boot`
renders its configuration (`agent_config`, a pure function) and starts it with
`amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 -s -c file:<config>`.

The agent tails files: it did not read the systemd journal before version
1.300070.0 (June 2026), and Amazon Linux's package may be older. So where the
agent runs, the worker's and the drain agent's units append their output to
files under /var/log/celery-fleet/ (app/host/units.py), logrotate keeps each
under `ROTATE_SIZE`, and the agent sends them to /celery-fleet/<stack>/worker as
the streams <instance id>/worker and <instance id>/agent. The boot's own output
is cloud-init's log (cloud-init runs fleet-boot), stream <instance id>/boot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.host.envfile import HEADER

CTL = Path("/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl")
# The agent's systemd unit (its package installs it; `-s` starts it).
UNIT = "amazon-cloudwatch-agent.service"
# Where cloud-init writes the output of the user-data's runcmd: fleet-boot's log.
BOOT_LOG = Path("/var/log/cloud-init-output.log")
# logrotate copies and truncates a file beyond this; three old copies are kept.
ROTATE_SIZE = "50M"
# The log files of a host, by stream: (file name under the log directory, stream).
LOG_FILES = (("worker.log", "worker"), ("agent.log", "agent"))


def agent_config(
    log_group: str, log_dir: Path, boot_log: Path = BOOT_LOG, *, dualstack: bool = False
) -> dict[str, Any]:
    """The agent's JSON configuration: the host's log files into `log_group`, one stream each.

    `dualstack` (a stack with `nat: ipv6`): the agent calls CloudWatch Logs at its
    dual-stack endpoint (`use_dualstack_endpoint`, in the agent since September 2025,
    amazon-cloudwatch-agent#1864; an older agent cannot reach the service over IPv6).
    """
    files = [(log_dir / name, stream) for name, stream in LOG_FILES] + [(boot_log, "boot")]
    agent: dict[str, Any] = {
        # Root: the log files are root's (systemd opens them for the units).
        "run_as_user": "root",
        "logfile": "/opt/aws/amazon-cloudwatch-agent/logs/amazon-cloudwatch-agent.log",
    }
    if dualstack:
        agent["use_dualstack_endpoint"] = True
    return {
        "agent": agent,
        "logs": {
            "logs_collected": {
                "files": {
                    "collect_list": [
                        {
                            "file_path": str(path),
                            "log_group_name": log_group,
                            # The agent puts in the instance's id itself.
                            "log_stream_name": f"{{instance_id}}/{stream}",
                            "timezone": "UTC",
                        }
                        for path, stream in files
                    ]
                }
            },
            "force_flush_interval": 5,
        },
    }


def logrotate_config(log_dir: Path) -> str:
    """/etc/logrotate.d/celery-fleet: the units' log files, each bounded in size.

    copytruncate: systemd holds the files open (O_APPEND) for the units' lifetime.
    """
    return f"""\
# {HEADER}
{log_dir}/*.log {{
    maxsize {ROTATE_SIZE}
    daily
    rotate 3
    copytruncate
    compress
    missingok
    notifempty
}}
"""


def start_argv(config: Path) -> list[str]:
    """The command that (re)loads `config` into the agent and starts it."""
    return [str(CTL), "-a", "fetch-config", "-m", "ec2", "-s", "-c", f"file:{config}"]


def installed() -> bool:
    return CTL.is_file()
