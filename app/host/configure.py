"""Configure a worker host: settings -> environment file -> units -> started, idempotently."""

from __future__ import annotations

import hashlib
import json
import pwd
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.cpus import available_cpus
from app.host import cwagent
from app.host.envfile import read_env, render_env, write_if_changed
from app.host.paths import HostPaths
from app.host.service import Systemd, run_command
from app.host.units import SERVICE_USER, agent_unit, worker_unit
from app.names import AGENT_UNIT, DUALSTACK_VARIABLE, WORKER_UNIT, ssm_prefix
from app.settings import ConfigError, Settings


def stack_from_prefix(prefix: str) -> str:
    """The stack whose SSM parameters are under `prefix` (/celery-fleet/<stack>/)."""
    stack = prefix.strip("/").rpartition("/")[2]
    if not stack or ssm_prefix(stack) != prefix:
        raise ConfigError(f"SSM prefix {prefix!r} is not of the form {ssm_prefix('<stack>')}.")
    return stack


# Tries of every AWS call of a boot (and of each network step of scripts/fleet-boot.sh).
BOOT_ATTEMPTS = 5


def boot_attempts(environ: Mapping[str, str]) -> int:
    """FLEET_BOOT_ATTEMPTS, as fleet-boot.sh reads it (tests make it small)."""
    raw = environ.get("FLEET_BOOT_ATTEMPTS", "").strip()
    return max(1, int(raw)) if raw.isdigit() else BOOT_ATTEMPTS


def aws_session(environ: Mapping[str, str]) -> Any:
    """A boto3 session whose every client retries (botocore's standard mode, with backoff):
    a boot's SSM reads must outlast a throttled or briefly unreachable endpoint."""
    import boto3
    import botocore.config
    import botocore.session

    core = botocore.session.get_session()
    core.set_default_client_config(
        botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": boot_attempts(environ)},
            connect_timeout=5,
            read_timeout=20,
        )
    )
    return boto3.session.Session(botocore_session=core)


# Variables of the boot's environment (the user-data's boot.env) that the worker and
# the drain agent need as well, so the environment file carries them on.
HANDED_ON = (DUALSTACK_VARIABLE,)


def handed_on(environ: Mapping[str, str]) -> dict[str, str]:
    return {key: environ[key] for key in HANDED_ON if environ.get(key)}


def load_settings(
    settings_file: str | None, stack: str | None, environ: Mapping[str, str]
) -> tuple[Settings, dict[str, str], str]:
    """(settings, other variables to keep, where they came from)."""
    if settings_file and stack:
        raise ConfigError("give either a settings file or a stack, not both.")
    if settings_file:
        raw = read_env(Path(settings_file)) if Path(settings_file).exists() else None
        if raw is None:
            raise ConfigError(f"settings file {settings_file} does not exist.")
        # Variables the settings do not cover (the agent's FLEET_AUTOSCALING_GROUP, AWS_*) stay.
        return Settings.from_env(raw), {**handed_on(environ), **raw}, f"file {settings_file}"
    if stack:
        from app.stack import settings_from_stack

        settings = settings_from_stack(stack, aws_session(environ))
        return settings, handed_on(environ), f"SSM Parameter Store (stack {stack})"
    if environ.get("FLEET_BROKER_URL"):
        return Settings.from_env(dict(environ)), handed_on(environ), "the environment"
    raise ConfigError(
        "no settings: give --stack NAME, --ssm-prefix PREFIX (FLEET_SSM_PREFIX), "
        "--settings FILE (FLEET_SETTINGS_FILE), or FLEET_BROKER_URL and "
        "FLEET_RESULT_URL in the environment."
    )


def host_env(
    settings: Settings,
    extra: Mapping[str, str],
    concurrency: int | None = None,
    node: str | None = None,
) -> dict[str, str]:
    """The environment file of this host: the settings, its size and its worker's name."""
    env = {**extra, **settings.as_env()}
    env["FLEET_CONCURRENCY"] = str(concurrency or settings.concurrency or available_cpus())
    env["FLEET_NODE_NAME"] = node or extra.get("FLEET_NODE_NAME") or default_node()
    if settings.aws_region:
        # The agent's and boto3's other clients read this one.
        env.setdefault("AWS_DEFAULT_REGION", settings.aws_region)
    return env


def default_node() -> str:
    # What Celery's own default (celery@%h) gives, and what app.agent looks for.
    return f"celery@{socket.gethostname()}"


