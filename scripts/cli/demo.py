"""`fleet demo`: a local fleet runs the example task over a million IDs, then stops."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click

from scripts.cli.common import fail


def _serial_seconds_per_item(fn, rounds: int = 5, n: int = 4000) -> float:
    """The fastest of a few short serial loops over `fn`: the first calls (cold caches) and
    a busy moment of the machine would make the serial time, and the efficiency, too high."""
    best = float("inf")
    for r in range(rounds):
        t0 = time.perf_counter()
        for i in range(r * n, (r + 1) * n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


@click.command()
@click.option(
    "--ids",
    "n_ids",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="How many IDs to run the example task over.",
)
@click.option(
    "--instances",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    help="Worker instances (default: one per usable CPU).",
)
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["redis", "rabbitmq"]),
    default="redis",
    show_default=True,
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep the results here (default: a temporary file, removed).",
)
def demo(n_ids, instances, broker_kind, out):
    """Start a local fleet, run the example task over --ids IDs, report, tear down."""
    from app import tasks  # noqa: F401 - registers process_id (the launcher does not import it)
    from app.cpus import available_cpus
    from app.launcher import JobError, JobOptions, Launcher, Source
    from app.registry import resolve
    from scripts.local.fleet import LocalFleet
    from scripts.local.processes import LocalFleetError

    task = resolve("process_id", ["app.tasks"])
    per_item = _serial_seconds_per_item(task.fn)
    cpus = available_cpus()
    click.echo(
        f"example task: {per_item * 1e6:.1f} us per ID on one core here; "
        f"{n_ids:,} IDs is {per_item * n_ids:.1f} s of CPU over {cpus} CPUs",
        err=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        target = out or Path(tmp) / "results.jsonl"
        try:
            click.echo("starting a local fleet...", err=True)
            with LocalFleet(instances or cpus, broker_kind) as fleet:
                click.echo(fleet.describe(), err=True)
                summary = Launcher(fleet.settings).run(
                    JobOptions(
                        task="process_id",
                        source=Source.parse(f"range:0:{n_ids}"),
                        out=target,
                        progress=True,
                    )
                )
        except (JobError, LocalFleetError) as exc:
            fail(str(exc), getattr(exc, "exit_code", 1))
        # Timed again after the job: a shared machine's speed drifts, and the
        # fastest serial time seen gives the fairest (lowest) efficiency.
        per_item = min(per_item, _serial_seconds_per_item(task.fn))
        ideal = per_item * n_ids / cpus
        click.echo(
            f"\n{summary.items:,} IDs in {summary.wall_seconds:.2f} s: "
            f"{summary.items_per_second:,.0f} IDs/s, {summary.errors} errors\n"
            f"parallel efficiency {ideal / summary.wall_seconds:.0%} "
            f"(ideal {ideal:.2f} s = serial time / {cpus} CPUs)"
            + (f"\nresults in {target}" if out else ""),
            err=True,
        )
    sys.exit(0 if summary.status == "ok" else 1)
