"""Configure and run the Celery worker of one host: the only place that knows how.

    python -m app.boot [configure]     settings -> environment file -> systemd units -> started
    python -m app.boot --foreground    the same files, then run the worker in this process
    python -m app.boot start | restart | drain | wait | status | logs

scripts/fleet-boot.sh installs the wheel into the venv and hands over to this
module; the Ansible role runs `configure`, the `fleet ops` tasks run the other
commands over SSH, and scripts/local.py starts its workers with `worker_argv`.
So user-data, Ansible, Fabric and the local fleet start workers the same way.

Settings come from SSM Parameter Store (--stack, or --ssm-prefix /
FLEET_SSM_PREFIX as the user-data's boot.env sets it), from a file of FLEET_*
lines (--settings / FLEET_SETTINGS_FILE), or from FLEET_* variables already in
the environment (a container). The worker is sized to the CPUs this process may
use (app.cpus: affinity and cgroup quota) unless --concurrency says otherwise.
Both go to the environment file, which is then the record of what this host
runs: `start`, `status` and the units read it.

Where systemd is PID 1 the worker and the drain agent (app.agent) are systemd
units. Elsewhere (a container, the tests) `start` runs the worker in the
background with a pidfile and `drain` signals that pid. The commands and the
worker's command line are the same; only the service manager differs.

`configure` is idempotent: it rewrites only files whose content changed and
touches systemd only then (or to start a unit that is not running); a second
run prints "nothing changed".

Paths, for tests and unusual hosts: FLEET_APP_DIR (/opt/celery-fleet, the venv
is in venv/), FLEET_ENV_FILE (/etc/celery-fleet/env), FLEET_SYSTEMD_DIR
(/etc/systemd/system), FLEET_RUN_DIR (pidfile and log without systemd;
FLEET_APP_DIR/run).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from app.cpus import available_cpus
from app.settings import ConfigError, Settings

WORKER_UNIT = "celery-fleet-worker.service"
AGENT_UNIT = "celery-fleet-agent.service"
SERVICE_USER = "celery-fleet"
# A stopping worker may finish its longest batch, then needs a moment to hand
# back what it had not started and exit.
STOP_MARGIN_SECONDS = 60
HEADER = "Written by `python -m app.boot` (celery-fleet): edits are overwritten."


def say(message: str) -> None:
    print(f"fleet-boot: {message}", file=sys.stderr, flush=True)


# -- the worker's command line ---------------------------------------------------


def worker_argv(python: str, queue: str, concurrency: int | None, node: str,
                loglevel: str = "INFO") -> list[str]:
    """The command that runs a fleet worker (systemd unit, foreground, background, local fleet).

    `concurrency` None lets the worker size itself (app.cpus), as a pinned
    local instance does.
    """
    sizing = ["-c", str(concurrency)] if concurrency else []
    return [python, "-m", "celery", "-A", "app", "worker",
            # fair: a free pool process gets the next batch, not one that prefetched it.
            "-O", "fair", "-Q", queue, *sizing, "-n", node,
            # Workers need not know each other: gossip is chatter and mingle
            # waits a second at every start for replies nobody uses.
            "--without-gossip", "--without-mingle", "--loglevel", loglevel]


def host_argv(env: Mapping[str, str], python: str = sys.executable) -> list[str]:
    """The worker command for this host, from its environment file."""
    return worker_argv(python, env["FLEET_QUEUE"], int(env["FLEET_CONCURRENCY"]),
                       env["FLEET_NODE_NAME"])


# -- where things are --------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    app_dir: Path
    env_file: Path
    systemd_dir: Path
    run_dir: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Layout:
        env = os.environ if env is None else env
        app_dir = Path(env.get("FLEET_APP_DIR") or "/opt/celery-fleet")
        return cls(
            app_dir=app_dir,
            env_file=Path(env.get("FLEET_ENV_FILE") or "/etc/celery-fleet/env"),
            systemd_dir=Path(env.get("FLEET_SYSTEMD_DIR") or "/etc/systemd/system"),
            run_dir=Path(env.get("FLEET_RUN_DIR") or app_dir / "run"),
        )

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "worker.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / "worker.log"


# -- the environment file ------------------------------------------------------------

# Characters systemd's EnvironmentFile and read_env take without quotes.
_PLAIN = frozenset(string.ascii_letters + string.digits + "_@%+=:,./~?&!*^-")
# Inside double quotes systemd un-escapes exactly these after a backslash.
_ESCAPED = '\\"`$'


def render_env(env: Mapping[str, str]) -> str:
    lines = [f"# {HEADER}"]
    for key in sorted(env):
        value = env[key]
        if "\n" in value or "\r" in value:
            raise ConfigError(f"{key} holds a line break; an environment file cannot carry it.")
        if set(value) <= _PLAIN:
            lines.append(f"{key}={value}")
        else:
            quoted = "".join("\\" + c if c in _ESCAPED else c for c in value)
            lines.append(f'{key}="{quoted}"')
    return "\n".join(lines) + "\n"


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads them (plain, or double-quoted with escapes)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key.startswith("export "):
            key = key[len("export "):].strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            out, chars = [], iter(value[1:-1])
            for c in chars:
                out.append(next(chars, "") if c == "\\" else c)
            value = "".join(out)
        elif len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        env[key] = value
    return env


def read_env(path: Path) -> dict[str, str]:
    try:
        return parse_env(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; run `python -m app.boot` (configure) "
                          "first.") from None


def write_if_changed(path: Path, text: str, mode: int) -> bool:
    """Write `text` to `path` atomically unless it already holds exactly that; True if written."""
    try:
        if path.read_text() == text and path.stat().st_mode & 0o777 == mode:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # Created with its final mode: the environment file holds secrets from the first byte.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)  # the umask may have taken bits away
    os.replace(tmp, path)
    return True


# -- settings -----------------------------------------------------------------------


def stack_from_prefix(prefix: str) -> str:
    from app.stack import ssm_prefix

    stack = prefix.strip("/").rpartition("/")[2]
    if not stack or ssm_prefix(stack) != prefix:
        raise ConfigError(f"SSM prefix {prefix!r} is not of the form {ssm_prefix('<stack>')}.")
    return stack


def load_settings(settings_file: str | None, stack: str | None,
                  environ: Mapping[str, str]) -> tuple[Settings, dict[str, str], str]:
    """(settings, other variables to keep, where they came from)."""
    if settings_file and stack:
        raise ConfigError("give either a settings file or a stack, not both.")
    if settings_file:
        raw = read_env(Path(settings_file)) if Path(settings_file).exists() else None
        if raw is None:
            raise ConfigError(f"settings file {settings_file} does not exist.")
        # Variables the settings do not cover (the agent's FLEET_AUTOSCALING_GROUP, AWS_*) stay.
        return Settings.from_env(raw), raw, f"file {settings_file}"
    if stack:
        from app.stack import settings_from_stack

        return settings_from_stack(stack), {}, f"SSM Parameter Store (stack {stack})"
    if environ.get("FLEET_BROKER_URL"):
        return Settings.from_env(dict(environ)), {}, "the environment"
    raise ConfigError("no settings: give --stack NAME, --ssm-prefix PREFIX (FLEET_SSM_PREFIX), "
                      "--settings FILE (FLEET_SETTINGS_FILE), or FLEET_BROKER_URL and "
                      "FLEET_RESULT_URL in the environment.")


def host_env(settings: Settings, extra: Mapping[str, str], concurrency: int | None = None,
             node: str | None = None) -> dict[str, str]:
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


# -- systemd units -----------------------------------------------------------------


def _unit_arg(arg: str) -> str:
    # systemd expands %specifiers and $VARIABLES in ExecStart; neither is meant here.
    arg = arg.replace("\\", "\\\\").replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in " \t\"'"):
        arg = '"' + arg.replace('"', '\\"') + '"'
    return arg


def _exec(argv: Sequence[str]) -> str:
    return " ".join(_unit_arg(a) for a in argv)


def worker_unit(layout: Layout, env: Mapping[str, str], python: str, user: str) -> str:
    stop_timeout = int(env.get("FLEET_MAX_BATCH_SECONDS") or 900) + STOP_MARGIN_SECONDS
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
WorkingDirectory={layout.app_dir}
# FLEET_* settings; root's only (secrets inside): systemd reads it before it drops to User=.
EnvironmentFile={layout.env_file}
ExecStart={_exec(host_argv(env, python))}
# SIGTERM is Celery's warm shutdown: take no new batch, finish the running ones.
KillSignal=SIGTERM
# SIGTERM to the main process only; the pool children would die on it mid-batch.
KillMode=mixed
# The longest batch (FLEET_MAX_BATCH_SECONDS) plus {STOP_MARGIN_SECONDS} s to hand back and exit.
TimeoutStopSec={stop_timeout}
# Also after the worker's liveness watchdog ends it (app/watchdog.py, exit code 70).
Restart=always
RestartSec=5
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def agent_unit(layout: Layout, env: Mapping[str, str], python: str) -> str:
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
WorkingDirectory={layout.app_dir}
EnvironmentFile={layout.env_file}
ExecStart={_exec(argv)}
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def on_ec2() -> bool:
    """Whether this machine is an EC2 instance (where the drain agent has metadata to read)."""
    for path, mark in (("/sys/devices/virtual/dmi/id/sys_vendor", "Amazon EC2"),
                       ("/sys/devices/virtual/dmi/id/board_asset_tag", "i-"),
                       ("/sys/hypervisor/uuid", "ec2")):
        with contextlib.suppress(OSError):
            if Path(path).read_text().strip().startswith(mark):
                return True
    return False


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 (not merely installed, as in a container)."""
    return os.path.isdir("/run/systemd/system")


