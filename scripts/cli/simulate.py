"""`fleet simulate`: a job on an autoscaled fleet against a static fleet and the ideal bound,
or (--largest-busy-fleet) the most slots the control plane keeps busy."""

from __future__ import annotations

import json
from pathlib import Path

import click

from scripts.cli.common import fail
from scripts.simulate import BUSY, WORK_PER_SLOT, Scenario, busy_line, largest_busy_fleet

DEFAULTS = Scenario()


@click.command()
@click.option("--items", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@click.option(
    "--seconds-per-item",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
)
@click.option(
    "--cores",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Worker slots per instance.",
)
@click.option(
    "--boot",
    "boot_seconds",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds from launch to a consuming worker.",
)
@click.option(
    "--spot-rate",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="Spot interruptions per instance-hour.",
)
@click.option(
    "--no-agent",
    is_flag=True,
    help="Spot without the drain agent: batches come back when their lease lapses.",
)
@click.option(
    "--broker-depth-only",
    is_flag=True,
    help="The policy sees only the broker's queue, not the batches launchers hold back.",
)
@click.option(
    "--price",
    type=click.FloatRange(min=0),
    default=0.714,
    show_default=True,
    help="Price per instance-hour (the default is only an example).",
)
@click.option("--max-instances", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--min-instances", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--backlog-per-slot",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="The policy's target.",
)
@click.option("--scale-out-cooldown", type=click.FloatRange(min=0), default=5.0, show_default=True)
@click.option("--scale-in-delay", type=click.FloatRange(min=0), default=10.0, show_default=True)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between policy decisions.",
)
@click.option(
    "--driver-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULTS.driver_rate,
    show_default=True,
    help="Batches a second one launcher sends and collects (inf: no limit).",
)
@click.option(
    "--store-latency",
    type=click.FloatRange(min=0),
    default=DEFAULTS.store_latency,
    show_default=True,
    help="Seconds per result-store round trip (each batch's commit).",
)
@click.option(
    "--broker-latency",
    type=click.FloatRange(min=0),
    default=DEFAULTS.broker_latency,
    show_default=True,
    help="Seconds per broker handoff, before a slot starts a batch.",
)
@click.option(
    "--largest-busy-fleet",
    "busy_fleet",
    is_flag=True,
    help=f"Print the most slots one job keeps {BUSY:.0%} busy: a static fleet, up when the job "
    f"starts, {WORK_PER_SLOT / 60:g} min of work per slot (instead of the comparison).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--plot",
    "png",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a PNG of queue depth and instance count over time.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def simulate(
    items,
    seconds_per_item,
    cores,
    boot_seconds,
    spot_rate,
    no_agent,
    broker_depth_only,
    price,
    max_instances,
    min_instances,
    backlog_per_slot,
    scale_out_cooldown,
    scale_in_delay,
    interval,
    driver_rate,
    store_latency,
    broker_latency,
    busy_fleet,
    seed,
    png,
    as_json,
):
    """Simulate a job on an autoscaled fleet against a static fleet and the ideal bound."""
    from app.autoscale import Policy
    from scripts.simulate import run as run_simulation

    try:
        policy = Policy(
            min_instances, max_instances, backlog_per_slot, scale_out_cooldown, scale_in_delay
        )
    except ValueError as exc:
        fail(str(exc), 2)
    scenario = Scenario(
        items=items,
        seconds_per_item=seconds_per_item,
        cores=cores,
        boot_seconds=boot_seconds,
        spot_rate=spot_rate,
        price=price,
        agent=not no_agent,
        held_visible=not broker_depth_only,
        interval=interval,
        seed=seed,
        driver_rate=driver_rate,
        store_latency=store_latency,
        broker_latency=broker_latency,
    )
    if busy_fleet:
        slots = largest_busy_fleet(scenario)
        if as_json:
            limits = ("driver_rate", "store_latency", "broker_latency", "seconds_per_item")
            answer = {"largest_busy_fleet": slots, "utilization": BUSY}
            answer |= {name: getattr(scenario, name) for name in limits}
            click.echo(json.dumps({**answer, "work_per_slot": WORK_PER_SLOT}))
        else:
            click.echo(busy_line(scenario, slots, WORK_PER_SLOT, BUSY))
        return
    text, results = run_simulation(scenario, policy, png)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "fleet": r.name,
                        "makespan_seconds": round(r.makespan, 2),
                        "instance_hours": round(r.instance_hours, 4),
                        "cost": round(r.cost, 4),
                        "peak_instances": r.peak_instances,
                        "interruptions": r.interruptions,
                        "batches_rerun": r.resent,
                    }
                    for r in results
                ]
            )
        )
    else:
        click.echo(text)
    if png:
        click.echo(f"plot written to {png}", err=True)
