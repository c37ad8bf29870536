"""`fleet ops`: the ops tasks (scripts/ops_tasks.py) across a fleet's hosts, over SSH.

Hosts come from the stack's autoscaling group (by its `celery-fleet:stack`
tag; boto3) or from --hosts. The instances have no open port and no public
address: with --ssm each SSH connection goes through Session Manager, as the
ProxyCommand

    aws ssm start-session --target %h --document-name AWS-StartSSHSession \
        --parameters portNumber=%p

with the instance id as the host. The instances have no key pair either:
--push-key sends your public key with EC2 Instance Connect just before each
connection (it is honoured for 60 s). This module only assembles: discovery,
connections, the rolling order and the output; the work is in ops_tasks.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from scripts import ops_tasks

if TYPE_CHECKING:
    from fabric import Connection

SSM_PROXY = ("aws ssm start-session --target %h --document-name AWS-StartSSHSession "
             "--parameters portNumber=%p")


@dataclass(frozen=True)
class Host:
    address: str  # what SSH connects to: an IP, a name, or (through SSM) an instance id
    instance_id: str | None = None
    zone: str | None = None


def discover(stack: str, session: Any = None, ssm: bool = False) -> list[Host]:
    """The stack's in-service instances: by instance id (for SSM) or private address."""
    from scripts.status import stack_instances

    hosts = []
    for i in stack_instances(stack, session):
        if i["state"] != "InService":
            continue
        address = i["id"] if ssm else i["private_ip"]
        if address:
            hosts.append(Host(address, i["id"], i["zone"]))
    return hosts


def expand_proxy(template: str, host: str, port: int, user: str) -> str:
    """ssh_config's %h, %p, %r and %% in a ProxyCommand."""
    out, chars = [], iter(template)
    for c in chars:
        if c != "%":
            out.append(c)
            continue
        token = next(chars, "")
        out.append({"h": host, "p": str(port), "r": user, "%": "%"}.get(token, "%" + token))
    return "".join(out)


