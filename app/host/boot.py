"""Configure and run the Celery worker of one host: the only place that knows how.

    python -m app.boot [configure]     settings -> environment file -> systemd units -> started
    python -m app.boot --foreground    the same files, then run the worker in this process
    python -m app.boot start | restart | drain | wait | status | logs

scripts/fleet-boot.sh installs the wheel into the venv and hands over to this
module; the Ansible role runs `configure`, the `fleet ops` tasks run the other
commands over SSH, and the local fleet (scripts/local/) starts its workers with
`app.host.command.worker_argv`.
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
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.celery_config import task_module_origins
from app.cpus import available_cpus
from app.host import cwagent
from app.host.command import host_argv, worker_environ
from app.host.configure import configure, host_env, load_settings, stack_from_prefix
from app.host.envfile import read_env, write_if_changed
from app.host.imds import Imds
from app.host.imports import check_task_modules
from app.host.paths import HostPaths
from app.host.service import BootError, service_for, want_systemd
from app.host.status import host_status, wait_online
from app.host.units import SERVICE_USER, on_ec2
from app.names import log_group
from app.settings import ConfigError, Settings


def say(message: str) -> None:
    print(f"fleet-boot: {message}", file=sys.stderr, flush=True)


COMMANDS = ("configure", "start", "restart", "drain", "wait", "status", "logs")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.boot", description=__doc__.split("\n")[0])
    manager = argparse.ArgumentParser(add_help=False)
    manager.add_argument(
        "--systemd",
        choices=("auto", "yes", "no"),
        default=os.environ.get("FLEET_SYSTEMD") or "auto",
        help="use systemd units (auto: when systemd is PID 1)",
    )
    sub = parser.add_subparsers(dest="command")

    conf = sub.add_parser(
        "configure",
        parents=[manager],
        help="write the environment file and units; start the worker",
    )
    conf.add_argument("--stack", help="read settings from SSM Parameter Store")
    conf.add_argument(
        "--ssm-prefix",
        default=os.environ.get("FLEET_SSM_PREFIX") or None,
        help="the stack's parameters, /celery-fleet/<stack>/ (FLEET_SSM_PREFIX)",
    )
    conf.add_argument(
        "--settings",
        default=os.environ.get("FLEET_SETTINGS_FILE") or None,
        metavar="FILE",
        help="read settings from a file of FLEET_* lines",
    )
    conf.add_argument("--concurrency", type=int, help="pool size (default: usable CPUs)")
    conf.add_argument("--node", help="the worker's Celery node name (default: celery@HOST)")
    conf.add_argument("--user", default=SERVICE_USER, help="the worker unit's user")
    conf.add_argument(
        "--agent",
        choices=("auto", "yes", "no"),
        default="auto",
        help="install the drain agent unit (auto: on EC2)",
    )
    conf.add_argument(
        "--no-start", action="store_true", help="write files and enable units, start nothing"
    )
    conf.add_argument(
        "--foreground", action="store_true", help="no systemd: run the worker in this process"
    )
    conf.add_argument("--json", action="store_true", help="print the report as JSON")

    for name, text in (
        ("start", "start the worker"),
        ("restart", "warm-stop (finish batches) and start the worker"),
        ("drain", "warm-stop the worker and wait until it has exited"),
    ):
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


def ec2_env(imds: Imds | None, environ: Mapping[str, str]) -> dict[str, str]:
    """On EC2, what the worker needs to publish its metrics: this instance's id, and
    FLEET_METRICS=cloudwatch unless the environment says otherwise. Nothing elsewhere."""
    if imds is None:
        return {}
    try:
        instance_id = imds.instance_id()
    except (OSError, RuntimeError) as exc:
        say(f"no instance metadata ({exc}): the worker publishes no metrics")
        return {}
    return {
        "FLEET_INSTANCE_ID": instance_id,
        "FLEET_METRICS": environ.get("FLEET_METRICS") or "cloudwatch",
    }


def shipped_log_group(settings: Settings, use_systemd: bool, ec2: bool) -> str | None:
    """The log group the CloudWatch agent ships this host's logs to, or None (and why)."""
    if not (use_systemd and ec2):
        return None
    if not cwagent.installed():
        say(f"no CloudWatch agent ({cwagent.CTL}): the logs stay in the journal")
        return None
    if not settings.stack:
        say("no stack (FLEET_STACK): no log group to ship the logs to")
        return None
    return log_group(settings.stack)