@dataclass
class Report:
    files: list[str]
    actions: list[str]
    systemd: str
    concurrency: int
    node: str
    source: str

    @property
    def changed(self) -> bool:
        return bool(self.files or self.actions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "changed": self.changed,
            "files": self.files,
            "actions": self.actions,
            "systemd": self.systemd,
            "concurrency": self.concurrency,
            "node": self.node,
            "source": self.source,
        }


def ensure_user(user: str, home: Path) -> bool:
    try:
        pwd.getpwnam(user)
        return False
    except KeyError:
        run_command(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                str(home),
                "--shell",
                "/sbin/nologin",
                user,
            ]
        )
        return True


def host_files(
    paths: HostPaths,
    env: Mapping[str, str],
    python: str,
    user: str,
    agent: bool,
    foreground: bool,
    log_group: str | None,
) -> dict[Path, tuple[str, int]]:
    """What configure writes: path -> (content, mode)."""
    files = {paths.env_file: (render_env(env), 0o600)}
    if foreground:
        return files
    shipped = log_group is not None
    logs = {name: paths.log_dir / name if shipped else None for name, _ in cwagent.LOG_FILES}
    files[paths.systemd_dir / WORKER_UNIT] = (
        worker_unit(paths, env, python, user, logs["worker.log"]),
        0o644,
    )
    if agent:
        drain = agent_unit(paths, env, python, logs["agent.log"])
        files[paths.systemd_dir / AGENT_UNIT] = (drain, 0o644)
    if log_group is not None:
        dualstack = env.get(DUALSTACK_VARIABLE, "").lower() == "true"
        config = cwagent.agent_config(log_group, paths.log_dir, dualstack=dualstack)
        files[paths.cwagent_config] = (json.dumps(config, indent=2) + "\n", 0o644)
        rotate = cwagent.logrotate_config(paths.log_dir)
        files[paths.logrotate_dir / "celery-fleet"] = (rotate, 0o644)
        # systemd creates a unit's log file, not its directory.
        paths.log_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    return files


def configure(
    paths: HostPaths,
    settings: Settings,
    extra: Mapping[str, str],
    source: str,
    *,
    concurrency: int | None = None,
    node: str | None = None,
    use_systemd: bool = False,
    start: bool = True,
    agent: bool = False,
    foreground: bool = False,
    user: str = SERVICE_USER,
    python: str = sys.executable,
    log_group: str | None = None,
) -> Report:
    """`log_group`: ship the units' logs there with the CloudWatch agent (app/host/cwagent.py)."""
    env = host_env(settings, extra, concurrency, node)
    units = [WORKER_UNIT, *([AGENT_UNIT] if agent else [])]
    shipped = log_group is not None and not foreground
    files = host_files(paths, env, python, user, agent, foreground, log_group)
    written = [
        str(path) for path, (text, mode) in files.items() if write_if_changed(path, text, mode)
    ]
    # What systemd was last told about: after a failed reload or restart the
    # files are already written, and the next run must still apply them.
    state = hashlib.sha256(repr(sorted((str(p), t) for p, (t, _) in files.items())).encode())
    applied = paths.env_file.with_name(".systemd-applied")
    report = Report(written, [], "", int(env["FLEET_CONCURRENCY"]), env["FLEET_NODE_NAME"], source)
    if foreground:
        report.systemd = "not used (--foreground)"
        return report
    if not use_systemd:
        report.systemd = "skipped: systemd is not running here"
        return report
    report.systemd = "used"
    if ensure_user(user, paths.app_dir):
        report.actions.append(f"created user {user}")
    systemd = Systemd()
    if written or not applied.exists() or applied.read_text() != state.hexdigest():
        systemd.ctl("daemon-reload")
        systemd.ctl("enable", *units)
        report.actions.append(f"enabled {' '.join(units)}")
        if start:
            # A running worker finishes its batches first (warm stop), then
            # comes back with the new settings.
            systemd.ctl("restart", *units)
            report.actions.append(f"(re)started {' '.join(units)}")
            if shipped:
                start_cwagent(paths, report)
        write_if_changed(applied, state.hexdigest(), 0o600)
    elif start:
        stopped = [u for u in units if not systemd.running(u)]
        if stopped:
            systemd.ctl("start", *stopped)
            report.actions.append(f"started {' '.join(stopped)}")
        if shipped and not systemd.running(cwagent.UNIT):
            start_cwagent(paths, report)
    return report


def start_cwagent(paths: HostPaths, report: Report) -> None:
    """Load the rendered configuration into the CloudWatch agent and (re)start it."""
    run_command(cwagent.start_argv(paths.cwagent_config))
    report.actions.append(f"started the CloudWatch agent ({paths.cwagent_config})")