# -- service managers --------------------------------------------------------------


class Service(Protocol):
    """The worker as a service: systemd's unit, or a background process with a pidfile."""

    name: str

    def running(self) -> bool: ...
    def pid(self) -> int | None: ...
    def start(self) -> None: ...
    def restart(self) -> None: ...
    def drain(self) -> None: ...
    def logs_argv(self, lines: int, follow: bool) -> list[str]: ...


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise BootError(f"`{' '.join(argv)}` failed ({result.returncode}): "
                        f"{(result.stderr or result.stdout).strip()}")
    return result


class BootError(RuntimeError):
    pass


class Systemd:
    name = "systemd"

    def __init__(self, unit: str = WORKER_UNIT) -> None:
        self.unit = unit

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["systemctl", *args], check)

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
        return ["journalctl", "--unit", self.unit, "--lines", str(lines), "--no-pager",
                "--output", "short-iso", *(["--follow"] if follow else [])]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False


class Background:
    """The worker as a detached process with a pidfile: hosts without systemd."""

    name = "pidfile"

    def __init__(self, layout: Layout, poll: float = 0.2) -> None:
        self.layout = layout
        self.poll = poll

    def pid(self) -> int | None:
        try:
            pid = int(self.layout.pidfile.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if not pid_alive(pid):
            return None
        # Never signal a process that merely inherited a stale pid.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        node = read_env(self.layout.env_file).get("FLEET_NODE_NAME", "").encode()
        return pid if b"celery" in b" ".join(cmdline) and node in cmdline else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> None:
        if self.running():
            return
        env = read_env(self.layout.env_file)
        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.layout.logfile, "ab") as log:
            proc = subprocess.Popen(
                host_argv(env), env=worker_environ(env), cwd=self.layout.app_dir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                # Its own session: it outlives this command and the SSH session that ran it.
                start_new_session=True)
        write_if_changed(self.layout.pidfile, f"{proc.pid}\n", 0o644)

    def drain(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        env = read_env(self.layout.env_file)
        timeout = int(env.get("FLEET_MAX_BATCH_SECONDS") or 900) + STOP_MARGIN_SECONDS
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # warm shutdown
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(self.poll)
        if pid_alive(pid):  # as systemd does after TimeoutStopSec
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.layout.pidfile.unlink()

    def restart(self) -> None:
        self.drain()
        self.start()

    def logs_argv(self, lines: int, follow: bool) -> list[str]:
        return ["tail", "-n", str(lines), *(["-F"] if follow else []), str(self.layout.logfile)]


def worker_environ(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with the host's FLEET_* settings in place of any others."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return {**base, **env}


def service_for(layout: Layout, use_systemd: bool) -> Service:
    return Systemd() if use_systemd else Background(layout)


def want_systemd(choice: str) -> bool:
    return systemd_running() if choice == "auto" else choice == "yes"


# -- configure -----------------------------------------------------------------------


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
        return {"changed": self.changed, "files": self.files, "actions": self.actions,
                "systemd": self.systemd, "concurrency": self.concurrency, "node": self.node,
                "source": self.source}


def ensure_user(user: str, home: Path) -> bool:
    try:
        pwd.getpwnam(user)
        return False
    except KeyError:
        _run(["useradd", "--system", "--no-create-home", "--home-dir", str(home),
              "--shell", "/sbin/nologin", user])
        return True


def configure(layout: Layout, settings: Settings, extra: Mapping[str, str], source: str, *,
              concurrency: int | None = None, node: str | None = None,
              use_systemd: bool = False, start: bool = True, agent: bool = False,
              foreground: bool = False, user: str = SERVICE_USER,
              python: str = sys.executable) -> Report:
    env = host_env(settings, extra, concurrency, node)
    files = {layout.env_file: (render_env(env), 0o600)}
    units = [WORKER_UNIT, *([AGENT_UNIT] if agent else [])]
    if not foreground:
        files[layout.systemd_dir / WORKER_UNIT] = (worker_unit(layout, env, python, user), 0o644)
        if agent:
            files[layout.systemd_dir / AGENT_UNIT] = (agent_unit(layout, env, python), 0o644)
    written = [str(path) for path, (text, mode) in files.items()
               if write_if_changed(path, text, mode)]
    # What systemd was last told about: after a failed reload or restart the
    # files are already written, and the next run must still apply them.
    state = hashlib.sha256(repr(sorted((str(p), t) for p, (t, _) in files.items())).encode())
    applied = layout.env_file.with_name(".systemd-applied")
    report = Report(written, [], "", int(env["FLEET_CONCURRENCY"]), env["FLEET_NODE_NAME"],
                    source)
    if foreground:
        report.systemd = "not used (--foreground)"
        return report
    if not use_systemd:
        report.systemd = "skipped: systemd is not running here"
        return report
    report.systemd = "used"
    if ensure_user(user, layout.app_dir):
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
        write_if_changed(applied, state.hexdigest(), 0o600)
    elif start:
        stopped = [u for u in units if not systemd.running(u)]
        if stopped:
            systemd.ctl("start", *stopped)
            report.actions.append(f"started {' '.join(stopped)}")
    return report


# -- status --------------------------------------------------------------------------


def installed_version() -> str:
    try:
        return metadata.version("celery-fleet")
    except metadata.PackageNotFoundError:
        return "dev"


def host_status(layout: Layout, service: Service) -> dict[str, Any]:
    """What this host runs: cores, size, service state, and the worker's own heartbeat."""
    env = read_env(layout.env_file)
    pid = service.pid()
    status: dict[str, Any] = {
        "host": socket.gethostname(), "node": env.get("FLEET_NODE_NAME"),
        "manager": service.name, "running": pid is not None or service.running(), "pid": pid,
        "cores": available_cpus(), "concurrency": int(env.get("FLEET_CONCURRENCY") or 0),
        "version": installed_version(), "online": False, "worker_version": None,
        "active": None, "reserved": None, "error": None,
    }
    try:
        from app.store import open_store

        store = open_store(Settings.from_env(env))
        store.ping()
        heartbeat = next((w for w in store.workers() if w.get("hostname") == status["node"]
                          and (pid is None or int(w.get("pid") or 0) == pid)), None)
    except (Exception, ConfigError) as exc:  # noqa: BLE001 - status reports what it cannot reach
        status["error"] = str(exc)
        return status
    if heartbeat is not None:
        status.update(online=status["running"], worker_version=heartbeat.get("version"),
                      active=heartbeat.get("active"), reserved=heartbeat.get("reserved"),
                      concurrency=heartbeat.get("concurrency", status["concurrency"]))
    return status


def wait_online(layout: Layout, service: Service, timeout: float,
                poll: float = 0.5) -> dict[str, Any]:
    """Block until the worker's heartbeat is in the result store; BootError if it dies first."""
    deadline = time.monotonic() + timeout
    while True:
        status = host_status(layout, service)
        if status["online"]:
            return status
        if not status["running"]:
            raise BootError(f"the worker is not running; see `python -m app.boot logs`"
                            f"{tail(layout, service)}")
        if time.monotonic() > deadline:
            raise BootError(f"the worker did not answer within {timeout:.0f} s"
                            f" ({status['error'] or 'no heartbeat'}){tail(layout, service)}")
        time.sleep(poll)


def tail(layout: Layout, service: Service, lines: int = 15) -> str:
    result = subprocess.run(service.logs_argv(lines, False), capture_output=True, text=True,
                            check=False)
    return f"\n{result.stdout.rstrip()}" if result.stdout.strip() else ""


# -- command line ----------------------------------------------------------------------

COMMANDS = ("configure", "start", "restart", "drain", "wait", "status", "logs")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.boot",
                                     description=__doc__.split("\n")[0])
    manager = argparse.ArgumentParser(add_help=False)
    manager.add_argument("--systemd", choices=("auto", "yes", "no"),
                         default=os.environ.get("FLEET_SYSTEMD") or "auto",
                         help="use systemd units (auto: when systemd is PID 1)")
    sub = parser.add_subparsers(dest="command")

    conf = sub.add_parser("configure", parents=[manager],
                          help="write the environment file and units; start the worker")
    conf.add_argument("--stack", help="read settings from SSM Parameter Store")
    conf.add_argument("--ssm-prefix", default=os.environ.get("FLEET_SSM_PREFIX") or None,
                      help="the stack's parameters, /celery-fleet/<stack>/ (FLEET_SSM_PREFIX)")
    conf.add_argument("--settings", default=os.environ.get("FLEET_SETTINGS_FILE") or None,
                      metavar="FILE", help="read settings from a file of FLEET_* lines")
    conf.add_argument("--concurrency", type=int, help="pool size (default: usable CPUs)")
    conf.add_argument("--node", help="the worker's Celery node name (default: celery@HOST)")
    conf.add_argument("--user", default=SERVICE_USER, help="the worker unit's user")
    conf.add_argument("--agent", choices=("auto", "yes", "no"), default="auto",
                      help="install the drain agent unit (auto: on EC2)")
    conf.add_argument("--no-start", action="store_true",
                      help="write files and enable units, start nothing")
    conf.add_argument("--foreground", action="store_true",
                      help="no systemd: run the worker in this process")
    conf.add_argument("--json", action="store_true", help="print the report as JSON")

    for name, text in (("start", "start the worker"),
                       ("restart", "warm-stop (finish batches) and start the worker"),
                       ("drain", "warm-stop the worker and wait until it has exited")):
        sub.add_parser(name, parents=[manager], help=text)
    wait = sub.add_parser("wait", parents=[manager], help="wait until the worker answers")
    wait.add_argument("--timeout", type=float, default=120.0)
    status = sub.add_parser("status", parents=[manager], help="this host's worker")
    status.add_argument("--json", action="store_true")
    logs = sub.add_parser("logs", parents=[manager], help="the worker's log")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.add_argument("-f", "--follow", action="store_true")

    argv = list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "configure")  # `python -m app.boot --foreground`
    return parser.parse_args(argv)


