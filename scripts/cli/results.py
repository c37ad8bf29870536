"""`fleet results JOB`: the stored results of a submitted job, from any machine."""

from __future__ import annotations

import sys

import click

from scripts.cli.common import fail, fleet_options, fleet_settings, open_fleet_store, store_errors


@click.command()
@click.argument("job")
@fleet_options
@click.option(
    "--out", type=click.Path(dir_okay=False), help="Write them to FILE (default: stdout)."
)
def results(job, broker, backend, stack, queue, out):
    """Stream the JSON lines of JOB written so far, in batch order: from the result store,
    or from its S3 sink's parts. A running job gives what is written now."""
    from app.launcher.jobs import known, write_results
    from app.launcher.jobs import results as job_results

    settings = fleet_settings(broker, backend, stack, queue)
    store = open_fleet_store(settings)
    with store_errors(settings, store):
        v = known(store, settings, job)
        try:
            target = open(out, "wb") if out else sys.stdout.buffer  # noqa: SIM115
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror}.", 2)
        try:
            lines = write_results(job_results(store, settings, job), target)
        finally:
            if out:
                target.close()
    more = (
        ""
        if v.state in ("ok", "errors", "cancelled", "failed")
        else f" (job {v.state}: more to come)"
    )
    click.echo(f"job {job}: {lines:,} results{more}", err=True)
