"""`fleet run`: run a task over every ID of a source on the fleet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from scripts.cli.common import fail, finish, fleet_options, imports_done


class BatchSize(click.ParamType):
    name = "auto|N"

    def convert(self, value, param, ctx):
        if value in (None, "auto") or isinstance(value, int):
            return None if value == "auto" else value
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a whole number", param, ctx)
        if n < 1:
            self.fail("must be at least 1", param, ctx)
        return n


def job_options(command):
    """The options `fleet run` and `fleet submit` share: what to run, over which IDs, where
    the results go, and which fleet."""
    for option in reversed(JOB_OPTIONS):
        command = option(command)
    return fleet_options(command)


JOB_OPTIONS = [
    click.argument("task", required=False),
    click.option(
        "--ids",
        "ids",
        metavar="SOURCE",
        help="A file (one ID per line; .csv with --column; .jsonl with --field), "
        "'-' for stdin, s3://BUCKET/KEY, or range:START:STOP.",
    ),
    click.option("--column", help="The ID column of a CSV source (by header name)."),
    click.option("--field", "field_", help="The ID field of a JSON-lines source."),
    click.option(
        "--format",
        "fmt",
        type=click.Choice(["text", "csv", "jsonl"]),
        help="Input format when the file name does not say (e.g. for stdin).",
    ),
    click.option(
        "--batch-size",
        type=BatchSize(),
        default="auto",
        show_default=True,
        help="IDs per batch; auto calibrates on the first IDs.",
    ),
    click.option(
        "--target-seconds",
        type=click.FloatRange(min=0.01),
        default=2.0,
        show_default=True,
        help="With --batch-size auto: aimed-at run time of one batch.",
    ),
    click.option(
        "--max-in-flight",
        type=click.IntRange(min=1),
        help="Batches on the broker at once (default: twice the worker slots).",
    ),
    click.option(
        "--sink",
        metavar="MODULE:FUNCTION",
        help="Your own writer, called on the workers with each batch's records and its key "
        "(must be idempotent per key); instead of --out.",
    ),
    click.option(
        "--max-writers",
        type=click.IntRange(min=1),
        help="With --out postgresql://: connections to the database across the whole fleet "
        "(default 4).",
    ),
    click.option(
        "--reduce",
        "reduce_",
        metavar="MODULE:FUNCTION",
        help="An associative f(a, b) of a task module: each batch's results are folded on "
        "its worker, the partials when the job ends; the value is in the summary.",
    ),
    click.option(
        "--require-version",
        is_flag=True,
        help="Refuse to start (exit code 4) while the workers online run more than one "
        "version of the code, or another than was deployed; without it that is a warning.",
    ),
]


def job_request(
    task, ids, column, field_, fmt, out, sink, max_writers, broker, backend, stack, queue
):
    """(source, sink spec, settings) of the shared options, or the one-line failure (exit 2)."""
    from app.launcher import InputError, Source
    from app.launcher.discovery import resolve_settings
    from app.sinks import BadSink, sink_spec

    try:
        source = Source.parse(ids, fmt, column, field_) if ids else None
    except InputError as exc:
        fail(str(exc), 2)
    if stack and (broker or backend):
        fail("give either --stack or --broker/--backend, not both.", 2)
    try:
        spec = sink_spec(out, sink, max_writers)
    except BadSink as exc:
        fail(str(exc), 2)
    return source, spec, resolve_settings(broker, backend, stack, queue=queue)


@click.command()
@job_options
@click.option(
    "--out",
    metavar="FILE|URL",
    help="Where the results go: a file of JSON lines (default: stdout), or a sink the "
    "workers write: s3://BUCKET/PREFIX/ (a part per batch) or "
    "postgresql://USER@HOST/DB?table=NAME (a row per ID).",
)
@click.option(
    "--resume", metavar="JOB", help="Finish an earlier job: re-send only what is missing."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the summary as JSON (on stdout with --out, else on stderr).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
def run(
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
    resume,
    broker,
    backend,
    stack,
    queue,
    as_json,
    progress,
    require_version,
):
    """Run TASK over every ID of --ids on the fleet.

    TASK is a function registered with @fleet_task, or module:function from a
    module the workers load (FLEET_INCLUDE / fleet local --include).
    """
    from app.launcher import JobError, JobOptions, Launcher

    imports_done()
    if not resume and not (task and ids):
        fail("give a TASK and --ids SOURCE (or --resume JOB). See `fleet run --help`.", 2)
    source, spec, settings = job_request(
        task, ids, column, field_, fmt, out, sink, max_writers, broker, backend, stack, queue
    )
    if resume and spec:
        fail("a resumed job writes where it wrote: give --resume JOB without a sink.", 2)
    opts = JobOptions(
        task=task,
        source=source,
        batch_size=batch_size,
        target_seconds=target_seconds,
        max_in_flight=max_in_flight,
        out=None if spec or out is None else Path(out),
        sink=spec,
        resume=resume,
        progress=sys.stderr.isatty() if progress is None else progress,
        require_version=require_version,
        reduce=reduce_,
    )
    try:
        summary = Launcher(settings).run(opts)
    except JobError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; batches already committed are kept for --resume.", 130)
    report = summary.as_dict()
    if as_json:
        click.echo(json.dumps(report), err=out is None)
    click.echo(
        f"job {summary.job}: {summary.status}, {summary.items:,} items, {summary.errors:,} "
        f"errors, {summary.wall_seconds:.2f} s, {summary.items_per_second:,.0f} items/s"
        + (f", {summary.resent} batches re-sent" if summary.resent else "")
        + (f", reduced: {json.dumps(summary.reduced)}" if opts.reduce else "")
        + (
            f"; resume with: fleet run --resume {summary.job}"
            if summary.status == "interrupted"
            else ""
        ),
        err=True,
    )
    finish({"ok": 0, "errors": 1, "interrupted": 130}[summary.status])
