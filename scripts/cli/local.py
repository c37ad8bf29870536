"""`fleet local`: a fleet on this machine until Ctrl-C."""

from __future__ import annotations

import shlex
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from scripts.cli.common import fail

if TYPE_CHECKING:
    from scripts.local.autoscaler import Autoscaler
    from scripts.local.fleet import LocalFleet


@click.command()
@click.option(
    "--instances",
    "-n",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker instances, each pinned to its share of this machine's CPUs.",
)
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["redis", "rabbitmq"]),
    default="redis",
    show_default=True,
)
@click.option(
    "--include",
    multiple=True,
    metavar="MODULE",
    help="Extra module with tasks for the workers to load (repeatable).",
)
@click.option(
    "--code",
    multiple=True,
    metavar="PROJECT",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A project directory whose tasks the workers run (repeatable): packaged with this "
    "kit as `fleet package` does and installed for the workers, as on EC2.",
)
@click.option("--queue", default="fleet", show_default=True)
@click.option(
    "--env",
    "print_env",
    is_flag=True,
    help="Print `export` lines for the running local fleet and exit.",
)
@click.option(
    "--autoscale",
    is_flag=True,
    help="Start and drain instances on the queue depth (app/autoscale.py), between "
    "--min-instances and --max-instances; --instances is then not used.",
)
@click.option(
    "--max-instances",
    type=click.IntRange(min=1),
    help="With --autoscale: the most instances (default: one per usable CPU).",
)
@click.option(
    "--min-instances",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="With --autoscale: instances kept with no work.",
)
@click.option(
    "--flower",
    is_flag=True,
    help="Also start Flower (Celery's web monitor) on a free loopback port.",
)
@click.option(
    "--tls",
    is_flag=True,
    help="Broker and result store speak TLS only (rediss://, amqps://), with a "
    "certificate from a throwaway CA (FLEET_TLS_CA_FILE), as on AWS.",
)
def local(
    instances,
    broker_kind,
    include,
    code,
    queue,
    print_env,
    autoscale,
    max_instances,
    min_instances,
    flower,
    tls,
):
    """Run a fleet on this machine until Ctrl-C.

    `fleet run` in another terminal finds it without flags; any Celery client
    can use it after `eval "$(fleet local --env)"`.
    """
    from app.launcher.discovery import read_local_state
    from scripts.local.fleet import LocalFleet
    from scripts.local.processes import LocalFleetError, stop_process

    if print_env:
        print_exports(read_local_state())
        return
    if read_local_state() is not None:
        fail("a local fleet is already running (see `fleet local --env`).", 1)
    fleet = LocalFleet(
        0 if autoscale else instances,
        broker_kind,
        tuple(include),
        queue,
        write_state=True,
        tls=tls,
        code=code,
        say=lambda message: say(f"  {message}..."),
    )
    flower_proc = None
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    try:
        say("starting the local fleet...")
        fleet.start()
        say(fleet.describe())
        scaler = start_autoscaler(fleet, min_instances, max_instances) if autoscale else None
        if flower:
            from scripts.local.flower import start_flower

            flower_proc, url = start_flower(fleet.settings, fleet.workdir)
            say(f"  flower: {url}")
        say(
            "run a job from another terminal, e.g.\n"
            "  fleet run process_id --ids range:0:100000 --out results.jsonl\n"
            'plain Celery clients: eval "$(fleet local --env)"\n'
            "Ctrl-C stops everything."
        )
        while not stopping:
            for index in fleet.supervise():
                say(f"instance{index} died; restarted it")
            if scaler is not None:
                scaler.tick()
            time.sleep(0.5)
    except LocalFleetError as exc:
        fail(str(exc), 1)
    finally:
        say("stopping the local fleet...")
        if flower_proc is not None:
            stop_process(flower_proc, timeout=10)
        fleet.stop()


def say(message: str) -> None:
    click.echo(message, err=True)


def print_exports(state: dict[str, Any] | None) -> None:
    """`export` lines for the running local fleet, for plain Celery clients too."""
    if state is None:
        fail("no local fleet is running; start one with `fleet local`.", 1)
    env = state["env"]
    env = {
        **env,
        "CELERY_BROKER_URL": env["FLEET_BROKER_URL"],
        "CELERY_RESULT_BACKEND": env["FLEET_RESULT_URL"],
    }
    for key, value in env.items():
        click.echo(f"export {key}={shlex.quote(value)}")


def start_autoscaler(
    fleet: LocalFleet, min_instances: int, max_instances: int | None
) -> Autoscaler:
    from app.autoscale import Policy
    from scripts.local.autoscaler import local_autoscaler

    try:
        policy = Policy(min_instances=min_instances, max_instances=max_instances or len(fleet.cpus))
    except ValueError as exc:
        fail(str(exc), 2)
    say(f"  autoscaling between {policy.min_instances} and {policy.max_instances} instances")
    return local_autoscaler(fleet, policy, say=say)
