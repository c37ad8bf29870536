"""Where a worker host keeps its files: /opt/celery-fleet, /etc/celery-fleet, the units."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostPaths:
    """The paths of a host; FLEET_APP_DIR, FLEET_ENV_FILE, FLEET_SYSTEMD_DIR and FLEET_RUN_DIR move
    them (tests, unusual hosts), and FLEET_LOG_DIR and FLEET_LOGROTATE_DIR those of the log
    files the CloudWatch agent ships (app/host/cwagent.py)."""

    app_dir: Path
    env_file: Path
    systemd_dir: Path
    run_dir: Path
    log_dir: Path = Path("/var/log/celery-fleet")
    logrotate_dir: Path = Path("/etc/logrotate.d")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HostPaths:
        env = os.environ if env is None else env
        app_dir = Path(env.get("FLEET_APP_DIR") or "/opt/celery-fleet")
        return cls(
            app_dir=app_dir,
            env_file=Path(env.get("FLEET_ENV_FILE") or "/etc/celery-fleet/env"),
            systemd_dir=Path(env.get("FLEET_SYSTEMD_DIR") or "/etc/systemd/system"),
            run_dir=Path(env.get("FLEET_RUN_DIR") or app_dir / "run"),
            log_dir=Path(env.get("FLEET_LOG_DIR") or "/var/log/celery-fleet"),
            logrotate_dir=Path(env.get("FLEET_LOGROTATE_DIR") or "/etc/logrotate.d"),
        )

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "worker.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / "worker.log"

    @property
    def cwagent_config(self) -> Path:
        """The CloudWatch agent's configuration, as app.boot renders it."""
        return self.env_file.with_name("cloudwatch-agent.json")
