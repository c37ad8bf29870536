"""`fleet submit`: hand a job to the fleet, which drives it; prints the job's ID at once."""

from __future__ import annotations

import json

import click

from scripts.cli.common import fail
from scripts.cli.run import job_options, job_request


@click.command()
@job_options
@click.option(
    "--out",
    metavar="URL",
    help="A sink the workers write: s3://BUCKET/PREFIX/ (a part per batch) or "
    "postgresql://USER@HOST/DB?table=NAME (a row per ID). Default: the results stay in "
    "the result store, for `fleet results JOB`.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"job": ID} as JSON.')
def submit(
    task,
    ids,
    column,
    field_,
    fmt,
    batch_size,
    target_seconds,
    max_in_flight,
    out,
    sink,
    max_writers,
    reduce_,
    broker,
    backend,
    stack,
    queue,
    require_version,
    as_json,
):
    """Submit TASK over every ID of --ids to the fleet, and print the job's ID.

    The job's driver runs on the workers: this machine may go away. A local ID file
    (or stdin) is uploaded to the result store first. Follow the job with `fleet jobs`,
    `fleet watch JOB` or `fleet wait JOB`; fetch it with `fleet results JOB`.
    """
    from app.launcher import JobError, JobOptions, Launcher
    from app.launcher.driver import submit as submit_job

    if not (task and ids):
        fail("give a TASK and --ids SOURCE. See `fleet submit --help`.", 2)
    if out and "://" not in out:
        fail(
            f"--out {out}: a submitted job's results stay in the fleet: give s3://BUCKET/PREFIX/, "
            "postgresql://...?table=NAME, or no --out (then `fleet results JOB --out FILE`).",
            2,
        )
    source, spec, settings = job_request(
        task, ids, column, field_, fmt, out, sink, max_writers, broker, backend, stack, queue
    )
    opts = JobOptions(
        task=task,
        source=source,
        batch_size=batch_size,
        target_seconds=target_seconds,
        max_in_flight=max_in_flight,
        sink=spec,
        progress=False,
        require_version=require_version,
        reduce=reduce_,
    )
    try:
        job = submit_job(Launcher(settings), opts)
    except JobError as exc:
        fail(str(exc), exc.exit_code)
    click.echo(json.dumps({"job": job}) if as_json else job)
    click.echo(
        f"submitted job {job}: `fleet watch {job}` follows it, `fleet results {job}` fetches it",
        err=True,
    )