@dataclass
class Fleet:
    """How to reach the hosts."""

    hosts: list[Host]
    user: str = "ec2-user"
    port: int = 22
    key: str | None = None
    proxy: str | None = None  # ProxyCommand template
    push_key: Callable[[Host], None] | None = None
    connect_timeout: float = 30
    _connections: dict[str, Connection] = field(default_factory=dict)

    def connection(self, host: Host) -> Connection:
        from fabric import Connection  # an import the rest of `fleet` need not pay

        if host.address not in self._connections:
            user, _, hostport = host.address.rpartition("@")
            user = user or self.user
            address, _, port = hostport.partition(":")
            port_number = int(port) if port else self.port
            connect: dict[str, Any] = {"timeout": self.connect_timeout}
            if self.key:
                connect.update(key_filename=self.key, look_for_keys=False, allow_agent=False)
            gateway = expand_proxy(self.proxy, address, port_number, user) \
                if self.proxy else None
            # ~/.ssh/config still applies (a Host i-* ProxyCommand, say); what is given here wins.
            self._connections[host.address] = Connection(
                address, user=user, port=port_number, connect_kwargs=connect, gateway=gateway)
        return self._connections[host.address]

    def close(self) -> None:
        for c in self._connections.values():
            c.close()

    def on(self, host: Host, task: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.push_key is not None:
            self.push_key(host)
        return task(self.connection(host), *args, **kwargs)


@dataclass
class Outcome:
    host: str
    ok: bool | None  # None: not run (an earlier failure stopped the roll)
    result: Any = None
    error: str = ""
    started: float | None = None
    finished: float | None = None


def rolling(fleet: Fleet, task: Callable[..., Any], *args: Any, at_a_time: int = 1,
            say: Callable[[str], None] = lambda _: None, **kwargs: Any) -> list[Outcome]:
    """Run `task` on `at_a_time` hosts at once, group after group; stop after a failing group."""
    outcomes = [Outcome(h.address, None) for h in fleet.hosts]

    def one(index: int) -> None:
        outcome, host = outcomes[index], fleet.hosts[index]
        outcome.started = time.time()
        try:
            outcome.result = fleet.on(host, task, *args, **kwargs)
            outcome.ok = True
        except Exception as exc:  # noqa: BLE001 - reported per host; the roll stops
            outcome.ok, outcome.error = False, _describe(exc)
        outcome.finished = time.time()
        say(f"{host.address}: {'ok' if outcome.ok else 'FAILED: ' + outcome.error}")

    for first in range(0, len(fleet.hosts), at_a_time):
        group = range(first, min(first + at_a_time, len(fleet.hosts)))
        with ThreadPoolExecutor(len(group)) as pool:
            list(pool.map(one, group))
        if any(outcomes[i].ok is False for i in group):
            left = len(fleet.hosts) - group[-1] - 1
            if left:
                say(f"stopping: {left} host(s) not touched")
            break
    return outcomes


def everywhere(fleet: Fleet, task: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Outcome]:
    """Run `task` on every host at once."""
    return rolling(fleet, task, *args, at_a_time=max(1, len(fleet.hosts)), **kwargs)


def _describe(exc: Exception) -> str:
    result = getattr(exc, "result", None)  # invoke's UnexpectedExit carries the command's output
    if result is not None:
        text = [line for line in (result.stderr or result.stdout or "").splitlines()
                if line.strip()]
        # The first line says what failed; the last ones (a log tail) say why.
        shown = text if len(text) <= 5 else [text[0], "...", *text[-3:]]
        return f"exit {result.exited}: " + (" | ".join(shown) if shown else result.command)
    return f"{type(exc).__name__}: {exc}"


def label(c: Connection) -> str:
    """The host as the operator named it: host, or host:port off port 22."""
    return c.original_host if c.port == 22 else f"{c.original_host}:{c.port}"


class Prefixed:
    """A stream that writes whole lines, each prefixed with the host, under one lock."""

    lock = threading.Lock()

    def __init__(self, host: str, out=None) -> None:
        self.host = host
        self.out = out or sys.stdout
        self.partial = ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        if lines:
            with self.lock:
                self.out.write("".join(f"{self.host} | {line}\n" for line in lines))
                self.out.flush()
        return len(text)

    def flush(self) -> None:
        if self.partial:
            self.write("\n")


def instance_connect_pusher(key: str, user: str, session: Any = None) -> Callable[[Host], None]:
    """Send the public key of `key` to an instance with EC2 Instance Connect (valid 60 s)."""
    import boto3

    public = Path(key + ".pub").read_text().strip()
    client = (session or boto3.session.Session()).client("ec2-instance-connect")

    def push(host: Host) -> None:
        if host.instance_id:
            client.send_ssh_public_key(InstanceId=host.instance_id, InstanceOSUser=user,
                                       SSHPublicKey=public)
    return push


# -- command line --------------------------------------------------------------------


def host_options(fn):
    for decorator in reversed([
        click.option("--stack", metavar="NAME",
                     help="The stack's in-service instances (autoscaling group by tag)."),
        click.option("--hosts", metavar="H1,H2", help="Hosts instead: [user@]host[:port],..."),
        click.option("--region", help="AWS region (default: your AWS configuration)."),
        click.option("--user", default="ec2-user", show_default=True, help="SSH user."),
        click.option("--port", type=int, default=22, show_default=True, help="SSH port."),
        click.option("--key", type=click.Path(exists=True, dir_okay=False),
                     help="SSH private key (default: your agent and ~/.ssh keys)."),
        click.option("--ssm", is_flag=True,
                     help="Connect through Session Manager (no open port needed)."),
        click.option("--proxy-command", metavar="CMD",
                     help="Any other ProxyCommand (%h host, %p port, %r user)."),
        click.option("--push-key", is_flag=True,
                     help="Send --key's public key with EC2 Instance Connect first."),
    ]):
        fn = decorator(fn)
    return fn


def make_fleet(stack, hosts, region, user, port, key, ssm, proxy_command, push_key) -> Fleet:
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
    proxy = proxy_command or (SSM_PROXY + (f" --region {region}" if region else "")
                              if ssm else None)
    if push_key and not key:
        raise click.UsageError("--push-key needs --key (its .pub is what is sent).")
    pusher = instance_connect_pusher(key, user, session) if push_key else None
    return Fleet(found, user=user, port=port, key=key, proxy=proxy, push_key=pusher)


def _finish(outcomes: Sequence[Outcome]) -> None:
    if any(o.ok is False for o in outcomes):
        raise SystemExit(1)


@click.group()
def ops() -> None:
    """Deploy, restart, drain, read logs and status of a fleet's hosts over SSH."""


@ops.command()
@click.argument("wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@host_options
@click.option("--at-a-time", "-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Hosts deployed to at once.")
@click.option("--timeout", type=float, default=300, show_default=True,
              help="Seconds a new worker may take to answer.")
def deploy(wheel, at_a_time, timeout, **how):
    """Roll WHEEL out: per host drain, install, start, wait; stop at the first failure."""
    fleet = make_fleet(**how)
    say = lambda m: click.echo(m, err=True)  # noqa: E731

    def deploy_one(c: Connection, wheel: Path, timeout: float) -> dict[str, Any]:
        return ops_tasks.deploy(c, wheel, timeout,
                                step=lambda s: say(f"{label(c)}: {s}"))

    try:
        outcomes = rolling(fleet, deploy_one, wheel, timeout, at_a_time=at_a_time, say=say)
    finally:
        fleet.close()
    done = [o for o in outcomes if o.ok]
    click.echo(f"deployed {wheel.name} to {len(done)} of {len(outcomes)} host(s)", err=True)
    _finish(outcomes)


@ops.command()
@host_options
@click.option("--at-a-time", "-n", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--timeout", type=float, default=300, show_default=True)
def restart(at_a_time, timeout, **how):
    """Rolling warm restart: each worker finishes its batches, restarts and answers."""
    fleet = make_fleet(**how)
    try:
        outcomes = rolling(fleet, ops_tasks.restart, timeout, at_a_time=at_a_time,
                           say=lambda m: click.echo(m, err=True))
    finally:
        fleet.close()
    _finish(outcomes)


@ops.command()
@host_options
def drain(**how):
    """Warm-stop every worker (running batches finish; nothing new is taken)."""
    fleet = make_fleet(**how)
    try:
        outcomes = everywhere(fleet, ops_tasks.drain, say=lambda m: click.echo(m, err=True))
    finally:
        fleet.close()
    _finish(outcomes)


@ops.command()
@host_options
@click.option("--lines", "-n", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until Ctrl-C.")
def logs(lines, follow, **how):
    """The workers' logs, each line prefixed with its host."""
    fleet = make_fleet(**how)

    def tail(c: Connection) -> None:
        stream = Prefixed(label(c))
        ops_tasks.logs(c, lines, follow, out_stream=stream)
        stream.flush()

    try:
        outcomes = everywhere(fleet, tail)
    finally:
        fleet.close()
    for o in outcomes:
        if o.ok is False:
            click.echo(f"{o.host} | error: {o.error}", err=True)
    _finish(outcomes)


@ops.command()
@host_options
@click.option("--json", "as_json", is_flag=True)
def status(as_json, **how):
    """Per host: cores, concurrency, batches running, app version installed and running."""
    fleet = make_fleet(**how)
    try:
        outcomes = everywhere(fleet, ops_tasks.status)
    finally:
        fleet.close()
    rows = [dict(o.result, address=o.host) if o.ok else {"address": o.host, "error": o.error}
            for o in outcomes]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(f"{'host':<24} {'cores':>5} {'conc':>4} {'running':>7} {'held':>4} "
                   f"{'version':<10} {'worker':<8}")
        for r in rows:
            if "error" in r and r.get("cores") is None:
                click.echo(f"{r['address']:<24} error: {r['error']}")
                continue
            state = "online" if r["online"] else ("up" if r["running"] else "stopped")
            click.echo(f"{r['address']:<24} {r['cores']:>5} {r['concurrency']:>4} "
                       f"{r['active'] if r['active'] is not None else '-':>7} "
                       f"{r['reserved'] if r['reserved'] is not None else '-':>4} "
                       f"{r['version']:<10} {state:<8}")
    _finish(outcomes)
