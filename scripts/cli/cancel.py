"""`fleet cancel JOB`: stop a job; the batches already written stay."""

from __future__ import annotations

import click

from scripts.cli.common import fleet_options, fleet_settings, open_fleet_store, store_errors


@click.command()
@click.argument("job")
@fleet_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the job's running batches to end.",
)
def cancel(job, broker, backend, stack, queue, timeout):
    """Cancel JOB: no new batch is sent, the workers drop its queued batches without running
    them, and this returns once none of its batches runs any more."""
    from app.launcher.jobs import cancel as cancel_job

    settings = fleet_settings(broker, backend, stack, queue)
    store = open_fleet_store(settings)
    with store_errors(settings, store):
        v = cancel_job(store, settings, job, timeout)
    click.echo(f"job {job}: {v.state}, {v.items:,} items written stay", err=True)
