"""`fleet ops`: deploy, restart, drain, logs and status of a fleet's hosts over SSH.

`deploy` rolls out a wheelhouse from `fleet package` (app/wheelhouse.py). The
tasks are in scripts/ops/tasks.py, the hosts in scripts/ops/hosts.py; this
module only assembles them into commands.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from app.launcher.versions import UNPACKAGED
from scripts.cli.common import fail
from scripts.ops import tasks
from scripts.ops.hosts import SSM_PROXY, Host, Hosts, discover, instance_connect_pusher
from scripts.ops.rolling import Outcome, Prefixed, everywhere, label, rolling

if TYPE_CHECKING:
    from fabric import Connection

    from app.wheelhouse import Wheelhouse


def host_options(fn):
    for decorator in reversed(
        [
            click.option(
                "--stack",
                metavar="NAME",
                help="The stack's in-service instances (autoscaling group by tag).",
            ),
            click.option("--hosts", metavar="H1,H2", help="Hosts instead: [user@]host[:port],..."),
            click.option("--region", help="AWS region (default: your AWS configuration)."),
            click.option("--user", default="ec2-user", show_default=True, help="SSH user."),
            click.option("--port", type=int, default=22, show_default=True, help="SSH port."),
            click.option(
                "--key",
                type=click.Path(exists=True, dir_okay=False),
                help="SSH private key (default: your agent and ~/.ssh keys).",
            ),
            click.option(
                "--ssm", is_flag=True, help="Connect through Session Manager (no open port needed)."
            ),
            click.option(
                "--proxy-command",
                metavar="CMD",
                help="Any other ProxyCommand (%h host, %p port, %r user).",
            ),
            click.option(
                "--push-key",
                is_flag=True,
                help="Send --key's public key with EC2 Instance Connect first.",
            ),
        ]
    ):
        fn = decorator(fn)
    return fn


def make_hosts(stack, hosts, region, user, port, key, ssm, proxy_command, push_key) -> Hosts:
    if bool(stack) == bool(hosts):
        raise click.UsageError("give either --stack NAME or --hosts H1,H2.")
    session = None
    if stack:
        import boto3

        session = boto3.session.Session(region_name=region)
        found = discover(stack, session, ssm=ssm)
        if not found:
            raise click.ClickException(f"no in-service instance in stack {stack!r}.")
    else:
        found = [Host(h.strip()) for h in hosts.split(",") if h.strip()]
    proxy = proxy_command or (
        SSM_PROXY + (f" --region {region}" if region else "") if ssm else None
    )
    if push_key and not key:
        raise click.UsageError("--push-key needs --key (its .pub is what is sent).")
    pusher = instance_connect_pusher(key, user, session) if push_key else None
    return Hosts(found, user=user, port=port, key=key, proxy=proxy, push_key=pusher)


def _finish(outcomes: Sequence[Outcome]) -> None:
    if any(o.ok is False for o in outcomes):
        raise SystemExit(1)


@click.group()
def ops() -> None:
    """Deploy, restart, drain, read logs and status of a fleet's hosts over SSH."""


def _load_wheelhouse(path: Path) -> Wheelhouse:
    """The wheelhouse in directory `path`; a usage error (exit 2) if it is not one."""
    from app.wheelhouse import PackageError, read_wheelhouse

    if not path.is_dir():
        fail(
            f"{path} is a file, not a wheelhouse (a directory); "
            "make one with `fleet package PROJECT --out DIR`.",
            2,
        )
    try:
        return read_wheelhouse(path)
    except PackageError as exc:
        fail(str(exc), 2)