def run_configure(args: argparse.Namespace, layout: Layout) -> int:
    stack = args.stack
    if not stack and not args.settings and args.ssm_prefix:
        stack = stack_from_prefix(args.ssm_prefix)
    settings, extra, source = load_settings(args.settings, stack, os.environ)
    use_systemd = not args.foreground and want_systemd(args.systemd)
    agent = {"yes": True, "no": False}.get(args.agent, on_ec2())
    report = configure(layout, settings, extra, source, concurrency=args.concurrency,
                       node=args.node, use_systemd=use_systemd, start=not args.no_start,
                       agent=agent, foreground=args.foreground, user=args.user)
    say(f"settings from {report.source}; {report.concurrency} worker processes "
        f"({available_cpus()} usable CPUs); node {report.node}")
    for path in report.files:
        say(f"wrote {path}")
    for action in report.actions:
        say(action)
    say(f"systemd: {report.systemd}")
    say("changed" if report.changed else "nothing changed")
    if args.json:
        print(json.dumps(report.as_dict()), flush=True)
    if args.foreground:
        env = read_env(layout.env_file)
        argv = host_argv(env)
        say(f"exec {' '.join(argv)}")
        # exec keeps this pid: `status` and `drain` find the worker as if `start` had run it.
        with contextlib.suppress(OSError):
            layout.run_dir.mkdir(parents=True, exist_ok=True)
            write_if_changed(layout.pidfile, f"{os.getpid()}\n", 0o644)
        os.chdir(layout.app_dir if layout.app_dir.is_dir() else "/")
        os.execve(argv[0], argv, worker_environ(env))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    layout = Layout.from_env()
    try:
        if args.command == "configure":
            return run_configure(args, layout)
        service = service_for(layout, want_systemd(args.systemd))
        if args.command == "logs":
            command = service.logs_argv(args.lines, args.follow)
            os.execvp(command[0], command)
        if args.command == "status":
            status = host_status(layout, service)
            if args.json:
                print(json.dumps(status))
            else:
                for key, value in status.items():
                    print(f"{key:>15}: {value}")
            return 0
        if args.command == "wait":
            status = wait_online(layout, service, args.timeout)
            say(f"{status['node']} answers: version {status['worker_version']}, "
                f"{status['concurrency']} processes")
            return 0
        getattr(service, args.command)()
        say(f"{args.command}: done ({service.name})")
        return 0
    except BootError as exc:
        say(str(exc))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