def run_configure(args: argparse.Namespace, paths: HostPaths) -> int:
    stack = args.stack
    if not stack and not args.settings and args.ssm_prefix:
        stack = stack_from_prefix(args.ssm_prefix)
    settings, extra, source = load_settings(args.settings, stack, os.environ)
    use_systemd = not args.foreground and want_systemd(args.systemd)
    ec2 = on_ec2()
    agent = {"yes": True, "no": False}.get(args.agent, ec2)
    extra = {**ec2_env(Imds() if ec2 else None, os.environ), **extra}
    logs_to = shipped_log_group(settings, use_systemd, ec2)
    # Every task module must import before a worker starts (ConfigError: the boot fails).
    worker_env = {**os.environ, **host_env(settings, extra, args.concurrency, args.node)}
    check_task_modules(sys.executable, task_module_origins(settings), worker_env)
    report = configure(
        paths,
        settings,
        extra,
        source,
        concurrency=args.concurrency,
        node=args.node,
        use_systemd=use_systemd,
        start=not args.no_start,
        agent=agent,
        foreground=args.foreground,
        user=args.user,
        log_group=logs_to,
    )
    say(
        f"settings from {report.source}; {report.concurrency} worker processes "
        f"({available_cpus()} usable CPUs); node {report.node}"
    )
    for path in report.files:
        say(f"wrote {path}")
    for action in report.actions:
        say(action)
    say(f"systemd: {report.systemd}")
    say("changed" if report.changed else "nothing changed")
    if args.json:
        print(json.dumps(report.as_dict()), flush=True)
    if args.foreground:
        env = read_env(paths.env_file)
        argv = host_argv(env)
        say(f"exec {' '.join(argv)}")
        # exec keeps this pid: `status` and `drain` find the worker as if `start` had run it.
        with contextlib.suppress(OSError):
            paths.run_dir.mkdir(parents=True, exist_ok=True)
            write_if_changed(paths.pidfile, f"{os.getpid()}\n", 0o644)
        os.chdir(paths.app_dir if paths.app_dir.is_dir() else "/")
        os.execve(argv[0], argv, worker_environ(env))
    return 0


def note_failure(exc: BaseException) -> None:
    """Hand why the boot failed to scripts/fleet-boot.sh (its fail_boot tags the instance)."""
    path = os.environ.get("FLEET_BOOT_REASON_FILE")
    if not path:
        return
    reason = exc.message if isinstance(exc, ConfigError) else str(exc) or type(exc).__name__
    with contextlib.suppress(OSError):
        Path(path).write_text(f"app.boot: {' '.join(reason.split())}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    paths = HostPaths.from_env()
    try:
        if args.command == "configure":
            try:
                return run_configure(args, paths)
            except (Exception, ConfigError) as exc:
                note_failure(exc)
                raise
        service = service_for(paths, want_systemd(args.systemd))
        if args.command == "logs":
            command = service.logs_argv(args.lines, args.follow)
            os.execvp(command[0], command)
        if args.command == "status":
            status = host_status(paths, service)
            if args.json:
                print(json.dumps(status))
            else:
                for key, value in status.items():
                    print(f"{key:>15}: {value}")
            return 0
        if args.command == "wait":
            status = wait_online(paths, service, args.timeout)
            say(
                f"{status['node']} answers: version {status['worker_version']}, code "
                f"{status['worker_code'] or 'unpackaged'}, {status['concurrency']} processes"
            )
            return 0
        getattr(service, args.command)()
        say(f"{args.command}: done ({service.name})")
        return 0
    except BootError as exc:
        say(str(exc))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
