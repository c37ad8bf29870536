"""`fleet results JOB`: the stored results of a submitted job, from any machine."""

from __future__ import annotations

import json
import sys

import click

from scripts.cli.common import fail, fleet_options, fleet_settings, open_fleet_store, store_errors


@click.command()
@click.argument("job")
@fleet_options
@click.option(
    "--out", type=click.Path(dir_okay=False), help="Write them to FILE (default: stdout)."
)
@click.option(
    "--reduced", is_flag=True, help="Print the job's reduced value (--reduce) as JSON instead."
)
def results(job, broker, backend, stack, queue, out, reduced):
    """Stream the JSON lines of JOB written so far, in batch order: from the result store,
    or from its S3 sink's parts. A running job gives what is written now."""
    from app.launcher.jobs import ENDED, known, write_results
    from app.launcher.jobs import results as job_results

    settings = fleet_settings(broker, backend, stack, queue)
    store = open_fleet_store(settings)
    with store_errors(settings, store):
        v = known(store, settings, job)
        if reduced:
            if v.state not in ("ok", "errors"):
                fail(f"job {job} is {v.state}: its reduced value comes when it ends.", 2)
            meta = store.get_meta(job) or {}
            if "reduce" not in meta:
                fail(f"job {job} has no reducer (give one with --reduce).", 2)
            click.echo(json.dumps(v.reduced))
            return
        try:
            target = open(out, "wb") if out else sys.stdout.buffer  # noqa: SIM115
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror}.", 2)
        try:
            lines = write_results(job_results(store, settings, job), target)
        finally:
            if out:
                target.close()
    more = "" if v.state in ENDED else f" (job {v.state}: more to come)"
    click.echo(f"job {job}: {lines:,} results{more}", err=True)