@ops.command()
@click.argument("wheelhouse", type=click.Path(exists=True, path_type=Path))
@host_options
@click.option(
    "--at-a-time",
    "-n",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Hosts deployed to at once.",
)
@click.option(
    "--timeout",
    type=float,
    default=300,
    show_default=True,
    help="Seconds a new worker may take to answer.",
)
def deploy(wheelhouse, at_a_time, timeout, **how):
    """Roll WHEELHOUSE out: per host drain, install, start, wait; stop at the first failure.

    WHEELHOUSE is the directory `fleet package PROJECT --out DIR` wrote.
    """
    from app.wheelhouse import summary

    house = _load_wheelhouse(wheelhouse)
    hosts = make_hosts(**how)
    say = lambda m: click.echo(m, err=True)  # noqa: E731
    say(f"rolling out {summary(house)[0]}")

    def deploy_one(c: Connection, house: Wheelhouse, timeout: float) -> dict[str, Any]:
        return tasks.deploy(c, house, timeout, step=lambda s: say(f"{label(c)}: {s}"))

    try:
        outcomes = rolling(hosts, deploy_one, house, timeout, at_a_time=at_a_time, say=say)
    finally:
        hosts.close()
    done = [o for o in outcomes if o.ok]
    say(f"deployed wheelhouse {house.version} to {len(done)} of {len(outcomes)} host(s)")
    _finish(outcomes)


@ops.command()
@host_options
@click.option("--at-a-time", "-n", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--timeout", type=float, default=300, show_default=True)
def restart(at_a_time, timeout, **how):
    """Rolling warm restart: each worker finishes its batches, restarts and answers."""
    hosts = make_hosts(**how)
    try:
        outcomes = rolling(
            hosts,
            tasks.restart,
            timeout,
            at_a_time=at_a_time,
            say=lambda m: click.echo(m, err=True),
        )
    finally:
        hosts.close()
    _finish(outcomes)


@ops.command()
@host_options
def drain(**how):
    """Warm-stop every worker (running batches finish; nothing new is taken)."""
    hosts = make_hosts(**how)
    try:
        outcomes = everywhere(hosts, tasks.drain, say=lambda m: click.echo(m, err=True))
    finally:
        hosts.close()
    _finish(outcomes)


@ops.command()
@host_options
@click.option("--lines", "-n", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until Ctrl-C.")
def logs(lines, follow, **how):
    """The workers' logs, each line prefixed with its host."""
    hosts = make_hosts(**how)

    def tail(c: Connection) -> None:
        stream = Prefixed(label(c))
        tasks.logs(c, lines, follow, out_stream=stream)
        stream.flush()

    try:
        outcomes = everywhere(hosts, tail)
    finally:
        hosts.close()
    for o in outcomes:
        if o.ok is False:
            click.echo(f"{o.host} | error: {o.error}", err=True)
    _finish(outcomes)


@ops.command()
@host_options
@click.option("--json", "as_json", is_flag=True)
def status(as_json, **how):
    """Per host: cores, concurrency, batches running and held, the kit's version, and the
    code version (the wheelhouse's) installed and the one the running worker reports."""
    hosts = make_hosts(**how)
    try:
        outcomes = everywhere(hosts, tasks.status)
    finally:
        hosts.close()
    rows = [
        dict(o.result, address=o.host) if o.ok else {"address": o.host, "error": o.error}
        for o in outcomes
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(
            f"{'host':<24} {'cores':>5} {'conc':>4} {'running':>7} {'held':>4} "
            f"{'version':<10} {'code':<16} {'worker code':<16} {'worker':<8}"
        )
        for r in rows:
            if "error" in r and r.get("cores") is None:
                click.echo(f"{r['address']:<24} error: {r['error']}")
                continue
            state = "online" if r["online"] else ("up" if r["running"] else "stopped")
            # A host on an older kit reports no code at all.
            code = r.get("code") or UNPACKAGED
            worker_code = (r.get("worker_code") or UNPACKAGED) if r["online"] else "-"
            click.echo(
                f"{r['address']:<24} {r['cores']:>5} {r['concurrency']:>4} "
                f"{r['active'] if r['active'] is not None else '-':>7} "
                f"{r['reserved'] if r['reserved'] is not None else '-':>4} "
                f"{r['version']:<10} {code:<16} {worker_code:<16} {state:<8}"
            )
    _finish(outcomes)
