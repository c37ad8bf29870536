"""`fleet retry JOB`: a new job over exactly the IDs of JOB that have an error record."""

from __future__ import annotations

import json

import click

from scripts.cli.common import fail, fleet_options, fleet_settings, store_errors


@click.command()
@click.argument("job")
@fleet_options
@click.option("--json", "as_json", is_flag=True, help='Print {"job": ID, "ids": N} as JSON.')
def retry(job, broker, backend, stack, queue, as_json):
    """Submit a new job over exactly the IDs of JOB that have an error record, with JOB's
    task, sink and options, and print its ID. Its records replace those errors: in `fleet
    results JOB`, and in a PostgreSQL sink's rows under JOB's key. Other sinks keep the new
    job's records under its own ID."""
    from app.launcher import JobError, Launcher
    from app.launcher.driver import retry as retry_job

    settings = fleet_settings(broker, backend, stack, queue)
    launcher = Launcher(settings)
    try:
        launcher.check_connections()
    except JobError as exc:
        fail(str(exc), exc.exit_code)
    with store_errors(settings, launcher.store):
        new, count = retry_job(launcher, job)
    click.echo(json.dumps({"job": new, "ids": count}) if as_json else new)
    click.echo(f"job {new} retries the {count:,} failed IDs of job {job}", err=True)
