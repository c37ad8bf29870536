"""Ops tasks on one worker host: plain functions of a Fabric `Connection`.

Each runs `python -m app.boot ...` (app/host/boot.py) on the host: the commands the
user-data and the Ansible role use, which drive the systemd unit where systemd
runs and a pidfile elsewhere, so these tasks need not know which. New code, a
wheelhouse from `fleet package` (app/wheelhouse.py), is uploaded and installed
by the host's own boot script (`fleet-boot install DIR`), offline.
scripts/cli/ops.py assembles these into `fleet ops` over many hosts.

Paths are the host's: its defaults, or FLEET_APP_DIR / FLEET_BOOT_SCRIPT in the
login environment, expanded by the host's shell. A user other than root runs
the commands with `sudo -n` (passwordless sudo, as ec2-user has).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # fabric is imported by whoever makes the Connection
    from fabric import Connection
    from invoke.runners import Result

    from app.wheelhouse import Wheelhouse

APP_DIR = '"${FLEET_APP_DIR:-/opt/celery-fleet}"'
PYTHON = '"${FLEET_APP_DIR:-/opt/celery-fleet}/venv/bin/python"'
BOOT_SCRIPT = '"${FLEET_BOOT_SCRIPT:-/usr/local/sbin/fleet-boot}"'


class TextOut(Protocol):
    """Where invoke may write a command's output: a text file, or any object with these two."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


def _sudo(c: Connection) -> str:
    return "" if c.user == "root" else "sudo -n "


def _quote(args: tuple[str, ...]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def boot(c: Connection, *args: str, **run: Any) -> Result:
    """`python -m app.boot ARGS` on the host, from its app directory (no stray app/ shadows it)."""
    run.setdefault("hide", True)
    return c.run(
        f"cd {APP_DIR} && {_sudo(c)}{PYTHON} -m app.boot {_quote(args)}", in_stream=False, **run
    )


def status(c: Connection) -> dict[str, Any]:
    """The host's worker: cores, concurrency, running, active batches; the kit's version and
    the code's (the wheelhouse's), installed and running (`worker_version`, `worker_code`)."""
    return json.loads(boot(c, "status", "--json").stdout)


def drain(c: Connection) -> None:
    """Warm-stop the worker (no new batch; running ones finish) and wait until it has exited."""
    boot(c, "drain")


def start(c: Connection) -> None:
    boot(c, "start")


def restart(c: Connection, timeout: float = 120) -> dict[str, Any]:
    """Warm restart, then wait until the new worker answers; its status."""
    boot(c, "restart")
    return wait(c, timeout)


def wait(c: Connection, timeout: float = 120) -> dict[str, Any]:
    """Wait until the worker's heartbeat is in the result store (fails if it dies first)."""
    boot(c, "wait", "--timeout", str(timeout))
    return status(c)


def logs(
    c: Connection, lines: int = 50, follow: bool = False, out_stream: TextOut | None = None
) -> str:
    """The last `lines` of the worker's log (journald, or its log file); with `follow`, stream."""
    args = ("logs", "--lines", str(lines), *(["--follow"] if follow else []))
    return boot(c, *args, out_stream=out_stream).stdout


def upload(c: Connection, wheelhouse: Wheelhouse) -> str:
    """Copy every file of `wheelhouse` into a new temporary directory on the host; its path."""
    remote = c.run("mktemp -d", hide=True, in_stream=False).stdout.strip()
    for path in wheelhouse.files:
        c.put(str(path), f"{remote}/{path.name}")
    return remote


def install(c: Connection, remote: str) -> str:
    """Install the wheelhouse uploaded to `remote` into the host's venv (the boot script's
    install); the line the boot script logs of it."""
    result = c.run(
        f"{_sudo(c)}{BOOT_SCRIPT} install {shlex.quote(remote)}", hide=True, in_stream=False
    )
    # Its last lines may be about the CloudWatch agent, installed after the code.
    said = [line for line in result.stderr.splitlines() if "wheelhouse" in line]
    return said[-1].strip() if said else ""


def deploy(
    c: Connection,
    wheelhouse: Wheelhouse,
    timeout: float = 120,
    step: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Upload `wheelhouse`, then drain, install, start, and wait until the new worker
    answers; its status. The upload comes first, while the old worker still works: the
    host is out of service only for the install and the start.

    `step` is told each stage as it begins ("upload", "drain", "install", "start",
    "wait") and "done" at the end, for a caller that logs or times them.
    """
    step("upload")
    remote = upload(c, wheelhouse)
    try:
        step("drain")
        drain(c)
        step("install")
        install(c, remote)
        step("start")
        start(c)
    finally:
        c.run(f"rm -rf {shlex.quote(remote)}", hide=True, warn=True, in_stream=False)
    step("wait")
    answer = wait(c, timeout)
    step("done")
    return answer
